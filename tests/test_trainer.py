import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import one_epoch_with_a_broken_tile, sigint_during_step, tiny_config
from safetensors.torch import load_file
from test_model import build_space
from torch import nn

from geobind import GeoBind
from geobind.binding.stage import BindingStage, total_loss
from geobind.binding.trainer import TrainingInterrupted, train
from geobind.cli import main
from geobind.config import ConfigError, parse_config
from geobind.data.manifest import read_dataset
from geobind.encoders import Encoder, l2_normalize, register_encoder
from geobind.modality import ModalitySpec, register_modality


def test_anchor_is_bit_identical_after_a_training_step(tiny_data):
    """The stage freezes its anchor at construction (no parameter requires grad, so none can
    reach an optimiser built from the stage's parameters), keeps it in eval mode, and a
    training step leaves it bit-identical while the trained tower moves."""
    model = build_space(tiny_data)
    ground, sat = model.encoder("ground"), model.encoder("satellite")
    assert all(p.requires_grad for p in ground.parameters())
    stage = BindingStage(sat, ground, symmetric=False)
    assert not any(p.requires_grad for p in ground.parameters())
    assert not any(p.requires_grad for _, p in stage.anchor.named_parameters())
    assert all(p.requires_grad for p in sat.parameters())
    stage.train()
    assert not ground.training and sat.training
    before = {k: v.clone() for k, v in ground.state_dict().items()}
    sat_before = {k: v.clone() for k, v in sat.state_dict().items()}
    t = read_dataset(tiny_data["stage1"])
    x = sat.collate([sat.load(p, train=True) for p in t.columns["satellite"][:8]])
    g = ground.collate([ground.load(p) for p in t.columns["ground"][:8]])
    opt = torch.optim.AdamW([p for _, p in stage.trainable_parameters()], lr=1e-2)
    out = stage(x, anchor_inputs=g)
    total_loss(out).backward()
    opt.step()
    assert all(p.grad is None for p in ground.parameters())
    for k, v in ground.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, sat_before[k]) for k, v in sat.state_dict().items())
    assert set(out) >= {"contrastive_loss", "logit_scale"}


def _weights(model_dir):
    return {k: v for k, v in load_file(str(model_dir / "satellite" / "model.safetensors")).items()}


def test_interrupted_and_resumed_run_matches_uninterrupted(tiny_data, tmp_path):
    def cfg(out):
        d = tiny_config(tiny_data, out, steps=6, audio=False)
        d["stages"][0]["optim"].update(epochs=2, max_steps=0, batch_size=12, ckpt_every=100)
        d["stages"][0]["loss"] = {"queue_size": 20}
        d["eval"] = None
        return parse_config(d)

    full = train(cfg(tmp_path / "a"), progress=False, log=None)
    with pytest.raises(TrainingInterrupted) as e:
        train(cfg(tmp_path / "b"), progress=False, log=None, stop_at_step=4)  # mid second epoch
    assert e.value.checkpoint.is_file()
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg(tmp_path / "b"), progress=False, log=None)
    said = []
    resumed = train(cfg(tmp_path / "b"), resume=True, progress=False, log=said.append)
    # It really continued (a restart from scratch would also end with equal weights).
    assert any("resumed at step 4 (epoch 2, batch 1)" in s for s in said), said
    wa, wb = _weights(full), _weights(resumed)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    ma = json.loads((full / "geobind.json").read_text())
    mb = json.loads((resumed / "geobind.json").read_text())
    assert ma["logit_scales"] == mb["logit_scales"]
    assert ma["stages"][0]["final_loss"] == mb["stages"][0]["final_loss"]
    assert ma["stages"][0]["steps"] == 6


