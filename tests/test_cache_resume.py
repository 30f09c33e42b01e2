"""An anchor cache stopped midway resumes from its finished parts."""

import shutil

import pytest
import torch
from test_model import build_space

from geobind.binding import cache as cache_mod
from geobind.binding.cache import cached_embeddings, part_spans
from geobind.data.manifest import read_dataset


def test_part_spans_are_batch_aligned_and_cover_the_rows(tiny_data, monkeypatch):
    monkeypatch.setattr(cache_mod, "PART_ROWS", 10)
    table = read_dataset(tiny_data["stage1"])
    n = len(table)
    spans = part_spans(table, 0, n, batch_size=4)
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))
    assert all(a % 4 == 0 for a, _ in spans)  # the batches of one pass, cut nowhere else
    # A rank's share (cut at a batch) keeps the same interior cuts.
    assert part_spans(table, 8, n, batch_size=4)[1:] == [s for s in spans if s[0] >= 16]


def test_a_stopped_cache_resumes_from_its_parts(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "PART_ROWS", 8)
    data = tmp_path / "data"
    shutil.copytree(tiny_data["root"], data)
    (data / "ground" / "0002.png").write_bytes(b"not a png")  # a bad row in the first part
    table = read_dataset(data / "stage1.csv")
    ground = build_space(tiny_data).encoder("ground")
    fresh, fresh_valid, fresh_info = cached_embeddings(ground, table, "ground", tmp_path / "fresh", batch_size=4)

    calls = {"n": 0}
    real = cache_mod._embed_span

    def stop_after_two_parts(*args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_embed_span", stop_after_two_parts)
    with pytest.raises(KeyboardInterrupt):
        cached_embeddings(ground, table, "ground", tmp_path / "c", batch_size=4)
    parts = list((tmp_path / "c").glob("*.parts/rows-*.safetensors"))
    assert len(parts) == 2 and not list((tmp_path / "c").glob("*.safetensors"))

    calls["n"] = -100  # no more stops; count the parts embedded on resume
    said = []
    emb, valid, info = cached_embeddings(ground, table, "ground", tmp_path / "c", batch_size=4, say=said.append)
    assert calls["n"] == -100 + len(part_spans(table, 0, len(table), 4)) - 2  # only the rest
    assert any("2 finished parts" in s for s in said)
    assert torch.equal(emb, fresh) and torch.equal(valid, fresh_valid)
    assert info["bad"] == fresh_info["bad"] == {"undecodable": 1}
    assert not list((tmp_path / "c").glob("*.parts"))  # removed once the file is written


def test_a_computation_is_logged_piece_by_piece_without_a_bar(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "PART_ROWS", 16)
    table = read_dataset(tiny_data["stage1"])
    ground = build_space(tiny_data).encoder("ground")
    lines = []
    cached_embeddings(ground, table, "ground", tmp_path / "c", batch_size=4, log=lines.append)
    n = len(table)
    assert lines[0].startswith(f"anchor cache: embedding ground for {n} rows")
    assert lines[-1] == f"anchor cache: {n} of {n} rows embedded" and len(lines) == 1 + len(part_spans(table, 0, n, 4))
    lines.clear()
    cached_embeddings(ground, table, "ground", tmp_path / "c", batch_size=4, log=lines.append)
    assert lines == []  # a hit says nothing here (the trainer says "anchor cache hit")
