"""Stopping a training run (Ctrl-C, SIGTERM, errors) and resuming it."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal

import pytest
import torch
from fixtures import sigint_during_step, tiny_config
from safetensors.torch import load_file

from geobind.binding.step import StepRunner
from geobind.binding.trainer import TrainingInterrupted, train
from geobind.config import parse_config
from geobind.data.errors import BadSampleError

STAGE = ("stages", "01-satellite")
TIMING = ("samples_per_s", "data_wait")  # wall-clock columns of metrics.csv


def _cfg(tiny_data, out, *, val_every=None, workers=0, data=None, **optim):
    """Stage 1 alone: 36 rows in batches of 12, 3 steps per epoch, 2 epochs."""
    d = tiny_config({**tiny_data, **({"stage1": data} if data else {})}, out, audio=False)
    d["stages"][0]["optim"].update({"epochs": 2, "max_steps": 0, "batch_size": 12, "ckpt_every": 100,
                                    "num_workers": workers, **optim})
    if val_every is not None:
        d["stages"][0]["optim"]["val_every"] = val_every
        d["stages"][0]["data"]["val"] = str(tiny_data["test"])
    if data is not None:
        d["stages"][0]["data"]["shuffle_buffer"] = 6
    d["eval"] = None
    return parse_config(d)


def _metrics(out):
    with open(out.joinpath(*STAGE, "metrics.csv"), newline="") as f:
        return [{k: v for k, v in r.items() if k not in TIMING} for r in csv.DictReader(f)]


def _weights(out):
    return load_file(str(out / "model" / "satellite" / "model.safetensors"))


def _same_run(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert _metrics(b) == _metrics(a)


def _step_hook(monkeypatch, at: dict):
    """Run ``at[n]()`` inside training step ``n`` (before the step computes)."""
    original, calls = StepRunner.__call__, [0]

    def call(self, *a, **k):
        calls[0] += 1
        if calls[0] in at:
            at[calls[0]]()
        return original(self, *a, **k)

    monkeypatch.setattr(StepRunner, "__call__", call)


def _sigint():
    os.kill(os.getpid(), signal.SIGINT)


def _second_signal_later():
    """A second Ctrl-C, as if it came a couple of seconds after the first."""
    _sigint()
    signal.getsignal(signal.SIGINT).__self__._at -= 2.0
    _sigint()


def _raise(e):
    def f():
        raise e
    return f


def _outer_handler(signum, frame):  # a handler the caller had installed before training
    pass


@pytest.mark.parametrize("end", ["finished", "stopped", "stopped_at_once", "step_error", "keyboard_interrupt",
                                 "strict_data_error"])
def test_signal_handlers_are_restored_on_every_way_out(tiny_data, tmp_path, monkeypatch, end):
    cfg = _cfg(tiny_data, tmp_path / "run", max_steps=3)
    expect = {"finished": None, "stopped": TrainingInterrupted, "stopped_at_once": TrainingInterrupted,
              "step_error": RuntimeError, "keyboard_interrupt": TrainingInterrupted,
              "strict_data_error": BadSampleError}[end]
    if end == "stopped":
        _step_hook(monkeypatch, {2: _sigint})
    elif end == "stopped_at_once":
        _step_hook(monkeypatch, {2: _second_signal_later})
    elif end == "step_error":  # e.g. CUDA running out of memory in a way torch does not name
        _step_hook(monkeypatch, {2: _raise(RuntimeError("CUDA error: an illegal memory access"))})
    elif end == "keyboard_interrupt":
        _step_hook(monkeypatch, {2: _raise(KeyboardInterrupt())})
    elif end == "strict_data_error":
        from fixtures import one_epoch_with_a_broken_tile

        d = one_epoch_with_a_broken_tile(tiny_data, tmp_path)
        d["stages"][0]["data"]["strict"] = True
        cfg = parse_config(d)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in before:
            signal.signal(s, _outer_handler)
        if expect is None:
            train(cfg, progress=False, log=None)
        else:
            with pytest.raises(expect):
                train(cfg, progress=False, log=None)
        assert signal.getsignal(signal.SIGINT) is _outer_handler
        assert signal.getsignal(signal.SIGTERM) is _outer_handler
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@pytest.mark.parametrize("case", ["first_step", "at_a_validation", "after_a_validation", "epoch_end",
                                  "epoch_end_validation"])
def test_a_stop_at_an_awkward_step_resumes_to_the_uninterrupted_run(tiny_data, tmp_path, monkeypatch, case):
    """Weights and every metrics.csv row (wall-clock columns aside) match the uninterrupted run."""
    at, val_every = {"first_step": (1, None), "at_a_validation": (2, 2), "after_a_validation": (3, 2),
                     "epoch_end": (3, None), "epoch_end_validation": (3, 0)}[case]
    full = train(_cfg(tiny_data, tmp_path / "a", val_every=val_every), progress=False, log=None)
    with sigint_during_step(at), pytest.raises(TrainingInterrupted, match="resumable checkpoint"):
        train(_cfg(tiny_data, tmp_path / "b", val_every=val_every), progress=False, log=None)
    ck = torch.load(tmp_path.joinpath("b", *STAGE, "checkpoint.pt"), weights_only=False)
    assert ck["step"] == at
    train(_cfg(tiny_data, tmp_path / "b", val_every=val_every), resume=True, progress=False, log=None)
    _same_run(full.parent, tmp_path / "b")


def test_a_resume_after_a_crash_logs_each_step_once(tiny_data, tmp_path, monkeypatch):
    """A crash in step 6 leaves metrics rows of step 5 and its validation, after the checkpoint
    of step 4; the resumed run trains step 5 again and logs it once."""
    def cfg(out):
        return _cfg(tiny_data, out, val_every=5, ckpt_every=4)

    full = train(cfg(tmp_path / "a"), progress=False, log=None)
    _step_hook(monkeypatch, {6: _raise(RuntimeError("CUDA error: an illegal memory access"))})
    with pytest.raises(RuntimeError, match="illegal memory"):
        train(cfg(tmp_path / "b"), progress=False, log=None)
    monkeypatch.undo()
    assert torch.load(tmp_path.joinpath("b", *STAGE, "checkpoint.pt"), weights_only=False)["step"] == 4
    assert [r["step"] for r in _metrics(tmp_path / "b")][-3:] == ["4", "5", "5"]
    train(cfg(tmp_path / "b"), resume=True, progress=False, log=None)
    _same_run(full.parent, tmp_path / "b")


def _two_ranks_stop_on_rank_1(rank: int, port: int, d: dict, cache: str, out: str) -> None:
    from dist_helpers import rank_env

    from geobind import distributed as gbdist
    from geobind.binding import trainer as trainer_mod

    rank_env(rank, port, 2, GEOBIND_CACHE=cache)
    saved, real = [], trainer_mod._atomic_save

    def save(obj, path):
        if path.name == "checkpoint.pt":
            saved.append((obj["step"], obj["epoch"], obj["step_in_epoch"]))
        real(obj, path)

    trainer_mod._atomic_save = save
    result = {"rank": rank, "error": None}
    try:
        # Rank 1 alone gets a SIGTERM during its last step of the first epoch (step 4 of 8),
        # whose batch is one sample short on that rank.
        with sigint_during_step(4, signal.SIGTERM) if rank == 1 else contextlib.nullcontext():
            train(parse_config(d), progress=False, log=None)
    except TrainingInterrupted as e:
        result["error"] = str(e)
    finally:
        result["saved"] = saved
        with open(f"{out}/rank{rank}.json", "w") as f:
            json.dump(result, f)
        gbdist.cleanup()


@pytest.mark.slow
def test_a_stop_on_one_rank_at_an_uneven_epoch_end_stops_both_with_one_checkpoint(tiny_data, tmp_path, monkeypatch):
    """2 ranks (gloo): the last batch of epoch 1 lacks a sample on rank 1, which alone is asked
    to stop during that step. Both ranks stop together at the epoch boundary, rank 0 writes the
    stop's checkpoint once, and resuming in one process reaches the uninterrupted run."""
    import shutil

    from dist_helpers import free_port, spawn_with_deadline

    from geobind.binding.trainer import _EpochBatches

    cache = str(tmp_path / "geobind-cache")
    monkeypatch.setenv("GEOBIND_CACHE", cache)
    data = tmp_path / "data"
    shutil.copytree(tiny_data["root"], data)
    perm = _EpochBatches(torch.ones(36, dtype=torch.bool), 8, 0, 0, 0, 0, 1).perm
    row = perm[3 * 8 + 4 + 1]  # in the second half (rank 1's) of epoch 1's last batch of 8
    (data / "sat" / f"{row:04d}.png").write_bytes(b"\x89PNG truncated")

    def cfg(out):
        d = tiny_config({**tiny_data, "stage1": data / "stage1.csv"}, out, audio=False)
        d["stages"][0]["optim"].update(max_steps=0, epochs=2, num_workers=0, grad_clip=0.0, ckpt_every=100)
        d["eval"] = None
        return d

    single = train(parse_config(cfg(tmp_path / "single")), progress=False, log=None)
    spawn_with_deadline(_two_ranks_stop_on_rank_1,
                        (free_port(), cfg(tmp_path / "two"), cache, str(tmp_path)), 2, seconds=120)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["error"] and r1["error"]  # both stopped
    # Epoch 1 ends with its checkpoint; the stop adds none of the same state.
    assert r0["saved"] == [[4, 1, 0]] and r1["saved"] == [], (r0, r1)
    ck = torch.load(tmp_path.joinpath("two", *STAGE, "checkpoint.pt"), weights_only=False)
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"], ck["bad"]) == (4, 1, 0, {"undecodable": 1})
    resumed = train(parse_config(cfg(tmp_path / "two")), resume=True, progress=False, log=None)
    w1, w2 = load_file(str(single / "satellite" / "model.safetensors")), _weights(resumed.parent)
    for k in w1:  # one and two processes sum in another order (see the two-rank trainer test)
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=2e-4, msg=k)
    done = json.loads(tmp_path.joinpath("two", *STAGE, "done.json").read_text())
    once = json.loads(tmp_path.joinpath("single", *STAGE, "done.json").read_text())
    assert (done["steps"], done["samples"], done["bad_samples"]) == \
        (once["steps"], once["samples"], once["bad_samples"]) == (8, 62, {"undecodable": 2})


