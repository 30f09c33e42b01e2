"""A binding stage as a module: the trainable encoder, its frozen anchor, the temperature and
the optional queue. Its forward returns named outputs; the total loss is the sum of the keys
ending in ``_loss`` (everything else is logged)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from geobind.encoders.base import Encoder
from geobind.losses import EmbeddingQueue, LogitScale, contrastive_loss


class BindingStage(nn.Module):
    """Binds ``encoder`` (trained) to ``anchor`` (frozen, owned by the stage).

    The anchor is frozen at construction, kept in eval mode even when the stage is put in
    train mode, and only ever run under ``torch.no_grad()``.
    """

    def __init__(
        self,
        encoder: Encoder,
        anchor: Encoder,
        *,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        symmetric: bool = False,
        queue_size: int = 0,
    ):
        super().__init__()
        self.encoder = encoder
        self.anchor = anchor
        self.anchor.requires_grad_(False)
        self.anchor.eval()
        self.logit_scale = LogitScale(temperature, learnable=learn_temperature)
        self.symmetric = symmetric
        self.queue = EmbeddingQueue(queue_size, encoder.dim) if queue_size > 0 else None

    def train(self, mode: bool = True) -> BindingStage:
        super().train(mode)
        self.anchor.eval()
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter that requires grad, the anchor's excluded."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad and not n.startswith("anchor.")]

    @torch.no_grad()
    def embed_anchor(self, anchor_batch: Any) -> torch.Tensor:
        """Run the frozen anchor (used when its embeddings are not cached)."""
        return self.anchor(anchor_batch)

    def forward(
        self,
        inputs: Any,
        anchor_emb: torch.Tensor | None = None,
        anchor_inputs: Any = None,
        keys: torch.Tensor | None = None,
        n_valid: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """``inputs``: a collated batch of the trained modality. The anchor side is given as
        cached embeddings (``anchor_emb``) or raw inputs (``anchor_inputs``). ``keys`` (sample
        indices) let the queue exclude a sample's own past anchor embedding.

        ``n_valid``: only the first ``n_valid`` rows of ``inputs`` are samples; the rest pad the
        batch to a fixed size (so a compiled encoder keeps one graph when bad samples were
        skipped) and are dropped right after the encoder: they reach neither the loss nor the
        queue, and get no gradient. The anchor side holds the ``n_valid`` samples only."""
        emb = self.encoder(inputs)
        if n_valid is not None:
            emb = emb[:n_valid]
        if anchor_emb is None:
            anchor_emb = self.embed_anchor(anchor_inputs)
        anchor_emb = anchor_emb.to(emb.device, torch.float32)
        scale = self.logit_scale()
        queue = mask = None
        if self.queue is not None and len(self.queue) > 0:
            queue = self.queue.negatives().to(emb.device)
            if keys is not None:
                mask = self.queue.mask_for(keys.to(self.queue.keys.device)).to(emb.device)
        loss = contrastive_loss(emb, anchor_emb, scale, symmetric=self.symmetric, queue=queue, queue_mask=mask)
        return {"contrastive_loss": loss, "logit_scale": scale.detach(), "embeddings": emb, "anchor": anchor_emb}


def total_loss(outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum of the outputs whose key ends in ``_loss``."""
    return sum(v for k, v in outputs.items() if k.endswith("_loss"))
