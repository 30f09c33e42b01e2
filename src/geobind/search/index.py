"""Search indexes over place embeddings: exact (chunked matrix product) or FAISS (approximate).

An index is a folder (``tiles.index/``):

* ``index.json``: format, kind (``exact``, ``hnsw`` or ``ivfpq``), count, dimension, the model
  identity and modality of the embeddings (verified against the model at search time), the
  approximate search settings and, after ``--check``, the measured recall@10;
* ``items.parquet``: ``id``, ``lat``, ``lon`` and ``caption`` (null where unknown) per item;
* ``vectors.npy``: the unit embeddings ``[N, D]`` (float32 or float16), always kept: exact
  search, re-ranking, maps and the recall check read them;
* ``faiss.index``: the FAISS index (approximate kinds only);
* ``thumbnails.parquet``: ``id`` and a small JPEG per item (image modalities, when built with
  thumbnails), served by id so that no request path ever reaches the filesystem.

Scores are cosine similarities (dot products of unit vectors) for every kind: approximate
search only chooses candidates, which are then re-scored exactly from ``vectors.npy``.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from geobind.search.common import (
    APPROX_THRESHOLD,
    FAISS_HINT,
    FAISS_SERIAL_BUILD,
    FAISS_SERIAL_QUERIES,
    atomic_path,
    check_writable,
    faiss_threads,
    import_faiss,
)
from geobind.search.embed import Embeddings, is_image_modality, read_embeddings

if TYPE_CHECKING:
    import torch  # imported where used: `index info` and `index build` need no torch

FORMAT = "geobind-index"
FORMAT_VERSION = 1
# What an index folder holds: --force replaces a folder of these alone, never one with other files.
INDEX_FILES = frozenset({"index.json", "items.parquet", "vectors.npy", "faiss.index", "thumbnails.parquet"})
KINDS = ("auto", "exact", "hnsw", "ivfpq")
CHUNK_ROWS = 131_072
# Settings tried, cheapest first, when ``check`` tunes an approximate index to a target recall.
TUNE_NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
TUNE_EF = (16, 32, 64, 128, 256, 512, 1024)
# Thumbnails per row group of thumbnails.parquet (a lookup reads one group: about 5 MB of
# 128 px JPEGs), and how many recently read groups a loaded index keeps.
THUMBNAIL_GROUP_ROWS = 1024
THUMBNAIL_GROUPS_KEPT = 16


def exact_topk(
    vectors: np.ndarray | torch.Tensor,
    queries: np.ndarray | torch.Tensor,
    k: int,
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by dot product: ``(scores [Q, k] float32, indices [Q, k] int64)``, best
    first. ``vectors`` is scanned in chunks of ``chunk_rows`` rows (float16 chunks are widened to
    float32), keeping a running top-k, so memory stays ``O(Q * chunk_rows)``; the result equals
    ``torch.topk(queries @ vectors.T, k)`` but for the order among tied scores."""
    import torch

    q = _as_f32_tensor(queries)
    if q.ndim == 1:
        q = q[None]
    n = vectors.shape[0]
    k = min(int(k), n)
    best_s = torch.empty(q.shape[0], 0)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.long)
    for start in range(0, n, chunk_rows):
        block = _as_f32_tensor(vectors[start : start + chunk_rows])
        # [rows, Q] (block @ q.T) rather than [Q, rows]: BLAS then packs the small query matrix,
        # not the chunk, which is 2x faster for a few queries.
        s = block @ q.T
        ts, ti = s.topk(min(k, s.shape[0]), dim=0)
        best_s = torch.cat([best_s, ts.T], dim=1)
        best_i = torch.cat([best_i, ti.T + start], dim=1)
        if best_s.shape[1] > k:
            best_s, pos = best_s.topk(k, dim=1)
            best_i = best_i.gather(1, pos)
    return best_s.numpy(), best_i.numpy()


def _as_f32_tensor(x) -> torch.Tensor:
    import torch

    if isinstance(x, torch.Tensor):
        return x.float()
    x = np.asarray(x)
    with warnings.catch_warnings():
        # Read-only arrays (memory maps) are only ever read here.
        warnings.simplefilter("ignore", UserWarning)
        if x.dtype == np.float16:
            return torch.from_numpy(x).float()
        return torch.from_numpy(x if x.dtype == np.float32 else x.astype(np.float32))