def _cli_train(tiny_data, tmp_path, capsys, *extra):
    import yaml

    from geobind.cli import main

    d = tiny_config(tiny_data, tmp_path / "run", steps=6, audio=False)
    d["eval"] = None
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(d))
    rc = main(["train", str(tmp_path / "run.yaml"), "--no-progress", *extra])
    out = capsys.readouterr()
    return rc, out.out + out.err


def test_a_stop_says_once_what_happens_and_how_to_resume(tiny_data, tmp_path, monkeypatch, capsys):
    ckpt = tmp_path.joinpath("run", *STAGE, "checkpoint.pt")
    with sigint_during_step(3):
        rc, said = _cli_train(tiny_data, tmp_path, capsys)
    assert rc == 130
    first = [line for line in said.splitlines() if "stopping after this step" in line]
    assert len(first) == 1 and "--resume" in first[0] and "at once" in first[0], said
    assert said.count(str(ckpt)) == 1 and "--resume" in said.split(str(ckpt))[1].splitlines()[0], said
    assert "stopped after step 3" in said
    assert "stopped after step 3" in (tmp_path / "run" / "train.log").read_text()  # the run's record

    # A second signal, a couple of seconds after the first, in step 2 after the resume (step 5).
    _step_hook(monkeypatch, {2: _second_signal_later})
    rc, said = _cli_train(tiny_data, tmp_path, capsys, "--resume")
    assert rc == 130
    assert len([line for line in said.splitlines() if "stopping after this step" in line]) == 1
    assert said.count(str(ckpt)) == 1, said
    line = next(line for line in said.splitlines() if str(ckpt) in line)
    assert "stopped at once during step 5 without writing a checkpoint" in line, said
    assert "the last one (step 4) stays" in line and "--resume" in line, said  # ckpt_every: 2
    assert torch.load(ckpt, weights_only=False)["step"] == 4