def test_resume_keeps_skip_counts_and_refuses_changed_settings(tiny_data, tmp_path):
    """Skips of the anchor pass are counted once, also after a resume; a resume that changes
    what the run has already trained on (of a finished stage or one with a checkpoint) is refused
    and names the setting, while loader workers may change."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data["root"], data)
    ground = read_dataset(data / "stage1.csv").columns["ground"]
    open(ground[0], "r+b").truncate(20)  # the anchor pass skips this photo once per run

    def cfg(out, steps=0, **optim):
        d = tiny_config({**tiny_data, "stage1": data / "stage1.csv"}, out, audio=False)
        d["stages"][0]["optim"].update({"epochs": 2, "max_steps": steps, "batch_size": 12, "ckpt_every": 100, **optim})
        d["eval"] = None
        return parse_config(d)

    full = train(cfg(tmp_path / "a"), progress=False, log=None)
    with pytest.raises(TrainingInterrupted):
        train(cfg(tmp_path / "b"), progress=False, log=None, stop_at_step=3)
    with pytest.raises(ValueError, match=r"stages\.satellite\.optim\.lr \(0\.001 -> 0\.002\)"):
        train(cfg(tmp_path / "b", lr=2e-3), resume=True, progress=False, log=None)
    # Loader workers and how often rows and checkpoints are written change no weights: resumable.
    resumed = train(cfg(tmp_path / "b", num_workers=1, log_every=2, ckpt_every=50), resume=True, progress=False,
                    log=None)
    sa = json.loads((full / "geobind.json").read_text())["stages"][0]
    sb = json.loads((resumed / "geobind.json").read_text())["stages"][0]
    assert sa["bad_samples"] == sb["bad_samples"] and sum(sa["bad_samples"].values()) == 1
    assert sa["epochs_seen"] == sb["epochs_seen"] == 2
    assert json.loads((tmp_path / "b" / "stages" / "01-satellite" / "done.json").read_text())["bad_samples"] == \
        sa["bad_samples"]
    # The stage is finished: more steps or another seed are refused too, and the run's
    # config.yaml still holds the settings it was trained with.
    with pytest.raises(ValueError, match=r"stages\.satellite\.optim\.max_steps \(0 -> 5\); seed|seed .*max_steps"):
        d = cfg(tmp_path / "b", steps=5)
        train(parse_config({**d.to_dict(), "seed": 3}), resume=True, progress=False, log=None)
    assert yaml.safe_load((tmp_path / "b" / "config.yaml").read_text())["seed"] == 0


def test_a_resumed_dropout_stage_matches_the_uninterrupted_one(tiny_data, tmp_path):
    """The audio tower has dropout: its masks come from the global RNG, which the resumed run's
    fresh loader pass must not move (each DataLoader has a generator of its own)."""

    def cfg(out):
        d = tiny_config(tiny_data, out, steps=2)
        d["stages"][1]["optim"].update(epochs=2, max_steps=0, batch_size=16, ckpt_every=100)
        d["eval"] = None
        return parse_config(d)

    full = train(cfg(tmp_path / "a"), progress=False, log=None)
    stop = len(read_dataset(tiny_data["stage2"])) // 16 + 1  # one batch into stage 2's second epoch
    assert stop > 2  # stage 1 (2 steps) finishes first
    with pytest.raises(TrainingInterrupted):
        train(cfg(tmp_path / "b"), progress=False, log=None, stop_at_step=stop)
    resumed = train(cfg(tmp_path / "b"), resume=True, progress=False, log=None)
    wa = load_file(str(full / "audio" / "model.safetensors"))
    wb = load_file(str(resumed / "audio" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_validations_change_no_weight_so_a_resume_may_change_val_every(tiny_data, tmp_path):
    """The audio stage (dropout: masks from the global RNG) trains to the same weights with a
    validation every 2 steps, with none, and resumed with another ``val_every``."""

    def cfg(out, val_every):
        d = tiny_config(tiny_data, out, steps=2)
        d["stages"][1]["data"]["val"] = str(tiny_data["test"])
        d["stages"][1]["optim"].update(max_steps=5, batch_size=16, ckpt_every=100, val_every=val_every)
        d["eval"] = None
        return parse_config(d)

    def audio_weights(model_dir):
        return load_file(str(model_dir / "audio" / "model.safetensors"))

    ref = audio_weights(train(cfg(tmp_path / "a", 0), progress=False, log=None))
    often = train(cfg(tmp_path / "b", 2), progress=False, log=None)
    rows = list(csv.DictReader(open(often.parent / "stages" / "02-audio" / "metrics.csv")))
    assert [r["step"] for r in rows if r.get("val_median_rank")] == ["2", "4", "5"], rows
    with pytest.raises(TrainingInterrupted):
        train(cfg(tmp_path / "c", 2), progress=False, log=None, stop_at_step=3)
    resumed = train(cfg(tmp_path / "c", 0), resume=True, progress=False, log=None)
    for w in (audio_weights(often), audio_weights(resumed)):
        assert w.keys() == ref.keys()
        for k in ref:
            assert torch.equal(w[k], ref[k]), k


# A toy third modality: registered here, with no edits to the trainer.
register_modality(ModalitySpec("toy_place", "latlon", (), "lat/lon of the place"), exist_ok=True)


@register_encoder("toy_location")
class ToyLocationEncoder(Encoder):
    def __init__(self, modality, dim, hidden=32):
        super().__init__(modality, dim)
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(6, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def load(self, item, *, train=False):
        lat, lon = (torch.tensor(v, dtype=torch.float32).deg2rad() for v in item)
        return torch.stack([lat.sin(), lat.cos(), lon.sin(), lon.cos(), (2 * lon).sin(), (2 * lon).cos()])

    def forward(self, batch):
        return l2_normalize(self.net(batch.to(self.device)))

    def settings(self):
        return {"hidden": self.hidden}

    @classmethod
    def create(cls, modality, spec, dim, space):
        return cls(modality, dim, spec.get("hidden", 32))

    def save(self, directory):
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.net.state_dict(), str(directory / "model.safetensors"))

    @classmethod
    def from_saved(cls, modality, directory, settings, dim, shared):
        enc = cls(modality, dim, settings["hidden"])
        enc.net.load_state_dict(load_file(str(directory / "model.safetensors")))
        return enc


def test_a_third_modality_needs_only_config_and_a_registered_encoder(tiny_data, tmp_path):
    d = tiny_config(tiny_data, tmp_path / "run", steps=3, audio=False)
    d["stages"].append({
        "name": "place", "train": "toy_place", "bind_to": "satellite",
        "encoder": {"type": "toy_location", "hidden": 16},
        "data": {"train": str(tiny_data["stage2"])},
        "optim": {"batch_size": 8, "max_steps": 3, "lr": 1e-2},
    })
    final = train(parse_config(d), progress=False, log=None)
    model = GeoBind.from_pretrained(final)
    assert set(model.modalities) == {"ground", "text", "satellite", "toy_place"}
    assert [s["name"] for s in model.meta["stages"]] == ["satellite", "place"]
    e = model.embed("toy_place", [(48.1, 11.6), (-33.9, 151.2)])
    assert e.shape == (2, 32)
    from geobind.evaluate import evaluate

    report = evaluate(model, read_dataset(tiny_data["test"]))
    assert "toy_place->text" in report["pairs"]
    # The pairs trained together; toy_place<->text is emergent (never trained together).
    assert report["trained_pairs"] == ["ground<->satellite", "ground<->text", "satellite<->toy_place"]


def test_bad_training_samples_are_skipped_and_counted(tiny_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_data["root"], data)
    (data / "sat" / "0000.png").write_bytes(b"\x89PNG truncated")
    (data / "ground" / "0005.png").unlink()
    d = tiny_config({**tiny_data, "stage1": data / "stage1.csv"}, tmp_path / "run", steps=4, audio=False)
    d["stages"][0]["optim"].update(max_steps=0, epochs=2)
    said = []
    final = train(parse_config(d), progress=False, log=said.append)
    done = json.loads((tmp_path / "run" / "stages" / "01-satellite" / "done.json").read_text())
    # The missing ground photo is dropped by the anchor cache; the broken tile when loaded.
    assert done["bad_samples"] == {"missing": 1, "undecodable": 2}  # the tile once an epoch
    said = "\n".join(said)
    assert "anchor cache written" in said and "; 1 rows left out (missing: 1)" in said, said
    # Each epoch reports its own skips: the broken tile, not the anchor's row again, nor "0".
    assert said.count("skipped 1 bad samples (undecodable: 1)") == 2 and "skipped 0" not in said, said
    assert said.count("skipping bad sample") == 1, said  # named once, counted every epoch
    # Only the anchor's row left out: the epochs skip nothing, and say nothing of it.
    (data / "sat" / "0000.png").write_bytes((tiny_data["root"] / "sat" / "0000.png").read_bytes())
    d["output_dir"] = str(tmp_path / "anchor-only")
    said = []
    train(parse_config(d), progress=False, log=said.append)
    assert not any("bad samples (" in line for line in said), said
    assert (final / "geobind.json").is_file()
    d["stages"][0]["data"]["strict"] = True
    d["output_dir"] = str(tmp_path / "strict")
    with pytest.raises(Exception, match="0005.png: missing"):
        train(parse_config(d), progress=False, log=None)


def test_cli_two_stage_train_and_eval(tiny_data, tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "run", steps=3)))
    assert main(["train", str(cfg), "--no-progress", "--set", "stages.audio.optim.max_steps=2"]) == 0
    # Without a bar (a batch job's log), each metrics row is one line.
    trained = capsys.readouterr().out
    assert "stage satellite: step 3/3 (epoch 1) loss " in trained and "stage audio: step 2/2 (epoch 1) loss " in trained
    # The run log says what each stage trains, from its start.
    run_log = (tmp_path / "run" / "train.log").read_text()
    assert "stage satellite: training satellite to match ground: 3 steps" in run_log
    assert "stage audio: training audio to match satellite: 2 steps" in run_log
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(report["pairs"]) == 12
    for m in report["pairs"].values():
        assert set(m) >= {"R@1", "R@5", "R@10", "median_rank", "n"} and m["n"] == 12
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tmp_path / "run" / "model"), "--data", str(tiny_data["test"]),
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["pairs"] == report["pairs"]
    assert "audio->text *" in capsys.readouterr().out
    # Never overwrite without --force; a second train into the same folder needs --resume.
    assert main(["eval", "--model", str(tmp_path / "run" / "model"), "--data", str(tiny_data["test"]),
                 "--out", str(out)]) == 2
    assert main(["train", str(cfg), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing"), "--data", str(tiny_data["test"])]) == 2
    # Unusable rows are left out, counted and said; with no pair left to rank, eval fails.
    import pandas as pd

    test = pd.read_csv(tiny_data["test"])
    for m in ("satellite", "ground"):
        test[m] = str(tiny_data["root"]) + "/" + test[m]
    test.loc[0, "satellite"] = "sat/none.png"
    test[["id", "lat", "lon", "satellite", "ground"]].to_csv(tmp_path / "one-bad.csv", index=False)
    assert main(["eval", "--model", str(tmp_path / "run" / "model"), "--data", str(tmp_path / "one-bad.csv"),
                 "--out", str(tmp_path / "one-bad.json")]) == 0
    printed = capsys.readouterr().out
    assert "skipped unusable rows: satellite 1 (missing 1)" in printed and "emergent" not in printed
    bad_report = json.loads((tmp_path / "one-bad.json").read_text())
    assert bad_report["skipped"] == {"satellite": {"missing": 1}}
    assert bad_report["pairs"]["satellite->ground"]["n"] == 11  # a trained pair: no emergent note
    test["satellite"] = "sat/none.png"
    test[["id", "lat", "lon", "satellite", "ground"]].to_csv(tmp_path / "all-bad.csv", index=False)
    assert main(["eval", "--model", str(tmp_path / "run" / "model"), "--data", str(tmp_path / "all-bad.csv")]) == 2
    assert "nothing to rank (unusable rows: satellite 12 (missing 12))" in capsys.readouterr().err


def test_lr_schedule_warms_up_linearly_to_the_peak_then_decays_by_cosine_to_the_floor():
    """``lr_lambda(total, warmup, floor)``: step s < warmup gives (s + 1) / warmup, so the first
    step already trains and the last warmup step reaches the peak; then a cosine from 1 at step
    ``warmup`` to ``floor`` at step ``total``, and ``floor`` after it. Values worked out by hand."""
    from geobind.binding.trainer import lr_lambda

    f = lr_lambda(10, 4, 0.1)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)  # the peak, where the cosine starts
    assert f(7) == pytest.approx(0.55)  # half-way: floor + (1 - floor) / 2
    assert f(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 6)))
    assert f(10) == pytest.approx(0.1) and f(25) == pytest.approx(0.1)
    g = lr_lambda(5, 0, 0.0)  # no warmup: the peak at once, zero at the end
    assert [g(s) for s in (0, 1, 5)] == pytest.approx([1.0, 0.5 * (1 + math.cos(math.pi / 5)), 0.0])


def test_metrics_csv_appends_and_grows_columns(tmp_path):
    import csv

    from geobind.binding.trainer import _MetricsWriter

    w = _MetricsWriter(tmp_path / "metrics.csv")
    w.row({"step": 4, "epoch": 1, "val_R@1": 0.5})
    w.row({"step": 10, "epoch": 1, "loss": 2.0, "lr": 0.1})
    w.row({"step": 20, "epoch": 2, "loss": 1.5, "lr": 0.05})
    w.row({"step": 30, "epoch": 2, "loss": 1.0, "bad_missing": 1})
    w.close()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["step"] for r in rows] == ["4", "10", "20", "30"]
    assert list(rows[0])[:4] == ["step", "epoch", "loss", "lr"]
    assert rows[0]["val_R@1"] == "0.5" and rows[2]["loss"] == "1.5" and rows[3]["bad_missing"] == "1"
    assert rows[1]["bad_missing"] == ""


def test_validation_is_not_repeated_on_the_same_weights(tiny_data, tmp_path):
    d = tiny_config(tiny_data, tmp_path / "run", steps=4, audio=False)
    d["stages"][0]["data"]["val"] = str(tiny_data["test"])
    d["stages"][0]["optim"]["val_every"] = 2
    d["eval"] = None
    said = []
    final = train(parse_config(d), progress=False, log=said.append)
    vals = [s for s in said if ": val satellite->ground" in s]
    assert [v.split(":")[0] for v in vals] == ["stage satellite step 2", "stage satellite step 4"]
    assert json.loads((final / "geobind.json").read_text())["stages"][0]["val"]["n"] == 12


def test_loader_workers_auto(monkeypatch):
    """``optim.num_workers: auto``: none on a CPU; on a GPU the rank's share of the cores less
    one, at most 8; a number is kept as given; anything else is a config error."""
    from geobind.distributed import loader_workers

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert loader_workers("auto", cpu) == 0 and loader_workers(3, cpu) == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert loader_workers("auto", gpu) == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert loader_workers("auto", gpu) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert loader_workers("auto", gpu) == 0


def test_num_workers_must_be_auto_or_a_count(tiny_data, tmp_path):
    d = tiny_config(tiny_data, tmp_path / "run", audio=False)
    d["stages"][0]["optim"]["num_workers"] = "many"
    with pytest.raises(ConfigError, match="optim.num_workers"):
        parse_config(d)
    d["stages"][0]["optim"]["num_workers"] = "auto"
    assert parse_config(d).stages[0].optim.num_workers == "auto"


def test_resolve_device_always_names_the_cuda_index(monkeypatch):
    """``device: cuda`` resolves to ``cuda:N``, so the trainer's checks of where a tensor lives
    (``tensor.device == device``) hold for tensors placed on it."""
    from geobind.binding.trainer import resolve_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with 2 GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda", torch.device("cpu")) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", torch.device("cpu")) == torch.device("cuda", 1)
    assert resolve_device("cpu", torch.device("cuda", 0)) == torch.device("cpu")
    assert resolve_device("auto", torch.device("cpu")) == torch.device("cpu")


def test_padding_rows_reach_neither_the_loss_nor_the_gradients_nor_the_queue(tiny_data):
    """A batch padded to a fixed size with ``n_valid`` gives the loss, the encoder gradients
    and the queue of the unpadded batch."""
    from geobind.search.embed import pad_batch

    model = build_space(tiny_data)
    t = read_dataset(tiny_data["stage1"])
    sat = model.encoder("satellite")
    x = sat.collate([sat.load(p, train=True) for p in t.columns["satellite"][:5]])
    g = torch.Generator().manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(5, model.dim, generator=g), dim=1)
    old = torch.nn.functional.normalize(torch.randn(3, model.dim, generator=g), dim=1)
    keys = torch.arange(5)
    padded = pad_batch(x, 8)
    assert padded["pixels"].shape[0] == 8

    results = []
    for inputs, n_valid in ((x, None), (padded, 5)):
        stage = BindingStage(model.encoder("satellite"), model.encoder("ground"), symmetric=True, queue_size=16)
        stage.train().zero_grad(set_to_none=True)  # the space hands out the same encoder twice
        stage.queue.enqueue(old, [100, 101, 102])
        out = stage(inputs, anchor_emb=anchors, keys=keys, n_valid=n_valid)
        total_loss(out).backward()
        stage.queue.enqueue(out["anchor"].detach(), keys)
        grads = {n: p.grad.clone() for n, p in stage.trainable_parameters() if p.grad is not None}
        results.append((out["contrastive_loss"].detach(), out["embeddings"].shape[0], grads, len(stage.queue)))
    (loss0, n0, g0, q0), (loss1, n1, g1, q1) = results
    assert (n0, n1, q0, q1) == (5, 5, 8, 8)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)


def _two_rank_train(rank: int, port: int, d: dict, cache: str, own_output: bool = False) -> None:
    from dist_helpers import rank_env

    from geobind import distributed as gbdist

    rank_env(rank, port, 2, GEOBIND_CACHE=cache)
    if own_output:  # as on two machines that do not share output_dir
        d = {**d, "output_dir": f"{d['output_dir']}-rank{rank}"}
    try:
        train(parse_config(d), progress=False, log=None)
    except ValueError as e:
        if not own_output:
            raise
        Path(f"{d['output_dir']}.error").write_text(str(e))
    finally:
        gbdist.cleanup()


@pytest.mark.slow
def test_two_ranks_skip_a_bad_sample_once_and_train_on_every_other_sample(tiny_data, tmp_path, monkeypatch):
    """A tile that cannot be decoded on one rank costs that one sample only (the other rank
    keeps its full batch), is counted once, and two ranks end with the single process's weights."""
    from dist_helpers import free_port, spawn_with_deadline

    monkeypatch.setenv("GEOBIND_CACHE", str(tmp_path / "geobind-cache"))
    d = one_epoch_with_a_broken_tile(tiny_data, tmp_path)
    # Validation every 2 steps: each rank embeds its share of the validation rows.
    d["stages"][0]["data"]["val"] = str(tiny_data["test"])
    d["stages"][0]["optim"]["val_every"] = 2
    single = train(parse_config(d), progress=False, log=None)
    two = {**d, "output_dir": str(tmp_path / "two")}
    spawn_with_deadline(_two_rank_train, (free_port(), two, str(tmp_path / "geobind-cache")), 2, seconds=300)
    vals = {}
    for out in (tmp_path / "run", tmp_path / "two"):
        with open(out / "stages" / "01-satellite" / "metrics.csv") as f:
            vals[out.name] = [(r["step"], float(r["val_n"])) for r in csv.DictReader(f) if r.get("val_n")]
    assert vals["run"] == vals["two"] and [step for step, _ in vals["two"]] == ["2", "4"]
    # Two machines that do not share output_dir: refused on both ranks, before anything trains.
    spawn_with_deadline(_two_rank_train, (free_port(), {**d, "output_dir": str(tmp_path / "own")},
                                          str(tmp_path / "geobind-cache"), True), 2, seconds=300)
    for r in (0, 1):
        msg = (tmp_path / f"own-rank{r}.error").read_text()
        assert "rank 1 cannot see the files rank 0 writes there" in msg and "shares" in msg, msg
    assert not (tmp_path / "own-rank0" / "stages").exists()

    for out in (tmp_path / "run", tmp_path / "two"):
        done = json.loads((out / "stages" / "01-satellite" / "done.json").read_text())
        assert (done["steps"], done["samples"], done["bad_samples"]) == (4, 31, {"undecodable": 1}), out
        assert done["samples_per_s"] > 0 and 0 <= done["data_wait"] < 1
        log = (out / "train.log").read_text()
        assert "skipping bad sample" in log and "samples/s (data wait" in log
    w1 = load_file(str(single / "satellite" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model" / "satellite" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for k in w1:
        # Summation order differs between one and two processes; Adam turns that rounding into
        # up to ~1e-4 on weights whose gradient is ~0 (key biases), ~1e-8 elsewhere.
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=2e-4, msg=k)
    diff = torch.cat([(w2[k] - w1[k]).abs().flatten() for k in w1])
    assert diff.mean() < 1e-7


def test_a_validation_without_usable_rows_is_skipped_and_said(tiny_data, tmp_path):
    """A validation set none of whose tiles decode: each validation says it was skipped (on
    every rank alike: the check uses what every rank holds), and training goes on."""
    import csv as csv_mod

    data = tmp_path / "data"
    shutil.copytree(tiny_data["root"], data)
    with open(data / "test.csv") as f:
        for row in csv_mod.DictReader(f):
            (data / row["satellite"]).write_bytes(b"\x89PNG truncated")
    d = tiny_config({**tiny_data, "stage1": data / "stage1.csv"}, tmp_path / "run", steps=4, audio=False)
    d["eval"] = None
    d["stages"][0]["data"]["val"] = str(data / "test.csv")
    d["stages"][0]["optim"]["val_every"] = 2
    said = []
    train(parse_config(d), progress=False, log=said.append)
    skipped = [s for s in said if "validation skipped: none of the" in s]
    assert len(skipped) == 2 and "has a usable satellite and ground" in skipped[0]
    assert (tmp_path / "run" / "model" / "geobind.json").is_file()


@pytest.mark.slow
def test_a_rank_left_without_samples_stands_in_and_two_ranks_match_one_process(tiny_data, tmp_path, monkeypatch):
    """One sample per rank, and rank 1's sample of step 4 cannot be decoded: rank 1 runs its
    last batch as a stand-in (no rows counted, zero gradient) while rank 0 trains its sample,
    so the two ranks train on the single process's 35 samples in its 18 steps of one epoch
    and reach its weights; before, every rank skipped that step and took one from epoch 2."""
    from dist_helpers import free_port, spawn_with_deadline

    from geobind.binding.trainer import _EpochBatches

    cache = str(tmp_path / "geobind-cache")
    monkeypatch.setenv("GEOBIND_CACHE", cache)
    data = tmp_path / "data"
    shutil.copytree(tiny_data["root"], data)
    row = _EpochBatches(torch.ones(36, dtype=torch.bool), 2, 0, 0, 0, 0, 1).perm[2 * 3 + 1]
    (data / "sat" / f"{row:04d}.png").write_bytes(b"\x89PNG truncated")
    d = tiny_config({**tiny_data, "stage1": data / "stage1.csv"}, tmp_path / "run", audio=False)
    d["stages"][0]["optim"].update(max_steps=0, epochs=1, num_workers=0, grad_clip=0.0, batch_size=2,
                                   ckpt_every=100, log_every=6)
    d["eval"] = None
    single = train(parse_config(d), progress=False, log=None)
    spawn_with_deadline(_two_rank_train, (free_port(), {**d, "output_dir": str(tmp_path / "two")}, cache), 2,
                        seconds=300)
    for out in ("run", "two"):
        done = json.loads((tmp_path / out / "stages" / "01-satellite" / "done.json").read_text())
        assert (done["steps"], done["samples"], done["bad_samples"]) == (18, 35, {"undecodable": 1}), out
    w1 = load_file(str(single / "satellite" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "model" / "satellite" / "model.safetensors"))
    for k in w1:  # summation order differs between one and two processes (see the test above)
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=2e-4, msg=k)