@dataclass
class Hit:
    """One search result."""

    rank: int  # 1 = best
    id: str
    lat: float
    lon: float
    score: float  # cosine similarity to the query
    caption: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The hit as a JSON-serialisable dict of its fields."""
        return {
            "rank": self.rank,
            "id": self.id,
            "lat": self.lat,
            "lon": self.lon,
            "score": self.score,
            "caption": self.caption,
        }


class Index:
    """Place embeddings of one modality, searchable by any query vector of the same space.

    >>> index = Index.load("tiles.index")                       # doctest: +SKIP
    >>> index.verify(model)                                     # same model? else ValueError
    >>> scores, rows = index.search(model.embed("text", "a forest"), k=10)   # doctest: +SKIP
    """

    def __init__(
        self,
        header: dict[str, Any],
        ids: list[str],
        lat: np.ndarray,
        lon: np.ndarray,
        vectors: np.ndarray,
        captions: list[str | None] | None = None,
        *,
        path: Path | None = None,
        faiss_index: Any = None,
        thumbnails: dict[str, bytes] | None = None,
    ):
        self.header = header
        self.ids = ids
        self.lat = np.asarray(lat, dtype=np.float64)
        self.lon = np.asarray(lon, dtype=np.float64)
        self.vectors = vectors
        self.captions = captions
        self.path = path
        self._faiss = faiss_index
        self._thumbnails = thumbnails
        self._thumbnail_file: _ThumbnailFile | None = None
        self._pos: dict[str, int] | None = None
        self._f32: torch.Tensor | None = None

    # -- description -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (f"Index({self.name!r}, kind={self.kind!r}, modality={self.modality!r}, n={len(self)}, "
                f"dim={self.dim})")

    @property
    def kind(self) -> str:
        """The index kind: ``"exact"``, ``"hnsw"`` or ``"ivfpq"``."""
        return self.header["kind"]

    @property
    def dim(self) -> int:
        """The embedding dimension of the indexed vectors."""
        return int(self.header["dim"])

    @property
    def modality(self) -> str:
        """The modality of the indexed embeddings."""
        return self.header["model"]["modality"]

    @property
    def identity(self) -> str:
        """The identity of the model that made the indexed embeddings."""
        return self.header["model"]["identity"]

    @property
    def name(self) -> str:
        """The index's path as a string, or ``"<in-memory index>"`` if it has none."""
        return str(self.path) if self.path else "<in-memory index>"

    def describe(self) -> dict[str, Any]:
        """The header plus the item count: what ``geobind index info`` and health checks show."""
        return {**self.header, "count": len(self), "path": self.name}

    # -- building --------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        embeddings: Embeddings | str | Path,
        kind: str = "auto",
        *,
        thumbnails: bool = True,
        thumbnail_size: int = 128,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        nlist: int | None = None,
        pq_m: int | None = None,
        nprobe: int = 32,
        rerank: int = 8,
        train_size: int | None = None,
        seed: int = 0,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> Index:
        """Build an index from embeddings (an :class:`Embeddings` or a Parquet path).

        ``kind``: ``exact``; ``hnsw`` (FAISS HNSW graph over the float vectors: ``hnsw_m``
        links per node, ``ef_construction``, ``ef_search``); ``ivfpq`` (FAISS inverted lists
        with product quantisation: ``nlist`` lists, ``pq_m`` bytes per vector, ``nprobe`` lists
        scanned, ``rerank`` x k candidates re-scored exactly); ``auto``: ``ivfpq`` from
        :data:`APPROX_THRESHOLD` items when FAISS is installed, else ``exact``.
        Thumbnails (``thumbnail_size`` px JPEGs) are made from the items of image modalities.
        """
        log = log or (lambda *_: None)
        _check_build_options(hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search, nlist=nlist,
                             pq_m=pq_m, nprobe=nprobe, rerank=rerank, thumbnail_size=thumbnail_size)
        if not isinstance(embeddings, Embeddings):
            embeddings = read_embeddings(embeddings)
        emb = embeddings
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(KINDS)}")
        n = len(emb)
        if n == 0:
            raise ValueError("cannot build an index of zero embeddings")
        if kind == "auto":
            kind = "exact"
            if n >= APPROX_THRESHOLD:
                try:
                    import_faiss()
                    kind = "ivfpq"
                except ImportError as e:
                    log(f"warning: {n} items but {e}; building an exact index")
        vectors = np.ascontiguousarray(emb.vectors)
        if vectors.dtype not in (np.float16, np.float32):
            vectors = vectors.astype(np.float32)
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            # A NaN row would rank first for every query (and make JSON output invalid).
            bad = [emb.ids[i] for i in np.flatnonzero(~finite)[:3]]
            raise ValueError(f"{int((~finite).sum())} embedding row(s) are not finite (NaN or infinite), e.g. "
                             f"ids {', '.join(map(repr, bad))}: embed those places again, or drop them")
        header: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "count": n,
            "dim": emb.dim,
            "dtype": str(vectors.dtype),
            "metric": "cosine",
            "model": {**emb.header.get("model", {}), "modality": emb.modality},
            "source": emb.header.get("dataset", {}),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if not header["model"].get("identity"):
            raise ValueError(
                "the embeddings carry no model identity; write them with `geobind embed`"
            )
        faiss_index = None
        if kind in ("hnsw", "ivfpq"):
            faiss = import_faiss()
            x = np.ascontiguousarray(vectors, dtype=np.float32)
            log(
                f"building {'an' if kind[0] in 'aeiou' else 'a'} {kind} index over {n} vectors (a few minutes per million on a laptop CPU)..."
            )
            t0 = time.perf_counter()
            with faiss_threads(faiss, n < FAISS_SERIAL_BUILD):
                if kind == "hnsw":
                    faiss_index, built, search = _build_hnsw(
                        faiss, x, hnsw_m, ef_construction, ef_search
                    )
                else:
                    faiss_index, built, search = _build_ivfpq(
                        faiss, x, nlist, pq_m, nprobe, rerank, train_size, seed
                    )
            header["faiss"], header["search"] = built, search
            header["build_seconds"] = round(time.perf_counter() - t0, 2)
            log(f"built {kind} over {n} vectors in {header['build_seconds']} s")
        thumbs = None
        if thumbnails and emb.thumbnails is not None:
            thumbs = {i: t for i, t in zip(emb.ids, emb.thumbnails) if t}
        elif thumbnails and emb.items is not None and is_image_modality(emb.modality):
            thumbs = make_thumbnails(emb.ids, emb.items, thumbnail_size, progress=progress)
        if thumbs is not None:
            header["thumbnails"] = {"count": len(thumbs), "format": "jpeg"}
        return cls(
            header,
            list(emb.ids),
            emb.lat,
            emb.lon,
            vectors,
            emb.captions,
            faiss_index=faiss_index,
            thumbnails=thumbs,
        )

    # -- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the index folder atomically; an existing one is replaced only with ``force``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(path)
        with atomic_path(path, force=force, own=INDEX_FILES) as tmp:
            tmp.mkdir()
            cols = {
                "id": pa.array(self.ids, pa.string()),
                "lat": pa.array(self.lat),
                "lon": pa.array(self.lon),
            }
            if self.captions is not None:
                cols["caption"] = pa.array(list(self.captions), pa.string())
            pq.write_table(pa.table(cols), tmp / "items.parquet")
            np.save(tmp / "vectors.npy", np.ascontiguousarray(self.vectors))
            # A loaded index reads its FAISS index and thumbnails only when used: saved before
            # that, they are copied from the folder it was loaded from, never left behind.
            source = self.path if self.path is not None and self.path.is_dir() else None
            if self._faiss is not None:
                import_faiss().write_index(self._faiss, str(tmp / "faiss.index"))
            elif source is not None and (source / "faiss.index").is_file():
                shutil.copyfile(source / "faiss.index", tmp / "faiss.index")
            if self._thumbnails:
                ids = list(self._thumbnails)
                pq.write_table(
                    pa.table(
                        {
                            "id": pa.array(ids, pa.string()),
                            "thumbnail": pa.array([self._thumbnails[i] for i in ids], pa.binary()),
                        }
                    ),
                    tmp / "thumbnails.parquet",
                    # Small row groups: a thumbnail is then read with its group alone (thumbnail()).
                    row_group_size=THUMBNAIL_GROUP_ROWS,
                )
            elif self._thumbnails is None and source is not None and (source / "thumbnails.parquet").is_file():
                shutil.copyfile(source / "thumbnails.parquet", tmp / "thumbnails.parquet")
            (tmp / "index.json").write_text(json.dumps(self.header, indent=2) + "\n")
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path, *, mmap: bool = False) -> Index:
        """Read an index folder written by :meth:`save`. ``mmap`` maps the vectors instead of
        reading them (large indexes, low memory); FAISS is imported only when needed."""
        import pyarrow.parquet as pq

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(
                f"index {path} does not exist; build one with `geobind index build`"
            )
        head = path / "index.json"
        if not path.is_dir() or not head.is_file():
            raise ValueError(
                f"{path} is not a GeoBind index (no index.json); build one with `geobind index build`"
            )
        try:
            header = json.loads(head.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"index {path} is damaged: {head.name} does not read ({e}); rebuild it with "
                             "`geobind index build`, or copy it again") from None
        if header.get("format") != FORMAT:
            raise ValueError(f"{path} is not a GeoBind index (format {header.get('format')!r})")
        if header.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} has index format {header['format_version']}; upgrade geobind")
        lost = [n for n in ("items.parquet", "vectors.npy") if not (path / n).is_file()]
        if lost:
            raise ValueError(f"index {path} is damaged: {' and '.join(lost)} missing; rebuild it with "
                             "`geobind index build`, or copy it again")
        try:
            items = pq.read_table(path / "items.parquet")
            vectors = np.load(path / "vectors.npy", mmap_mode="r" if mmap else None)
        except (OSError, ValueError, EOFError) as e:  # a missing or cut-short file
            raise ValueError(f"index {path} is damaged ({e}); rebuild it with `geobind index build`, or "
                             "copy it again") from None
        n = items.num_rows
        if vectors.shape != (n, header["dim"]) or n != header["count"]:
            raise ValueError(
                f"index {path} is inconsistent: {n} items, vectors of shape {vectors.shape}, "
                f"header says {header['count']} x {header['dim']}; rebuild it"
            )
        captions = items.column("caption").to_pylist() if "caption" in items.column_names else None
        return cls(
            header,
            [str(x) for x in items.column("id").to_pylist()],
            items.column("lat").to_numpy(),
            items.column("lon").to_numpy(),
            vectors,
            captions,
            path=path,
        )

    def verify(self, model) -> None:
        """Raise a ``ValueError`` naming the problem unless ``model`` is the model whose encoder
        embedded this index (same dimension and same encoder identity)."""
        if model.dim != self.dim:
            raise ValueError(
                f"index {self.name} holds {self.dim}-d {self.modality} embeddings but the model's space has "
                f"{model.dim} dims: it was built with another model. Rebuild it with this model "
                "(`geobind embed` then `geobind index build`)."
            )
        if self.modality not in model.modalities:
            raise ValueError(
                f"index {self.name} holds {self.modality} embeddings but the model has no {self.modality} "
                "encoder: it was built with another model"
            )
        mine = model.identity(self.modality)
        if mine != self.identity:
            raise ValueError(
                f"index {self.name} was built with another model: its {self.modality} encoder identity is "
                f"{self.identity[:16]}, this model's is {mine[:16]}. Rebuild it with this model "
                "(`geobind embed` then `geobind index build`), or search with the model it was built with."
            )

    # -- search ----------------------------------------------------------------------------
    def vectors_f32(self) -> torch.Tensor:
        """The vectors as one float32 tensor (widened once and kept; for maps over all items)."""
        if self._f32 is None:
            self._f32 = _as_f32_tensor(self.vectors)
        return self._f32

    def search(
        self,
        queries: np.ndarray | torch.Tensor,
        k: int = 10,
        *,
        exact: bool | None = None,
        **settings: Any,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items for each query row: ``(scores [Q, k], rows [Q, k])``, best first.

        Scores are cosine similarities, clamped to [-1, 1] (float16 vectors are not exactly
        unit length). ``exact=None`` uses the FAISS index when there is one; ``exact=True``
        always scans every vector. ``settings`` override the stored approximate search settings
        (``nprobe``, ``ef_search``, ``rerank``). Missing results come back as rows ``-1`` with
        score ``-inf``: with ``ivfpq`` when the ``nprobe`` lists it scans hold fewer than ``k``
        items (exact search finds them all).
        A ``k`` above the index size is taken as the index size (every item, ranked)."""
        q = _as_f32_tensor(queries)
        if q.ndim == 1:
            q = q[None]
        if q.shape[1] != self.dim:
            raise ValueError(f"queries have {q.shape[1]} dims but index {self.name} has {self.dim}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a whole number of 1 or more, not {k!r}")
        k = int(k)
        k = min(k, len(self))  # more would only pad with nothing found
        if exact or self.kind == "exact":
            s, i = exact_topk(self._exact_source(), q, k)
        else:
            s, i = self._approx(q.numpy(), k, {**self.header.get("search", {}), **settings})
        # Rounding (float16 vectors above all) can put a cosine a hair outside [-1, 1].
        s = np.where(np.isfinite(s), np.clip(s, -1.0, 1.0), s).astype(np.float32)
        if s.shape[1] < k:
            pad = k - s.shape[1]
            s = np.concatenate([s, np.full((s.shape[0], pad), -np.inf, np.float32)], axis=1)
            i = np.concatenate([i, np.full((i.shape[0], pad), -1, np.int64)], axis=1)
        return s, i

    def _exact_source(self):
        # Float16 vectors in memory are widened once and kept; float32 ones and memory maps are
        # scanned as they are (exact_topk widens a memory-mapped float16 chunk by chunk).
        if self.vectors.dtype == np.float16 and not isinstance(self.vectors, np.memmap):
            return self.vectors_f32()
        return self.vectors

    def _load_faiss(self):
        if self._faiss is None:
            try:
                faiss = import_faiss()
            except ImportError:
                raise ImportError(
                    f"index {self.name} is {self.kind}: searching it needs FAISS, which is not installed: "
                    f"{FAISS_HINT} (or search it exactly: `geobind search --exact`; or build an exact index: --kind exact)"
                ) from None
            if self.path is None or not (self.path / "faiss.index").is_file():
                raise ValueError(
                    f"index {self.name} is {self.kind} but has no faiss.index file; rebuild it"
                )
            self._faiss = faiss.read_index(str(self.path / "faiss.index"))
        return self._faiss

    def _approx(
        self, q: np.ndarray, k: int, settings: dict[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        index = self._load_faiss()
        faiss = import_faiss()
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(
                efSearch=max(int(settings.get("ef_search", 128)), k)
            )
        else:
            params = faiss.SearchParametersIVF(nprobe=int(settings.get("nprobe", 32)))
        kk = min(len(self), k * max(int(settings.get("rerank", 1)), 1))
        with faiss_threads(faiss, q.shape[0] < FAISS_SERIAL_QUERIES):
            _, cand = index.search(np.ascontiguousarray(q, dtype=np.float32), kk, params=params)
        return self._rescore(q, cand, k)

    def _rescore(self, q: np.ndarray, cand: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact cosine scores of the candidates; the best ``k`` of them, best first."""
        valid = cand >= 0
        safe = np.where(valid, cand, 0)
        vecs = np.asarray(self.vectors[safe.reshape(-1)], dtype=np.float32).reshape(
            *cand.shape, self.dim
        )
        scores = np.einsum("qcd,qd->qc", vecs, q.astype(np.float32))
        scores = np.where(valid, scores, -np.inf).astype(np.float32)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        s = np.take_along_axis(scores, order, axis=1)
        i = np.where(np.isfinite(s), np.take_along_axis(cand, order, axis=1), -1)
        return s, i.astype(np.int64)

    def hits(
        self, query: np.ndarray | torch.Tensor, k: int = 10, *, exact: bool | None = None
    ) -> list[Hit]:
        """The top-``k`` places for one query vector, as :class:`Hit` records (fewer where
        :meth:`search` finds fewer)."""
        s, i = self.search(query, k, exact=exact)
        out = []
        for rank, (score, row) in enumerate(zip(s[0], i[0]), start=1):
            if row < 0:
                break
            out.append(
                Hit(
                    rank,
                    self.ids[row],
                    float(self.lat[row]),
                    float(self.lon[row]),
                    float(score),
                    self.captions[row] if self.captions is not None else None,
                )
            )
        return out

    # -- items -----------------------------------------------------------------------------
    def position(self, item_id: str) -> int:
        """Row of ``item_id``; ``KeyError`` when the index has no such item."""
        if self._pos is None:
            self._pos = {x: i for i, x in enumerate(self.ids)}
        return self._pos[item_id]

    def caption(self, item_id: str) -> str | None:
        """The caption of ``item_id`` where known."""
        return self.captions[self.position(item_id)] if self.captions is not None else None

    @property
    def has_thumbnails(self) -> bool:
        """Whether the index was built with at least one thumbnail."""
        return bool(self.header.get("thumbnails", {}).get("count"))

    def thumbnail(self, item_id: str) -> bytes | None:
        """The JPEG thumbnail of ``item_id`` (bytes), or None when the index has none for it.
        A saved index's thumbnails stay on disk: the ids are read once, and each thumbnail with
        its row group (a few recent groups are kept), so a million places' JPEGs are never all
        in memory. Safe to call from several threads."""
        if self._thumbnails is not None:
            return self._thumbnails.get(item_id)
        f = self._thumbnail_reader()
        return f.get(item_id) if f is not None else None

    def has_thumbnail(self, item_id: str) -> bool:
        """Whether ``item_id`` has a thumbnail, without reading it: a saved index looks the id up
        among its thumbnails' ids (no row group is read). Safe to call from several threads."""
        if self._thumbnails is not None:
            return bool(self._thumbnails.get(item_id))
        f = self._thumbnail_reader()
        return f is not None and item_id in f.row

    def _thumbnail_reader(self) -> _ThumbnailFile | None:
        if self._thumbnail_file is None:
            f = self.path / "thumbnails.parquet" if self.path else None
            if f is None or not f.is_file():
                self._thumbnails = {}
                return None
            self._thumbnail_file = _ThumbnailFile(f)
        return self._thumbnail_file

    # -- quality ---------------------------------------------------------------------------
    def check(
        self,
        *,
        n_queries: int = 1000,
        k: int = 10,
        target_recall: float | None = 0.95,
        tune: bool = True,
        seed: int = 0,
        log: Callable[[str], None] | None = None,
    ) -> dict[str, Any]:
        """Recall@``k`` of the approximate search against exact search, and both speeds.

        Queries are midpoints of random pairs of stored vectors (renormalised): places "between"
        two real places, never a stored vector itself. With ``target_recall`` and ``tune`` the
        search setting (``nprobe``, up to ``nlist``, or ``ef_search``) is raised step by step
        from its smallest value until recall@k reaches the target, and the chosen setting is
        stored in the header (``log`` says so); with ``tune=False`` the stored setting is only
        measured and kept. The result is also stored under ``check``."""
        log = log or (lambda *_: None)
        if self.kind == "exact":
            raise ValueError(
                "the recall check compares an approximate index with exact search; this index is exact"
            )
        rng = np.random.default_rng(seed)
        n = len(self)
        a, b = rng.integers(0, n, n_queries), rng.integers(0, n, n_queries)
        q = np.asarray(self.vectors[a], np.float32) + np.asarray(self.vectors[b], np.float32)
        q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        t0 = time.perf_counter()
        truth_s, truth = exact_topk(self._exact_source(), q, k)
        exact_s = time.perf_counter() - t0
        truth_s = np.clip(truth_s, -1.0, 1.0)  # as search clips the scores it returns
        search = dict(self.header.get("search", {}))
        key = tuned_setting(self.kind)
        nlist = self.header["faiss"].get("nlist")
        tuning = tune and target_recall is not None
        if not tune and target_recall is not None:
            log(f"check: {key}={search[key]} as given, measured and kept (not tuned)")
        if not tuning:
            steps = [search[key]]
        elif nlist is not None:
            # Up to every list: past that, only --rerank or the codes can raise recall.
            steps = [v for v in TUNE_NPROBE if v < nlist] + [nlist]
        else:
            steps = list(TUNE_EF)
        if tuning:
            # Never below the stored (default) setting: the probe queries are midpoints of stored
            # places, far easier than real queries of another modality (text, audio), which
            # lie far from every place; a setting lowered on them loses recall on real queries.
            floor = search[key]
            steps = [floor] + [v for v in steps if v > floor]
        result = {}
        for value in steps:
            settings = {**search, key: value}
            self.search(q[:1], k, **settings)  # warm up (loads FAISS, touches pages)
            t0 = time.perf_counter()
            got_s, got = self.search(q, k, **settings)
            approx_s = time.perf_counter() - t0
            recall = recall_at_k(got, truth, got_s, truth_s)
            result = {
                f"recall@{k}": round(recall, 4),
                "queries": n_queries,
                key: value,
                "rerank": settings.get("rerank", 1),
                "exact_queries_per_s": round(n_queries / exact_s, 1),
                "approx_queries_per_s": round(n_queries / approx_s, 1),
                "speedup": round(exact_s / approx_s, 1),
            }
            log(
                f"  {key}={value}: recall@{k} {recall:.3f}, {result['approx_queries_per_s']} queries/s "
                f"({speed_phrase(exact_s / approx_s)})"
            )
            if not tuning or recall >= target_recall:
                break
        value = result[key]
        if target_recall is not None and result[f"recall@{k}"] < target_recall:
            log(f"warning: recall@{k} {result[f'recall@{k}']} is below the target {target_recall} "
                f"at {key}={value}; {self._low_recall_hint(key, value, tuning)}")
        if tuning and value != search.get(key):
            log(f"check: {key} set to {value} (was {search.get(key)}): "
                + ("the smallest setting tried that reaches the target recall"
                   if result[f"recall@{k}"] >= target_recall else "the largest setting tried")
                + f"; give --{key.replace('_', '-')} to keep a value of your own")
        if target_recall is not None:
            result["target_recall"] = target_recall
        self.header["search"] = {**search, key: value}
        self.header["check"] = result
        return result

    def _low_recall_hint(self, key: str, value: int, tuned: bool) -> str:
        flag = "--" + key.replace("_", "-")
        rerank = self.header.get("search", {}).get("rerank", 1)
        if not tuned:
            return (f"{value} is the setting given and is kept: raise {flag}, or leave it out and "
                    f"--check tunes it")
        if key == "nprobe":
            return (f"all {value} lists are scanned, so the misses come from the compressed codes: "
                    f"raise --rerank (now {rerank}) to re-score more candidates exactly, or --pq-m "
                    f"for finer codes, or build an exact index")
        return (f"{value} is the largest {key} tried: raise --hnsw-m (more links per node), or "
                f"build an exact index")


class _ThumbnailFile:
    """A saved index's ``thumbnails.parquet``, read a row group at a time on demand."""

    def __init__(self, path: Path):
        import pyarrow.parquet as pq

        self.file = pq.ParquetFile(path)
        ids = self.file.read(columns=["id"]).column("id").to_pylist()
        self.row = {x: i for i, x in enumerate(ids)}
        sizes = [self.file.metadata.row_group(g).num_rows for g in range(self.file.num_row_groups)]
        self.starts = np.cumsum([0, *sizes])
        self.groups: OrderedDict[int, Any] = OrderedDict()  # row group -> its thumbnail column
        self.lock = threading.Lock()

    def get(self, item_id: str) -> bytes | None:
        i = self.row.get(item_id)
        if i is None:
            return None
        g = int(np.searchsorted(self.starts, i, side="right")) - 1
        with self.lock:  # one reader of the file at a time; the cache is shared by the threads
            col = self.groups.get(g)
            if col is None:
                col = self.groups[g] = self.file.read_row_group(g, columns=["thumbnail"]).column("thumbnail")
                if len(self.groups) > THUMBNAIL_GROUPS_KEPT:
                    self.groups.popitem(last=False)
            else:
                self.groups.move_to_end(g)
            return col[i - int(self.starts[g])].as_py() or None


def tuned_setting(kind: str) -> str:
    """The search setting that :meth:`Index.check` tunes for an approximate ``kind``."""
    return "ef_search" if kind == "hnsw" else "nprobe"


def speed_phrase(ratio: float) -> str:
    """``exact time / approximate time`` in words: ``"3.0x faster than exact search"``,
    ``"2.5x slower than exact search"`` or, within rounding, ``"as fast as exact search"``."""
    if ratio <= 0 or f"{max(ratio, 1 / ratio):.1f}" == "1.0":
        return "as fast as exact search"
    if ratio > 1:
        return f"{ratio:.1f}x faster than exact search"
    return f"{1 / ratio:.1f}x slower than exact search"


def recall_at_k(got: np.ndarray, truth: np.ndarray, got_scores: np.ndarray | None = None,
                truth_scores: np.ndarray | None = None, *, tol: float = 1e-6) -> float:
    """Mean fraction of each row of ``truth`` (exact top-k rows) found in the same row of ``got``.

    With the exact scores of both (``got_scores``, ``truth_scores``), a returned row that scores
    as high as the k-th true one (within ``tol``) counts as found too: an item tied with a true
    top-k item (a duplicate vector) is as good an answer, and exact search's own choice among
    tied items is arbitrary."""
    k = truth.shape[1]
    hits = []
    for r, (g, t) in enumerate(zip(got, truth)):
        valid = g >= 0
        found = set(g[valid].tolist()) & set(t.tolist())
        if got_scores is not None and truth_scores is not None:
            kth = truth_scores[r, -1]
            tied = g[valid][got_scores[r][valid] >= kth - tol]
            found |= set(tied.tolist())
        hits.append(min(len(found), k))
    return float(np.mean(hits) / k)


def _build_hnsw(faiss, x: np.ndarray, m: int, ef_construction: int, ef_search: int):
    index = faiss.IndexHNSWFlat(x.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.add(x)
    return (
        index,
        {"m": m, "ef_construction": ef_construction},
        {"ef_search": ef_search, "rerank": 1},
    )


def _check_build_options(**options: int | None) -> None:
    """Index settings are counts: each given one must be at least 1 (``hnsw_m`` at least 2)."""
    for name, value in options.items():
        least = 2 if name == "hnsw_m" else 1
        if value is not None and (isinstance(value, bool) or int(value) != value or value < least):
            raise ValueError(f"{name}={value!r}: give a whole number of at least {least}")


def _build_ivfpq(
    faiss,
    x: np.ndarray,
    nlist: int | None,
    pq_m: int | None,
    nprobe: int,
    rerank: int,
    train_size: int | None,
    seed: int,
):
    n, dim = x.shape
    if n < 39 * 16:
        # The smallest codebooks (4 bits) want 39 x 16 training points (FAISS's rule).
        raise ValueError(f"ivfpq needs at least {39 * 16} embeddings to train its codebooks, got {n}; "
                         "use kind exact (fast at this size, and what auto picks)")
    if nlist is not None and nlist > n // 39:
        raise ValueError(f"nlist={nlist} lists for {n} embeddings: each list needs about 39 of them to "
                         f"train, so use at most {n // 39} (or leave nlist out for ~4 sqrt(N))")
    nlist = nlist or _default_nlist(n)
    pq_m = pq_m or _default_pq_m(dim)
    if dim % pq_m:
        raise ValueError(f"pq_m={pq_m} must divide the dimension {dim}")
    # 8-bit codebooks want ~39 x 256 training points (FAISS's rule); small sets get smaller
    # codebooks instead of badly trained ones.
    nbits = 8 if n >= 39 * 256 else 6 if n >= 39 * 64 else 4
    index = faiss.IndexIVFPQ(
        faiss.IndexFlatIP(dim), dim, nlist, pq_m, nbits, faiss.METRIC_INNER_PRODUCT
    )
    ntrain = min(n, train_size or max(64 * nlist, 256 * 40))
    rng = np.random.default_rng(seed)
    index.train(x[np.sort(rng.choice(n, ntrain, replace=False))] if ntrain < n else x)
    index.add(x)
    built = {"nlist": nlist, "pq_m": pq_m, "nbits": nbits, "train_size": int(ntrain)}
    return index, built, {"nprobe": min(nprobe, nlist), "rerank": rerank}


def _default_nlist(n: int) -> int:
    # ~4 sqrt(N) lists (FAISS's guideline), a power of two, at least 1 and at most N / 39.
    target = 4 * np.sqrt(n)
    nlist = int(2 ** round(np.log2(max(target, 1))))
    return int(max(1, min(nlist, max(n // 39, 1))))


def _default_pq_m(dim: int) -> int:
    # One byte per 8 dimensions (64 bytes for 512-d), the largest such divisor of dim.
    for m in range(max(dim // 8, 1), 0, -1):
        if dim % m == 0:
            return m
    return 1


def make_thumbnails(
    ids: Sequence[str], items: Sequence[str | None], size: int = 128, *, progress: bool = False
) -> dict[str, bytes]:
    """JPEG thumbnails (longest side ``size`` px) of the image files in ``items``, keyed by id;
    unreadable or missing files are left out. (``geobind embed`` makes them while embedding;
    this covers embeddings written without them.)"""
    from geobind.search.embed import thumbnail_bytes

    out: dict[str, bytes] = {}
    pairs = list(zip(ids, items))
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc="thumbnails", unit="img", leave=False)
    for item_id, item in pairs:
        data = thumbnail_bytes(item, size) if item is not None else None
        if data:
            out[item_id] = data
    return out


def build_index(
    embeddings: Embeddings | str | Path,
    out: str | Path,
    kind: str = "auto",
    *,
    check: bool = False,
    target_recall: float | None = 0.95,
    keep: Collection[str] = (),
    force: bool = False,
    log: Callable[[str], None] | None = print,
    **options: Any,
) -> Index:
    """Build an index (see :meth:`Index.build`), optionally run the recall check, save it to
    ``out`` (atomic, no overwrite without ``force``). The check tunes ``nprobe`` or
    ``ef_search`` to ``target_recall`` unless it is named in ``keep`` (settings the caller chose
    and wants kept: then it is only measured)."""
    if target_recall is not None and not 0 < target_recall <= 1:
        raise ValueError(f"target_recall={target_recall}: a recall is in (0, 1], e.g. 0.95")
    check_writable(out, force=force, own=INDEX_FILES)
    index = Index.build(embeddings, kind, log=log, **options)
    if check:
        if index.kind == "exact":
            (log or print)(
                "check: the index is exact (recall 1.0 by construction); nothing to check"
            )
        else:
            index.check(
                target_recall=target_recall, tune=tuned_setting(index.kind) not in keep, log=log
            )
    index.save(out, force=force)
    return index


__all__ = [
    "APPROX_THRESHOLD",
    "Hit",
    "Index",
    "build_index",
    "exact_topk",
    "make_thumbnails",
    "recall_at_k",
]