def test_a_sigterm_stop_exits_as_the_signal_ended_it(tiny_data, tmp_path, capsys):
    """A stop asked by SIGTERM (a scheduler's) exits 143, one by Ctrl-C 130, as shells report."""
    import signal

    with sigint_during_step(2, signal.SIGTERM):
        rc, said = _cli_train(tiny_data, tmp_path, capsys)
    assert rc == 143 and "stopped after step 2" in said


def test_a_second_signal_while_the_stop_writes_its_checkpoint_keeps_the_last_one(tiny_data, tmp_path,
                                                                               monkeypatch):
    """Ctrl-C again while the stop's checkpoint is being written: the write is abandoned (no
    partial file left), the checkpoint before it stays, and the run says so."""
    cfg = _cfg(tiny_data, tmp_path / "run")
    ckpt = tmp_path.joinpath("run", *STAGE, "checkpoint.pt")
    real = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("step") == 5:  # the stop's checkpoint, half written
            open(f, "wb").write(b"partial")
            _second_signal_later()
        return real(obj, f, *a, **k)

    _step_hook(monkeypatch, {5: _sigint})
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(TrainingInterrupted, match="without writing a checkpoint") as e:
        train(cfg, progress=False, log=None)
    assert not e.value.written
    assert torch.load(ckpt, weights_only=False)["step"] == 3  # epoch 1's
    assert not ckpt.with_name("checkpoint.pt.tmp").exists()