def test_out_of_memory_says_what_to_change_and_keeps_the_checkpoint(tiny_data, tmp_path, monkeypatch, capsys):
    """A step that does not fit in memory stops the run with a message naming the stage, the
    batch and what to change; the checkpoint written before it is left in place."""
    from geobind.binding.step import StepRunner

    real = StepRunner.__call__
    calls = []

    def third_step_too_big(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(StepRunner, "__call__", third_step_too_big)
    cfg = tmp_path / "run.yaml"
    d = tiny_config(tiny_data, tmp_path / "run", steps=4, audio=False)
    cfg.write_text(yaml.safe_dump(d))
    assert main(["train", str(cfg), "--no-progress"]) == 1
    err = capsys.readouterr().err
    ckpt = tmp_path / "run" / "stages" / "01-satellite" / "checkpoint.pt"
    assert "stage satellite: out of cpu memory in step 3 with 8 samples per rank (optim.batch_size 8 over 1 rank)" in err
    assert "lower optim.batch_size (e.g. to 4)" in err and "optim.compile: true" in err
    assert f"The checkpoint {ckpt} is kept" in err
    assert torch.load(ckpt, weights_only=False)["step"] == 2


def test_a_starved_model_gets_one_hint_on_feeding_it_faster(tiny_data, tmp_path, monkeypatch):
    """When loader workers cannot keep up (here: tiles that take 150 ms each to load, slow
    enough that a tiny model's step on a busy machine still waits for them), the run log says so
    once, with what to change; loading in the main process on a CPU says nothing (there the
    model and the loader share the cores by design)."""
    import time

    from geobind.encoders.images import ImageTransform

    real = ImageTransform.__call__

    def slow(self, item, train=False):
        time.sleep(0.15)
        return real(self, item, train=train)

    monkeypatch.setattr(ImageTransform, "__call__", slow)
    logs = {}
    for workers in (1, 0):
        d = tiny_config(tiny_data, tmp_path / f"w{workers}", steps=4, audio=False)
        d["stages"][0]["optim"]["num_workers"] = workers
        d["eval"] = None
        train(parse_config(d), progress=False, log=None)
        logs[workers] = (tmp_path / f"w{workers}" / "train.log").read_text()
    hint = "of the time waiting for the loader, so the input, not the model, sets the pace"
    assert logs[1].count(hint) == 1
    # On a CPU, device augmentation would only move the loader's work into the training process.
    assert "augment_on: device" not in logs[1] and "geobind data pack` (`--image-size 256`" in logs[1]
    assert hint not in logs[0]
    from types import SimpleNamespace

    from geobind.binding.trainer import _data_wait_hint

    class Encoder:  # the parts of an encoder the hint reads
        transform = SimpleNamespace(augment="overhead", on_device=False)

        def __init__(self, cuda):
            self.cuda = cuda

        def parameters(self):
            return iter([SimpleNamespace(is_cuda=self.cuda)])

    assert "augment_on: device" in _data_wait_hint("s", 0.3, 2, 5, 1, Encoder(True), packed=True)
    assert "augment_on: device" not in _data_wait_hint("s", 0.3, 2, 5, 1, Encoder(False), packed=True)


def test_profile_records_the_chosen_steps_of_each_stage(tiny_data, tmp_path, capsys):
    """``--profile 1:2`` records steps 2-3 of each stage: a Chrome trace and a table of the
    costliest operators per stage; a malformed window is refused with the form to use."""
    cfg = tmp_path / "run.yaml"
    d = tiny_config(tiny_data, tmp_path / "run", steps=4)
    d["eval"] = None
    cfg.write_text(yaml.safe_dump(d))
    assert main(["train", str(cfg), "--no-progress", "--profile", "1:2"]) == 0
    out = capsys.readouterr().out
    for stage, name in (("01-satellite", "satellite"), ("02-audio", "audio")):
        folder = tmp_path / "run" / "stages" / stage / "profile"
        trace = json.loads((folder / "trace.json").read_text())
        assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
        table = (folder / "profile.txt").read_text()
        assert table.startswith(f"stage {name}: steps 2-3 of this session on cpu:") and "aten::" in table
        assert not list(folder.glob("*.tmp"))
    assert out.count("profiled steps 2-3") == 2
    d["output_dir"] = str(tmp_path / "late")
    cfg.write_text(yaml.safe_dump(d))
    assert main(["train", str(cfg), "--no-progress", "--profile", "10:2"]) == 0
    out = capsys.readouterr().out
    assert "stage satellite: nothing profiled: the window starts after step 10 of this session, and the stage ran 4" in out
    assert not (tmp_path / "late" / "stages" / "01-satellite" / "profile").exists()
    with pytest.raises(SystemExit):
        main(["train", str(cfg), "--profile", "5"])
    assert "use AFTER:STEPS, e.g. 50:5" in capsys.readouterr().err


def test_a_model_folder_of_other_files_is_refused_before_training(tiny_data, tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"model holds files that are not a GeoBind model \(notes.txt\)"):
        train(parse_config(tiny_config(tiny_data, out, steps=1)), progress=False, log=None)
    assert sorted(p.name for p in out.rglob("*")) == ["model", "notes.txt"]  # nothing written
    assert main(["train", str(tmp_path), "--no-progress"]) == 2  # a folder, not a config file


def test_every_missing_dataset_is_named_before_the_anchor_loads(tiny_data, tmp_path):
    d = tiny_config(tiny_data, tmp_path / "run", steps=1)
    d["stages"][0]["data"]["train"] = str(tmp_path / "nowhere" / "stage1.csv")
    d["stages"][1]["data"]["val"] = str(tmp_path / "nowhere" / "val.csv")
    d["stages"][1]["data"]["train"] = str(tmp_path / "shards" / "{000..003}.tar")  # a pattern: its reader's call
    with pytest.raises(FileNotFoundError, match=r"stages.satellite.data.train: .*stage1.csv; "
                                                r"stages.audio.data.val: .*val.csv$"):
        train(parse_config(d), progress=False, log=None)
    assert not (tmp_path / "run").exists()


def test_per_sample_seeding_leaves_the_gpu_generators_alone(monkeypatch):
    """Loading in the main process (num_workers 0) seeds the host RNGs per sample; reseeding
    CUDA's too would tie a GPU's dropout masks to the last sample loaded."""
    import random

    from geobind.binding.trainer import _seeded

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: calls.append(s))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: calls.append(s))
    before = torch.random.get_rng_state()
    with _seeded(7):
        first = (random.random(), torch.rand(1).item())
    with _seeded(7):
        assert (random.random(), torch.rand(1).item()) == first
    assert calls == [] and torch.equal(torch.random.get_rng_state(), before)


