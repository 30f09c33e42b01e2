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


def _stop_after_two_parts(monkeypatch) -> dict:
    """Make the next cache computation stop (Ctrl-C) after two parts; the returned counter
    counts the parts embedded (set it below 0 to count a resume's without stopping)."""
    calls = {"n": 0}
    real = cache_mod._embed_span

    def stopping(*args, **kwargs):
        if calls["n"] == 2:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_embed_span", stopping)
    return calls


def test_a_stopped_cache_resumes_from_its_parts(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "PART_ROWS", 8)
    data = tmp_path / "data"
    shutil.copytree(tiny_data["root"], data)
    (data / "ground" / "0002.png").write_bytes(b"not a png")  # a bad row in the first part
    table = read_dataset(data / "stage1.csv")
    ground = build_space(tiny_data).encoder("ground")
    fresh, fresh_valid, fresh_info = cached_embeddings(ground, table, "ground", tmp_path / "fresh", batch_size=4)

    calls = _stop_after_two_parts(monkeypatch)
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


def test_parts_of_another_batch_size_are_embedded_again(tiny_data, tmp_path, monkeypatch):
    """Batches of another size may give other last bits: such parts (same rows, same file name
    when the part size is a multiple of both) are not mixed into the file."""
    monkeypatch.setattr(cache_mod, "PART_ROWS", 8)
    table = read_dataset(tiny_data["stage1"])
    ground = build_space(tiny_data).encoder("ground")
    fresh, _, _ = cached_embeddings(ground, table, "ground", tmp_path / "fresh", batch_size=2)
    calls = _stop_after_two_parts(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cached_embeddings(ground, table, "ground", tmp_path / "c", batch_size=4)
    assert part_spans(table, 0, len(table), 2)[:2] == part_spans(table, 0, len(table), 4)[:2]  # same names
    calls["n"] = -100
    emb, _, _ = cached_embeddings(ground, table, "ground", tmp_path / "c", batch_size=2)
    assert calls["n"] == -100 + len(part_spans(table, 0, len(table), 2))  # every part embedded again
    assert torch.equal(emb, fresh)


def test_a_hit_removes_parts_left_by_a_run_stopped_after_its_write(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "PART_ROWS", 8)
    table = read_dataset(tiny_data["stage1"])
    ground = build_space(tiny_data).encoder("ground")

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # between the write and the removal

    monkeypatch.setattr(cache_mod.shutil, "rmtree", stopped)
    with pytest.raises(KeyboardInterrupt):
        cached_embeddings(ground, table, "ground", tmp_path / "c", batch_size=4)
    monkeypatch.undo()
    assert list((tmp_path / "c").glob("*.parts"))
    _, _, info = cached_embeddings(ground, table, "ground", tmp_path / "c", batch_size=4)
    assert info["hit"] and not list((tmp_path / "c").glob("*.parts"))


def _uneven_worker(r, port, out):
    import datetime
    import time

    import torch.distributed as dist
    from dist_helpers import rank_env

    from geobind import distributed as gbdist

    rank_env(r, port, 2)
    dist.init_process_group("gloo", rank=r, world_size=2, timeout=datetime.timedelta(seconds=2))
    try:
        if r == 1:
            time.sleep(4)  # a share twice the collective timeout
        gbdist.wait_for_ranks(poll_s=0.1)
        (out / f"rank{r}").write_text(repr(gbdist.all_gather_object(r)))
    finally:
        dist.destroy_process_group()


def test_ranks_wait_for_an_uneven_share_beyond_the_collective_timeout(tmp_path):
    from dist_helpers import free_port, spawn_with_deadline

    spawn_with_deadline(_uneven_worker, (free_port(), tmp_path), 2, seconds=60)
    assert (tmp_path / "rank0").read_text() == (tmp_path / "rank1").read_text() == "[0, 1]"


def test_a_part_whose_data_was_lost_is_embedded_again(tiny_data, tmp_path, monkeypatch):
    """Zeros under an intact header (a crash before the renamed part reached the disk): the
    part is not trusted, so its rows are not silently left out as invalid."""
    import struct

    monkeypatch.setattr(cache_mod, "PART_ROWS", 8)
    table = read_dataset(tiny_data["stage1"])
    ground = build_space(tiny_data).encoder("ground")
    fresh, fresh_valid, _ = cached_embeddings(ground, table, "ground", tmp_path / "fresh", batch_size=4)
    calls = _stop_after_two_parts(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        cached_embeddings(ground, table, "ground", tmp_path / "c", batch_size=4)
    part = sorted((tmp_path / "c").glob("*.parts/rows-*.safetensors"))[1]
    raw = bytearray(part.read_bytes())
    data = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[data:] = bytes(len(raw) - data)
    part.write_bytes(bytes(raw))
    calls["n"] = -100
    emb, valid, _ = cached_embeddings(ground, table, "ground", tmp_path / "c", batch_size=4)
    assert torch.equal(emb, fresh) and torch.equal(valid, fresh_valid)
