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

from geobind.search.embed import Embeddings, embed_dataset, read_embeddings, write_embeddings
from geobind.search.index import APPROX_THRESHOLD, Hit, Index, build_index, exact_topk, recall_at_k
from geobind.search.maps import MapResult, map_points, map_raster, score_matrix, scores
from geobind.search.query import Query, embed_query, sniff_file

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