def test_shard_lists_pipes_and_other_layouts_are_left_to_their_readers(tiny_data, tmp_path):
    from geobind.binding.trainer import _missing_data

    d = tiny_config(tiny_data, tmp_path / "run", steps=1)
    d["eval"] = None
    for spec in (f"pipe:cat {tmp_path}/a.tar", f"{tmp_path}/a.tar::{tmp_path}/b.tar", "s3://bucket/{0..3}.tar"):
        d["stages"][0]["data"].update(train=spec, layout="shards")
        assert _missing_data(parse_config(d)) == [], spec
    d["stages"][0]["data"].update(train=str(tmp_path / "gone.tar"), layout="shards")
    assert _missing_data(parse_config(d)) == [f"stages.satellite.data.train: {tmp_path / 'gone.tar'}"]
    # optim.ckpt_every 0 (checkpoints at epoch ends only) is still a valid setting.
    d["stages"][0]["optim"]["ckpt_every"] = 0
    assert parse_config(d).stages[0].optim.ckpt_every == 0


def test_ctrl_c_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(tiny_data, tmp_path):
    """A real SIGINT during step 3 (with loader workers running): the step finishes, a checkpoint
    is written, and the resumed run ends with the uninterrupted run's weights."""
    import signal

    def cfg(out):
        d = tiny_config(tiny_data, out, steps=6, audio=False)
        d["stages"][0]["optim"].update(epochs=2, max_steps=0, batch_size=12, ckpt_every=100, num_workers=1)
        d["eval"] = None
        return parse_config(d)

    full = train(cfg(tmp_path / "a"), progress=False, log=None)
    said = []
    with sigint_during_step(3), pytest.raises(TrainingInterrupted, match="resumable checkpoint"):
        train(cfg(tmp_path / "b"), progress=False, log=said.append)
    assert any("stopping after this step" in s for s in said)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    ck = torch.load(tmp_path / "b" / "stages" / "01-satellite" / "checkpoint.pt", weights_only=False)
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"]) == (3, 1, 0)
    resumed = train(cfg(tmp_path / "b"), resume=True, progress=False, log=None)
    wa, wb = _weights(full), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # metrics.csv logs the rate each step used: warmup's first, the cosine's last above zero.
    import csv

    from geobind.binding.trainer import lr_lambda

    rows = [r for r in csv.DictReader(open(tmp_path / "a" / "stages" / "01-satellite" / "metrics.csv")) if r["lr"]]
    f = lr_lambda(6, 1, 0.0)
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3 * f(int(r["step"]) - 1) for r in rows])
    assert float(rows[-1]["lr"]) > 0
    done = json.loads((tmp_path / "b" / "stages" / "01-satellite" / "done.json").read_text())
    assert done["resumed_at_step"] == 3 and done["steps"] == 6