def test_a_ctrl_c_outside_the_training_steps_says_how_to_resume(tiny_data, tmp_path, monkeypatch):
    """Ctrl-C while the anchor cache is computed (no stop handler yet): the run says --resume."""
    from geobind.binding import trainer as trainer_mod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod, "cached_embeddings", interrupted)
    with pytest.raises(TrainingInterrupted, match="--resume") as e:
        train(_cfg(tiny_data, tmp_path / "run"), progress=False, log=None)
    assert not e.value.written


def test_a_failing_message_does_not_lose_the_stop():
    """The first signal's message is written from the signal handler; if writing it fails (a
    print interrupted inside another print to the same stream raises "reentrant call"), the
    stop is still requested and nothing escapes into the interrupted code."""
    from geobind.binding.trainer import StopRequests

    def say(msg):
        raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stdout>'>")

    stop = StopRequests(say)
    stop._handle(signal.SIGINT, None)
    assert stop.requested


@pytest.mark.parametrize("at", [1, 3])
def test_a_stop_in_a_shard_run_with_loader_workers_resumes_exactly(tiny_data, tmp_path, monkeypatch, at):
    """Shards streamed by 2 loader workers (which ignore the Ctrl-C): a stop in the first step,
    or in the last step of epoch 1 (with its validation due), resumes to the uninterrupted run."""
    from geobind.data.pack import pack

    monkeypatch.setenv("GEOBIND_CACHE", str(tmp_path / "geobind-cache"))
    shards = tmp_path / "shards"
    pack(tiny_data["stage1"], shards, shard_size=7, image_size=0, image_format="png", progress=False, log=None)

    def cfg(out):
        return _cfg(tiny_data, out, data=shards, workers=2, val_every=0)

    full = train(cfg(tmp_path / "a"), progress=False, log=None)
    with sigint_during_step(at), pytest.raises(TrainingInterrupted, match="resumable checkpoint"):
        train(cfg(tmp_path / "b"), progress=False, log=None)
    ck = torch.load(tmp_path.joinpath("b", *STAGE, "checkpoint.pt"), weights_only=False)
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"]) == ((1, 0, 1) if at == 1 else (3, 1, 0))
    train(cfg(tmp_path / "b"), resume=True, progress=False, log=None)
    _same_run(full.parent, tmp_path / "b")


def test_a_stop_before_the_first_step_resumes_exactly(tiny_data, tmp_path, monkeypatch):
    """Ctrl-C while the first batch loads: the stop comes before step 1 trains."""
    from geobind.binding import trainer as trainer_mod

    full = train(_cfg(tiny_data, tmp_path / "a"), progress=False, log=None)
    real, calls = trainer_mod._CollateTrain.__call__, [0]

    def collate(self, samples):
        calls[0] += 1
        if calls[0] == 1:
            _sigint()
        return real(self, samples)

    monkeypatch.setattr(trainer_mod._CollateTrain, "__call__", collate)
    with pytest.raises(TrainingInterrupted, match="stopped before its first step; resumable checkpoint"):
        train(_cfg(tiny_data, tmp_path / "b"), progress=False, log=None)
    monkeypatch.undo()
    ck = torch.load(tmp_path.joinpath("b", *STAGE, "checkpoint.pt"), weights_only=False)
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"]) == (0, 0, 0)
    train(_cfg(tiny_data, tmp_path / "b"), resume=True, progress=False, log=None)
    _same_run(full.parent, tmp_path / "b")


