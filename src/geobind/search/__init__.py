"""Using a trained space: embed collections, search them by any modality, map a query.

* :func:`embed_dataset` / :func:`read_embeddings`: a dataset's embeddings in Parquet;
* :class:`Index` / :func:`build_index`: exact or FAISS search over them, verified against the
  model that made them;
* :func:`map_raster` / :func:`map_points` and :class:`MapResult`: zero-shot maps as GeoTIFF,
  PNG and CSV;
* :class:`Query` / :func:`embed_query`: combined queries (the renormalised sum of the items'
  unit embeddings).

The same is on the model: ``model.search(...)``, ``model.map(...)``, ``model.embed_query(...)``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Where each public name lives; submodules load on first use, so that importing a light one
# (``geobind.search.common``, the CLI's help) does not load torch and pandas.
_HOME = {
    "Embeddings": "embed", "embed_dataset": "embed", "read_embeddings": "embed", "write_embeddings": "embed",
    "APPROX_THRESHOLD": "common", "Hit": "index", "Index": "index", "build_index": "index",
    "exact_topk": "index", "recall_at_k": "index",
    "MapResult": "maps", "map_points": "maps", "map_raster": "maps", "score_matrix": "maps", "scores": "maps",
    "Query": "query", "embed_query": "query", "sniff_file": "query",
}

if TYPE_CHECKING:
    from geobind.search.common import APPROX_THRESHOLD
    from geobind.search.embed import Embeddings, embed_dataset, read_embeddings, write_embeddings
    from geobind.search.index import Hit, Index, build_index, exact_topk, recall_at_k
    from geobind.search.maps import MapResult, map_points, map_raster, score_matrix, scores
    from geobind.search.query import Query, embed_query, sniff_file


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"geobind.search.{_HOME[name]}"), name)
    raise AttributeError(f"module 'geobind.search' has no attribute {name!r}")


__all__ = [
    "APPROX_THRESHOLD",
    "Embeddings",
    "Hit",
    "Index",
    "MapResult",
    "Query",
    "build_index",
    "embed_dataset",
    "embed_query",
    "exact_topk",
    "map_points",
    "map_raster",
    "read_embeddings",
    "recall_at_k",
    "score_matrix",
    "scores",
    "sniff_file",
    "write_embeddings",
]


def __dir__() -> list[str]:
    # The lazily imported names too, so that tab completion offers them.
    return sorted(set(globals()) | set(__all__))