def test_a_second_signal_a_second_later_stops_at_once(monkeypatch):
    import signal

    from geobind.binding import trainer as trainer_mod

    now = [100.0]
    monkeypatch.setattr(trainer_mod.time, "monotonic", lambda: now[0])
    said = []
    with trainer_mod.StopRequests(said.append) as stop:
        stop._handle(signal.SIGINT, None)
        now[0] += 0.2
        stop._handle(signal.SIGINT, None)  # the same Ctrl-C forwarded by torchrun: one request
        assert stop.requested and len(said) == 1
        now[0] += 1.0
        with pytest.raises(KeyboardInterrupt):
            stop._handle(signal.SIGTERM, None)


def test_a_stop_comes_before_a_validation_and_an_untrained_run_may_change_settings(tiny_data, tmp_path):
    def cfg(out, seed=0):
        d = tiny_config(tiny_data, out, steps=4, audio=False)
        d["stages"][0]["optim"].update(val_every=2, log_every=1)
        d["stages"][0]["data"]["val"] = str(tiny_data["test"])
        d["eval"], d["seed"] = None, seed
        return parse_config(d)

    with sigint_during_step(2), pytest.raises(TrainingInterrupted):
        train(cfg(tmp_path / "run"), progress=False, log=None)
    stage = tmp_path / "run" / "stages" / "01-satellite"
    assert torch.load(stage / "checkpoint.pt", weights_only=False)["step"] == 2
    assert "val_R@1" not in (stage / "metrics.csv").read_text()  # stopped before validating
    # A run that failed before anything trained resumes with other settings.
    (stage / "checkpoint.pt").unlink()
    final = train(cfg(tmp_path / "run", seed=1), resume=True, progress=False, log=None)
    fresh = train(cfg(tmp_path / "fresh", seed=1), progress=False, log=None)
    wa, wb = _weights(final), _weights(fresh)  # the new seed's anchor, not the saved one
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fork_hang_warning_names_the_affected_pythons():
    from geobind.binding.trainer import FORK_HANG_WARNING, fork_may_hang

    for affected in [(3, 10, 13), (3, 10, 14), (3, 11, 0), (3, 11, 7), (3, 11, 9)]:
        assert fork_may_hang(affected), affected
    for fixed in [(3, 10, 15), (3, 11, 10), (3, 11, 14), (3, 12, 0), (3, 13, 1)]:
        assert not fork_may_hang(fixed), fixed
    msg = FORK_HANG_WARNING.format(version="3.11.7")
    assert "3.11.7" in msg and "optim.num_workers: 0" in msg and "gh-112275" in msg