def test_a_stop_in_a_stages_last_step_finishes_that_stage_first(tiny_data, tmp_path):
    """In the last step of stage 1 of 2 the stage still finishes (its model saved), the run
    stops before stage 2, and the resumed run reaches the uninterrupted one's weights; in the
    last step of the last stage the final model is saved and only what follows is skipped."""
    def cfg(out):
        d = tiny_config(tiny_data, out, steps=2)
        d["eval"] = None
        return parse_config(d)

    full = train(cfg(tmp_path / "a"), progress=False, log=None)
    with sigint_during_step(2), pytest.raises(TrainingInterrupted, match="after stage satellite finished"):
        train(cfg(tmp_path / "b"), progress=False, log=None)
    assert (tmp_path / "b" / "stages" / "01-satellite" / "done.json").is_file()
    assert not (tmp_path / "b" / "stages" / "02-audio").exists()
    with sigint_during_step(2), pytest.raises(TrainingInterrupted, match="model is saved"):
        train(cfg(tmp_path / "b"), resume=True, progress=False, log=None)
    wa = load_file(str(full / "audio" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "model" / "audio" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_log_lines_during_training_start_their_own_line_beside_the_progress_bar(tiny_data, tmp_path, capsys):
    """The bar (on stderr) steps aside for each log line: a validation line written to the same
    stream starts after the bar was cleared (a carriage return), not glued to the bar's text."""
    import sys

    def log(msg):
        print(msg, file=sys.stderr)

    train(_cfg(tiny_data, tmp_path / "run", val_every=2), progress=True, log=log)
    err = capsys.readouterr().err
    starts = [i for i in range(len(err)) if err.startswith("stage satellite step ", i)]
    assert len(starts) >= 2  # validations at steps 2, 4 and 6
    assert all(err[i - 1] in "\r\n" for i in starts), [err[max(0, i - 40):i + 20] for i in starts]


# `geobind train` (argv after the marker path) whose step 2 writes the marker file (the run is
# training, its loader workers are up) and waits there for the SIGTERM the test sends to the
# whole process group, then a second longer, as a longer step would: the workers have the
# signal meanwhile. The wait is bounded, so a child that never gets the signal ends anyway.
_STEP_WAITS_FOR_SIGTERM = """
import os, signal, sys, time
from pathlib import Path

from geobind.binding.step import StepRunner
from geobind.cli import main

marker, argv = Path(sys.argv[1]), sys.argv[2:]
real, calls = StepRunner.__call__, [0]


def call(self, *a, **k):
    calls[0] += 1
    if calls[0] == 2:
        marker.write_text(str(os.getpid()))
        until = time.monotonic() + 60
        while not signal.getsignal(signal.SIGTERM).__self__.requested and time.monotonic() < until:
            time.sleep(0.05)
        time.sleep(1.0)
    return real(self, *a, **k)


StepRunner.__call__ = call
sys.exit(main(argv))
"""


def test_a_sigterm_to_the_whole_job_with_loader_workers_stops_with_a_checkpoint(tiny_data, tmp_path, capsys):
    """Slurm, systemd and ``kill -- -PGID`` signal every process of the job, the loader workers
    too: the run still stops at the step boundary as a SIGTERM to the main process alone does
    (exit 143, the stop's checkpoint written), rather than failing as its workers die, and
    ``--resume`` completes it."""
    import subprocess
    import sys
    import time

    import yaml
    from dist_helpers import _children

    from geobind.cli import main

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(tiny_data, tmp_path / "run").to_dict()))
    args = ["train", str(cfg), "--no-progress", "--set", "stages.0.optim.num_workers=2"]
    marker = tmp_path / "in-step-2"
    proc = subprocess.Popen([sys.executable, "-c", _STEP_WAITS_FOR_SIGTERM, str(marker), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, which the test signals
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the run never reached step 2 (exit {proc.poll()})"
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers  # the loader's workers are up, and get the signal too
        os.killpg(proc.pid, signal.SIGTERM)
        said, _ = proc.communicate(timeout=120)
    except BaseException as e:  # a hang (or a failed check) kills the job instead of blocking
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        said = proc.communicate(timeout=30)[0]
        pytest.fail(f"{type(e).__name__}: {e}\n{said}")
    assert proc.returncode == 143, said
    assert "stopped after step 2" in said and "resumable checkpoint" in said, said
    assert "killed by signal" not in said and "exited unexpectedly" not in said, said
    ck = torch.load(tmp_path.joinpath("run", *STAGE, "checkpoint.pt"), weights_only=False)
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"]) == (2, 0, 2)
    assert main([*args, "--resume"]) == 0
    done = json.loads(tmp_path.joinpath("run", *STAGE, "done.json").read_text())
    assert done["resumed_at_step"] == 2 and done["steps"] == 6


def test_a_run_is_refused_an_output_dir_another_training_process_holds(tiny_data, tmp_path, capsys):
    """A ``--resume`` started while the run is still training (it holds ``<output_dir>/.lock``)
    is refused, naming the holder, and changes nothing there; once the lock is released it
    resumes, and a run that ended releases the lock."""
    import fcntl

    out = tmp_path / "run"
    ckpt = out.joinpath(*STAGE, "checkpoint.pt")
    with sigint_during_step(2):
        assert _cli_train(tiny_data, tmp_path, capsys)[0] == 130
    written = ckpt.stat().st_mtime_ns
    with open(out / ".lock", "a+") as held:  # as the first run holds it while it trains
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: the stopped run released it
        held.truncate(0)
        held.write(str(os.getpid()))
        held.flush()
        rc, said = _cli_train(tiny_data, tmp_path, capsys, "--resume")
    assert rc == 2, said
    assert f"{out} is in use by another training process (pid {os.getpid()})" in said, said
    assert ckpt.stat().st_mtime_ns == written and not out.joinpath(*STAGE, "done.json").exists()
    rc, said = _cli_train(tiny_data, tmp_path, capsys, "--resume")
    assert rc == 0, said
    assert json.loads(out.joinpath(*STAGE, "done.json").read_text())["resumed_at_step"] == 2
    with open(out / ".lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released as the run ended


def test_resume_of_an_output_dir_without_a_checkpoint_says_it_starts_the_run(tiny_data, tmp_path):
    said = []
    out = tmp_path / "run"
    train(_cfg(tiny_data, out, max_steps=2), resume=True, progress=False, log=said.append)
    assert f"--resume: {out} holds no checkpoint or finished stage; starting the run" in said, said
    assert json.loads(out.joinpath(*STAGE, "done.json").read_text())["steps"] == 2


def test_a_resume_after_the_training_data_changed_warns(tiny_data, tmp_path):
    """The checkpoint records which data it trained on: a resume on a manifest edited since
    (here one caption) says the resumed stage does not continue the interrupted run exactly."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data["root"], data)
    out = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tiny_data, out, data=data / "stage1.csv", max_steps=4), progress=False, log=None,
              stop_at_step=2)
    manifest = data / "stage1.csv"
    text = manifest.read_text()
    first = text.splitlines()[1]
    manifest.write_text(text.replace(first, first.replace("a photo of a", "a picture of a"), 1))
    said = []
    train(_cfg(tiny_data, out, data=data / "stage1.csv", max_steps=4), resume=True, progress=False,
          log=said.append)
    warned = [s for s in said if "changed since the checkpoint was written" in s]
    assert len(warned) == 1 and str(manifest) in warned[0], said


def test_a_run_interrupted_after_its_last_checkpoint_records_its_final_loss(tiny_data, tmp_path, monkeypatch):
    """Ctrl-C after the last step's checkpoint, before the stage's done.json: the resumed stage
    has no step left to train, and records the loss of that last step (the checkpoint keeps
    it), a number in valid JSON rather than NaN. The data did not change: no warning."""
    from geobind.binding import trainer as trainer_mod

    out = tmp_path / "run"

    def interrupted(*a, **k):  # called as the stage's record is built, after its last checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod, "_throughput", interrupted)
    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(_cfg(tiny_data, out, max_steps=4, ckpt_every=2), progress=False, log=None)
    monkeypatch.undo()
    assert torch.load(out.joinpath(*STAGE, "checkpoint.pt"), weights_only=False)["step"] == 4
    assert not out.joinpath(*STAGE, "done.json").exists()
    said = []
    final = train(_cfg(tiny_data, out, max_steps=4, ckpt_every=2), resume=True, progress=False, log=said.append)
    assert not any("changed since the checkpoint" in s for s in said), said

    def strict(text):
        def refuse(constant):
            raise ValueError(f"not JSON: {constant}")
        return json.loads(text, parse_constant=refuse)

    done = strict(out.joinpath(*STAGE, "done.json").read_text())
    assert done["resumed_at_step"] == 4 and done["steps"] == 4
    last_logged = float(_metrics(out)[-1]["loss"])  # step 4's, rounded to 6 places
    assert done["final_loss"] == pytest.approx(last_logged, abs=1e-6)
    assert strict((final / "geobind.json").read_text())["stages"][0]["final_loss"] == done["final_loss"]


@pytest.mark.parametrize("val_every", [None, 0])
def test_an_epochs_end_is_checkpointed_once_unless_a_validation_comes_between(tiny_data, tmp_path, monkeypatch,
                                                                               val_every):
    """ckpt_every divides the 3-step epoch: its last step is written with the epoch's end, once;
    an epoch-end validation (val_every 0) keeps the step's own checkpoint before it runs."""
    from geobind.binding import trainer as trainer_mod

    saved, real = [], trainer_mod._atomic_save

    def save(obj, path):
        if path.name == "checkpoint.pt":
            saved.append((obj["step"], obj["epoch"], obj["step_in_epoch"]))
        real(obj, path)

    monkeypatch.setattr(trainer_mod, "_atomic_save", save)
    train(_cfg(tiny_data, tmp_path / "a", val_every=val_every, ckpt_every=3), progress=False, log=None)
    if val_every is None:
        assert saved == [(3, 1, 0), (6, 1, 3)]
    else:
        assert saved == [(3, 0, 3), (3, 1, 0), (6, 1, 3)]


def test_an_error_in_a_loader_worker_ends_the_run_promptly(tiny_data, tmp_path):
    """A worker's own error (not a bad sample) ends the run at once with that error: its loader
    workers are shut down, not left to the interpreter's exit, whose SIGTERM they would sit out
    for their grace period while this rank, and any rank waiting on it, hung on."""
    import subprocess
    import sys
    import textwrap
    import time

    import yaml

    d = tiny_config(tiny_data, tmp_path / "run", audio=False)
    d["stages"][0]["optim"].update(num_workers=2, max_steps=4)
    d["eval"] = None
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(d))
    script = textwrap.dedent(f"""
        import sys
        from geobind.binding import trainer
        def broken(self, key):
            raise RuntimeError("a bug in a loader worker")
        trainer._TrainItems.__getitem__ = broken
        from geobind.cli import main
        sys.exit(main(["train", {str(cfg)!r}, "--no-progress"]))
    """)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "GEOBIND_CACHE": str(tmp_path / "cache")})
    took = time.monotonic() - t0
    assert p.returncode != 0 and "a bug in a loader worker" in p.stderr
    assert "Alarm clock" not in p.stderr, p.stderr[-2000:]
    assert took < 40, f"took {took:.0f} s to exit"


