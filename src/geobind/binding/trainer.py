"""The training loop: runs a config's binding stages in order.

A plain PyTorch loop, one process or many under ``torchrun`` (DDP). Data comes from a
:class:`~geobind.data.manifest.Table` (map-style: a seeded global permutation per epoch, each rank
taking its slice of every global batch) or a :class:`~geobind.data.shards.ShardSet` (streamed:
:func:`geobind.data.shards.plan_epoch`); both give every usable sample exactly once per epoch
across ranks and loader workers and resume mid-epoch (see :func:`train_loader`). Each stage lives in
``<output_dir>/stages/<NN>-<name>/`` with ``checkpoint.pt`` (resumable, written atomically),
``metrics.csv``, ``config.yaml`` and, once finished, ``model/`` (a GeoBind model directory holding
every modality bound so far). The next stage loads that directory, so stages chain. The final
model goes to ``<output_dir>/model``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import platform
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler

from geobind import distributed as gbdist
from geobind.binding.cache import cached_embeddings, embed_table_shared
from geobind.binding.prefetch import DevicePrefetcher, map_tensors
from geobind.binding.profiling import StepProfiler
from geobind.binding.stage import BindingStage
from geobind.binding.step import StepRunner
from geobind.config import RunConfig, StageConfig, plain
from geobind.data.errors import BadSampleError
from geobind.data.manifest import Table, for_loader_workers, read_dataset
from geobind.data.shards import EpochStream, ShardSet, next_segments, plan_epoch, worker_count
from geobind.encoders import anchor_encoders, build_anchor, get_encoder_class
from geobind.encoders.base import eagerly, uncompile
from geobind.metrics import retrieval_metrics
from geobind.model import GeoBind, _not_model_files
from geobind.search.common import exclusive_lock, write_failure, write_text_atomic
from geobind.search.embed import pad_batch

CHECKPOINT = "checkpoint.pt"
DONE = "done.json"
# An anchor cache up to this size is moved to the GPU for the stage (1.7M 512-d float16 vectors).
ANCHOR_ON_DEVICE_BYTES = 2 * 2**30


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped early (Ctrl-C, SIGTERM or a requested stop); ``message`` says where and
    how to resume. ``written``: a checkpoint of the step it stopped at was written (else an
    earlier one, if any, stays)."""

    def __init__(self, checkpoint: Path, written: bool = True, *, message: str):
        super().__init__(message)
        self.checkpoint = checkpoint
        self.written = written


class TrainingDiverged(ValueError):
    """The training loss became NaN or infinite; the message says what to change."""


class TrainingOutOfMemory(RuntimeError):
    """A training step did not fit in the device's memory; the message says what to change."""


def _out_of_memory_message(stage: str, step: int, per_rank: int, batch_size: int, world: int,
                           device: torch.device, precision: str, compiled: bool, recomputes: bool,
                           checkpoint: Path) -> str:
    where = f"{device.type.upper() if device.type == 'cuda' else device.type} memory"
    msg = (f"stage {stage}: out of {where} in step {step} with {per_rank} samples per rank "
           f"(optim.batch_size {batch_size} over {world} rank{'s' if world > 1 else ''})")
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        peak = torch.cuda.max_memory_allocated(device)
        msg += f"; peak {peak / 2**30:.1f} of {total / 2**30:.1f} GiB allocated"
    hints = [f"lower optim.batch_size (e.g. to {max(world, batch_size // 2 // world * world)})"]
    if precision == "fp32" and device.type == "cuda":
        hints.append("set optim.precision: bf16 (or auto)")
    if not recomputes:
        hints.append("set optim.grad_checkpointing: true (activations recomputed in the backward pass)")
    if not compiled:
        hints.append("set optim.compile: true (fused kernels keep fewer activations)")
    if world == 1 and device.type == "cuda" and torch.cuda.device_count() > 1:
        hints.append(f"spread the batch over the {torch.cuda.device_count()} GPUs with torchrun")
    msg += ". To fit: " + "; ".join(hints) + "."
    if checkpoint.is_file():
        msg += (f" The checkpoint {checkpoint} is kept, but it resumes only this config: with any of these "
                "changes, train into a new output_dir.")
    return msg


# A window of steps that spends more than this share of its time waiting for the loader gets a
# one-time hint (the first window is left out: it holds the workers' start-up and compilation).
DATA_WAIT_HINT = 0.10


def _data_wait_hint(stage: str, wait: float, first: int, last: int, workers: int, encoder, packed: bool) -> str:
    """What to say when the loader sets the pace of a stage (steps ``first``-``last``)."""
    cpus = gbdist.usable_cpus()
    hints = []
    if workers < cpus - 1:
        hints.append(f"raise optim.num_workers (now {workers} per rank; {cpus} cores here)")
    transform = getattr(encoder, "transform", None)
    on_gpu = any(p.is_cuda for p in encoder.parameters())  # on a CPU it would only move the work
    if (transform is not None and getattr(transform, "augment", None) == "overhead" and not transform.on_device
            and on_gpu):
        hints.append("set augment_on: device in the encoder (the loader then only decodes tiles)")
    if not packed:
        how = ("`--image-size 256` pre-resizes the tiles" if transform is not None
               else "`--audio-rate 48000` pre-resamples the recordings")
        hints.append(f"pack the data into shards once with `geobind data pack` ({how})")
    advice = ("; ".join(hints) + ".") if hints else "the loader already has every core: fewer ranks per machine, or a faster CPU."
    steps = f"step {last}" if first == last else f"steps {first}-{last}"
    return (f"stage {stage}: {steps} spent {wait:.0%} of the time waiting for the loader, so the input, not "
            f"the model, sets the pace. To feed it faster: {advice}")


# ---------------------------------------------------------------------------------------------
# data


def _item_seed(seed: int, epoch: int, index: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + index) % (2**31 - 1)


@contextlib.contextmanager
def _seeded(seed: int):
    """Run a block with the host's global RNGs seeded, restoring them afterwards, so per-sample
    augmentation depends only on (seed, epoch, index): exact resume, any worker count. CUDA's
    generators are left alone (``torch.manual_seed`` would reseed them too), so loading in the
    main process (``num_workers: 0``) does not touch a GPU's dropout masks."""
    py, np_state, t = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(np_state)
        torch.random.set_rng_state(t)


class _TrainItems(Dataset):
    def __init__(self, table: Table, modality: str, encoder, seed: int, anchor=None, anchor_modality=None):
        self.table, self.modality, self.encoder, self.seed = table, modality, encoder, seed
        self.anchor, self.anchor_modality = anchor, anchor_modality
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, key):
        epoch, i = key
        try:
            with _seeded(_item_seed(self.seed, epoch, i)):
                x = self.encoder.load(self.table.item(self.modality, i), train=True)
            if self.anchor is not None:
                a = self.anchor.load(self.table.item(self.anchor_modality, i), train=False)
                return i, (x, a)
            return i, x
        except BadSampleError as e:
            return i, e


class _ShardTrainItem:
    """``(row, streamed sample) -> input`` (or ``(input, anchor input)``), with the same seeded
    per-sample augmentation as :class:`_TrainItems`: it depends on (seed, epoch, row) only."""

    def __init__(self, shards: ShardSet, modality: str, encoder, seed: int, anchor=None, anchor_modality=None):
        self.shards, self.modality, self.encoder, self.seed = shards, modality, encoder, seed
        self.anchor, self.anchor_modality = anchor, anchor_modality
        self.epoch = 0

    def __call__(self, row: int, sample: dict):
        with _seeded(_item_seed(self.seed, self.epoch, row)):
            x = self.shards.load(sample, row, self.modality, lambda it: self.encoder.load(it, train=True))
        if self.anchor is not None:
            a = self.shards.load(sample, row, self.anchor_modality, lambda it: self.anchor.load(it, train=False))
            return x, a
        return x


class _EpochBatches(Sampler):
    """This rank's share of each global batch of one epoch's seeded permutation; starts at
    ``start_step`` so a resumed run continues with the very next batch."""

    def __init__(self, valid: torch.Tensor, batch_size: int, seed: int, epoch: int, start_step: int,
                 rank: int, world: int):
        g = torch.Generator().manual_seed(seed * 9_973 + epoch)
        idx = valid.nonzero().flatten()
        self.perm = idx[torch.randperm(len(idx), generator=g)].tolist()
        self.bs, self.epoch, self.start = batch_size, epoch, start_step
        self.rank, self.world = rank, world
        self.steps = len(self.perm) // batch_size

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def __iter__(self):
        per = self.bs // self.world
        for s in range(self.start, self.steps):
            b = self.perm[s * self.bs : (s + 1) * self.bs]
            yield [(self.epoch, i) for i in b[self.rank * per : (self.rank + 1) * per]]


class _TrainLoader(DataLoader):
    """A DataLoader whose loader workers :meth:`close` ends at once. A training loop left by an
    exception (a worker's own error re-raised, a rank's failure) would otherwise leave them to
    the interpreter's exit, whose SIGTERM they ignore (:func:`_worker_sigterm`) for
    ``WORKER_SIGTERM_GRACE_S`` seconds while the rank, and the ranks waiting on it, hang on."""

    _live = None

    def _get_iterator(self):
        self._live = super()._get_iterator()
        return self._live

    def close(self) -> None:
        live, self._live = self._live, None
        shutdown = getattr(live, "_shutdown_workers", None)  # multi-process iterators only
        if shutdown is not None:
            shutdown()


