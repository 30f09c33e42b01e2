"""Every sample exactly once per epoch across 2 ranks x 2 loader workers (gloo, spawned
processes), for manifest and shard inputs; resuming on a different number of ranks; and the
trainer itself under 2 ranks, resumed on 1. One spawn runs every distributed check, to pay the
process start-up once."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_helpers import free_port, rank_env, spawn_with_deadline
from fixtures import sigint_during_step, tiny_config

from geobind import distributed as gbdist
from geobind.binding.trainer import (
    TrainingInterrupted,
    _CollateTrain,
    fork_may_hang,
    train,
    train_items,
    train_loader,
)
from geobind.config import parse_config
from geobind.data.manifest import read_dataset
from geobind.data.pack import pack

WORLD, WORKERS, BATCH = 2, 2, 12
# The spawn takes 10-60 s; past this the ranks are taken to hang.
HANG_S = 150


class _Marker:
    """A stand-in encoder: loading must succeed, the batch content does not matter here."""

    def load(self, item, *, train=False):
        assert isinstance(item, (str, bytes)) and len(item) > 0
        return torch.zeros(1)

    def collate(self, samples):
        return torch.stack(samples)


def _epoch_rows(data, epoch, rank, world, start=0, segments=None, stop_after=None):
    valid = torch.tensor([i not in data.bad_rows for i in range(len(data))])
    enc = _Marker()
    loader, segs = train_loader(
        data,
        train_items(data, "satellite", enc, seed=0),
        valid=valid,
        batch_size=BATCH,
        seed=0,
        epoch=epoch,
        step_in_epoch=start,
        rank=rank,
        world=world,
        num_workers=WORKERS,
        collate_fn=_CollateTrain(enc, None),
        segments=segments,
        shuffle_buffer=5,
    )
    batches = []
    for idx, _, _, bad in loader:
        assert not bad
        batches.append(idx.tolist())
        if stop_after is not None and len(batches) == stop_after:
            break
    return batches, segs


def _gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _worker(rank: int, port: int, paths: dict, cache: str) -> None:
    rank_env(rank, port, WORLD, GEOBIND_CACHE=cache)
    # Loader workers fork from the rank, as under torchrun on Linux (a spawned rank would
    # otherwise spawn its workers too, paying an interpreter start-up for each).
    torch.multiprocessing.set_start_method("fork", force=True)
    gbdist.init_distributed(backend="gloo")
    results = {}
    try:
        for kind in ("manifest", "shards"):
            data = read_dataset(paths[kind])
            for epoch in (0, 1):
                batches, _ = _epoch_rows(data, epoch, rank, WORLD)
                results[f"{kind}/epoch{epoch}"] = _gather(batches)
            # Epoch 2 is interrupted after 1 step; the parent resumes it on 1 rank.
            batches, segs = _epoch_rows(data, 2, rank, WORLD, stop_after=1)
            results[f"{kind}/epoch2-part"] = _gather(batches)
            results[f"{kind}/segments"] = segs
        # The trainer itself: 2 ranks, interrupted at step 2 of 3 by a Ctrl-C that reaches rank 1
        # only (during its second step): both ranks stop together after that step.
        cfg = parse_config(json.loads(Path(paths["config"]).read_text()))
        try:
            with sigint_during_step(2) if rank == 1 else contextlib.nullcontext():
                train(cfg, progress=False, log=None)
            results["interrupted"] = False
        except TrainingInterrupted:
            results["interrupted"] = True
        results["ranks_interrupted"] = _gather(results["interrupted"])
        if rank == 0:
            Path(paths["results"]).write_text(json.dumps(results))
    finally:
        gbdist.cleanup()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_every_sample_once_per_epoch_over_ranks_and_workers_and_resume_on_other_ranks(
    tiny_data, tmp_path, monkeypatch
):

    cache = str(tmp_path / "geobind-cache")
    monkeypatch.setenv("GEOBIND_CACHE", cache)
    shards = tmp_path / "shards"
    pack(
        tiny_data["stage1"],
        shards,
        shard_size=5,
        image_size=0,
        image_format="png",
        progress=False,
        log=None,
    )
    cfg = tiny_config({**tiny_data, "stage1": shards}, tmp_path / "run", audio=False)
    cfg["stages"][0]["optim"].update(
        max_steps=0, epochs=2, batch_size=BATCH, num_workers=WORKERS, ckpt_every=100
    )
    cfg["eval"] = None
    paths = {
        "manifest": str(tiny_data["stage1"]),
        "shards": str(shards),
        "config": str(tmp_path / "cfg.json"),
        "results": str(tmp_path / "results.json"),
    }
    Path(paths["config"]).write_text(json.dumps(cfg))
    # A CPython with the fork deadlock (gh-112275, which the README warns of) can hang a loader
    # worker as it is forked: there a hang gets one fresh try before it counts as a failure.
    for attempt in (1, 2):
        try:
            spawn_with_deadline(_worker, (free_port(), paths, cache), WORLD, HANG_S)
            break
        except pytest.fail.Exception as e:
            if attempt == 2 or "did not end" not in str(e) or not fork_may_hang():
                raise
            shutil.rmtree(tmp_path / "run", ignore_errors=True)
            Path(paths["results"]).unlink(missing_ok=True)
    res = json.loads(Path(paths["results"]).read_text())

    everyone = list(range(36))  # 36 rows, batches of 12: nothing left over
    for kind in ("manifest", "shards"):
        orders = []
        for epoch in (0, 1):
            per_rank = res[f"{kind}/epoch{epoch}"]
            assert [len(b) for b in per_rank] == [3, 3]  # same number of steps on every rank
            assert all(len(x) == BATCH // WORLD for b in per_rank for x in b)
            seen = sorted(i for b in per_rank for x in b for i in x)
            assert seen == everyone, (kind, epoch)
            orders.append([x for b in per_rank for x in b])
        assert orders[0] != orders[1]  # reshuffled every epoch
        # Resume epoch 2 on one rank: the rest of the epoch, nothing twice, nothing lost.
        done = [i for b in res[f"{kind}/epoch2-part"] for x in b for i in x]
        assert len(done) == BATCH
        data = read_dataset(paths[kind])
        rest, segs = _epoch_rows(data, 2, 0, 1, start=1, segments=res[f"{kind}/segments"])
        assert len(rest) == 2 and all(len(x) == BATCH for x in rest)
        assert sorted(done + [i for x in rest for i in x]) == everyone
        if kind == "shards":
            assert segs == [[WORLD, WORKERS, 0], [1, WORKERS, 1]]

    # The trainer: both ranks stopped together, rank 0 wrote the checkpoint; resume on 1 rank.
    assert res["ranks_interrupted"] == [True, True]
    # On a Python with the fork deadlock, the run log warns once (rank 0).
    warned = (tmp_path / "run" / "train.log").read_text().count("can hang while forking loader workers")
    assert warned == (1 if fork_may_hang(tuple(sys.version_info[:3])) else 0)
    stage = tmp_path / "run" / "stages" / "01-satellite"
    ck = torch.load(stage / "checkpoint.pt", weights_only=False)
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"], ck["world_size"]) == (2, 0, 2, WORLD)
    assert ck["segments"] == [[WORLD, WORKERS, 0]]
    said = []
    final = train(parse_config(cfg), resume=True, progress=False, log=said.append)
    assert any("resumed at step 2 (epoch 1, batch 2)" in s for s in said), said
    done = json.loads((stage / "done.json").read_text())
    assert done["steps"] == 6 and (final / "geobind.json").is_file()
    assert torch.load(stage / "checkpoint.pt", weights_only=False)["world_size"] == 1
