"""Training does not depend on what is shown or on how the anchor embeddings were obtained.

The audio stage's encoder has dropout, so it draws from the global torch RNG every step: any
extra draw before the loop (a progress bar over the anchor-cache loader used to make one)
changed its weights, while the satellite stage (no dropout) stayed identical.
"""

import csv

import torch
from fixtures import tiny_config
from safetensors.torch import load_file

from geobind.binding.trainer import train
from geobind.config import parse_config

STAGES = {"01-satellite": "satellite", "02-audio": "audio"}
LOGGED = ("step", "epoch", "loss", "lr", "logit_scale")  # not the timings


def _run(tiny_data, out, *, progress: bool, cache_dir=None, validate: bool = False):
    d = tiny_config(tiny_data, out, steps=4)
    d["eval"] = None
    if cache_dir is not None:
        d["cache_dir"] = str(cache_dir)
    if validate:  # the audio stage validates every 2 steps on the test split
        d["stages"][1]["data"]["val"] = str(tiny_data["test"])
        d["stages"][1]["optim"]["val_every"] = 2
    train(parse_config(d), progress=progress, log=None)
    weights = {s: load_file(str(out / "stages" / s / "model" / m / "model.safetensors")) for s, m in STAGES.items()}
    with open(out / "stages" / "02-audio" / "metrics.csv", newline="") as f:
        logged = [tuple(r[k] for k in LOGGED) for r in csv.DictReader(f) if r["loss"]]  # not validation rows
    assert logged, "no metrics rows"
    return weights, logged


def _assert_same(a, b):
    (wa, la), (wb, lb) = a, b
    for stage in STAGES:
        assert wa[stage].keys() == wb[stage].keys()
        for k in wa[stage]:
            assert torch.equal(wa[stage][k], wb[stage][k]), f"{stage}: {k} differs"
    assert la == lb


def test_progress_bars_do_not_change_training(tiny_data, tmp_path):
    shown = _run(tiny_data, tmp_path / "shown", progress=True)
    hidden = _run(tiny_data, tmp_path / "hidden", progress=False)
    _assert_same(shown, hidden)


def test_an_anchor_cache_hit_trains_like_a_miss(tiny_data, tmp_path):
    cache = tmp_path / "cache"
    miss = _run(tiny_data, tmp_path / "miss", progress=False, cache_dir=cache)
    assert any(cache.glob("anchor-*.safetensors"))
    hit = _run(tiny_data, tmp_path / "hit", progress=False, cache_dir=cache)
    _assert_same(miss, hit)


def test_validating_during_a_stage_does_not_change_its_training(tiny_data, tmp_path):
    plain = _run(tiny_data, tmp_path / "plain", progress=False)
    validated = _run(tiny_data, tmp_path / "validated", progress=False, validate=True)
    _assert_same(plain, validated)