def train_items(data: Table | ShardSet, modality: str, encoder, seed: int, anchor=None, anchor_modality=None):
    """Per-sample training inputs of ``modality`` (and the anchor's when it is not cached)."""
    cls = _ShardTrainItem if isinstance(data, ShardSet) else _TrainItems
    return cls(data, modality, encoder, seed, anchor, anchor_modality)


def train_loader(data: Table | ShardSet, items, *, valid: torch.Tensor, batch_size: int, seed: int, epoch: int,
                 step_in_epoch: int, rank: int, world: int, num_workers: int, collate_fn,
                 segments: list | None = None, shuffle_buffer: int = 1000, pin_memory: bool = False
                 ) -> tuple[DataLoader, list | None]:
    """This rank's loader for one epoch, starting at batch ``step_in_epoch``.

    Manifests: a seeded permutation of the valid rows, cut into global batches; rank ``r`` takes
    its slice of each, and loader workers fetch whole batches, so the ranks together see each
    valid row once per epoch (the last ``n_valid % batch_size`` rows of the permutation are left
    out). The batches do not depend on the number of ranks or workers: resuming on another
    layout continues the same sequence of global batches.

    Shards: :func:`~geobind.data.shards.plan_epoch` (exactly once per epoch as well). Returns the
    loader and the epoch's segments to store in the checkpoint (``None`` for manifests).
    """
    if isinstance(data, ShardSet):
        workers = worker_count(num_workers)
        segments = next_segments(segments, world, workers, step_in_epoch)
        plan = plan_epoch(data.counts, valid.numpy().astype(bool), seed=seed, epoch=epoch, batch_size=batch_size,
                          segments=[tuple(x) for x in segments], step_in_epoch=step_in_epoch, bufsize=shuffle_buffer)
        items.epoch = epoch
        stream = EpochStream(data, plan, rank, items)
        loader = _TrainLoader(stream, batch_size=plan.per_rank_batch, num_workers=num_workers, collate_fn=collate_fn,
                            pin_memory=pin_memory, generator=loader_generator(seed, epoch),
                            worker_init_fn=_ignore_stop_signals)
        return loader, segments
    sampler = _EpochBatches(valid, batch_size, seed, epoch, step_in_epoch, rank, world)
    loader = _TrainLoader(items, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                        pin_memory=pin_memory, persistent_workers=False, generator=loader_generator(seed, epoch),
                        worker_init_fn=_ignore_stop_signals)
    return loader, None


# How long a loader worker outlives a SIGTERM sent to the whole job (see _worker_sigterm).
WORKER_SIGTERM_GRACE_S = 60


