"""Outputs are written atomically and never replace a user's folder, ``force`` or not."""

from __future__ import annotations

import numpy as np
import pytest

from geobind.search.common import OutputExistsError, atomic_path, check_writable
from geobind.search.embed import Embeddings
from geobind.search.index import INDEX_FILES, Index


def test_a_file_output_never_replaces_a_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(IsADirectoryError, match="is a folder"):
            check_writable(tmp_path / "out", force=force)
        with pytest.raises(IsADirectoryError), atomic_path(tmp_path / "out", force=force) as tmp:
            tmp.write_text("x")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    (tmp_path / "f.json").write_text("old")
    with pytest.raises(OutputExistsError):
        check_writable(tmp_path / "f.json")
    with atomic_path(tmp_path / "f.json", force=True) as tmp:
        tmp.write_text("new")
    assert (tmp_path / "f.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", "out"]  # no temporaries left


def test_a_folder_output_replaces_only_a_folder_of_its_own_files(tmp_path):
    own = set(INDEX_FILES)
    out = tmp_path / "idx"
    out.mkdir()
    (out / "index.json").write_text("{}")
    (out / ".DS_Store").write_text("")  # clutter does not count as the user's work
    check_writable(out, force=True, own=own)  # an index folder: replaced with force
    with pytest.raises(OutputExistsError):
        check_writable(out, own=own)
    (out / "notes.txt").write_text("mine")
    for force in (False, True):
        with pytest.raises(FileExistsError, match=r"holds files it did not write \(notes.txt\)"):
            check_writable(out, force=force, own=own)
    with pytest.raises(FileExistsError, match="is a file"):
        check_writable(out / "notes.txt", force=True, own=own)
    # Index.save: an index is replaced with force, a folder with the user's files never.
    rng = np.random.default_rng(0)
    v = rng.normal(size=(20, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    emb = Embeddings([f"p{i}" for i in range(20)], np.zeros(20), np.zeros(20), v,
                     header={"modality": "satellite", "dim": 8, "model": {"identity": "m"}})
    index = Index.build(emb, "exact", thumbnails=False)
    index.save(tmp_path / "fresh")
    index.save(tmp_path / "fresh", force=True)
    with pytest.raises(FileExistsError, match="did not write"):
        index.save(out, force=True)
    assert (out / "notes.txt").read_text() == "mine"