def test_a_run_resumes_from_any_folder_and_from_its_saved_config(tiny_data, tmp_path, monkeypatch):
    """Paths in a config are relative to its file; the run keeps them absolute, so a stopped run
    resumes whichever folder the command starts in (or the config given by another path), and
    the config saved with it trains on the same files. A checkpoint of a run whose saved config
    still names its paths relative to where it started resumes from that folder."""
    import os

    conf = tmp_path / "proj" / "conf"
    conf.mkdir(parents=True)
    d = tiny_config(tiny_data, tmp_path / "x", steps=4, audio=False)
    d["stages"][0]["optim"].update(ckpt_every=100)
    d["eval"] = None
    rel = lambda p: os.path.relpath(p, conf)  # noqa: E731
    d["output_dir"] = "../runs/r"
    d["anchor"]["tokenizer"] = rel(d["anchor"]["tokenizer"])
    d["stages"][0]["data"]["train"] = rel(d["stages"][0]["data"]["train"])
    (conf / "run.yaml").write_text(yaml.safe_dump(d))
    monkeypatch.chdir(tmp_path / "proj")
    with sigint_during_step(2):
        assert main(["train", "conf/run.yaml"]) == 130
    saved = yaml.safe_load((tmp_path / "proj" / "runs" / "r" / "config.yaml").read_text())
    assert os.path.isabs(saved["stages"][0]["data"]["train"]) and os.path.isabs(saved["output_dir"])
    monkeypatch.chdir(tmp_path)  # another folder, and the config named another way
    assert main(["train", str(tmp_path / "proj" / "conf" / ".." / "conf" / "run.yaml"), "--resume"]) == 0
    done = json.loads((tmp_path / "proj" / "runs" / "r" / "stages" / "01-satellite" / "done.json").read_text())
    assert done["resumed_at_step"] == 2 and done["steps"] == 4
    # The saved config is a config: it names the same run and files.
    assert main(["train", str(tmp_path / "proj" / "runs" / "r" / "config.yaml"), "--resume"]) == 0

    # A run saved with paths relative to the folder it started in (and so another fingerprint).
    run = tmp_path / "proj" / "runs" / "old"
    monkeypatch.chdir(tmp_path / "proj")
    with sigint_during_step(2):
        assert main(["train", "conf/run.yaml", "--set", "output_dir=../runs/old"]) == 130
    stage = run / "stages" / "01-satellite"
    for f in (run / "config.yaml", stage / "config.yaml"):
        text = f.read_text().replace(str(tmp_path / "proj") + "/", "")
        f.write_text(text.replace(str(tiny_data["root"]), os.path.relpath(tiny_data["root"], tmp_path / "proj")))
    ck = torch.load(stage / "checkpoint.pt", weights_only=False)
    torch.save({**ck, "fingerprint": "0123456789abcdef"}, stage / "checkpoint.pt")
    assert "conf/" in (stage / "config.yaml").read_text() or "../" in (stage / "config.yaml").read_text()
    assert main(["train", "conf/run.yaml", "--set", "output_dir=../runs/old", "--resume"]) == 0


