"""One optimisation step of a binding stage, shared by the trainer and the benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from geobind import distributed as gbdist
from geobind.binding.stage import BindingStage, total_loss


class StepRunner:
    """forward (autocast) -> backward (grad scaling for fp16) -> clip -> optimiser and schedule
    step -> temperature clamp -> queue update. Returns the loss and the stage's outputs."""

    def __init__(
        self,
        stage: BindingStage,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        autocast: Callable[[], Any] = contextlib.nullcontext,
        scaler: torch.amp.GradScaler | None = None,
        grad_clip: float = 0.0,
        module: torch.nn.Module | None = None,
    ):
        self.stage, self.optimizer, self.scheduler = stage, optimizer, scheduler
        self.autocast, self.scaler, self.grad_clip = autocast, scaler, grad_clip
        # The module called for the forward: the stage itself, or its DDP wrapper.
        self.module = module if module is not None else stage
        self.params = [p for _, p in stage.trainable_parameters()]

    def __call__(self, inputs: Any, anchor_emb=None, anchor_inputs=None, keys=None, n_valid: int | None = None):
        with self.autocast():
            out = self.module(inputs, anchor_emb=anchor_emb, anchor_inputs=anchor_inputs, keys=keys,
                              n_valid=n_valid)
            loss = total_loss(out)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.stage.logit_scale.clamp_()
        if self.stage.queue is not None:
            anchors = out["anchor"].detach()
            if keys is None:  # no sample identity: nothing can be masked later
                keys = torch.full((anchors.shape[0],), -1, dtype=torch.long, device=anchors.device)
            self.stage.queue.enqueue(gbdist.all_gather_no_grad(anchors), gbdist.all_gather_no_grad(keys))
        return loss.detach(), out
