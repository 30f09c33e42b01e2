"""WebDataset shards: packing, the index, streaming plans, and training/embedding from shards."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from fixtures import tiny_config
from layout_fixtures import make_soundingearth
from PIL import Image
from safetensors.torch import load_file
from test_model import build_space

from geobind.binding.cache import embed_table
from geobind.binding.trainer import TrainingInterrupted, train
from geobind.cli import main
from geobind.config import parse_config
from geobind.data import pack as pack_mod
from geobind.data.manifest import read_dataset
from geobind.data.pack import pack
from geobind.data.shards import (
    SHARDS_FILE,
    RowStream,
    ShardSet,
    buffer_shuffle,
    epoch_rows,
    next_segments,
    plan_epoch,
)
from geobind.evaluate import evaluate


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOBIND_CACHE", str(tmp_path / "geobind-cache"))


def _members(shards: ShardSet):
    return {row: s for row, s in RowStream(shards, lambda row, sample: sample)}


def test_pack_round_trip_keeps_rows_order_and_metadata(tiny_data, tmp_path):
    out = tmp_path / "shards"
    res = pack(tiny_data["stage1"], out, shard_size=10, image_size=16, progress=False, log=None)
    assert (res.shards, res.samples, dict(res.bad)) == (4, 36, {})
    table = read_dataset(tiny_data["stage1"])
    shards = read_dataset(out)  # a folder of shards is detected with the default layout
    assert isinstance(shards, ShardSet) and len(shards) == len(table)
    assert shards.ids == table.ids and shards.lat == table.lat and shards.lon == table.lon
    assert shards.meta["scene"].tolist() == table.meta["scene"].tolist()
    assert set(shards.columns) == {"satellite", "ground", "text"}
    head = json.loads((out / SHARDS_FILE).read_text())
    assert [e["nsamples"] for e in head["shardlist"]] == [10, 10, 10, 6]
    samples = _members(shards)
    assert sorted(samples) == list(range(36))
    s = samples[5]
    assert set(s) >= {"__key__", "satellite.jpg", "ground.jpg", "text.txt", "json"}
    assert Image.open(io.BytesIO(s["satellite.jpg"])).size == (16, 16)  # 32 px pre-resized to 16
    assert s["text.txt"].decode() == table.columns["text"][5]
    assert json.loads(s["json"])["id"] == table.ids[5]


def test_pack_shrinks_large_jpegs_as_a_full_decode_would_and_keeps_small_ones_whole(tmp_path):
    """A large JPEG is decoded at a reduced scale (both sides still above the target) and then
    resized: within a few grey levels of resizing the full decode. One whose reduced scale
    lands exactly on the target is still re-encoded at the target, and one that needs no
    resizing keeps its own bytes."""
    from test_media import _photo

    sizes = {"large": (900, 1200), "exact": (512, 512), "small": (100, 80)}
    for name, (h, w) in sizes.items():
        Image.fromarray(_photo(h, w)).save(tmp_path / f"{name}.jpg", quality=90)
    (tmp_path / "m.csv").write_text("id,lat,lon,satellite,text\n" + "".join(
        f"{name},{i},{i},{name}.jpg,a photo\n" for i, name in enumerate(sizes)))
    pack(tmp_path / "m.csv", tmp_path / "s", shard_size=10, image_size=256, progress=False, log=None)
    shards = read_dataset(tmp_path / "s")
    got = {shards.ids[row]: s["satellite.jpg"] for row, s in _members(shards).items()}
    assert got["small"] == (tmp_path / "small.jpg").read_bytes()
    assert Image.open(io.BytesIO(got["exact"])).size == (256, 256)
    large = Image.open(io.BytesIO(got["large"]))
    assert large.size == (341, 256)
    full = Image.open(tmp_path / "large.jpg").convert("RGB").resize((341, 256), Image.BICUBIC)
    diff = np.abs(np.asarray(large, np.float32) - np.asarray(full, np.float32))
    assert diff.mean() < 3.0, diff.mean()


def _key_of(row, sample):  # module level: loader workers may be spawned
    return sample["__key__"]


@pytest.mark.parametrize("workers", [0, 2, 5])
def test_chunk_stream_batches_spans_and_gives_each_worker_a_stretch(tiny_data, tmp_path, workers):
    """Batches never straddle a span (so a span's batches do not depend on the others read with
    it), every row comes once with its own sample, and each worker reads contiguous spans."""
    import pickle

    from torch.utils.data import DataLoader

    from geobind.data.shards import ChunkStream

    pack(tiny_data["stage1"], tmp_path / "s", shard_size=10, image_size=16, progress=False, log=None)
    shards = read_dataset(tmp_path / "s")
    keys = {r: s["__key__"] for r, s in _members(shards).items()}
    spans = [(0, 7), (7, 14), (21, 28), (28, 35)]  # not every row: a resumed or sharded run
    stream = ChunkStream(shards, _key_of, spans, batch_size=3)
    pickle.loads(pickle.dumps(stream))
    assert len(stream) == 12
    batches = list(DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=lambda b: b))
    assert sorted(len(b) for b in batches) == sorted([3, 3, 1] * 4)
    for b in batches:
        rows = [r for r, _ in b]
        assert rows == list(range(rows[0], rows[0] + len(rows)))
        assert len({next(i for i, (a, z) in enumerate(spans) if a <= r < z) for r in rows}) == 1
        assert all(key == keys[r] for r, key in b)
    assert sorted(r for b in batches for r, _ in b) == [r for a, z in spans for r in range(a, z)]
    if workers:  # round-robin over the workers: the first batches come from different stretches
        firsts = [batches[i][0][0] for i in range(min(workers, len(spans)))]
        assert firsts == [spans[k][0] for k in np.cumsum([0] + [len(g) for g in np.array_split(
            np.arange(len(spans)), workers)])[:len(firsts)]]


def test_pack_resumes_after_interruption_and_refuses_other_settings(
    tiny_data, tmp_path, monkeypatch, capsys
):
    clean = tmp_path / "clean"
    pack(tiny_data["stage1"], clean, shard_size=8, image_size=16, progress=False, log=None)

    real, calls = pack_mod._write_shard, []

    def flaky(k, *a, **kw):
        calls.append(k)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(k, *a, **kw)

    out = tmp_path / "out"
    monkeypatch.setattr(pack_mod, "_write_shard", flaky)
    with pytest.raises(KeyboardInterrupt):
        pack(tiny_data["stage1"], out, shard_size=8, image_size=16, progress=False, log=None)
    monkeypatch.setattr(pack_mod, "_write_shard", real)
    # Unfinished, it is no dataset: reading it says so instead of giving 2 of its 5 shards.
    with pytest.raises(ValueError, match=r"unfinished `geobind data pack` output \(2 shards written so far\)"):
        read_dataset(out)
    said = []
    res = pack(
        tiny_data["stage1"], out, shard_size=8, image_size=16, progress=False, log=said.append
    )
    assert res.resumed == 2 and "resuming, 2 of 5 shards" in said[0]
    for name in [f"shard-{k:06d}.tar" for k in range(5)] + ["index.parquet"]:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name
    assert not (out / ".pack").exists()

    # Same command again: nothing to do. Other settings or a foreign folder: refused, named.
    assert (
        main(
            [
                "data",
                "pack",
                str(tiny_data["stage1"]),
                str(out),
                "--shard-size",
                "8",
                "--image-size",
                "16",
                "--no-progress",
            ]
        )
        == 0
    )
    assert "nothing to do" in capsys.readouterr().out
    assert (
        main(
            [
                "data",
                "pack",
                str(tiny_data["stage1"]),
                str(out),
                "--shard-size",
                "9",
                "--no-progress",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "shard_size: 8 there, 9 now" in err and "new folder" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    assert (
        main(["data", "pack", str(tiny_data["stage1"]), str(tmp_path / "junk"), "--no-progress"])
        == 2
    )
    assert "not a GeoBind pack" in capsys.readouterr().err


def test_pack_audio_rate_stores_mono_flac_at_that_rate(tmp_path):
    csv = make_soundingearth(tmp_path / "se", n=8)
    out = tmp_path / "se-shards"
    assert (
        main(
            [
                "data",
                "pack",
                str(csv),
                str(out),
                "--layout",
                "soundingearth",
                "--audio-rate",
                "8000",
                "--shard-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    shards = read_dataset(out)
    assert set(shards.columns) == {"satellite", "audio", "text"}
    table = read_dataset(csv, "soundingearth")
    for row, s in _members(shards).items():
        wave, rate = sf.read(io.BytesIO(s["audio.flac"]))
        assert rate == 8000 and wave.ndim == 1
        # The recording's duration survives the resampling (1-3 s).
        src = sf.info(table.columns["audio"][row])
        assert abs(len(wave) / 8000 - src.frames / src.samplerate) < 1e-3
        assert json.loads(s["json"])["caption"].startswith("This is a sound of")


def test_pack_keeps_to_the_shard_contract_for_keys_and_audio(tmp_path):
    """Every sample gets its own key (an id shaped like a row key cannot collide with the key
    given to an unsafe id), and audio the contract does not list (OGG) is stored as FLAC."""
    import pandas as pd

    (tmp_path / "m").mkdir()
    t = np.arange(8000) / 8000
    for i in range(3):
        sf.write(tmp_path / "m" / f"a{i}.ogg", (0.2 * np.sin(2 * np.pi * 440 * (i + 1) * t)).astype(np.float32),
                 8000, format="OGG", subtype="VORBIS")
    pd.DataFrame({"id": ["a.b", "s000000000", "p2"], "lat": [1.0, 2.0, 3.0], "lon": [4.0, 5.0, 6.0],
                  "audio": [f"a{i}.ogg" for i in range(3)]}).to_csv(tmp_path / "m" / "m.csv", index=False)
    assert main(["data", "pack", str(tmp_path / "m" / "m.csv"), str(tmp_path / "out"), "--no-progress"]) == 0
    shards = read_dataset(tmp_path / "out")
    samples = _members(shards)
    keys = [s["__key__"] for s in samples.values()]
    assert len(set(keys)) == 3 and shards.ids == ["a.b", "s000000000", "p2"]
    assert all({k for k in s if not k.startswith("__")} == {"audio.flac", "json"} for s in samples.values())
    for row, s in samples.items():
        wave, rate = sf.read(io.BytesIO(s["audio.flac"]))
        assert rate == 8000 and abs(len(wave) - 8000) < 100, row
    assert main(["data", "check", str(tmp_path / "out")]) == 0


def test_pack_audio_format_wav_stores_16_bit_pcm_that_loads_like_flac(tmp_path, capsys):
    """``--audio-format wav`` stores the same resampled waveform as 16-bit PCM: training reads
    its clips without decoding, and they equal the FLAC pack's to within 16-bit rounding."""
    from geobind.data.audio_io import load_audio

    csv = make_soundingearth(tmp_path / "se", n=4)
    packs = {}
    for fmt in ("flac", "wav"):
        out = tmp_path / f"se-{fmt}"
        argv = ["data", "pack", str(csv), str(out), "--layout", "soundingearth", "--audio-rate", "8000",
                "--no-progress"]
        assert main(argv + (["--audio-format", "wav"] if fmt == "wav" else [])) == 0
        packs[fmt] = _members(read_dataset(out))
    assert packs["flac"].keys() == packs["wav"].keys()
    for row in packs["flac"]:
        flac, wav = packs["flac"][row], packs["wav"][row]
        assert "audio.wav" in wav and "audio.flac" not in wav
        info = sf.info(io.BytesIO(wav["audio.wav"]))
        assert (info.format, info.subtype, info.samplerate, info.channels) == ("WAV", "PCM_16", 8000, 1)
        a, b = load_audio(flac["audio.flac"], 8000), load_audio(wav["audio.wav"], 8000)
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=0, atol=1 / 32768 + 1e-7)
    assert main(["data", "pack", str(csv), str(tmp_path / "x"), "--layout", "soundingearth",
                 "--audio-format", "wav", "--no-progress"]) == 2
    assert "give --audio-rate too" in capsys.readouterr().err


