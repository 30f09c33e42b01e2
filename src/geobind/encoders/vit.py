"""A lean forward pass for CLIP's vision transformer: the pooled class token, no extra work.

``transformers`` runs every token through every layer and returns all hidden states. GeoBind
only ever uses the pooled class token, and in the last layer nothing else depends on the other
tokens: only their keys and values are needed. :func:`pooled_class_token` therefore computes the
last layer for the class token alone (about 7 % of a ViT-B/32's forward and backward work) and
calls ``scaled_dot_product_attention`` directly in every layer. It reads the model's own
submodules and parameters, so checkpoints, parameter names and ``state_dict`` are unchanged,
and it computes what ``vision_model(pixel_values=x).pooler_output`` computes (tested).

The patch embedding, a convolution whose stride equals its kernel, is computed as what it is: a
matrix product of the flattened patches with the flattened kernel (:func:`patch_embeddings`).
Same weights and result; cuDNN's kernels for such a strided convolution (and its weight
gradient) are slow on large batches, where a matrix product runs at the card's full rate.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn import functional as F

__all__ = ["patch_embeddings", "pooled_class_token"]


def patch_embeddings(embeddings: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``embeddings(pixel_values)`` of transformers' ``CLIPVisionEmbeddings`` (class token and
    patch tokens plus position embeddings, ``(B, 1 + patches, hidden)``), the patch projection
    done as a matrix product over non-overlapping patches instead of a strided convolution.
    Anything else (another image size, a convolution with padding or overlapping patches) goes
    to the module's own forward, which also raises its error for a wrong image size."""
    conv = embeddings.patch_embedding
    b, c, h, w = pixel_values.shape
    p = conv.kernel_size[0]
    plain = (conv.kernel_size == (p, p) and conv.stride == (p, p) and conv.padding == (0, 0)
             and conv.dilation == (1, 1) and conv.groups == 1 and c == conv.in_channels
             and h == w == embeddings.image_size and h % p == 0)
    if not plain:
        return embeddings(pixel_values)
    # (B, C, H/p, p, W/p, p) -> (B, H/p * W/p, C * p * p): each row one patch, in the order of
    # the kernel's flattened (C, p, p) weights and of the convolution's flattened output.
    patches = pixel_values.to(conv.weight.dtype).reshape(b, c, h // p, p, w // p, p)
    patches = patches.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)
    tokens = F.linear(patches, conv.weight.reshape(conv.out_channels, -1), conv.bias)
    hidden = torch.cat([embeddings.class_embedding.expand(b, 1, -1), tokens], dim=1)
    return hidden + embeddings.position_embedding(embeddings.position_ids)


def _attend(attn: nn.Module, queries_from: torch.Tensor, keys_from: torch.Tensor) -> torch.Tensor:
    """CLIP attention: queries from ``queries_from`` (B, Tq, D), keys and values from
    ``keys_from`` (B, T, D); no mask (vision tokens attend to all tokens)."""
    b, tq, d = queries_from.shape
    t = keys_from.shape[1]
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(queries_from).view(b, tq, heads, head_dim).transpose(1, 2)
    k = attn.k_proj(keys_from).view(b, t, heads, head_dim).transpose(1, 2)
    v = attn.v_proj(keys_from).view(b, t, heads, head_dim).transpose(1, 2)
    p = float(attn.dropout) if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=attn.scale)
    return attn.out_proj(out.transpose(1, 2).reshape(b, tq, d))


def _layer(layer: nn.Module, hidden: torch.Tensor, class_only: bool) -> torch.Tensor:
    """One pre-norm CLIP encoder layer; with ``class_only`` only the class token's output."""
    normed = layer.layer_norm1(hidden)
    if class_only:
        hidden, queries = hidden[:, :1], normed[:, :1]
    else:
        queries = normed
    hidden = hidden + _attend(layer.self_attn, queries, normed)
    return hidden + layer.mlp(layer.layer_norm2(hidden))


def pooled_class_token(vision_model: nn.Module, pixel_values: torch.Tensor, *,
                       checkpoint: bool = False) -> torch.Tensor:
    """``vision_model(pixel_values=...).pooler_output`` of a CLIP vision transformer (the
    post-layer-norm class token, shape ``(B, hidden)``), with the last layer computed for the
    class token only. ``vision_model`` is ``CLIPModel.vision_model`` or
    ``CLIPVisionModelWithProjection.vision_model``.

    ``checkpoint``: when gradients are being recorded, keep only each layer's input and
    recompute the layer in the backward pass (activation checkpointing)."""
    hidden = vision_model.pre_layrnorm(patch_embeddings(vision_model.embeddings, pixel_values))
    layers = vision_model.encoder.layers
    recompute = checkpoint and torch.is_grad_enabled()
    for i, layer in enumerate(layers):
        class_only = i == len(layers) - 1
        if recompute:
            hidden = torch.utils.checkpoint.checkpoint(_layer, layer, hidden, class_only, use_reentrant=False)
        else:
            hidden = _layer(layer, hidden, class_only=class_only)
    return vision_model.post_layernorm(hidden[:, 0])
