"""GeoBind: one embedding space for satellite images, ground-level photos, text and audio,
learned by binding every modality to satellite imagery of the same place."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

# pyarrow (loaded by pandas) starts a jemalloc purging thread when it is first imported; a data
# loader worker forked while that thread holds an allocator lock can hang forever. Purging
# inline instead costs nothing measurable. Only effective if pyarrow is not imported yet.
os.environ.setdefault("JE_ARROW_MALLOC_CONF", "background_thread:false")

__version__ = "0.1.0"

__all__ = ["GeoBind", "__version__"]

if TYPE_CHECKING:
    from geobind.model import GeoBind


def __getattr__(name: str):
    # Imported on first use, so `geobind --help` and light submodules do not load torch.
    if name == "GeoBind":
        from geobind.model import GeoBind

        return GeoBind
    if name in ("losses", "metrics"):  # `import geobind; geobind.metrics...` as after an import of it
        import importlib

        return importlib.import_module(f"geobind.{name}")
    raise AttributeError(f"module 'geobind' has no attribute {name!r}")


def __dir__() -> list[str]:
    # The lazily imported names too, so that tab completion offers them.
    return sorted(set(globals()) | set(__all__))