def test_a_diverged_loss_stops_the_run_and_batch_sizes_are_checked_before_training(tiny_data, tmp_path,
                                                                                  monkeypatch):
    from geobind.binding import stage as stage_mod
    from geobind.binding.trainer import TrainingDiverged

    d = tiny_config(tiny_data, tmp_path / "nan", audio=False)
    d["eval"] = None
    real = stage_mod.total_loss
    monkeypatch.setattr("geobind.binding.step.total_loss", lambda out: real(out) * float("nan"))
    with pytest.raises(TrainingDiverged, match=r"the loss became nan by step 1; the model was not saved") as e:
        train(parse_config(d), progress=False, log=None)
    assert str(e.value).endswith("Lower optim.lr or check the data")  # fp16 is named only under fp16
    assert not (tmp_path / "nan" / "model").exists()
    # NaN from step 3 on, read on log rows every 10 steps: the checkpoint due at step 4 is not
    # written with diverged weights; step 2's stays, and is finite.
    calls = []
    monkeypatch.setattr("geobind.binding.step.total_loss",
                        lambda out: real(out) * (float("nan") if calls.append(1) or len(calls) >= 3 else 1.0))
    d = tiny_config(tiny_data, tmp_path / "nan-later", steps=8, audio=False)
    d["eval"] = None
    d["stages"][0]["optim"].update(ckpt_every=2, log_every=10)
    with pytest.raises(TrainingDiverged, match=r"by step 4; the model was not saved, and neither was a checkpoint"):
        train(parse_config(d), progress=False, log=None)
    ck = torch.load(tmp_path / "nan-later" / "stages" / "01-satellite" / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["stage"].values())
    # fp16: the grad scaler skips a step whose loss is NaN, weights intact, and the run goes on.
    calls.clear()
    monkeypatch.setattr("geobind.binding.step.total_loss",
                        lambda out: real(out) * (float("nan") if calls.append(1) or len(calls) == 2 else 1.0))
    d = tiny_config(tiny_data, tmp_path / "fp16", steps=4, audio=False)
    d["eval"] = None
    d["stages"][0]["optim"].update(precision="fp16", log_every=2)
    final = train(parse_config(d), progress=False, log=None)
    weights = load_file(str(final / "satellite" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    monkeypatch.undo()
    # A later stage's batch larger than its data (36 places): said before stage 1 trains.
    d = tiny_config(tiny_data, tmp_path / "big")
    d["eval"] = None
    d["stages"][1]["optim"]["batch_size"] = 64
    with pytest.raises(ValueError, match=r"stages\.audio\.optim\.batch_size: 64 is more than the \d+ samples"):
        train(parse_config(d), progress=False, log=None)
    assert not (tmp_path / "big" / "stages" / "01-satellite").exists()
    # A warmup longer than the stage is said.
    d = tiny_config(tiny_data, tmp_path / "warm", steps=2, audio=False)
    d["eval"] = None
    d["stages"][0]["optim"]["warmup_steps"] = 100
    said = []
    train(parse_config(d), progress=False, log=said.append)
    assert any("warmup_steps (100) is not below the stage's 2 steps" in s for s in said)


def test_manifest_paths_written_from_the_working_folder_get_a_hint(tiny_data, tmp_path, monkeypatch):
    """Paths in a manifest are read relative to its folder; written relative to the working
    folder instead (ds/tiles/0.png in ds/m.csv), the preflight says so."""
    from PIL import Image

    from geobind.binding.trainer import _unreadable_data

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds" / "tiles").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (32, 32), (i * 40, 100, 50)).save(tmp_path / "ds" / "tiles" / f"{i}.png")
    (tmp_path / "ds" / "m.csv").write_text(
        "id,lat,lon,satellite,ground\n" + "".join(f"p{i},{i},{i},ds/tiles/{i}.png,ds/tiles/{i}.png\n" for i in range(3)))
    d = tiny_config({**tiny_data, "stage1": tmp_path / "ds" / "m.csv"}, tmp_path / "run", audio=False)
    d["eval"] = None
    problems = _unreadable_data(parse_config(d))
    assert len(problems) == 2 and all("ds/tiles/0.png exists relative to the working folder" in p for p in problems)


def test_a_warmup_as_long_as_the_stage_is_not_warned_about(tiny_data, tmp_path):
    """Warmup step s trains at (s + 1) / warmup of optim.lr, so a warmup of the stage's length
    reaches optim.lr in its last step: no warning. One step longer never does, and is warned."""
    for warmup, warned in ((2, False), (3, True)):
        d = tiny_config(tiny_data, tmp_path / f"warmup{warmup}", steps=2, audio=False)
        d["eval"] = None
        d["stages"][0]["optim"]["warmup_steps"] = warmup
        said = []
        train(parse_config(d), progress=False, log=said.append)
        assert any(f"warmup_steps ({warmup}) is not below the stage's 2 steps" in s for s in said) == warned, said
        with open(tmp_path / f"warmup{warmup}" / "stages" / "01-satellite" / "metrics.csv") as f:
            last_lr = float(list(csv.DictReader(f))[-1]["lr"])
        assert (last_lr == pytest.approx(1e-3)) != warned, last_lr


def test_a_refusal_every_rank_meets_is_reported_once(monkeypatch, capsys):
    """Rank 0's verdict on the run (its output_dir in use, say), raised alike on every rank, is
    printed by rank 0 alone; every rank exits 2."""
    import geobind.cli as cli

    def refuse(args):
        e = FileExistsError("output_dir runs/x is in use by another training process")
        e.on_every_rank = True
        raise e

    monkeypatch.setattr(cli, "cmd_train", refuse)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", "x.yaml"]) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert cli.main(["train", "x.yaml"]) == 2
    assert "geobind train: error: output_dir runs/x is in use" in capsys.readouterr().err


def test_a_stage_model_that_cannot_be_loaded_is_refused_before_any_stage_trains(tiny_data, tmp_path, monkeypatch):
    """Stage 2's `pretrained` model is checked with the rest of the run, not once stage 1 has
    trained: a folder that is not there, and a hub id that cannot be fetched (offline)."""
    from geobind.encoders.audio import tiny_clap_audio_spec

    d = tiny_config(tiny_data, tmp_path / "run", steps=2)
    d["stages"][1]["encoder"] = {"type": "clap_audio", **tiny_clap_audio_spec(32), "pretrained": "./no-such-clap"}
    d["stages"][1]["encoder"].pop("config", None)
    with pytest.raises(FileNotFoundError, match=r"stages.audio.encoder.pretrained: \S*no-such-clap is not a folder here"):
        train(parse_config(d), progress=False, log=None)
    assert not (tmp_path / "run" / "stages").exists() or not any((tmp_path / "run" / "stages").iterdir())

    import huggingface_hub

    def offline(repo_id, filename, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    d["stages"][1]["encoder"]["pretrained"] = "someone/clap-model"
    d["output_dir"] = str(tmp_path / "run2")
    with pytest.raises(FileNotFoundError, match=r"'someone/clap-model' is neither a folder beside the config nor "
                                                r"could it be fetched .*couldn't connect.*Offline\?"):
        train(parse_config(d), progress=False, log=None)