def _worker_sigterm(signum, frame) -> None:
    """A SIGTERM in a loader worker. Slurm (at a time limit or ``scancel``), systemd and
    ``kill -- -PGID`` signal every process of the job, the workers included: a worker that died
    of it at once would fail the loader (``DataLoader worker ... is killed by signal``) before
    its rank reaches the step boundary where it writes the stop's checkpoint. So the worker
    keeps serving; its rank ends it as the loader closes. Should that not happen, it ends
    itself after a grace period, and a second SIGTERM (a loader's own ``terminate()``) ends it
    at once."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.alarm(WORKER_SIGTERM_GRACE_S)


def _ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C (which a terminal sends to every process of the job) and a
    job-wide SIGTERM to their rank, which stops at the next step; a worker that died of either
    would fail the loader before that (see :func:`_worker_sigterm`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)  # not the command's own, inherited at the fork


class _AgreedStop(Exception):
    """Every rank stops at this step boundary (a stop was requested on one of them)."""


# CPython gh-112275: a forked child can block for good on a lock that another thread held at
# the fork. torch.distributed's threads (gloo's, also used for the host-side exchanges under
# NCCL) take it as a collective's work is released, just when the main thread forks loader
# workers. Fixed in 3.10.15, 3.11.10 and 3.12.
FORK_HANG_WARNING = (
    "warning: Python {version} can hang while forking loader workers in a distributed run (CPython "
    "issue gh-112275, fixed in Python 3.10.15, 3.11.10 and 3.12); if a rank stops making progress "
    "at a stage's or an epoch's start, use a newer Python or set optim.num_workers: 0"
)


def fork_may_hang(version: tuple[int, ...] | None = None) -> bool:
    """Whether this Python (or ``version``) has the fork deadlock of :data:`FORK_HANG_WARNING`,
    where loader workers start by forking (Linux's default)."""
    v = tuple(version or sys.version_info[:3])
    if version is None and multiprocessing.get_start_method(allow_none=True) not in (None, "fork"):
        return False
    if version is None and sys.platform != "linux":
        return False
    return v < (3, 10, 15) or ((3, 11) <= v[:2] and v < (3, 11, 10))


class StopRequests:
    """Ctrl-C and SIGTERM while a stage trains: the first asks to stop at the next step
    boundary, where every rank learns of it in the step's host exchange and all stop
    together with a checkpoint; another one, a second or more later, stops at once without
    one (the last checkpoint stays). Signals within a second count as one: under ``torchrun``
    a terminal's Ctrl-C reaches each rank twice (directly and forwarded)."""

    # The signal that asked the last stop (SIGINT or SIGTERM): the command's exit status is 128
    # plus it, as a shell reports for a process the signal ended.
    last_signal: int | None = None

    def __init__(self, say: Callable[[str], None] | None = None):
        self.requested = False
        self._at = 0.0
        self._say = say
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopRequests:
        StopRequests.last_signal = None
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        StopRequests.last_signal = signum
        now = time.monotonic()
        if self.requested:
            if now - self._at >= 1.0:
                raise KeyboardInterrupt
            return
        self.requested, self._at = True, now
        if self._say is not None:
            try:
                self._say("stopping after this step to write a checkpoint; rerun with --resume to continue "
                          "from it (Ctrl-C again, a second or more later, stops at once without one)")
            except Exception:
                # The handler runs inside whatever the main thread was doing: a print interrupted
                # inside another print to the same stream fails ("reentrant call"). The stop
                # still happens, and its own message follows at the step boundary.
                pass


def loader_generator(seed: int = 0, epoch: int = 0) -> torch.Generator:
    """A DataLoader's own generator. Each ``iter()`` of a loader draws its workers' base seed from
    its generator, by default the global one that training's dropout draws from: a resumed run
    (which starts a fresh pass mid-epoch) or an extra pass (an anchor cache, a validation) would
    otherwise shift every later dropout mask. Samples are seeded per item, not by workers."""
    return torch.Generator().manual_seed(_item_seed(seed, epoch, 0))


class _CollateTrain:
    """``[(index, input | (input, anchor input) | BadSampleError)]`` -> ``(indices, batch,
    anchor batch, bad)``. A class, not a closure, so loader workers can be spawned processes."""

    def __init__(self, encoder, anchor):
        self.encoder, self.anchor = encoder, anchor

    def __call__(self, samples):
        encoder, anchor = self.encoder, self.anchor
        good = [(i, x) for i, x in samples if not isinstance(x, BadSampleError)]
        bad = [e for _, e in samples if isinstance(e, BadSampleError)]
        idx = torch.tensor([i for i, _ in good], dtype=torch.long)
        if anchor is None:
            return idx, (encoder.collate([x for _, x in good]) if good else None), None, bad
        return (
            idx,
            encoder.collate([x for _, (x, _) in good]) if good else None,
            anchor.collate([a for _, (_, a) in good]) if good else None,
            bad,
        )


# ---------------------------------------------------------------------------------------------
# optimisation


def build_optimizer(stage: BindingStage, cfg: StageConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (no decay on norms, biases, the temperature)."""
    decay, no_decay = [], []
    for name, p in stage.trainable_parameters():
        (decay if p.ndim >= 2 and "logit_scale" not in name else no_decay).append(p)
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **kwargs)


def lr_lambda(total_steps: int, warmup: int, floor: float):
    """Linear warmup then cosine decay to ``floor`` x peak."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def _auto_precision(device: torch.device) -> str:
    """What ``optim.precision: auto`` means on ``device``: bf16 on CUDA, fp32 elsewhere."""
    return "bf16" if device.type == "cuda" else "fp32"


def _precision_name(cfg: StageConfig, device: torch.device) -> str:
    """``optim.precision`` with ``auto`` resolved (:func:`_auto_precision`)."""
    p = cfg.optim.precision
    return _auto_precision(device) if p == "auto" else p


def _precision(cfg: StageConfig, device: torch.device):
    p = _precision_name(cfg, device)
    if p == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if p == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if p == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


# ---------------------------------------------------------------------------------------------
# checkpoints


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:  # an error or a Ctrl-C mid-write: the previous file stays, no partial one
        # A full disk reaches here as torch's "unexpected pos 64 vs 0": say what it is, and where.
        failure = write_failure(path, e, kept="the previous checkpoint, if any, is kept: rerun with --resume")
        tmp.unlink(missing_ok=True)
        if failure is not None:
            raise failure from e
        raise


def _rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.random.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        # As many as this machine shows: a checkpoint from a machine with more GPUs visible
        # resumes too.
        torch.cuda.set_rng_state_all(st["cuda"][: torch.cuda.device_count()])


# Layouts whose dataset is a local file or folder (a registered layout may take other names).
_PATH_LAYOUTS = ("manifest", "shards", "sat2cap", "soundingearth", "geotiff")


def _missing_data(cfg: RunConfig, done: set[str] = frozenset()) -> list[str]:
    """``where: path`` of every dataset path the run still needs (stages not in ``done``) that
    names no file or folder. Shard patterns, lists (``a.tar::b.tar``), ``pipe:`` commands, URLs
    and other layouts' names are left to their readers."""
    paths = [(f"stages.{s.name}.data.{k}", getattr(s.data, k), s.data.layout) for s in cfg.stages
             if s.name not in done for k in ("train", "val")]
    if cfg.eval is not None:
        paths.append(("eval.data", cfg.eval.data, cfg.eval.layout))

    def plain_path(p: str) -> bool:
        return not (any(c in p for c in "{*?[") or "://" in p or "::" in p or p.startswith("pipe:"))

    return [f"{where}: {p}" for where, p, layout in paths
            if p and layout in _PATH_LAYOUTS and plain_path(str(p)) and not Path(p).exists()]


def _unloadable_models(cfg: RunConfig, done: set[str] = frozenset()) -> list[str]:
    """``where: why`` for every stage encoder still to train whose ``pretrained`` model can be
    neither found as a folder nor fetched from the Hugging Face hub: found now, not when the
    stages before it have trained (a compute node without internet, a misspelt folder). A hub
    id is checked by fetching its small ``config.json`` (from the local cache when it is there)."""
    problems = []
    for s in cfg.stages:
        p = (s.encoder or {}).get("pretrained") if s.name not in done else None
        if not p or Path(str(p)).expanduser().exists():
            continue
        p = str(p)
        where = f"stages.{s.name}.encoder.pretrained"
        if p.startswith((".", "/", "~")) or p.count("/") > 1:  # a hub id is "name" or "owner/name"
            problems.append(f"{where}: {p} is not a folder here")
            continue
        try:
            from huggingface_hub import hf_hub_download

            hf_hub_download(p, "config.json")
        except Exception as e:  # offline, unknown repository, no access
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(f"{where}: {p!r} is neither a folder beside the config nor could it "
                            f"be fetched from the Hugging Face hub ({reason}). Offline? Give a local "
                            "directory, or fetch the model once where there is a network")
    return problems


# What a resumed run may not change once it has trained on it (other run settings, such as the
# device, evaluation or loader workers, change no trained weight).
_RUN_KEYS = ("anchor", "init_model", "anchor_modalities", "seed")


# Settings that hold paths: compared as the places they name, so a run whose config named them
# relative to the folder it started in still resumes (configs now hold absolute paths).
_PATH_KEYS = frozenset({"output_dir", "init_model", "cache_dir", "pretrained", "tokenizer", "train", "val", "data"})


def _same_place(old: Any, new: Any) -> bool:
    if not (isinstance(old, str) and isinstance(new, str)) or "://" in old + new:
        return False
    return os.path.abspath(os.path.expanduser(old)) == os.path.abspath(os.path.expanduser(new))


def _changed_keys(old: Any, new: Any, prefix: str) -> list[str]:
    """``key (old -> new)`` for every value of ``old`` that ``new`` holds differently; keys that
    only one side has (settings added or removed between versions) are left out."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [c for k in old if k in new for c in _changed_keys(old[k], new[k], f"{prefix}.{k}")]
    if old == new or (prefix.rsplit(".", 1)[-1] in _PATH_KEYS and _same_place(old, new)):
        return []
    return [f"{prefix.lstrip('.')} ({old!r} -> {new!r})"]


def _as_saved(d: dict) -> dict:
    """A config mapping in the form the run's YAML files hold."""
    return yaml.safe_load(yaml.safe_dump(plain(d), sort_keys=False)) or {}


def _run_changes(cfg: RunConfig, out: Path) -> list[str]:
    """The run-level settings (initial space, seed) that differ from the run in ``out``."""
    saved_run = out / "config.yaml"
    if not saved_run.is_file():
        return []
    old = yaml.safe_load(saved_run.read_text()) or {}
    return _changed_keys({k: old[k] for k in _RUN_KEYS if k in old}, _as_saved(cfg.to_dict()), "")


def _stage_folder(out: Path, i: int, name: str) -> Path:
    """The folder of stage ``i`` (0-based) named ``name`` in the run folder ``out``."""
    return out / "stages" / f"{i + 1:02d}-{name}"


def _resume_changes(cfg: RunConfig, out: Path) -> list[str]:
    """The settings a resumed run changes for what the run has already trained: the run's
    initial space and seed (once any stage has a checkpoint or has finished), and every stage
    that has a checkpoint or has finished."""
    def trained(d: Path) -> bool:
        return (d / DONE).is_file() or (d / CHECKPOINT).is_file()

    changed = []
    if any(trained(d) for d in out.glob("stages/*")):
        changed += _run_changes(cfg, out)
    for i, s in enumerate(cfg.stages):
        d = _stage_folder(out, i, s.name)
        if trained(d):
            changed += _stage_changes(s, d) or []
    return changed


def _stage_changes(s: StageConfig, d: Path) -> list[str] | None:
    """What ``s`` changes against the stage config saved in ``d`` (``None``: none saved)."""
    if not (d / "config.yaml").is_file():
        return None
    old, new = yaml.safe_load((d / "config.yaml").read_text()) or {}, _as_saved(dataclasses.asdict(s))
    for o in (old, new):
        for key in RESUMABLE_OPTIM:
            o.get("optim", {}).pop(key, None)
    return _changed_keys(old, new, f"stages.{s.name}")


# A table none of whose files of a modality exist among this many rows, spread over the
# table, has wrong paths (a wrong template or folder), not a few bad samples.
PROBE_ROWS = 20


def _unreadable_data(cfg: RunConfig, done: set[str] = frozenset(), read: dict | None = None) -> list[str]:
    """``where: problem`` for every dataset the run still needs that cannot serve it: it does not
    read (a wrong column or layout option, a folder that is no dataset), lacks the stage's
    modalities, or names files none of which exist among rows spread over it. The evaluation
    dataset (``eval.data``) is checked too, for the modalities it holds. ``read``, if given,
    keeps what was read (keyed by :func:`_dataset_key`) for the stages to reuse."""
    from geobind.modality import get_modality

    todo = [(f"stages.{s.name}.data.{key}", getattr(s.data, key), s.data, (s.train, s.bind_to))
            for s in cfg.stages if s.name not in done for key in ("train", "val") if getattr(s.data, key)]
    if cfg.eval is not None:
        todo.append(("eval.data", cfg.eval.data, cfg.eval, None))
    out = []
    for where, path, data_cfg, needs in todo:
        try:
            data = read_dataset(path, data_cfg.layout, **data_cfg.layout_options)
            if needs:
                data.require(*needs)
        except (ValueError, OSError) as e:
            out.append(f"{where}: {e}")
            continue
        if read is not None and needs:
            read[_dataset_key(path, data_cfg)] = data
        if not isinstance(data, Table):
            continue
        for m in needs or tuple(data.columns):
            if get_modality(m).source != "path":
                continue
            col = data.columns[m]
            rows = sorted({int(i) for i in np.linspace(0, len(col) - 1, min(PROBE_ROWS, len(col)))})
            probe = [col[i] for i in rows if isinstance(col[i], str)]
            if probe and not any(Path(v).exists() for v in probe):
                out.append(f"{where}: none of {len(probe)} {m} files spread over the dataset exists "
                           f"(e.g. {probe[0]}); check the paths, or the layout's path options"
                           + _cwd_hint(probe[0], Path(str(path)).expanduser().parent))
    return out


def _cwd_hint(missing: str, folder: Path) -> str:
    """A hint when a manifest's path was written relative to the working folder: read relative
    to the manifest's ``folder`` it is missing, but it exists from where the command runs."""
    try:
        raw = os.path.relpath(missing, folder)
    except ValueError:  # another drive (Windows)
        return ""
    if raw.startswith("..") or not Path(raw).exists():
        return ""
    return (f". Paths are read relative to the manifest's folder ({folder}); {raw} exists relative to the "
            "working folder: write them relative to the manifest, or absolute")


def _counts(counts: dict[str, int]) -> str:
    """``missing: 2, undecodable: 1``: skip counts for people."""
    return ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))


