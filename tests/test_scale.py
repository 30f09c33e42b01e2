"""Behaviour that must hold at a million rows, checked at a small size: manifests resolve paths
per folder, checks keep only the examples they print, retrieval chunks are bounded by the
gallery's size, and a saved index keeps its FAISS index and thumbnails on disk."""

import os

import pytest
import torch
from space_helpers import clustered_unit_vectors, synthetic_embeddings

from geobind.data.manifest import _empty, _resolve_path, _resolve_paths
from geobind.data.splits import _relpaths
from geobind.metrics import retrieval_ranks
from geobind.search import index as index_mod
from geobind.search.index import Index

CELLS = ["/x.png", "a//b.png", "./x.png", "x.png", "dir/..", "a/b/", "a/./b.png", "//net/x", "~/t.png",
         "./~/t.png", "~", ".", "", "  ", None, float("nan"), 5, "tiles\\0001.jpg", "//..", "é/ü.jpg"]


@pytest.mark.parametrize("base", [".", "/data/m", "rel/dir", "/"])
def test_paths_resolved_per_folder_equal_pathlib_per_cell(base):
    from pathlib import Path

    want = [None if _empty(v) else _resolve_path(v, Path(base)) for v in CELLS]
    assert _resolve_paths(CELLS, Path(base)) == want


@pytest.mark.parametrize("start", ["out", "/tmp/o", ".", "/", "../q"])
def test_relative_paths_per_folder_equal_relpath_per_row(start):
    paths = [None, "/x.png", "a//b.png", "./x.png", "x.png", "dir/..", "a/b/", "/", "//net/x", "a/.", "../../y"]
    assert _relpaths(paths, start) == [os.path.relpath(p, start) if p is not None else "" for p in paths]


def test_check_keeps_the_first_examples_in_row_order(tmp_path):
    from geobind.data.check import check_dataset

    rows = ["id,lat,lon,satellite"] + [f"p{i},1,2,missing/{i}.png" for i in range(300)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    for workers in (0, 2):
        report = check_dataset(tmp_path / "m.csv", num_workers=workers, max_examples=5)
        assert report.reasons == {"missing": 300}
        assert [e[0].rsplit("/", 1)[1] for e in report.examples] == [f"{i}.png" for i in range(5)]
    assert check_dataset(tmp_path / "m.csv", max_examples=0).examples == []


def test_retrieval_chunks_shrink_for_a_large_gallery(monkeypatch):
    from geobind import metrics

    g = torch.nn.functional.normalize(torch.randn(600, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    q = torch.nn.functional.normalize(g[:500] + 0.7 * torch.randn(500, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    g[3] = g[4]  # a tie
    want = retrieval_ranks(q, g)

    monkeypatch.setattr(metrics, "MAX_CHUNK_SCORES", 600 * 7)
    got = retrieval_ranks(q, g)
    assert torch.equal(got, want)


def _index_with_extras(tmp_path, kind="exact"):
    emb = synthetic_embeddings(clustered_unit_vectors(700, 16))
    emb.thumbnails = [f"jpeg-{i}".encode() if i % 3 else None for i in range(len(emb))]
    return emb


def test_saved_thumbnails_are_read_a_row_group_at_a_time(tmp_path, monkeypatch):
    monkeypatch.setattr(index_mod, "THUMBNAIL_GROUP_ROWS", 50)
    monkeypatch.setattr(index_mod, "THUMBNAIL_GROUPS_KEPT", 2)
    emb = _index_with_extras(tmp_path)
    Index.build(emb, "exact").save(tmp_path / "a.index")
    index = Index.load(tmp_path / "a.index")
    for i in (1, 2, 400, 698, 5, 1):
        assert index.thumbnail(emb.ids[i]) == f"jpeg-{i}".encode()
    assert index.thumbnail(emb.ids[3]) is None and index.thumbnail("no such id") is None
    assert len(index._thumbnail_file.groups) == 2  # recent groups only, never the whole file


def test_whether_a_place_has_a_thumbnail_reads_no_row_group(tmp_path, monkeypatch):
    # The explorer asks this for every search result: a lookup among the ids, not a read of a
    # row group (a few MB of JPEGs each) per result.
    monkeypatch.setattr(index_mod, "THUMBNAIL_GROUP_ROWS", 50)
    emb = _index_with_extras(tmp_path)
    Index.build(emb, "exact").save(tmp_path / "a.index")
    index = Index.load(tmp_path / "a.index")
    assert [index.has_thumbnail(emb.ids[i]) for i in (1, 2, 3, 400)] == [True, True, False, True]
    assert not index.has_thumbnail("no such id")
    assert not index._thumbnail_file.groups
    memory = Index.build(emb, "exact")
    assert [memory.has_thumbnail(emb.ids[i]) for i in (1, 3)] == [True, False]


def test_a_loaded_index_saved_again_keeps_faiss_and_thumbnails(tmp_path):
    kinds = ["exact"]
    try:
        import faiss  # noqa: F401

        kinds.append("ivfpq")
    except ImportError:
        pass
    emb = _index_with_extras(tmp_path)
    for kind in kinds:
        Index.build(emb, kind).save(tmp_path / f"{kind}.index")
        Index.load(tmp_path / f"{kind}.index").save(tmp_path / f"{kind}-copy.index")
        copy = Index.load(tmp_path / f"{kind}-copy.index")
        assert copy.thumbnail(emb.ids[1]) == b"jpeg-1"
        s, i = copy.search(emb.vectors[:2], 3)
        assert i[:, 0].tolist() == [0, 1]
        assert sorted(os.listdir(tmp_path / f"{kind}-copy.index")) == sorted(os.listdir(tmp_path / f"{kind}.index"))
