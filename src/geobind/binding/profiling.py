"""``geobind train --profile AFTER:STEPS``: a few training steps under :mod:`torch.profiler`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from geobind.search.common import atomic_path

__all__ = ["StepProfiler"]


class StepProfiler:
    """Records steps ``after + 1`` to ``after + steps`` of a stage (counted from the first step of
    this session, so start-up and compilation stay out) and writes, into ``out_dir``:

    * ``trace.json``: the timeline (CPU operators, and the GPU kernels they launch on CUDA), for
      https://ui.perfetto.dev or ``chrome://tracing``;
    * ``profile.txt``: wall time per recorded step and the costliest operators, by their own
      GPU time on CUDA (by CPU time elsewhere).

    Under ``torchrun`` every rank writes its own (``trace.rank1.json``, ...). Call
    :meth:`before_step` and :meth:`after_step` around each step and :meth:`finish` when the
    stage ends (it writes what was recorded if the stage was shorter than the window).
    """

    def __init__(self, out_dir: Path, after: int, steps: int, device: torch.device, *,
                 rank: int | None = None, say: Callable[[str], None] = print, label: str = ""):
        if after < 0 or steps < 1:
            raise ValueError(f"profile window needs after >= 0 and steps >= 1; got {after}:{steps}")
        self.out_dir, self.after, self.steps, self.device = Path(out_dir), after, steps, device
        self.rank, self.say, self.label = rank, say, label
        self.seen = 0  # steps finished in this session
        self.recorded = 0
        self._prof = None
        self._t0 = 0.0
        self.done = False

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def before_step(self) -> None:
        """Start recording when the next step is the window's first."""
        if self.done or self._prof is not None or self.seen != self.after:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._sync()  # the window starts with no earlier work still queued
        self._prof = torch.profiler.profile(activities=activities, record_shapes=True)
        self._prof.start()
        self._t0 = time.perf_counter()

    def after_step(self) -> None:
        """Count a finished step; stop and write once the window is full."""
        if self.done:
            return
        self.seen += 1
        if self._prof is not None:
            self.recorded += 1
            if self.recorded == self.steps:
                self.finish()

    def finish(self) -> None:
        """Stop recording (if it started) and write the files; later calls do nothing."""
        if self.done:
            return
        self.done = True
        if self._prof is None:
            self.say(f"{self.label}nothing profiled: the window starts after step {self.after} of this "
                     f"session, and the stage ran {self.seen}")
            return
        self._sync()
        wall = time.perf_counter() - self._t0
        self._prof.stop()
        suffix = f".rank{self.rank}" if self.rank is not None else ""
        trace = self.out_dir / f"trace{suffix}.json"
        with atomic_path(trace, force=True) as tmp:
            self._prof.export_chrome_trace(str(tmp))
        cuda = self.device.type == "cuda"
        table = self._prof.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30)
        steps = f"steps {self.after + 1}-{self.after + self.recorded}"
        per_step = f"{1000 * wall / max(1, self.recorded):.1f} ms per step"
        report = self.out_dir / f"profile{suffix}.txt"
        with atomic_path(report, force=True) as tmp:
            tmp.write_text(f"{self.label}{steps} of this session on {self.device}: {per_step} (wall, profiler on)\n"
                           f"operators by their own {'GPU' if cuda else 'CPU'} time:\n{table}\n")
        self.say(f"{self.label}profiled {steps}: {per_step}; {report} and {trace.name} "
                 "(open it in https://ui.perfetto.dev)")
