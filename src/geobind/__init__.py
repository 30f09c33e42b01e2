"""GeoBind: one embedding space for satellite images, ground-level photos, text and audio,
learned by binding every modality to satellite imagery of the same place."""

__version__ = "0.1.0"

from geobind.model import GeoBind  # noqa: E402

__all__ = ["GeoBind", "__version__"]