def test_a_folder_holding_the_users_own_config_is_refused_as_output_dir(tiny_data, tmp_path):
    """`output_dir: .` beside the config: the run would write its own config.yaml over it."""
    import yaml

    out = tmp_path / "exp"
    out.mkdir()
    mine = yaml.safe_dump(tiny_config(tiny_data, out, audio=False))
    (out / "config.yaml").write_text(mine)
    with pytest.raises(FileExistsError, match=r"holds config.yaml of its own, which the run would overwrite"):
        train(_cfg(tiny_data, out, max_steps=1), progress=False, log=None)
    assert (out / "config.yaml").read_text() == mine


def test_a_checkpoint_the_full_disk_cuts_short_is_named_and_the_last_one_kept(tmp_path, monkeypatch):
    """torch's writer loses errno on a full disk ("unexpected pos"): the error names the file and
    what is kept, and no partial file is left."""
    import shutil
    from collections import namedtuple

    from geobind.binding import trainer as trainer_mod

    path = tmp_path / "checkpoint.pt"
    trainer_mod._atomic_save({"step": 1}, path)

    def full(obj, f):
        open(f, "wb").write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(10, 10, 0))
    with pytest.raises(OSError, match=r"cannot write .*checkpoint.pt: the disk holding .* is full \(the previous "
                                      r"checkpoint, if any, is kept: rerun with --resume\)"):
        trainer_mod._atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