def test_embeddings_and_report_from_shards_equal_the_manifest(tiny_data, tmp_path):
    # PNG sources packed without resizing keep their bytes, so the decoded inputs are identical.
    out = tmp_path / "test-shards"
    pack(
        tiny_data["test"],
        out,
        shard_size=5,
        image_size=0,
        image_format="png",
        progress=False,
        log=None,
    )
    model = build_space(tiny_data)
    table, shards = read_dataset(tiny_data["test"]), read_dataset(out)
    for m in ("ground", "text", "satellite"):
        ref, v_ref, _ = embed_table(model.encoder(m), table, m, batch_size=4)
        got, v_got, _ = embed_table(model.encoder(m), shards, m, batch_size=4, num_workers=2)
        assert torch.equal(v_got, v_ref), m
        # Same inputs; only the batching differs (two workers split the rows).
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=m)
    assert evaluate(model, shards)["pairs"] == evaluate(model, table)["pairs"]


def _emitted_batches(plan, rank):
    """What rank ``rank``'s DataLoader delivers under ``plan``: slot order, buffer shuffle,
    skip, round-robin over workers."""
    out = {}
    for w in range(plan.workers):
        sid = rank * plan.workers + w
        rows = list(buffer_shuffle(plan.slots[sid].tolist(), plan.bufsize, plan.slot_rng(sid)))
        rows = rows[plan.skip_batches[sid] * plan.per_rank_batch :]
        out[w] = [
            rows[i : i + plan.per_rank_batch] for i in range(0, len(rows), plan.per_rank_batch)
        ]
    seq, k = [], 0
    while any(out.values()):
        w = (k + plan.rotation) % plan.workers
        seq.append(out[w].pop(0))
        k += 1
    return seq


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 3), (3, 2), (2, 2)])
def test_plan_gives_every_usable_row_once_per_epoch(layout):
    counts = np.array([7, 0, 13, 5, 9, 11])
    valid = np.ones(counts.sum(), dtype=bool)
    valid[[3, 20, 21, 40]] = False
    world, workers = layout
    bs = 6
    rows = epoch_rows(counts, valid, seed=1, epoch=2)
    expected = sorted(rows[: len(rows) // bs * bs].tolist())
    plan = plan_epoch(
        counts,
        valid,
        seed=1,
        epoch=2,
        batch_size=bs,
        segments=[(world, workers, 0)],
        step_in_epoch=0,
        bufsize=4,
    )
    per_rank = [_emitted_batches(plan, r) for r in range(world)]
    assert {len(b) for b in per_rank} == {len(expected) // bs}  # every rank, same number of steps
    seen = [i for batches in per_rank for b in batches for i in b]
    assert sorted(seen) == expected  # exactly once
    assert all(len(b) == bs // world for batches in per_rank for b in batches)
    # Deterministic, and each epoch has its own order.
    again = plan_epoch(
        counts,
        valid,
        seed=1,
        epoch=2,
        batch_size=bs,
        segments=[(world, workers, 0)],
        step_in_epoch=0,
        bufsize=4,
    )
    assert [_emitted_batches(again, r) for r in range(world)] == per_rank
    other = plan_epoch(
        counts,
        valid,
        seed=1,
        epoch=3,
        batch_size=bs,
        segments=[(world, workers, 0)],
        step_in_epoch=0,
        bufsize=4,
    )
    assert [_emitted_batches(other, r) for r in range(world)] != per_rank


_REAL_WRITE_SHARD = pack_mod._write_shard


def _slow_write_shard(*a, **kw):
    """A shard write that takes half a second more (module level: the workers unpickle it)."""
    import time

    time.sleep(0.5)
    return _REAL_WRITE_SHARD(*a, **kw)


def test_a_stopped_pack_with_workers_stops_at_once_and_resumes(tiny_data, tmp_path, monkeypatch):
    """With worker processes, a stop drops the shards not started and ends the ones being
    written (it used to wait for every queued shard); the rerun finishes to the same bytes."""
    import concurrent.futures
    import time

    clean = tmp_path / "clean"
    pack(tiny_data["stage1"], clean, shard_size=4, image_size=16, progress=False, log=None)
    real_completed = concurrent.futures.as_completed

    def stop_after_first(futs):
        for i, fut in enumerate(real_completed(futs)):
            if i == 1:
                raise KeyboardInterrupt
            yield fut

    monkeypatch.setattr(pack_mod, "_write_shard", _slow_write_shard)
    monkeypatch.setattr(concurrent.futures, "as_completed", stop_after_first)
    out = tmp_path / "out"
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        pack(tiny_data["stage1"], out, shard_size=4, image_size=16, workers=2, progress=False, log=None)
    assert time.monotonic() - t0 < 3.0  # 9 shards of 0.5 s over 2 workers would take 2.5 s more
    assert len(list(out.glob("*.tar"))) < 9
    monkeypatch.undo()
    pack(tiny_data["stage1"], out, shard_size=4, image_size=16, workers=2, progress=False, log=None)
    for name in [f"shard-{k:06d}.tar" for k in range(9)] + ["index.parquet"]:
        assert (out / name).read_bytes() == (clean / name).read_bytes(), name


def test_plan_resumes_exactly_on_the_same_layout_and_once_on_another():
    counts, bs = np.array([9, 14, 6, 12, 7]), 4
    valid = np.ones(counts.sum(), dtype=bool)
    plan = plan_epoch(
        counts,
        valid,
        seed=0,
        epoch=0,
        batch_size=bs,
        segments=[(2, 2, 0)],
        step_in_epoch=0,
        bufsize=5,
    )
    full = [_emitted_batches(plan, r) for r in range(2)]
    steps = len(full[0])
    for k in range(steps + 1):  # same layout: the remaining batches are the very same ones
        segs = next_segments([[2, 2, 0]], 2, 2, k)
        assert segs == [[2, 2, 0]]
        p = plan_epoch(
            counts, valid, seed=0, epoch=0, batch_size=bs, segments=segs, step_in_epoch=k, bufsize=5
        )
        assert [_emitted_batches(p, r) for r in range(2)] == [b[k:] for b in full]
    # 2 ranks x 2 workers for 3 steps, then 1 rank x 3 workers for 2, then 4 ranks x 1 worker.
    seen = [i for r in range(2) for b in full[r][:3] for i in b]
    segs = next_segments([[2, 2, 0]], 1, 3, 3)
    p = plan_epoch(
        counts, valid, seed=0, epoch=0, batch_size=bs, segments=segs, step_in_epoch=3, bufsize=5
    )
    part = _emitted_batches(p, 0)
    seen += [i for b in part[:2] for i in b]
    segs = next_segments(segs, 4, 1, 5)
    assert segs == [[2, 2, 0], [1, 3, 3], [4, 1, 5]]
    p = plan_epoch(
        counts, valid, seed=0, epoch=0, batch_size=bs, segments=segs, step_in_epoch=5, bufsize=5
    )
    for r in range(4):
        rest = _emitted_batches(p, r)
        assert len(rest) == steps - 5
        seen += [i for b in rest for i in b]
    all_rows = epoch_rows(counts, valid, 0, 0)
    assert sorted(seen) == sorted(all_rows[: len(all_rows) // bs * bs].tolist())


def _weights(model_dir):
    return load_file(str(model_dir / "satellite" / "model.safetensors"))


@pytest.mark.parametrize("workers", [0, 2])
def test_training_from_shards_resumes_exactly(tiny_data, tmp_path, workers):
    shards = tmp_path / "shards"
    pack(
        tiny_data["stage1"],
        shards,
        shard_size=7,
        image_size=0,
        image_format="png",
        progress=False,
        log=None,
    )

    def cfg(out):
        d = tiny_config({**tiny_data, "stage1": shards}, out, steps=6, audio=False)
        d["stages"][0]["optim"].update(
            epochs=2, max_steps=0, batch_size=12, ckpt_every=100, num_workers=workers
        )
        d["stages"][0]["data"]["shuffle_buffer"] = 6
        d["eval"] = None
        return parse_config(d)

    full = train(cfg(tmp_path / "a"), progress=False, log=None)
    with pytest.raises(TrainingInterrupted):
        train(cfg(tmp_path / "b"), progress=False, log=None, stop_at_step=4)  # mid second epoch
    said = []
    resumed = train(cfg(tmp_path / "b"), resume=True, progress=False, log=said.append)
    assert any("resumed at step 4 (epoch 2, batch 1)" in s for s in said), said
    wa, wb = _weights(full), _weights(resumed)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    done = json.loads((tmp_path / "b" / "stages" / "01-satellite" / "done.json").read_text())
    assert done["steps"] == 6 and done["bad_samples"] == {}


def test_a_changed_shard_of_a_pack_is_refused_and_a_stale_index_rebuilt(tiny_data, tmp_path, monkeypatch):
    """A shard of a finished pack whose size changed (cut short by an interrupted copy, or
    replaced) would lose samples without a word: refused, naming the shard and the way out.
    Without the pack's records, a stored index that no longer fits is rebuilt."""
    monkeypatch.setenv("GEOBIND_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "shards"
    pack(tiny_data["stage1"], out, shard_size=10, image_size=16, progress=False, log=None)
    tar = out / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])  # a copy cut short
    with pytest.raises(ValueError, match=r"shard-000000.tar is \d+ bytes where `geobind data pack` wrote \d+ bytes "
                                         r"\(10 samples\): it was cut short or replaced"):
        read_dataset(out)
    # Replace one shard by a shorter one in a folder without pack.json: the index is rebuilt.
    shutil.copy(out / "shard-000003.tar", tar)
    (out / "pack.json").unlink()
    with pytest.warns(UserWarning, match="re-indexing"):
        shards = read_dataset(out)
    assert len(shards) == 6 + 10 + 10 + 6


def test_loaders_pickle_for_spawned_workers(tiny_data, tmp_path):
    """Under a spawn/forkserver start method (macOS, Python 3.14, spawned ranks) the dataset
    and collate function travel to loader workers by pickle."""
    import pickle

    from geobind.binding.trainer import _CollateTrain, train_items, train_loader

    model = build_space(tiny_data)
    enc = model.encoder("satellite")
    out = tmp_path / "shards"
    pack(tiny_data["stage1"], out, shard_size=10, image_size=16, progress=False, log=None)
    for data in (read_dataset(tiny_data["stage1"]), read_dataset(out)):
        loader, _ = train_loader(
            data,
            train_items(data, "satellite", enc, 0),
            valid=torch.ones(len(data), dtype=bool),
            batch_size=6,
            seed=0,
            epoch=0,
            step_in_epoch=0,
            rank=0,
            world=1,
            num_workers=2,
            collate_fn=_CollateTrain(enc, None),
        )
        pickle.loads(pickle.dumps((loader.dataset, loader.collate_fn)))


def test_data_throughput_benchmark_quick_run(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "data_throughput.py"
    spec = importlib.util.spec_from_file_location("data_throughput", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    r = mod.main(["--quick", "--workers", "1", "--out", str(tmp_path / "r.json")])
    assert len(r["pipeline"]) == 14 and all(p["samples_per_s"] > 0 for p in r["pipeline"])
    assert set(r["pack_mb"]) == {"shards_orig", "shards_256", "shards_audio48k", "shards_audio48k_wav"}
    assert set(r["train"]) == {"memory", "manifest", "shards_256", "shards_256_device_aug"}
    assert all(0 <= t["data_wait"] <= 1 and t["samples_per_s"] > 0 for t in r["train"].values())
    assert (
        json.loads((tmp_path / "r.json").read_text())["machine"]["gpu"] is None
        or torch.cuda.is_available()
    )


def test_pack_refuses_a_sample_rate_below_one_before_making_its_folder(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "pack", str(tiny_data["stage2"]), str(tmp_path / "out"), "--audio-rate", "-5"])
    assert e.value.code == 2 and "a sample rate in Hz, e.g. 48000" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_second_pack_into_the_same_folder_is_refused_while_one_runs(tiny_data, tmp_path, monkeypatch):
    from geobind.search.common import exclusive_lock

    out = tmp_path / "s"
    held = []
    real = pack_mod._pack_shards

    def while_held(*a, **k):  # a second pack starts while this one writes its shards
        with pytest.raises(FileExistsError, match=r"s is being packed by another geobind data pack \(pid \d+\)"):
            pack(tiny_data["stage1"], out, shard_size=10, image_size=16, progress=False, log=None)
        held.append(True)
        return real(*a, **k)

    monkeypatch.setattr(pack_mod, "_pack_shards", while_held)
    res = pack(tiny_data["stage1"], out, shard_size=10, image_size=16, progress=False, log=None)
    assert held == [True] and res.samples == 36 and not (out / ".pack").exists()
    f, holder = exclusive_lock(tmp_path / "free.lock")  # released with the pack: nothing holds it
    assert f is not None and holder is None
    f.close()
