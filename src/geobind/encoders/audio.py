"""The audio encoder: CLAP's HTS-AT audio tower, as GeoCLAP binds it (GeoBind stage 2).

``ClapAudioEncoder`` = waveform decoding (:mod:`geobind.data.audio_io`, in data-loader workers)
+ the batched torch log-mel front end (:class:`~geobind.encoders.mel.ClapMelFrontEnd`, on the
model's device) + ``transformers.ClapAudioModelWithProjection`` + an optional linear head when
CLAP's projection size differs from the space's dimension.

Clips are cropped (random offset in training, the start in evaluation) or repeat-padded to
``clip_seconds`` in the waveform domain, so every clip is "not longer" for CLAP's fusion and
``is_longer`` is always false. With a fused checkpoint the fusion branch
(``patch_embed.fusion_model``, ``patch_embed.mel_conv2d``) is therefore never run; it is frozen
so DDP sees no unused trainable parameters and the optimiser leaves it as loaded. The patch
embedding is switched to :class:`_GlobalPatchEmbed`, which computes exactly what CLAP's fused
patch embedding computes for clips that are not longer, without the data-dependent
``torch.where(is_longer)`` indexing: the whole forward is then one ``torch.compile`` graph.
The bicubic stretch of the mel features to the Swin input size runs as a product with an
interpolation matrix (:func:`set_mel_resize`), whose backward is a product too.

Spec keys (a stage's encoder config)::

    pretrained: laion/clap-htsat-fused   # or a local directory (ClapAudioModel* or full ClapModel)
    config: {...}                        # ClapAudioConfig fields: random init, or overrides
    sample_rate: 48000                   # and the other AudioSettings fields, all optional

Settings default to CLAP's extractor (48 kHz, 10 s, 1024/480, 64 mels, 0-14 kHz, htk), then to
a ``preprocessor_config.json`` found next to the pretrained weights, then to the spec.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn import functional as F
from transformers.models.clap.modeling_clap import ClapAudioEncoder as HFClapAudioEncoder
from transformers.models.clap.modeling_clap import (
    ClapAudioLayer,
    ClapAudioPatchEmbed,
    ClapAudioSelfAttention,
)

from geobind.data.audio_io import load_audio, load_audio_window
from geobind.encoders.base import (
    Encoder,
    check_config_keys,
    l2_normalize,
    quiet_transformers,
    register_encoder,
)
from geobind.encoders.mel import ClapMelFrontEnd, crop_start, fit_clip

__all__ = [
    "AudioSettings",
    "ClapAudioEncoder",
    "load_clip",
    "set_mel_resize",
    "set_window_attention",
    "tiny_clap_audio_config",
    "tiny_clap_audio_spec",
]

HEAD_FILE = "head.safetensors"


@dataclass(frozen=True)
class AudioSettings:
    """Preprocessing of the audio encoder (defaults: ``laion/clap-htsat-*``'s extractor)."""

    sample_rate: int = 48_000  # Hz; inputs are resampled to it
    clip_seconds: float = 10.0  # clip length; longer audio is cropped, shorter repeat-padded
    n_fft: int = 1024  # STFT window = FFT size, samples
    hop_length: int = 480  # STFT hop, samples; frames = 1 + clip_samples // hop_length
    n_mels: int = 64  # mel bands; must equal the backbone's num_mel_bins
    f_min: float = 0.0  # lowest mel filter edge, Hz
    f_max: float = 14_000.0  # highest mel filter edge, Hz
    mel_scale: str = "htk"  # "htk" (fusion extractor, no norm) or "slaney" (rand_trunc extractor)

    @property
    def clip_samples(self) -> int:
        """Samples per clip at ``sample_rate``."""
        return int(round(self.clip_seconds * self.sample_rate))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AudioSettings:
        """Settings from a dict, ignoring keys that are not fields (e.g. ``fusion``, ``head``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


_SETTING_KEYS = tuple(f.name for f in dataclasses.fields(AudioSettings))
# "type" is how configs name the encoder type itself; it is not ours to interpret.
_SPEC_KEYS = ("pretrained", "config", "type", *_SETTING_KEYS)


def tiny_clap_audio_config(projection_dim: int = 32) -> dict[str, Any]:
    """``ClapAudioConfig`` overrides for a tiny fused HTS-AT used by tests and smoke runs.

    Same architecture as ``laion/clap-htsat-fused`` (patch embed + AFF fusion branch, Swin
    stages with patch merging, group-2D-CNN pooling, 2-layer projection), scaled down:

    ============================  ==================  =========
    field                         clap-htsat-fused    tiny
    ============================  ==================  =========
    num_mel_bins                  64                  16
    spec_size (image side)        256                 64
    freq_ratio (spec/mels)        4                   4
    frames accepted (spec*ratio)  1024                256
    patch_embeds_hidden_size      96                  16
    depths / heads                2,2,6,2 / 4,8,16,32 1,1 / 2,4
    hidden_size (= last stage)    768                 32
    window_size                   8                   4
    projection_dim                512                 32
    ============================  ==================  =========

    Pair it with :func:`tiny_clap_audio_spec`'s front end (1 s at 16 kHz, hop 160 -> 101
    frames, 16 mels). Forward + backward of a batch of 4 takes ~15 ms on one CPU core.
    """
    return {
        "num_mel_bins": 16,
        "spec_size": 64,
        "window_size": 4,
        "patch_embeds_hidden_size": 16,
        "depths": [1, 1],
        "num_attention_heads": [2, 4],
        # The projection reads the last stage's width: patch_embeds_hidden_size * 2**(stages-1).
        "hidden_size": 32,
        "projection_dim": int(projection_dim),
        "enable_fusion": True,
        "fusion_type": "aff_2d",
    }


def tiny_clap_audio_spec(projection_dim: int = 32) -> dict[str, Any]:
    """A complete encoder spec for the tiny model: 1 s clips at 16 kHz, 16 mels up to 8 kHz."""
    return {
        "config": tiny_clap_audio_config(projection_dim),
        "sample_rate": 16_000,
        "clip_seconds": 1.0,
        "n_fft": 512,
        "hop_length": 160,
        "n_mels": 16,
        "f_min": 0.0,
        "f_max": 8_000.0,
        "mel_scale": "htk",
    }


def _use_global_patch_embed(audio_encoder: nn.Module) -> None:
    """Switch a fused HTS-AT to the global-only patch embedding (same weights, same state-dict
    keys, same results for clips that are not longer; see :class:`_GlobalPatchEmbed`)."""
    if type(audio_encoder.patch_embed) is ClapAudioPatchEmbed:
        audio_encoder.patch_embed.__class__ = _GlobalPatchEmbed
    # With fusion off at the encoder level it no longer computes torch.where(is_longer), a
    # data-dependent shape that splits a compiled graph; the patch embedding ignores the index.
    audio_encoder.enable_fusion = False


class _GlobalPatchEmbed(ClapAudioPatchEmbed):
    """Fused HTS-AT patch embedding for clips that are never "longer": the global channel only.

    CLAP's fused patch embedding projects mel channel 0 (the global view) and, for the clips
    flagged ``is_longer``, mixes in the local views through ``fusion_model``. Every clip here
    is cropped or padded to length, so no clip is flagged and the result is
    ``norm(flatten(proj(x[:, 0:1])))``, computed here without the index lookup."""

    def forward(self, hidden_states, is_longer_idx=None):
        _, _, height, width = hidden_states.shape
        if height != self.img_size[0] or width != self.img_size[1]:
            raise ValueError(
                f"Input audio size ({height}*{width}) doesn't match model ({self.img_size[0]}*{self.img_size[1]})."
            )
        hidden_states = self.proj(hidden_states[:, 0:1])
        if self.flatten:
            hidden_states = hidden_states.flatten(2).transpose(1, 2)
        return self.norm(hidden_states)


class _SdpaWindowAttention(ClapAudioSelfAttention):
    """HTS-AT window attention through ``scaled_dot_product_attention`` (same parameters).

    transformers computes it in eager form: the scores of every window are materialised, the
    relative position bias and the shifted-window mask added, then softmax and a second product.
    Here the bias and mask become SDPA's additive mask, so fused attention kernels can run it.
    Shifted windows put the window index beside the heads, ``(B, windows * heads, N, d)``, so
    the mask ``(1, windows * heads, N, N)`` broadcasts over the batch instead of being copied
    per clip. Asking for attention maps (or a head mask) falls back to the eager form."""

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        # transformers 4.x passes (head_mask, output_attentions), 5.x (output_attentions): a head
        # mask or attention maps are left to transformers' own form.
        if any(a is not None and a is not False for a in (*args, *kwargs.values())):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        rows, tokens, channels = hidden_states.shape
        heads, size = self.num_attention_heads, self.attention_head_size
        q, k, v = self.query(hidden_states), self.key(hidden_states), self.value(hidden_states)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        # (heads, N, N), contiguous: fused kernels want a unit stride along the keys.
        bias = bias.view(tokens, tokens, heads).permute(2, 0, 1).contiguous()
        p = self.dropout.p if self.training else 0.0
        if attention_mask is None:
            def split(x):
                return x.view(rows, tokens, heads, size).transpose(1, 2)

            out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=bias.unsqueeze(0).to(q.dtype),
                                                 dropout_p=p)
            out = out.transpose(1, 2)
        else:
            windows = attention_mask.shape[0]
            batch = rows // windows

            def split(x):
                x = x.view(batch, windows, tokens, heads, size).permute(0, 1, 3, 2, 4)
                return x.reshape(batch, windows * heads, tokens, size)

            mask = (bias.unsqueeze(0) + attention_mask.unsqueeze(1)).reshape(1, windows * heads, tokens, tokens)
            out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask.to(q.dtype), dropout_p=p)
            out = out.view(batch, windows, heads, tokens, size).permute(0, 1, 3, 2, 4)
        return (out.reshape(rows, tokens, channels),)


def set_window_attention(backbone: nn.Module, implementation: str) -> None:
    """Run every HTS-AT window attention of ``backbone`` as ``"sdpa"`` (the default of
    :class:`ClapAudioEncoder`) or ``"eager"`` (transformers' own form). Parameters, buffers and
    results are the same either way; only the kernels differ."""
    _swap_classes(backbone, "window attention", implementation,
                  {"sdpa": _SdpaWindowAttention, "eager": ClapAudioSelfAttention})


def _swap_classes(backbone: nn.Module, what: str, implementation: str, classes: dict[str, type]) -> list[nn.Module]:
    """Give every module of ``backbone`` that is one of ``classes`` (all share the last one as
    base) the class named ``implementation``; returns those modules."""
    if implementation not in classes:
        names = " or ".join(repr(name) for name in classes)
        raise ValueError(f"{what} {implementation!r}: use {names}")
    base = list(classes.values())[-1]
    swapped = [module for module in backbone.modules() if isinstance(module, base)]
    for module in swapped:
        module.__class__ = classes[implementation]
    return swapped


def _interpolation_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The ``[n_out, n_in]`` matrix ``A`` for which ``A @ x`` is the bicubic ``align_corners=True``
    interpolation of ``x`` from ``n_in`` to ``n_out`` samples along one axis.

    It is the interpolation of the identity itself: column ``j`` holds the weights input ``j``
    gets in every output, border clamping included, as PyTorch's kernel on ``device`` computes
    them (the other axis keeps its size, where bicubic weights are exactly 0 and 1)."""
    build = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    eye = torch.eye(n_in, device=device, dtype=build).view(1, 1, n_in, n_in)
    matrix = F.interpolate(eye, size=(n_out, n_in), mode="bicubic", align_corners=True)
    return matrix.view(n_out, n_in).to(dtype)


class _MatmulMelResize(HFClapAudioEncoder):
    """HTS-AT encoder whose mel-to-image resize is a matrix product (same parameters).

    transformers stretches the batch-normalised mel features to the Swin input size with a
    bicubic ``interpolate`` (time, and frequency when there are fewer mel bins than the image
    rows); its backward is a scatter with atomic adds, slow on GPUs. Along one axis the
    interpolation is a fixed linear map, so it is computed here as a product with
    :func:`_interpolation_matrix` (backward: a product with its transpose), in the features'
    dtype with autocast off, so it keeps the precision of the interpolation (on CUDA, float32
    products run in TF32 where ``torch.backends.cuda.matmul.allow_tf32`` allows it).

    The matrices are kept per ``(in, out, device, dtype)`` in a plain dict attribute (made by
    :func:`set_mel_resize`), never in the state dict. While ``torch.compile`` traces, a missing
    one is computed in the graph and not stored: storing it would invalidate the graph just
    built (one recompilation). :meth:`prepare` fills the dict before compiling instead.

    With :class:`_GlobalPatchEmbed` only mel channel 0 reaches the patch embedding, so only that
    channel is resized; the outputs and gradients are those of resizing all of them."""

    def _resize_matrix(self, n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        cache = getattr(self, "_mel_resize_matrices", None)
        key = (n_in, n_out, device, dtype)
        matrix = None if cache is None else cache.get(key)
        if matrix is None:
            if torch.compiler.is_compiling():
                return _interpolation_matrix(n_in, n_out, device, dtype)
            # A normal tensor even under inference_mode: a later training step saves it for
            # its backward.
            with torch.inference_mode(False), torch.no_grad():
                matrix = _interpolation_matrix(n_in, n_out, device, dtype)
            if cache is not None:
                cache[key] = matrix
        return matrix

    def _resize(self, features: torch.Tensor, dim: int, size: int) -> torch.Tensor:
        """Bicubic ``align_corners=True`` resize of ``features`` to ``size`` along ``dim``
        (-2: time, -1: frequency)."""
        n_in = features.shape[dim]
        if n_in == size:
            return features
        matrix = self._resize_matrix(n_in, size, features.device, features.dtype)
        with torch.autocast(device_type=features.device.type, enabled=False):
            if dim == -2:
                return torch.matmul(matrix, features)
            return torch.matmul(features, matrix.mT)

    def reshape_mel2img(self, normalized_input_features):
        features = normalized_input_features
        _, _, time_length, freq_length = features.shape

        spec_width = int(self.spec_size * self.freq_ratio)
        spec_height = self.spec_size // self.freq_ratio

        if time_length > spec_width or freq_length > spec_height:
            raise ValueError("the wav size should be less than or equal to the swin input size")

        if isinstance(self.patch_embed, _GlobalPatchEmbed):
            features = features[:, :1]
        if time_length < spec_width:
            features = self._resize(features, -2, spec_width)
        if freq_length < spec_height:
            # transformers' second interpolation targets (time_length, spec_height): the time
            # axis goes back to the input's length (a no-op unless it was stretched above).
            features = self._resize(features, -2, time_length)
            features = self._resize(features, -1, spec_height)

        # The same layout change as transformers: [B, C, W, H] -> [B, C, H * ratio, W // ratio].
        batch, channels, time, freq = features.shape
        features = features.reshape(batch, channels * self.freq_ratio, time // self.freq_ratio, freq)
        features = features.permute(0, 1, 3, 2).contiguous()
        return features.reshape(batch, channels, freq * self.freq_ratio, time // self.freq_ratio)

    def prepare(self, time_length: int, freq_length: int, device: torch.device | str,
                dtype: torch.dtype = torch.float32) -> None:
        """Make the matrices that features ``[B, C, time_length, freq_length]`` of ``dtype`` on
        ``device`` need now (the first forward would otherwise): a compiled caller then reads
        them as they are, every step."""
        empty = torch.empty(0, 1, time_length, freq_length, device=torch.device(device), dtype=dtype)
        with torch.no_grad():
            self.reshape_mel2img(empty)


def set_mel_resize(backbone: nn.Module, implementation: str) -> None:
    """Stretch the mel features of every HTS-AT encoder in ``backbone`` to the Swin input size
    as a ``"matmul"`` with an interpolation matrix (the default of :class:`ClapAudioEncoder`) or
    with transformers' ``"interpolate"``. Parameters, buffers and results are the same either
    way (to float rounding); only the kernels differ."""
    swapped = _swap_classes(backbone, "mel resize", implementation,
                            {"matmul": _MatmulMelResize, "interpolate": HFClapAudioEncoder})
    for module in swapped:
        if implementation == "matmul":
            module.__dict__.setdefault("_mel_resize_matrices", {})
        else:
            module.__dict__.pop("_mel_resize_matrices", None)


class _CheckpointedSwinLayer(ClapAudioLayer):
    """An HTS-AT (Swin) block that keeps only its input when gradients are recorded and
    recomputes itself in the backward pass (same parameters; transformers' CLAP has no
    gradient checkpointing of its own)."""

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(ClapAudioLayer.forward, self, *args, use_reentrant=False,
                                                     **kwargs)
        return ClapAudioLayer.forward(self, *args, **kwargs)


@register_encoder("clap_audio")
class ClapAudioEncoder(Encoder):
    """CLAP audio tower + torch mel front end (+ linear head) -> unit ``[B, dim]`` vectors.

    Per-sample inputs are float32 waveforms of ``audio.clip_samples`` samples (see
    :meth:`load`); batches are ``[B, clip_samples]``.
    """

    input_kind = "audio"

    def __init__(self, modality: str, dim: int, backbone: nn.Module, audio: AudioSettings):
        super().__init__(modality, dim)
        config = backbone.config
        _check_settings(audio, config)
        self.audio = audio
        self.backbone = backbone
        self.fusion = bool(config.enable_fusion)
        self.frontend = ClapMelFrontEnd(
            sample_rate=audio.sample_rate,
            n_fft=audio.n_fft,
            hop_length=audio.hop_length,
            n_mels=audio.n_mels,
            f_min=audio.f_min,
            f_max=audio.f_max,
            mel_scale=audio.mel_scale,
            fusion=self.fusion,
        )
        projection_dim = int(config.projection_dim)
        self.head = nn.Linear(projection_dim, self.dim) if projection_dim != self.dim else None
        if self.fusion:
            # is_longer is always false (clips are cropped to length), so these never run.
            audio_encoder = backbone.audio_model.audio_encoder
            patch_embed = audio_encoder.patch_embed
            patch_embed.fusion_model.requires_grad_(False)
            patch_embed.mel_conv2d.requires_grad_(False)
            _use_global_patch_embed(audio_encoder)
        set_window_attention(backbone, "sdpa")
        set_mel_resize(backbone, "matmul")

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each HTS-AT block in the backward pass (only its input is kept)."""
        cls = _CheckpointedSwinLayer if enabled else ClapAudioLayer
        for module in self.backbone.modules():
            if isinstance(module, ClapAudioLayer):
                module.__class__ = cls

    def compile(self, *args, **kwargs) -> None:
        """:meth:`torch.nn.Module.compile`, in place, after making the mel front end's constants
        and the mel resize matrices on the encoder's device: the compiled graph reads them
        instead of being rebuilt once they exist (compile after moving the encoder to its
        device)."""
        device = self.device
        self.frontend.prepare(device)
        audio_encoder = self.backbone.audio_model.audio_encoder
        if isinstance(audio_encoder, _MatmulMelResize):
            frames = self.frontend.num_frames(self.audio.clip_samples)
            audio_encoder.prepare(frames, self.audio.n_mels, device, self.backbone.dtype)
        super().compile(*args, **kwargs)

    # -- data side -------------------------------------------------------------------------
    def load(self, item: Any, *, train: bool = False) -> torch.Tensor:
        """A path, bytes, ``(waveform, rate)`` pair or 1-D array -> float32 ``[clip_samples]``.

        Longer audio is cropped (random window if ``train``, else the start); shorter audio is
        repeat-padded as CLAP's extractor does. Bad files raise ``BadSampleError``.
        """
        return load_clip(item, self.audio, train=train)

    def collate(self, samples: list[torch.Tensor]) -> torch.Tensor:
        """Per-sample waveforms -> ``[B, clip_samples]``."""
        return torch.stack(samples)

    # -- model side ------------------------------------------------------------------------
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, clip_samples]`` waveforms -> float32 unit vectors ``[B, dim]``."""
        expected = self.audio.clip_samples
        if batch.ndim != 2 or batch.shape[1] != expected:
            raise ValueError(
                f"audio batch must be [B, {expected}] waveforms ({self.audio.clip_seconds:g} s at "
                f"{self.audio.sample_rate} Hz), got {tuple(batch.shape)}; prepare items with "
                "encoder.load() / encoder.collate()"
            )
        device = self.device
        waves = batch.to(device, non_blocking=True)
        features = self.frontend(waves).to(self.backbone.dtype)
        is_longer = torch.zeros(waves.shape[0], 1, dtype=torch.bool, device=device)
        embeds = self.backbone(input_features=features, is_longer=is_longer).audio_embeds
        if self.head is not None:
            embeds = self.head(embeds)
        return l2_normalize(embeds)

    def settings(self) -> dict[str, Any]:
        """Preprocessing settings plus the fusion flag and head sizes (for ``geobind.json``)."""
        out: dict[str, Any] = dataclasses.asdict(self.audio)
        out["fusion"] = self.fusion
        out["projection_dim"] = int(self.backbone.config.projection_dim)
        out["head"] = (
            {"in": self.head.in_features, "out": self.head.out_features} if self.head else None
        )
        return out

    # -- construction and persistence -------------------------------------------------------
    @classmethod
    def check_spec(cls, spec: dict[str, Any]) -> None:
        unknown = sorted(set(spec) - set(_SPEC_KEYS))
        if unknown:
            raise ValueError(
                f"audio encoder spec: unknown keys {unknown}; accepted: {', '.join(_SPEC_KEYS)}"
            )
        if spec.get("pretrained") is None and "config" not in spec:
            raise ValueError(
                "audio encoder spec needs 'pretrained' (a local CLAP directory or a hub id such "
                "as 'laion/clap-htsat-fused') or 'config' (ClapAudioConfig fields, random init)"
            )
        if spec.get("config") is not None:
            from transformers import ClapAudioConfig

            check_config_keys(ClapAudioConfig, spec["config"], "audio encoder spec: config")

    @classmethod
    def create(
        cls, modality: str, spec: dict[str, Any], dim: int, space: dict[str, Encoder]
    ) -> ClapAudioEncoder:
        """Build from a spec with ``pretrained`` (local dir or hub id) and/or ``config``.

        ``pretrained`` alone loads a checkpoint (a hub id such as ``laion/clap-htsat-fused`` is
        the only case that may download; a full ``ClapModel`` checkpoint works, its text tower
        is skipped). ``config`` alone builds a randomly initialised HTS-AT from
        ``ClapAudioConfig(**config)``; with ``pretrained`` it overrides config fields. Other
        keys are :class:`AudioSettings` fields.
        """
        from transformers import ClapAudioConfig, ClapAudioModelWithProjection

        cls.check_spec(spec)
        pretrained = spec.get("pretrained")
        overrides = dict(spec.get("config") or {})
        values: dict[str, Any] = {}
        if pretrained is not None:
            backbone = _load_backbone(str(pretrained), overrides)
            values.update(_extractor_settings(str(pretrained)))
        else:
            try:
                config = ClapAudioConfig(**overrides)
            except (TypeError, ValueError) as e:
                raise ValueError(f"audio encoder spec: invalid 'config': {e}") from None
            backbone = ClapAudioModelWithProjection(config)
        values.setdefault("n_mels", int(backbone.config.num_mel_bins))
        values.update({k: spec[k] for k in _SETTING_KEYS if k in spec})
        encoder = cls(modality, dim, backbone, AudioSettings.from_dict(values))
        return encoder.eval()

    def save(self, directory: str | Path) -> None:
        """Backbone via ``save_pretrained`` (safetensors), the head as ``head.safetensors``, and a
        ``preprocessor_config.json`` so ``ClapFeatureExtractor.from_pretrained`` reads it too."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with quiet_transformers():
            self.backbone.save_pretrained(directory)
        if self.head is not None:
            state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(state, str(directory / HEAD_FILE))
        _write_extractor_config(directory, self.audio)

    @classmethod
    def from_saved(
        cls,
        modality: str,
        directory: str | Path,
        settings: dict[str, Any],
        dim: int,
        shared: dict[str, Any],
    ) -> ClapAudioEncoder:
        """Rebuild from :meth:`save`'s directory and :meth:`settings`; never downloads."""
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"audio encoder directory {directory} does not exist")
        key = f"clap_audio:{directory.resolve()}"
        backbone = shared.get(key)
        if backbone is None:
            backbone = _load_backbone(str(directory), {}, local_only=True)
            shared[key] = backbone
        encoder = cls(modality, dim, backbone, AudioSettings.from_dict(settings))
        head = settings.get("head")
        if (head is None) != (encoder.head is None):
            raise ValueError(
                f"{directory}: settings say head={head} but the backbone projects to "
                f"{backbone.config.projection_dim} and the space has dim={dim}"
            )
        if encoder.head is not None:
            path = directory / HEAD_FILE
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing (the audio encoder's linear head)")
            encoder.head.load_state_dict(load_file(str(path)))
        return encoder.eval()


def load_clip(item: Any, audio: AudioSettings, *, train: bool = False) -> torch.Tensor:
    """:meth:`ClapAudioEncoder.load` without the encoder (cheap to send to loader workers).

    WAV, FLAC, AIFF and MP3 files (and shard members) have only the clip's window decoded (and
    resampled, at other rates), with the same random draw as decoding the whole recording and
    cropping it: the same samples for lossless files at the sample rate (e.g. shards packed with
    ``--audio-rate``), within float rounding otherwise (see
    :func:`~geobind.data.audio_io.load_audio_window`). Evaluation's window (the start) is read
    alone from Ogg files too."""
    n = audio.clip_samples
    # Evaluation's window is the start (``start=None``), which any container reads exactly.
    window = load_audio_window(item, audio.sample_rate, n,
                               start=(lambda length: crop_start(length, n, random=True)) if train else None)
    wave = torch.from_numpy(window if window is not None else load_audio(item, audio.sample_rate))
    clip = fit_clip(wave, n, train=train)
    if clip.untyped_storage().nbytes() != clip.numel() * clip.element_size():
        # A crop is a view of the whole recording; don't ship all of it to the main process.
        clip = clip.clone()
    return clip


def _check_settings(audio: AudioSettings, config: Any) -> None:
    if audio.n_mels != int(config.num_mel_bins):
        raise ValueError(
            f"audio settings have n_mels={audio.n_mels} but the CLAP backbone expects "
            f"num_mel_bins={config.num_mel_bins}; set n_mels: {config.num_mel_bins} in the audio "
            "encoder spec (or build the backbone with a matching config.num_mel_bins)"
        )
    if audio.mel_scale not in ("htk", "slaney"):
        raise ValueError(f"mel_scale must be 'htk' or 'slaney', got {audio.mel_scale!r}")
    if audio.clip_samples <= audio.n_fft // 2:
        raise ValueError(
            f"clip_seconds={audio.clip_seconds} gives {audio.clip_samples} samples, too few for "
            f"n_fft={audio.n_fft}"
        )
    freq_ratio = int(config.spec_size) // int(config.num_mel_bins)
    if freq_ratio < 1:
        raise ValueError(
            f"CLAP config spec_size={config.spec_size} must be at least num_mel_bins="
            f"{config.num_mel_bins}"
        )
    frames = 1 + audio.clip_samples // audio.hop_length
    max_frames = int(config.spec_size) * freq_ratio
    if frames > max_frames:
        raise ValueError(
            f"{audio.clip_seconds:g} s clips at {audio.sample_rate} Hz with hop_length="
            f"{audio.hop_length} give {frames} mel frames, more than the {max_frames} the backbone "
            f"accepts (spec_size * spec_size // num_mel_bins); shorten clip_seconds or raise "
            "hop_length"
        )


def _is_local_path(name: str) -> bool:
    return (
        Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") > 1
    )


def _load_backbone(name: str, overrides: dict[str, Any], *, local_only: bool = False) -> nn.Module:
    """``ClapAudioModelWithProjection`` from a local directory or hub id.

    A full ``ClapModel`` checkpoint loads too: its ``audio_config`` is picked out and its
    ``audio_model.*`` / ``audio_projection.*`` weights have the same names here; the text
    tower's weights are skipped silently, missing audio weights are an error.
    """
    from transformers import ClapAudioModelWithProjection
    from transformers.utils import logging as hf_logging

    local = local_only or _is_local_path(name)
    path = Path(name).expanduser()
    if local and not path.is_dir():
        raise FileNotFoundError(
            f"CLAP checkpoint directory {name} does not exist (give a directory written by "
            "save_pretrained, or a hub id such as 'laion/clap-htsat-fused')"
        )
    source = str(path) if local else name
    verbosity = hf_logging.get_verbosity()
    # The load report lists every skipped text-tower weight of a full ClapModel as UNEXPECTED;
    # we report what matters below instead.
    hf_logging.set_verbosity_error()
    try:
        with quiet_transformers():
            model, info = ClapAudioModelWithProjection.from_pretrained(
                source, local_files_only=local, output_loading_info=True, **overrides
            )
    finally:
        hf_logging.set_verbosity(verbosity)
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"{name} is not a CLAP audio checkpoint: {len(missing)} audio weights are missing "
            f"(e.g. {missing[:3]})"
        )
    if info.get("mismatched_keys"):
        raise ValueError(f"{name}: weights with mismatched shapes: {info['mismatched_keys'][:3]}")
    stray = [
        k
        for k in info.get("unexpected_keys", [])
        if not k.startswith(("text_model.", "text_projection.", "logit_scale"))
    ]
    if stray:
        warnings.warn(f"{name}: ignored unexpected weights {sorted(stray)[:5]}", stacklevel=3)
    return model


def _extractor_settings(name: str) -> dict[str, Any]:
    """AudioSettings values from a ``preprocessor_config.json`` next to the weights, if any."""
    raw: dict[str, Any] | None = None
    path = Path(name).expanduser()
    if path.is_dir():
        file = path / "preprocessor_config.json"
        if file.is_file():
            raw = json.loads(file.read_text())
    elif not _is_local_path(name):
        from transformers import ClapFeatureExtractor

        # Only for hub ids, which the user named; a checkpoint without one keeps the defaults.
        with contextlib.suppress(OSError, ValueError):
            raw = ClapFeatureExtractor.from_pretrained(name).to_dict()
    if (
        not raw
        or raw.get("feature_extractor_type", "ClapFeatureExtractor") != "ClapFeatureExtractor"
    ):
        return {}
    mapping = {
        "sampling_rate": "sample_rate",
        "max_length_s": "clip_seconds",
        "fft_window_size": "n_fft",
        "hop_length": "hop_length",
        "feature_size": "n_mels",
        "frequency_min": "f_min",
        "frequency_max": "f_max",
    }
    values = {ours: raw[theirs] for theirs, ours in mapping.items() if raw.get(theirs) is not None}
    if "truncation" in raw:
        values["mel_scale"] = "htk" if raw["truncation"] == "fusion" else "slaney"
    return values


def _write_extractor_config(directory: Path, audio: AudioSettings) -> None:
    config = {
        "feature_extractor_type": "ClapFeatureExtractor",
        "feature_size": audio.n_mels,
        "sampling_rate": audio.sample_rate,
        "hop_length": audio.hop_length,
        # The extractor multiplies this by the rate and pads with it, so keep whole seconds ints.
        "max_length_s": int(audio.clip_seconds)
        if float(audio.clip_seconds).is_integer()
        else audio.clip_seconds,
        "fft_window_size": audio.n_fft,
        "frequency_min": audio.f_min,
        "frequency_max": audio.f_max,
        "padding_value": 0.0,
        "return_attention_mask": False,
        "top_db": None,
        "truncation": "fusion" if audio.mel_scale == "htk" else "rand_trunc",
        "padding": "repeatpad",
    }
    (directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")