def _batch_problems(cfg: RunConfig, done: set[str], world: int, read: dict,
                    resumed: frozenset[str] = frozenset()) -> list[str]:
    """Batch sizes the run cannot use, found before any stage trains: not divisible by the ranks,
    or larger than a stage's training set (read by the preflight). ``resumed``: stages resuming
    from a checkpoint, whose batch cannot change (the number of ranks can)."""
    out = []
    for s in cfg.stages:
        if s.name in done:
            continue
        b = s.optim.batch_size
        head = f"stages.{s.name}.optim.batch_size: {b} is not divisible by {world} ranks"
        if b % world and s.name in resumed:
            ranks = [k for k in range(1, min(b, 64) + 1) if b % k == 0]
            which = (f"a number of ranks that divides it ({', '.join(map(str, ranks[:-1]))} or {ranks[-1]})"
                     if len(ranks) > 1 else "1 rank")
            out.append(f"{head}; a stage resumes with its batch, so resume on {which}")
        elif b % world:
            near = sorted({max(world, b // world * world), (b // world + 1) * world})
            out.append(f"{head} (e.g. {' or '.join(map(str, near))})")
        data = read.get(_dataset_key(s.data.train, s.data))
        if data is not None and len(data) < b:
            out.append(f"stages.{s.name}.optim.batch_size: {b} is more than the {len(data)} samples of "
                       f"{s.data.train}; lower it")
    return out


def _dataset_key(path: str, data_cfg) -> str:
    return json.dumps([path, data_cfg.layout, data_cfg.layout_options], sort_keys=True, default=str)


# optim settings that change neither the batches nor the weights (loader workers, how often
# metrics rows, validations and checkpoints are written; a validation draws nothing from the
# training RNG): a run may resume with others.
RESUMABLE_OPTIM = ("num_workers", "log_every", "val_every", "ckpt_every")


def _stage_fingerprint(cfg: StageConfig) -> str:
    d = dataclasses.asdict(cfg)
    for key in RESUMABLE_OPTIM:
        d["optim"].pop(key, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# the loop


def resolve_device(name: str, dist_device: torch.device) -> torch.device:
    """The config's ``device`` (``auto``: the rank's device), with a CUDA index always given, so
    that it compares equal to the device of the tensors placed on it."""
    device = dist_device if name == "auto" else gbdist.parse_device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def initial_space(cfg: RunConfig) -> GeoBind:
    """The space before the first stage: a CLIP anchor, or an existing GeoBind model."""
    if cfg.init_model:
        return GeoBind.from_pretrained(cfg.init_model)
    clip, tok = build_anchor(cfg.anchor)
    encs = anchor_encoders(clip, tok, cfg.anchor_modalities["image"], cfg.anchor_modalities["text"])
    return GeoBind(clip.config.projection_dim, encs, {
        "anchor": {k: v for k, v in cfg.anchor.items() if k != "config"},
        "anchor_modalities": dict(cfg.anchor_modalities),
    })


class Trainer:
    """Runs every stage of a :class:`RunConfig`. See :func:`train`."""

    def __init__(self, cfg: RunConfig, *, resume: bool = False, progress: bool = True,
                 stop_at_step: int | None = None, log=print, profile: tuple[int, int] | None = None):
        self.cfg, self.resume, self.progress, self.stop_at_step = cfg, resume, progress, stop_at_step
        self._stop_pending = False  # a stop asked for during a stage's last step
        self._read: dict[str, Any] = {}  # datasets the preflight read (rank 0), for the stages
        self.profile = profile
        self.log = log
        self.out = Path(cfg.output_dir)
        self.dist = gbdist.init_distributed(device=cfg.device)
        self.device = resolve_device(cfg.device, self.dist.device)
        self.main = self.dist.is_main
        self.cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else self.out / "cache"
        self._fork_warned = False

    def _say(self, msg: str, echo: bool = True, *, in_handler: bool = False) -> None:
        """Tell ``log`` (unless ``echo`` is false: the message is an exception's, which the caller
        reports) and append to the run log, on rank 0. A progress bar steps aside for the line
        and is drawn again below it; ``in_handler`` (a signal handler's message) does that without
        tqdm's lock, which the interrupted code may hold."""
        if not self.main:
            return
        if self.log and echo:
            from tqdm.auto import tqdm

            with tqdm.external_write_mode(nolock=in_handler):
                self.log(msg)
        if self.out.is_dir():  # the run log: rank 0 only, like checkpoints
            with open(self.out / "train.log", "a", encoding="utf-8") as f:
                f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")

    def run(self) -> Path:
        """Run every stage (skipping finished ones on resume) and return the final model directory.
        Raises FileExistsError, FileNotFoundError or ValueError if the run cannot start, and
        :class:`TrainingInterrupted` when it is stopped or interrupted."""
        try:
            return self._run()
        finally:
            lock = getattr(self, "_lock_file", None)
            if lock is not None:  # closing it releases the lock (a later run in this process may start)
                lock.close()
                self._lock_file = None

    def _run(self) -> Path:
        cfg = self.cfg
        # Rank 0 checks, every rank raises: a refusal must not leave the others in a barrier.
        refusal = self._preflight() if self.main else None
        # A resume whose initial space or seed changed before anything trained builds it anew.
        fresh = bool(self.resume and self.main and _run_changes(cfg, self.out))
        refusal, self._fresh_space = gbdist.broadcast_object((refusal, fresh))
        if refusal is not None:
            kind, message = refusal
            error = {"exists": FileExistsError, "missing": FileNotFoundError, "changed": ValueError,
                     "unreadable": ValueError}[kind](message)
            error.on_every_rank = True  # rank 0's verdict, raised alike by every rank: reported once
            raise error
        if self.main:
            if self.resume and not any(self.out.glob("stages/*/" + CHECKPOINT)) \
                    and not any(self.out.glob("stages/*/" + DONE)):
                self._say(f"--resume: {self.out} holds no checkpoint or finished stage; starting the run")
            self.out.mkdir(parents=True, exist_ok=True)
            # Atomically: a resume reads it back to refuse a changed seed or anchor.
            write_text_atomic(self.out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        gbdist.barrier()
        if self.dist.distributed:
            self._check_shared_output()
        try:
            return self._run_stages()
        except TrainingInterrupted:
            raise
        except Exception as e:
            # The run log says why the run ended (the caller reports the error itself).
            self._say(f"error: {type(e).__name__}: {e}", echo=False)
            raise
        except KeyboardInterrupt:
            # Outside a stage's training steps (building the space, the anchor cache, a stage's
            # final validation, saving a model): nothing half-done is kept but the anchor
            # cache's finished parts, which the rerun embeds no more.
            msg = "interrupted; rerun with --resume to continue from the finished stages and the last checkpoint"
            self._say(msg, echo=False)
            raise TrainingInterrupted(self.out, written=False, message=msg) from None

    def _check_shared_output(self, wait_s: float = 10.0) -> None:
        """Every rank must see the files rank 0 writes in ``output_dir`` (the next stage loads
        the last one's model from it; ``--resume`` reads rank 0's checkpoints): rank 0 writes a
        probe file there and every rank looks for it, for up to ``wait_s`` seconds (a network
        filesystem may show a new file late). A ``ValueError`` on every rank otherwise."""
        import secrets

        probe = self.out / f".rank0-{gbdist.broadcast_object(secrets.token_hex(8))}"
        if self.main:
            probe.write_text("")
        gbdist.barrier()
        until = time.monotonic() + wait_s
        while not probe.is_file() and time.monotonic() < until:
            time.sleep(0.5)
        blind = [r for r, (seen,) in enumerate(gbdist.all_gather_ints([int(probe.is_file())])) if not seen]
        if self.main:
            probe.unlink(missing_ok=True)
        if blind:
            raise ValueError(
                f"output_dir {self.out}: rank{'s' if len(blind) > 1 else ''} {', '.join(map(str, blind))} cannot "
                "see the files rank 0 writes there. On several machines output_dir must be on a filesystem "
                "every machine shares (each stage loads the model the last one saved there, and --resume reads "
                "rank 0's checkpoints)")

    def _run_stages(self) -> Path:
        cfg = self.cfg
        model = self._initial_space()
        prev_dir, stopped = None, None
        for i, scfg in enumerate(cfg.stages):
            stage_dir = _stage_folder(self.out, i, scfg.name)
            if (stage_dir / DONE).is_file() and self.resume:
                self._say(f"stage {scfg.name}: already finished, loading {stage_dir / 'model'}")
            else:
                if prev_dir is not None:
                    model = GeoBind.from_pretrained(prev_dir)
                self._run_stage(i, scfg, model, stage_dir)
                # A stop asked for during the stage's last step: the stage is done and saved.
                if self._stop_agreed(self._stop_pending):
                    stopped = scfg.name
                    if i + 1 < len(cfg.stages):
                        raise TrainingInterrupted(stage_dir / DONE, message=(
                            f"interrupted after stage {scfg.name} finished; rerun with --resume to train the next"))
            prev_dir = stage_dir / "model"
        final = self.out / "model"
        model = GeoBind.from_pretrained(prev_dir)
        if self.main:
            model.save_pretrained(final)
            self._say(f"model saved to {final}")
        gbdist.barrier()
        if stopped is not None:  # the run is complete; what was asked to stop is what follows it
            raise TrainingInterrupted(final, message=(
                f"interrupted as the last stage finished: the model is saved at {final}; evaluation "
                "was skipped (geobind eval runs it)"))
        return final

    def _preflight(self) -> tuple[str, str] | None:
        """Why the run cannot start, checked before anything is loaded or written:
        ``("exists" | "missing", message)``, or ``None``."""
        cfg = self.cfg
        if self.out.exists() and any(self.out.glob("stages/*/" + CHECKPOINT)) and not self.resume:
            return "exists", (f"{self.out} already holds a run; pass --resume to continue it, or choose "
                              "another output_dir")
        # A folder no run has used (no .lock, which every run leaves) may hold the user's own
        # config.yaml (`output_dir: .` beside it) or report.json: the run writes both there.
        theirs = [n for n in ("config.yaml", "report.json") if (self.out / n).exists()]
        if theirs and self.out.is_dir() and not (self.out / ".lock").exists():
            return "exists", (f"{self.out} holds {' and '.join(theirs)} of its own, which the run would overwrite "
                              "with its own; choose a new or empty output_dir, or move them")
        final = self.out / "model"
        if final.exists() and not final.is_dir():
            return "exists", f"{final} is a file; the run saves its model folder there: move it, or choose another output_dir"
        foreign = _not_model_files(final) if final.is_dir() else []
        if foreign:  # checked now, not when the model is saved at the end of the run
            return "exists", (f"{final} holds files that are not a GeoBind model ({', '.join(foreign[:5])}); "
                              "the run saves its model there: move them, or choose another output_dir")
        changed = _resume_changes(cfg, self.out) if self.resume else []
        if changed:
            return "changed", (f"--resume: {self.out} was trained with other settings than the config now "
                               f"gives: {'; '.join(changed)}. Resume with the settings it was started "
                               "with, or choose another output_dir to train with the new ones")
        done = {s.name for i, s in enumerate(cfg.stages)
                if self.resume and (_stage_folder(self.out, i, s.name) / DONE).is_file()}
        missing = _missing_data(cfg, done)
        if missing:  # all of them at once, before the anchor loads
            return "missing", "data not found: " + "; ".join(missing)
        unreadable = _unreadable_data(cfg, done, self._read)
        if unreadable:  # read now, not after the stages before them have trained
            return "unreadable", "; ".join(unreadable)
        resumed = frozenset(s.name for i, s in enumerate(cfg.stages)
                            if self.resume and (_stage_folder(self.out, i, s.name) / CHECKPOINT).is_file())
        models = _unloadable_models(cfg, done)
        if models:  # before stage 1 trains, not when the stage that needs one starts
            return "missing", "; ".join(models)
        batches = _batch_problems(cfg, done, self.dist.world_size, self._read, resumed)
        if batches:
            return "unreadable", "; ".join(batches)
        # Last, so that a run refused for another reason creates nothing.
        busy = self._lock_output()
        if busy:
            return "exists", busy
        return None

    def _lock_output(self) -> str | None:
        """Hold an exclusive lock on ``<output_dir>/.lock`` while the run lasts (released by the
        operating system however the process ends, ``kill -9`` included). Two runs in one
        output_dir (a ``--resume`` started while the first still trains, a requeued job) would
        both write its checkpoints and metrics. Returns why the run cannot start, or ``None``."""
        self.out.mkdir(parents=True, exist_ok=True)
        f, holder = exclusive_lock(self.out / ".lock")
        if holder is not None:
            return (f"{self.out} is in use by another training process (pid {holder}); wait for it to "
                    "end, or stop it, before training or resuming there")
        self._lock_file = f  # held until the process ends
        return None

    def _initial_space(self) -> GeoBind:
        """Build the initial space once (seeded) and keep a copy when it has random weights, so
        a resumed run binds to exactly the same anchor."""
        saved = self.out / "stages" / "00-anchor"
        if self.resume and not self._fresh_space and (saved / "geobind.json").is_file():
            return GeoBind.from_pretrained(saved)
        torch.manual_seed(self.cfg.seed)
        model = initial_space(self.cfg)
        if self.cfg.anchor is not None and not self.cfg.anchor.get("pretrained") and self.main:
            model.save_pretrained(saved)
        gbdist.barrier()
        if self.cfg.anchor is not None and not self.cfg.anchor.get("pretrained"):
            # Every rank binds to the identical saved weights.
            model = GeoBind.from_pretrained(saved)
        return model

    def _run_stage(self, index: int, scfg: StageConfig, model: GeoBind, stage_dir: Path) -> None:
        cfg, dev = self.cfg, self.device
        if self.main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(stage_dir / "config.yaml", yaml.safe_dump(plain(dataclasses.asdict(scfg)), sort_keys=False))
        anchor = model.encoder(scfg.bind_to)
        model.frozen(model.modalities)
        # Seeded per stage so an interrupted and a fresh run build the same initial weights.
        torch.manual_seed(cfg.seed * 1000 + index)
        enc_cls = get_encoder_class(scfg.encoder["type"])
        encoder = enc_cls.create(scfg.train, dict(scfg.encoder), model.dim, dict(model.encoders.items()))
        if encoder.dim != model.dim:
            raise ValueError(f"stage {scfg.name}: encoder gives {encoder.dim}-d vectors, space has {model.dim}")
        stage = BindingStage(
            encoder, anchor, temperature=scfg.loss.temperature, learn_temperature=scfg.loss.learn_temperature,
            symmetric=scfg.loss.symmetric, queue_size=scfg.loss.queue_size,
        ).to(dev)

        table = self._dataset(scfg.data.train, scfg.data)
        table.require(scfg.train, scfg.bind_to)
        if isinstance(table, ShardSet):
            self._say(f"stage {scfg.name}: {len(table)} samples in {len(table.urls)} shards ({table.schema.name})")
        workers = gbdist.loader_workers(scfg.optim.num_workers, dev)
        if scfg.optim.num_workers == "auto" and workers:
            self._say(f"stage {scfg.name}: {workers} loader workers per rank (optim.num_workers: auto)")
        if workers and self.dist.distributed and not self._fork_warned and fork_may_hang():
            self._fork_warned = True
            self._say(FORK_HANG_WARNING.format(version=platform.python_version()))
        bad_rows = getattr(table, "bad_rows", None) or {}
        if bad_rows:  # rows left out before any is read (coordinates): each named, as skips are
            rows = sorted(bad_rows)

            def why(i: int) -> str:
                place = f", lat {table.lat[i]}, lon {table.lon[i]}" if bad_rows[i] == "bad-coordinates" else ""
                return f"{table.ids[i]} ({bad_rows[i]}{place})"

            more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
            self._say(f"stage {scfg.name}: skipping {len(rows)} of {len(table)} rows of {table.source}: "
                      f"{', '.join(why(i) for i in rows[:5])}{more}")
        bad = Counter()
        if scfg.cache_anchor:
            anchor_emb, valid, info = self._anchor_cache(anchor, table, scfg, workers)
            bad.update(info["bad"])
            self._say(f"stage {scfg.name}: anchor cache {'hit' if info['hit'] else 'written'} ({info['path']})"
                      + (f"; {sum(info['bad'].values())} rows left out ({_counts(info['bad'])})" if info["bad"] else ""))
        else:
            anchor_emb, valid = None, torch.tensor([i not in table.bad_rows for i in range(len(table))])
        cache_bytes = anchor_emb.numel() * anchor_emb.element_size() if anchor_emb is not None else 0
        if dev.type == "cuda" and 0 < cache_bytes <= ANCHOR_ON_DEVICE_BYTES:
            # Small enough to live on the device: each step's anchors are then a device gather.
            anchor_emb = anchor_emb.to(dev)
        val = None
        if scfg.data.val:
            vt = self._dataset(scfg.data.val, scfg.data)
            vt.require(scfg.train, scfg.bind_to)
            v_emb, v_valid, _ = self._anchor_cache(anchor, vt, scfg, workers)
            val = (vt, v_emb, v_valid)

        o = scfg.optim
        world = self.dist.world_size
        if o.batch_size % world:
            raise ValueError(f"stage {scfg.name}: batch_size {o.batch_size} is not divisible by {world} ranks")
        per_rank = o.batch_size // world
        n_valid = int(valid.sum())
        steps_per_epoch = n_valid // o.batch_size
        if steps_per_epoch == 0:
            skipped = len(table) - n_valid
            if n_valid == 0 or skipped > n_valid:
                reasons = dict(bad) or {r: sum(1 for v in table.bad_rows.values() if v == r)
                                        for r in set(table.bad_rows.values())}
                raise ValueError(
                    f"stage {scfg.name}: {skipped} of {len(table)} samples in {table.source} are unusable "
                    f"({_counts(reasons) or 'see train.log'}), "
                    f"leaving {n_valid}, fewer than one batch ({o.batch_size}). "
                    f"`geobind data check {scfg.data.train} --layout {scfg.data.layout}"
                    + "".join(f" --layout-option {k}={v}" for k, v in scfg.data.layout_options.items())
                    + "` lists the problems"
                )
            raise ValueError(
                f"stage {scfg.name}: {n_valid} usable pairs in {table.source} is fewer than one batch "
                f"({o.batch_size}); lower optim.batch_size"
            )
        total = o.max_steps or steps_per_epoch * o.epochs
        self._say(f"stage {scfg.name}: training {scfg.train} to match {scfg.bind_to}: {total} steps "
                  f"({steps_per_epoch} per epoch) of {o.batch_size} pairs on {dev}"
                  + (f" (the batch over {self.dist.world_size} ranks)" if self.dist.world_size > 1 else ""),
                  echo=False)
        if o.warmup_steps > total:
            self._say(f"warning: stage {scfg.name}: optim.warmup_steps ({o.warmup_steps}) is not below the "
                      f"stage's {total} steps, so the learning rate never reaches optim.lr ({o.lr:g}); lower "
                      "optim.warmup_steps")
        optim = build_optimizer(stage, scfg, dev)
        sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_lambda(total, o.warmup_steps, o.min_lr_ratio))
        autocast, scaler = _precision(scfg, dev)

        step, epoch, step_in_epoch = 0, 0, 0
        samples = 0  # samples trained on, over all ranks
        segments = None  # shards: this epoch's (world, workers, first step) layouts
        # (step, epoch) of a validation that a stop came before: the resumed run runs it first.
        val_due: tuple[int, int] | None = None
        ckpt_path = stage_dir / CHECKPOINT
        ckpt_step: int | None = None  # the step of the checkpoint on disk, when known
        fp = _stage_fingerprint(scfg)
        resumed_loss = float("nan")
        if ckpt_path.is_file():
            if not self.resume:
                raise FileExistsError(f"{ckpt_path} exists; pass --resume to continue, or use another output_dir")
            ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
            # A checkpoint from a config that named its paths relative to the folder the run started
            # in has another fingerprint; the saved stage config then says whether it is the same.
            if ck["fingerprint"] != fp and _stage_changes(scfg, stage_dir) != []:
                raise ValueError(
                    f"{ckpt_path} was written by a different stage config; resume with the same config "
                    "or start a new output_dir"
                )
            stage.load_state_dict(ck["stage"], strict=False)
            optim.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            if scaler is not None and ck.get("scaler"):
                scaler.load_state_dict(ck["scaler"])
            step, epoch, step_in_epoch = ck["step"], ck["epoch"], ck["step_in_epoch"]
            ckpt_step = step
            samples = ck.get("samples", 0)
            val_due = ck.get("val_due")
            segments = ck.get("segments")
            # The checkpoint's counts already hold the anchor pass's skips counted above.
            bad.clear()
            bad.update(ck.get("bad", {}))
            _set_rng_state(ck["rng"])
            resumed_loss = ck.get("last_loss", float("nan"))
            self._say(f"stage {scfg.name}: resumed at step {step} (epoch {epoch + 1}, batch {step_in_epoch})")
            if ck.get("data_identity") not in (None, table.identity):
                self._say(f"warning: stage {scfg.name}: {scfg.data.train} changed since the checkpoint was "
                          "written; the resumed stage trains on the new data, so it does not continue the "
                          "interrupted run exactly (its epochs' order and length change)")

        if o.grad_checkpointing:
            encoder.set_grad_checkpointing(True)
        if o.compile:
            # In place: parameter names (checkpoints, saved models) are unchanged. The first
            # steps include the compilation; short batches are padded to keep its one graph.
            encoder.compile()
            self._say(f"stage {scfg.name}: compiling the {scfg.train} encoder (optim.compile); the first "
                      "step takes longer")
        ddp_stage = stage
        if self.dist.distributed:
            # Gradients as views into DDP's buckets: no copy of every gradient into the buckets
            # and back each step (2 x 351 MB read + written at ViT-B/32), and one gradient-sized
            # buffer less. Same values (the optimiser reads the same numbers).
            ddp_stage = torch.nn.parallel.DistributedDataParallel(
                stage, device_ids=[dev.index] if dev.type == "cuda" else None, gradient_as_bucket_view=True
            )
        runner = StepRunner(stage, optim, sched, autocast=autocast, scaler=scaler, grad_clip=o.grad_clip,
                            module=ddp_stage)

        saved = None  # where this session last wrote the checkpoint

        # Whether any step's loss since the stage began was NaN or infinite: kept on the device
        # (no host wait per step) and read on log rows and before every checkpoint, so that no
        # checkpoint ever holds the weights of a diverged run. Under fp16 a step whose loss or
        # gradients overflow is skipped by the grad scaler, weights intact: there the run has
        # diverged only when the weights are not finite (the same on every rank under DDP).
        nonfinite = torch.zeros((), dtype=torch.bool, device=dev)

        def check_finite():
            if scaler is not None:
                norms = torch.stack([p.detach().float().norm() for p in runner.params])
                nonfinite.copy_(~torch.isfinite(norms).all())
            if bool(nonfinite):  # the loss is the global batch's: every rank agrees
                value = float(last_loss_t) if last_loss_t is not None else float("nan")
                what = ("the weights became nan or inf" if scaler is not None else
                        f"the loss became {value if not math.isfinite(value) else 'nan or inf'}")
                raise TrainingDiverged(
                    f"stage {scfg.name}: {what} "
                    f"by step {step}; the model was not saved, and neither was a checkpoint after it (an "
                    "earlier checkpoint, if any, stays). Lower optim.lr"
                    + (", check the data, or train in bf16 or fp32 instead of fp16" if scaler is not None
                       else " or check the data"))

        def save_ckpt():
            nonlocal saved, ckpt_step
            # The same point twice (an epoch's end, then a stop before the next step): one write.
            at = (step, epoch, step_in_epoch, val_due)
            if at == saved:
                return
            check_finite()
            if self.main:
                trainable = {k: v for k, v in stage.state_dict().items() if not k.startswith("anchor.")}
                _atomic_save(
                    {"stage": trainable, "optimizer": optim.state_dict(), "scheduler": sched.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else None, "step": step, "epoch": epoch,
                     "step_in_epoch": step_in_epoch, "samples": samples, "segments": segments,
                     "world_size": world, "rng": _rng_state(), "bad": dict(bad), "fingerprint": fp,
                     "val_due": val_due, "data_identity": table.identity,
                     "last_loss": float(last_loss_t) if last_loss_t is not None else last_loss},
                    ckpt_path,
                )
            saved, ckpt_step = at, step

        metrics_path = stage_dir / "metrics.csv"
        # A resumed stage trains again the steps after its checkpoint: their rows (left by a
        # crash) are dropped, so that each step is logged once.
        writer = _MetricsWriter(metrics_path if self.main else None, after=ckpt_step)
        if val_due is not None and val is not None:
            # Before the stop, the run owed this validation (every rank takes part).
            self._validate(stage, val, scfg, writer, *val_due)
        val_due = None
        uncached_anchor = None if scfg.cache_anchor else anchor
        ds = train_items(for_loader_workers(table, workers), scfg.train, encoder, cfg.seed, uncached_anchor,
                         scfg.bind_to)
        pbar = None
        if self.main and self.progress:
            from tqdm.auto import tqdm

            pbar = tqdm(total=total, initial=step, desc=f"stage {scfg.name}", unit="step", dynamic_ncols=True)
        t_start, start_step = time.perf_counter(), step
        # This session's loop time (loader waits and steps, not validation or checkpoints).
        loop = {"data": 0.0, "step": 0.0, "samples_before": samples}
        bad_before = Counter(bad)  # skips counted before this epoch (for the per-epoch report)
        warned: set[str] = set()  # bad samples named so far
        stage.train()
        last_loss, last_loss_t = resumed_loss, None
        stand_in = None  # this rank's last batch (several ranks): run when a step leaves it none
        hinted = False  # the data-wait hint is given once per stage
        profiler = None
        if self.profile is not None:
            profiler = StepProfiler(stage_dir / "profile", *self.profile, dev, say=self._say,
                                    rank=self.dist.rank if self.dist.distributed else None,
                                    label=f"stage {scfg.name}: ")
        stop = StopRequests(partial(self._say, in_handler=True) if self.main else None).__enter__()
        live_loader = None
        try:
            while step < total:
                loader, segments = train_loader(
                    table, ds, valid=valid, batch_size=o.batch_size, seed=cfg.seed, epoch=epoch,
                    step_in_epoch=step_in_epoch, rank=self.dist.rank, world=world, num_workers=workers,
                    collate_fn=_CollateTrain(encoder, uncached_anchor), segments=segments,
                    shuffle_buffer=scfg.data.shuffle_buffer, pin_memory=dev.type == "cuda")
                live_loader = loader
                if dev.type == "cuda":  # copy batch k + 1 to the GPU while step k computes
                    loader = DevicePrefetcher(loader, dev, _move_train_batch)
                t_data = time.perf_counter()
                window = {"data": 0.0, "step": 0.0, "n": 0, "steps": 0}
                windows_seen = 0
                for idx, inputs, anchor_inputs, bad_items in loader:
                    t0 = time.perf_counter()
                    window["data"] += t0 - t_data
                    loop["data"] += t0 - t_data
                    n = len(idx)
                    # A rank left with no good sample can still take part in the step (see below)
                    # when it has an earlier batch to stand in and the anchors are cached.
                    can_stand_in = n > 0 or (stand_in is not None and anchor_emb is not None)
                    n_step, fewest, errors, stopping, stand_ins = self._agree_on_batch(
                        n, bad_items, stop.requested, can_stand_in)
                    if stopping:  # before this batch counts: a resumed run loads it again
                        raise _AgreedStop
                    for e in errors:
                        if scfg.data.strict:
                            raise e
                        bad[e.reason] += 1
                        if str(e) not in warned:  # once a stage; each epoch's line counts them
                            warned.add(str(e))
                            self._say(f"skipping bad sample {e}")
                    # Ranks may train on different numbers of samples after skips (the loss
                    # gathers uneven batches). A rank left with none runs its last batch as a
                    # stand-in, with none of its rows counted (and its batch norm statistics
                    # put back): it adds nothing to the loss and a zero gradient, and the
                    # others train on their samples, as one process would. Where a rank cannot
                    # (its first step of this session, or anchors that are not cached), every
                    # rank skips the step together.
                    if n_step < 1 or (fewest < 1 and not stand_ins):
                        step_in_epoch += 1
                        t_data = time.perf_counter()
                        continue
                    n_pad = None
                    standing_in = n == 0
                    if standing_in:
                        inputs, n_pad, idx = stand_in, 0, idx.new_zeros(0)
                        # Training mode stays (a mode switch would compile a second graph, on
                        # this rank alone, and turn off the audio encoder's checkpointing); the
                        # buffers its forward updates (batch norm statistics) are put back.
                        buffers = [(b, b.detach().clone()) for b in stage.encoder.buffers()]
                    elif o.compile and n < per_rank:
                        # A compiled encoder keeps its one graph: the batch is padded back to
                        # its full size and the stage drops the padding after the encoder.
                        inputs, n_pad = pad_batch(inputs, per_rank), n
                    if self.dist.distributed and not standing_in:
                        stand_in = inputs
                    keys = idx.to(dev, non_blocking=True)
                    a_emb = None
                    if anchor_emb is not None:
                        on_device = anchor_emb.device == dev
                        a_emb = anchor_emb[keys if on_device else idx]
                        if not on_device:
                            # Pinned, so the copy is queued without making the host wait.
                            a_emb = a_emb.pin_memory().to(dev, non_blocking=True)
                    if profiler is not None:
                        profiler.before_step()
                    step_lr = sched.get_last_lr()[0]  # the rate this step uses (the runner steps the schedule)
                    try:
                        loss, out = runner(inputs, anchor_emb=a_emb, anchor_inputs=anchor_inputs, keys=keys,
                                           n_valid=n_pad)
                    except torch.OutOfMemoryError as e:
                        raise TrainingOutOfMemory(_out_of_memory_message(
                            scfg.name, step + 1, per_rank, o.batch_size, world, dev, o.precision, o.compile,
                            o.grad_checkpointing, ckpt_path)) from e
                    finally:
                        if standing_in:
                            with torch.no_grad():
                                for b, kept in buffers:
                                    b.copy_(kept)
                    samples += n_step
                    step += 1
                    if profiler is not None:
                        profiler.after_step()
                    step_in_epoch += 1
                    # The loss stays on the device between log rows: reading it every step
                    # would make the host wait for the device each step. Reading it on a log
                    # row waits for every queued step, so the window's time is wall time.
                    last_loss_t = loss
                    if scaler is None:  # under fp16 check_finite looks at the weights instead
                        nonfinite |= ~torch.isfinite(loss)
                    log_row = step % o.log_every == 0 or step == total
                    if log_row:
                        check_finite()  # the weights are lost from a non-finite loss on
                        last_loss = float(last_loss_t)
                    t1 = time.perf_counter()
                    window["step"] += t1 - t0
                    loop["step"] += t1 - t0
                    window["n"] += n_step
                    window["steps"] += 1
                    if pbar is not None:
                        pbar.update(1)
                    if log_row:
                        el = window["data"] + window["step"]
                        wait = window["data"] / max(el, 1e-9)
                        if (windows_seen > 0 and not hinted and wait > DATA_WAIT_HINT
                                and (workers > 0 or dev.type == "cuda")):
                            hinted = True
                            self._say(_data_wait_hint(scfg.name, wait, step - window["steps"] + 1, step, workers,
                                                      encoder, isinstance(table, ShardSet)))
                        windows_seen += 1
                        if pbar is not None:
                            pbar.set_postfix(loss=f"{last_loss:.4f}", sps=f"{window['n'] / max(1e-9, el):.1f}")
                        elif self.main and self.log:  # no bar (--no-progress, a batch job): one line a row
                            self.log(f"stage {scfg.name}: step {step}/{total} (epoch {epoch + 1}) loss {last_loss:.4f} "
                                     f"lr {step_lr:.3g} {window['n'] / max(1e-9, el):.1f} samples/s")
                        writer.row({"step": step, "epoch": epoch + 1, "loss": round(last_loss, 6),
                                    "lr": step_lr, "logit_scale": float(out["logit_scale"]),
                                    "samples_per_s": round(window["n"] / max(el, 1e-9), 2),
                                    "data_wait": round(wait, 4),
                                    "bad_samples": sum(bad.values()),
                                    **{f"bad_{k}": v for k, v in sorted(bad.items())}})
                        window = {"data": 0.0, "step": 0.0, "n": 0, "steps": 0}
                    if o.val_every and step % o.val_every == 0 and val is not None:
                        if self._stop_agreed(stop.requested):  # not after a validation the others wait for
                            val_due = (step, epoch)
                            raise _AgreedStop
                        self._validate(stage, val, scfg, writer, step, epoch)
                    # An epoch's last step is saved after the loop, with the epoch's end, unless
                    # an epoch-end validation comes first (the steps are kept should it fail).
                    epoch_save_next = step_in_epoch >= steps_per_epoch and (val is None or o.val_every)
                    if step == total or (o.ckpt_every and step % o.ckpt_every == 0 and not epoch_save_next):
                        save_ckpt()
                    if self.stop_at_step is not None and step == self.stop_at_step:
                        stop.requested = True
                    if step >= total:
                        break
                    t_data = time.perf_counter()
                # Skips of this epoch's batches (the anchor pass's, counted before, are not the epoch's).
                this = {k: v - bad_before.get(k, 0) for k, v in bad.items() if v - bad_before.get(k, 0)}
                if step_in_epoch >= steps_per_epoch and this:
                    self._say(f"epoch {epoch + 1}: skipped {sum(this.values())} bad samples ({_counts(this)}); "
                              f"so far in this stage: {sum(bad.values())} ({_counts(bad)})")
                if step >= total:
                    break
                epoch += 1
                step_in_epoch = 0
                segments = None
                bad_before = Counter(bad)
                # Every rank agrees on a stop here: before a validation the others would wait
                # for, and before the next epoch's loader starts (a stop asked for in the
                # epoch's last step then writes the epoch's checkpoint, once).
                if self._stop_agreed(stop.requested):
                    if val is not None and not o.val_every:
                        val_due = (step, epoch - 1)
                    raise _AgreedStop
                if val is not None and not o.val_every:
                    self._validate(stage, val, scfg, writer, step, epoch - 1)
                save_ckpt()
        except _AgreedStop:  # every rank is here, at the same step
            msg = None
            try:
                if profiler is not None:
                    profiler.finish()
                save_ckpt()
                msg = (f"stage {scfg.name}: stopped {f'after step {step}' if step else 'before its first step'}; "
                       f"resumable checkpoint written to {ckpt_path} (rerun with --resume to continue)")
                if pbar is not None:
                    pbar.close()
                self._say(msg, echo=False)  # the exception's message: the caller reports it
                gbdist.barrier()
            except KeyboardInterrupt:  # a second signal while the checkpoint was written
                if msg is None:
                    raise self._stopped_at_once(scfg.name, step, ckpt_path, ckpt_step, pbar) from None
            raise TrainingInterrupted(ckpt_path, message=msg) from None
        except KeyboardInterrupt:
            # At once, anywhere in a step (or a collective): no checkpoint of a half-done step,
            # and no barrier another rank may never reach. The last checkpoint stays.
            raise self._stopped_at_once(scfg.name, step, ckpt_path, ckpt_step, pbar) from None
        finally:
            stop.__exit__()
            if live_loader is not None:  # its workers end now, whichever way the loop was left
                live_loader.close()
        self._stop_pending = stop.requested
        if pbar is not None:
            pbar.close()
        if profiler is not None:
            profiler.finish()
        if last_loss_t is not None:
            last_loss = float(last_loss_t)
        seconds = time.perf_counter() - t_start
        vm = None
        if val is not None:
            # Reuse a validation already run on these very weights (val_every hit the last step).
            last = getattr(self, "_last_val", None)
            vm = last[1] if last and last[0] == (scfg.name, step) else \
                self._validate(stage, val, scfg, writer, step, epoch)
        # The last step already wrote the checkpoint (step == total), so none is written here.
        if o.compile:
            uncompile(encoder)  # later stages and evaluation run it eagerly
        if o.grad_checkpointing:
            encoder.set_grad_checkpointing(False)
        # The stage's result: the space with the new modality added.
        model.add_encoder(scfg.train, encoder.cpu())
        stage_rec = {"name": scfg.name, "train": scfg.train, "bind_to": scfg.bind_to, "data": scfg.data.train,
                     "steps": step, "samples": samples, "epochs_seen": epoch + 1, "final_loss": last_loss, "bad_samples": dict(bad),
                     "seconds": round(seconds, 2), **_throughput(loop, samples), "val": vm,
                     **({"resumed_at_step": start_step} if start_step else {})}
        model.meta.setdefault("stages", []).append(stage_rec)
        model.meta.setdefault("logit_scales", {})[f"{scfg.train}->{scfg.bind_to}"] = float(stage.logit_scale().detach())
        if self.main:
            model.save_pretrained(stage_dir / "model")
            write_text_atomic(stage_dir / DONE, json.dumps(stage_rec, indent=2))
            rate = (f", {stage_rec['samples_per_s']:,.1f} samples/s (data wait {stage_rec['data_wait']:.1%})"
                    if stage_rec.get("samples_per_s") else "")
            ran = f"{step} steps" + (f" ({step - start_step} since the resume)" if start_step else "")
            self._say(f"stage {scfg.name}: {ran} in {seconds:.1f}s{rate}, final loss {last_loss:.4f}"
                      + (f", skipped {sum(bad.values())} ({_counts(bad)})" if bad else ""))
        gbdist.barrier()
        writer.close()

    def _stopped_at_once(self, name: str, step: int, ckpt_path: Path, ckpt_step: int | None,
                         pbar) -> TrainingInterrupted:
        """The stop of a second signal, during step ``step + 1``: no checkpoint is written."""
        if pbar is not None:
            pbar.close()
        msg = f"stage {name}: stopped at once during step {step + 1} without writing a checkpoint"
        if ckpt_path.is_file():
            last = f" (step {ckpt_step})" if ckpt_step is not None else ""
            msg += f"; the last one{last} stays at {ckpt_path} (rerun with --resume to continue from it)"
        else:
            msg += "; the stage has none yet, so --resume starts it again"
        self._say(msg, echo=False)  # the exception's message: the caller reports it
        return TrainingInterrupted(ckpt_path, written=False, message=msg)

    def _dataset(self, path: str, data_cfg):
        """The dataset at ``path``: as the preflight read it (once), else read now."""
        read = self._read.pop(_dataset_key(path, data_cfg), None)
        return read if read is not None else read_dataset(path, data_cfg.layout, **data_cfg.layout_options)

    def _stop_agreed(self, requested: bool) -> bool:
        """Whether any rank asked to stop (every rank calls this at the same point)."""
        if not self.dist.distributed:
            return requested
        return any(r[0] for r in gbdist.all_gather_ints([int(requested)]))

    def _agree_on_batch(self, n: int, bad_items: list[BadSampleError], stop: bool = False,
                        can_stand_in: bool = True) -> tuple[int, int, list[BadSampleError], bool, bool]:
        """``(samples over all ranks, fewest on one rank, every rank's skipped samples, whether
        any rank asked to stop, whether every rank can take part)`` for this step, the same on
        every rank: skips are counted once for the whole run and checkpointed alike by every
        rank, and a stop is made by all together. One small host-side exchange per step (two
        when a rank skipped something)."""
        if not self.dist.distributed:
            return n, n, list(bad_items), stop, n > 0
        counts = gbdist.all_gather_ints([n, len(bad_items), int(stop), int(can_stand_in)])
        if any(c[2] for c in counts):
            return 0, 0, [], True, False
        errors = list(bad_items)
        if any(c[1] for c in counts):
            errors = [e for errs in gbdist.all_gather_object(list(bad_items)) for e in errs]
        return (sum(c[0] for c in counts), min(c[0] for c in counts), errors, False,
                all(c[3] for c in counts))

    def _anchor_cache(self, anchor, table, scfg, workers: int):
        # Collective: every rank embeds its share of the rows and all end with the full float16
        # table (rank 0 writes the file); on a hit every rank maps the existing file. Its loader
        # has a generator of its own, so a hit and a miss leave training's RNG alike. The anchor
        # runs in the stage's precision, as it would in every step without the cache; the usual
        # one (bf16 on CUDA, fp32 elsewhere) keeps the cache's key as it always was.
        p = _precision_name(scfg, self.device)
        usual = p == _auto_precision(self.device)
        return cached_embeddings(anchor, table, scfg.bind_to, self.cache_dir, batch_size=256,
                                 num_workers=workers,
                                 progress=self.progress and self.main,
                                 strict=scfg.data.strict, say=self._say, log=self._say,
                                 autocast=None if usual else _precision(scfg, self.device)[0],
                                 key_extra="" if usual else f"precision={p}")

    @torch.no_grad()
    def _validate(self, stage: BindingStage, val, scfg: StageConfig, writer, step: int, epoch: int):
        vt, v_anchor, v_valid = val
        # Every rank embeds its share of the rows (the batches one process makes), so that no
        # rank waits in a collective while another embeds it all; rank 0 scores and logs. The
        # loader has a generator of its own, so training's RNG is not drawn on.
        with eagerly(stage.encoder):
            emb, valid = embed_table_shared(stage.encoder, vt, scfg.train, batch_size=256)
        stage.train()
        keep = valid & v_valid  # the same on every rank, so every rank takes the same way out
        usable = bool(keep.any())
        if not usable:  # said by rank 0 (_say)
            self._say(f"stage {scfg.name} step {step}: validation skipped: none of the {len(vt)} rows of "
                      f"{vt.source} has a usable {scfg.train} and {scfg.bind_to}")
        if not self.main or not usable:
            self._last_val = ((scfg.name, step), None)  # every rank knows which validations ran
            return None
        m = retrieval_metrics(emb[keep], v_anchor[keep])
        row = {"step": step, "epoch": epoch + 1, **{f"val_{k}": v for k, v in m.items()}}
        writer.row(row)
        self._say(f"stage {scfg.name} step {step}: val {scfg.train}->{scfg.bind_to} "
                  + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in m.items()))
        self._last_val = ((scfg.name, step), m)
        return m


def _throughput(loop: dict, samples: int) -> dict:
    """``samples_per_s`` and ``data_wait`` of this session's training loop (empty without steps)."""
    busy = loop["data"] + loop["step"]
    if busy <= 0 or samples <= loop["samples_before"]:
        return {}
    return {"samples_per_s": round((samples - loop["samples_before"]) / busy, 2),
            "data_wait": round(loop["data"] / busy, 4)}


def _move_train_batch(item, to_device):
    """A training loader item with its model inputs moved (the indices stay on the host)."""
    idx, inputs, anchor_inputs, bad = item
    return idx, map_tensors(inputs, to_device), map_tensors(anchor_inputs, to_device), bad


class _MetricsWriter:
    """Appends rows to metrics.csv (columns grow as new keys appear); TensorBoard if installed.
    ``after``: the step a resumed stage continues from; rows of later steps (written before a
    crash, and about to be written again) are dropped, and so are TensorBoard's."""

    def __init__(self, path: Path | None, after: int | None = None):
        self.path = path
        self.tb = None
        if path is not None and after is not None and path.is_file():
            self._drop_rows_after(after)
        if path is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                purge = {} if after is None else {"purge_step": after + 1}
                self.tb = SummaryWriter(str(path.parent / "tensorboard"), **purge)
            except Exception:  # tensorboard not installed: CSV only
                self.tb = None

    def _drop_rows_after(self, step: int) -> None:
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            keys, rows = reader.fieldnames, list(reader)
        kept = [r for r in rows if not (r.get("step") or "").isdigit() or int(r["step"]) <= step]
        if keys is not None and len(kept) < len(rows):
            self._rewrite(keys, kept)

    def _rewrite(self, keys: list[str], rows: list[dict]) -> None:
        """The whole file anew, atomically."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, self.path)

    # The usual columns come first, so the file reads well whichever row arrives first.
    LEADING = ("step", "epoch", "loss", "lr", "logit_scale", "samples_per_s", "data_wait", "bad_samples")

    def row(self, row: dict) -> None:
        if self.path is None:
            return
        header = self._header()
        if header is not None and set(row) <= set(header):
            # Common case: append one line (a long run must not rewrite the file every row).
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=header).writerow(row)
        else:
            # A new column (a first validation or skip reason): rewrite once with it added.
            rows = []
            if header is not None:
                with open(self.path, newline="") as f:
                    rows = list(csv.DictReader(f))
            rows.append(row)
            seen = {k for r in rows for k in r}
            keys = [k for k in self.LEADING if k in seen]
            for r in rows:
                keys += [k for k in r if k not in keys]
            self._rewrite(keys, rows)
            self._keys = keys
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def _header(self) -> list[str] | None:
        if getattr(self, "_keys", None) is None and self.path.is_file():
            with open(self.path, newline="") as f:
                self._keys = next(csv.reader(f), None)
        return getattr(self, "_keys", None)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True, stop_at_step: int | None = None,
          log=print, profile: tuple[int, int] | None = None) -> Path:
    """Run every stage of ``cfg``; return the final model directory.

    ``resume`` continues an interrupted run from its checkpoints. ``stop_at_step`` stops the
    first unfinished stage after that many steps with a checkpoint, as Ctrl-C would (used to
    test exact resumption). ``profile=(after, steps)`` records ``steps`` steps of each stage,
    after its first ``after`` in this session, with :mod:`torch.profiler` (see
    :class:`StepProfiler`).
    """
    return Trainer(cfg, resume=resume, progress=progress, stop_at_step=stop_at_step, log=log,
                   profile=profile).run()
