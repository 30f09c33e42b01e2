"""CLIP-based encoders: the frozen anchor (``ground`` images and ``text``) and the trainable
``satellite`` tower initialised from the anchor's image tower (as Sat2Cap does)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    PreTrainedTokenizerBase,
)

from geobind.encoders.base import (
    Encoder,
    check_config_keys,
    l2_normalize,
    names_local_path,
    quiet_transformers,
    register_encoder,
)
from geobind.encoders.device_augment import model_input
from geobind.encoders.images import (
    AUGMENT_ON,
    CLIP_MEAN,
    CLIP_STD,
    SATELLITE_MEAN,
    SATELLITE_STD,
    ImageTransform,
    collate_images,
)
from geobind.encoders.vit import pooled_class_token

__all__ = [
    "MIN_VOCAB_SIZE",
    "ClipImageEncoder",
    "ClipTextEncoder",
    "ClipVisionEncoder",
    "anchor_encoders",
    "build_anchor",
    "build_clip",
    "check_tokenizer",
    "load_clip",
    "resolve_pretrained",
    "save_image_processor",
]

# A real CLIP tokenizer has ~49k tokens. Offline `from_pretrained` of a hub id can silently
# fall back to a near-empty vocabulary, which trains on garbage: refuse anything this small.
MIN_VOCAB_SIZE = 64


def resolve_pretrained(name: str | Path) -> tuple[str, bool]:
    """``(name, local_files_only)``: local directories never touch the network; anything else
    is treated as a hub id, which is the only case where a download may happen."""
    p = Path(name).expanduser()
    if p.exists():
        if not p.is_dir():
            raise FileNotFoundError(f"{p} is a file; pass the model directory that holds config.json")
        return str(p), True
    if names_local_path(name):
        raise FileNotFoundError(f"model directory {name} does not exist")
    return str(name), False


def check_tokenizer(tok: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    """Raise if the tokenizer's vocabulary is implausibly small (a broken offline load)."""
    n = len(tok)
    if n < MIN_VOCAB_SIZE:
        raise ValueError(
            f"tokenizer from {source} has only {n} tokens; a broken or partial download is likely. "
            "Point `tokenizer` at a directory holding a complete tokenizer (tokenizer.json)."
        )
    return tok


def load_clip(pretrained: str | Path, tokenizer: str | Path | None = None) -> tuple[CLIPModel, PreTrainedTokenizerBase]:
    """Load a ``CLIPModel`` and its tokenizer from a local directory or a hub id."""
    name, local = resolve_pretrained(pretrained)
    try:
        with quiet_transformers():
            model = CLIPModel.from_pretrained(name, local_files_only=local, attn_implementation="sdpa")
        tok_name, tok_local = resolve_pretrained(tokenizer) if tokenizer else (name, local)
        tok = AutoTokenizer.from_pretrained(tok_name, local_files_only=tok_local)
    except OSError as e:
        raise OSError(
            f"could not load CLIP from {pretrained!r}: {e}\n"
            "Offline? Use a local directory (e.g. the demo's anchor) or download the model first."
        ) from e
    return model, check_tokenizer(tok, str(tokenizer or pretrained))


def build_clip(config: dict[str, Any]) -> CLIPModel:
    """A randomly initialised ``CLIPModel`` from a config dict (``text_config``,
    ``vision_config``, ``projection_dim``, ...)."""
    cfg = CLIPConfig(**copy.deepcopy(config))
    _sync_projection_dim(cfg)
    return CLIPModel(cfg)


def _sync_projection_dim(cfg: CLIPConfig) -> None:
    """Give the text and vision sub-configs the model's ``projection_dim``: CLIPModel reads only
    the top-level one, but ``CLIPTextModelWithProjection`` / ``CLIPVisionModelWithProjection``
    loaded from the saved folder read the sub-config's (512 by default) and fail on the weights."""
    for sub in (cfg.text_config, cfg.vision_config):
        sub.projection_dim = cfg.projection_dim


def _image_embeds(vision_model, projection, batch, transform: ImageTransform, device: torch.device,
                  checkpoint: bool = False) -> torch.Tensor:
    """Unit image vectors of a CLIP vision tower and its projection, for a loader batch
    (normalised on ``device``; the pooled class token from the lean forward)."""
    pixels = model_input(batch, transform, device)
    return l2_normalize(projection(pooled_class_token(vision_model, pixels, checkpoint=checkpoint)))


class _ClipShared:
    """Mixin: the ground and text encoders share one CLIPModel saved once under ``clip/``."""

    backbone_dir = "clip"

    def backbone_key(self) -> str:
        return self.backbone_dir

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        _sync_projection_dim(self.clip.config)
        self.clip.save_pretrained(directory, safe_serialization=True)
        tok = getattr(self, "tokenizer", None)
        if tok is not None:
            # Saved with the text tower's own limit, so `truncation=True` outside geobind gives
            # sequences the model takes (a tokenizer may come with a longer default, e.g. 77).
            limit = int(self.clip.config.text_config.max_position_embeddings)
            if not tok.model_max_length or tok.model_max_length > limit:
                tok.model_max_length = limit
            tok.save_pretrained(directory)
            _portable_tokenizer_config(directory / "tokenizer_config.json")

    @staticmethod
    def _shared_clip(directory: str | Path, shared: dict[str, Any]):
        directory = Path(directory).resolve()  # a saved model's folder: never a hub id
        if not directory.is_dir():
            raise FileNotFoundError(f"CLIP encoder directory {directory} does not exist")
        key = str(directory)
        if key not in shared:
            shared[key] = load_clip(directory)
        return shared[key]


@register_encoder("clip_image")
class ClipImageEncoder(_ClipShared, Encoder):
    """CLIP's image tower: ground-level photos (the stage-1 anchor)."""

    input_kind = "image"

    def __init__(self, modality: str, clip: CLIPModel, tokenizer=None, image_size: int | None = None):
        super().__init__(modality, clip.config.projection_dim)
        self.clip = clip
        self.tokenizer = tokenizer  # kept so the shared directory is complete whichever saves first
        size = image_size or clip.config.vision_config.image_size
        self.transform = ImageTransform(size, CLIP_MEAN, CLIP_STD)

    def load(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]:
        return self.transform(item, train=False)

    def collate(self, samples: list[Any]) -> torch.Tensor | dict[str, torch.Tensor]:
        return collate_images(samples)

    def forward(self, batch: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        return _image_embeds(self.clip.vision_model, self.clip.visual_projection, batch, self.transform, self.device)

    def settings(self) -> dict[str, Any]:
        return self.transform.settings()

    def save_preprocessing(self, directory: str | Path) -> None:
        save_image_processor(directory, self.transform)

    @classmethod
    def from_saved(cls, modality, directory, settings, dim, shared):
        clip, tok = cls._shared_clip(directory, shared)
        return cls(modality, clip, tok, settings.get("image_size"))


def save_image_processor(directory: str | Path, transform: ImageTransform) -> None:
    """``preprocessor_config.json`` of a ``CLIPImageProcessor`` doing what ``transform`` does
    for evaluation: shortest side to ``image_size`` (bicubic), centre crop, this mean and std."""
    from transformers.utils import logging as hf_logging

    # Without torchvision, transformers 5 warns that it falls back to its PIL processor, which is
    # the one this config is for; the warning would follow every save.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        from transformers import CLIPImageProcessor

        processor = CLIPImageProcessor(
            do_resize=True, size={"shortest_edge": transform.size}, resample=3,  # PIL's BICUBIC
            do_center_crop=True, crop_size={"height": transform.size, "width": transform.size},
            do_rescale=True, do_normalize=True, image_mean=list(transform.mean), image_std=list(transform.std),
            do_convert_rgb=True,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    processor.save_pretrained(str(directory))


def _portable_tokenizer_config(path: Path) -> None:
    """Make a saved ``tokenizer_config.json`` load with transformers 4 as well as 5: transformers
    5 names a plain fast tokenizer ``TokenizersBackend``, a class 4.x lacks (both know it as
    ``PreTrainedTokenizerFast``), and records how it was loaded (``is_local``,
    ``local_files_only``), which says nothing about the saved folder."""
    import json

    if not path.is_file():
        return
    cfg = json.loads(path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):
        cfg.pop(key, None)
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


@register_encoder("clip_text")
class ClipTextEncoder(_ClipShared, Encoder):
    """CLIP's text tower: captions and free-text queries."""

    input_kind = "text"

    def __init__(self, modality: str, clip: CLIPModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__(modality, clip.config.projection_dim)
        self.clip = clip
        self.tokenizer = tokenizer
        self.max_length = int(clip.config.text_config.max_position_embeddings)

    def load(self, item: Any, *, train: bool = False) -> str:
        from geobind.data.errors import BadSampleError

        if item is None or (isinstance(item, str) and not item.strip()):
            raise BadSampleError("<text>", "empty-text", "caption is empty")
        if not isinstance(item, str):
            raise BadSampleError("<text>", "not-text", f"a caption is a string, not {type(item).__name__}")
        return item

    def known_words(self, text: str) -> bool:
        """Whether ``text`` has a token the tokenizer knows: False when every one is its unknown
        token (a word-level vocabulary meeting other characters or words), which would make
        every such text the same vector. Byte-level tokenizers know every text."""
        return not self.unknown_texts([text])

    def unknown_texts(self, texts: list[str]) -> list[int]:
        """Positions of the ``texts`` none of whose tokens the tokenizer knows (see
        :meth:`known_words`), tokenized in batches."""
        unk = self.tokenizer.unk_token_id
        if unk is None:
            return []
        out = []
        for s in range(0, len(texts), 4096):
            # verbose=False: no "longer than the maximum" warning for what is only a lookup
            ids = self.tokenizer(list(texts[s:s + 4096]), add_special_tokens=False, verbose=False)["input_ids"]
            out += [s + i for i, row in enumerate(ids) if all(t == unk for t in row)]
        return out

    def collate(self, samples: list[str]) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                list(samples), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = self.device
        out = self.clip.text_model(
            input_ids=batch["input_ids"].to(dev), attention_mask=batch.get("attention_mask").to(dev)
        )
        return l2_normalize(self.clip.text_projection(out.pooler_output))

    def settings(self) -> dict[str, Any]:
        return {"max_length": self.max_length, "vocab_size": len(self.tokenizer)}

    @classmethod
    def from_saved(cls, modality, directory, settings, dim, shared):
        clip, tok = cls._shared_clip(directory, shared)
        return cls(modality, clip, tok)


def build_anchor(spec: dict[str, Any]) -> tuple[CLIPModel, PreTrainedTokenizerBase]:
    """The CLIP anchor of a run config: ``pretrained`` (local directory or hub id, e.g.
    ``openai/clip-vit-base-patch32``), or ``config`` (random weights) plus ``tokenizer``."""
    unknown = set(spec) - {"type", "pretrained", "config", "tokenizer"}
    if unknown:
        raise ValueError(f"anchor: unknown keys {sorted(unknown)}; use pretrained, config, tokenizer")
    if spec.get("pretrained"):
        return load_clip(spec["pretrained"], spec.get("tokenizer"))
    if spec.get("config") is None:
        raise ValueError("anchor: give `pretrained` (directory or hub id) or `config`")
    if not spec.get("tokenizer"):
        raise ValueError("anchor: a CLIP built from `config` needs `tokenizer` (a tokenizer directory)")
    name, local = resolve_pretrained(spec["tokenizer"])
    tok = check_tokenizer(AutoTokenizer.from_pretrained(name, local_files_only=local), name)
    cfg = copy.deepcopy(spec["config"])
    text_cfg = cfg.setdefault("text_config", {})
    text_cfg.setdefault("vocab_size", len(tok))
    if tok.eos_token_id is not None:
        text_cfg.setdefault("eos_token_id", tok.eos_token_id)
    if tok.bos_token_id is not None:
        text_cfg.setdefault("bos_token_id", tok.bos_token_id)
    if tok.pad_token_id is not None:
        text_cfg.setdefault("pad_token_id", tok.pad_token_id)
    if text_cfg["vocab_size"] < len(tok):
        raise ValueError(f"anchor: text vocab_size {text_cfg['vocab_size']} < tokenizer size {len(tok)}")
    return build_clip(cfg), tok


def anchor_encoders(clip: CLIPModel, tok: PreTrainedTokenizerBase, ground: str, text: str) -> dict[str, Encoder]:
    """The two encoders a CLIP anchor gives the space."""
    return {ground: ClipImageEncoder(ground, clip, tok), text: ClipTextEncoder(text, clip, tok)}


@register_encoder("clip_vision")
class ClipVisionEncoder(Encoder):
    """A trainable ``CLIPVisionModelWithProjection`` for overhead tiles (Sat2Cap's recipe),
    with its own normalisation statistics and overhead augmentation.

    The loader hands over uint8 tiles (a dict batch) that :meth:`forward` normalises on the
    model's device; with ``augment_on: device`` training batches also carry the drawn
    augmentation parameters, and :meth:`forward` augments them there."""

    input_kind = "image"

    def __init__(self, modality: str, model: CLIPVisionModelWithProjection, transform: ImageTransform):
        super().__init__(modality, model.config.projection_dim)
        self.model = model
        self.transform = transform
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each transformer layer in the backward pass (only its input is kept)."""
        self.grad_checkpointing = bool(enabled)

    def load(self, item: Any, *, train: bool = False) -> dict[str, torch.Tensor]:
        return self.transform(item, train=train)

    def collate(self, samples: list[Any]) -> torch.Tensor | dict[str, torch.Tensor]:
        return collate_images(samples)

    def forward(self, batch: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor:
        return _image_embeds(self.model.vision_model, self.model.visual_projection, batch, self.transform,
                             self.device, checkpoint=self.grad_checkpointing)

    def settings(self) -> dict[str, Any]:
        return self.transform.settings()

    def save_preprocessing(self, directory: str | Path) -> None:
        save_image_processor(directory, self.transform)

    @classmethod
    def check_spec(cls, spec):
        known = {"type", "init_from", "pretrained", "config", "image_size", "mean", "std", "augment",
                 "augment_on", "load_size"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"encoder clip_vision: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        if spec.get("config") is not None:
            check_config_keys(CLIPVisionConfig, spec["config"], "encoder clip_vision: config")
        augment_on = spec.get("augment_on", "loader")
        if augment_on not in AUGMENT_ON:
            raise ValueError(
                f"encoder clip_vision: augment_on={augment_on!r}; use one of {', '.join(AUGMENT_ON)}"
            )

    @classmethod
    def create(cls, modality, spec, dim, space):
        """``spec``: ``init_from`` (a modality served by a CLIP image tower, default ``ground``)
        or ``pretrained`` (a ``CLIPVisionModelWithProjection`` directory or hub id) or ``config``;
        optional ``image_size``, ``mean``, ``std``, ``augment`` (``overhead`` or ``none``),
        ``augment_on`` (``loader``, the default: PIL in the loader workers; or ``device``: batched
        on the training device) and ``load_size`` (device mode: the side tiles are loaded at,
        default ``round(image_size * 8 / 7)``)."""
        cls.check_spec(spec)
        if spec.get("pretrained"):
            name, local = resolve_pretrained(spec["pretrained"])
            model = CLIPVisionModelWithProjection.from_pretrained(
                name, local_files_only=local, attn_implementation="sdpa"
            )
        elif spec.get("config"):
            model = CLIPVisionModelWithProjection(CLIPVisionConfig(**spec["config"]))
        else:
            src = spec.get("init_from", "ground")
            if src in space and isinstance(space[src], ClipVisionEncoder):
                # A tower trained by an earlier stage (satellite, say): start from a copy of it.
                model = copy.deepcopy(space[src].model)
            elif src not in space or not isinstance(space[src], ClipImageEncoder):
                towers = sorted(m for m, e in space.items() if isinstance(e, (ClipImageEncoder, ClipVisionEncoder)))
                raise ValueError(
                    f"encoder clip_vision: init_from={src!r} must name a modality served by a CLIP image "
                    f"tower in the space ({', '.join(towers) or 'none'}); the space has {sorted(space)}"
                )
            else:
                clip = space[src].clip
                vcfg = copy.deepcopy(clip.config.vision_config)
                vcfg.projection_dim = clip.config.projection_dim
                model = CLIPVisionModelWithProjection(vcfg)
                model.vision_model.load_state_dict(clip.vision_model.state_dict())
                model.visual_projection.load_state_dict(clip.visual_projection.state_dict())
        if model.config.projection_dim != dim:
            raise ValueError(
                f"encoder clip_vision projects to {model.config.projection_dim} dims but the space has {dim}"
            )
        size = spec.get("image_size", model.config.image_size)
        if size != model.config.image_size:  # its position embeddings are for one size
            raise ValueError(f"encoder clip_vision: image_size {size} differs from the tower's "
                             f"{model.config.image_size}: leave image_size out, or set it to {model.config.image_size}")
        transform = ImageTransform(
            size, spec.get("mean", SATELLITE_MEAN), spec.get("std", SATELLITE_STD), spec.get("augment", "overhead"),
            spec.get("augment_on", "loader"), spec.get("load_size"),
        )
        return cls(modality, model, transform)

    def save(self, directory):
        self.model.save_pretrained(directory, safe_serialization=True)

    @classmethod
    def from_saved(cls, modality, directory, settings, dim, shared):
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"satellite encoder directory {directory} does not exist")
        model = CLIPVisionModelWithProjection.from_pretrained(
            str(directory), local_files_only=True, attn_implementation="sdpa"
        )
        # Models saved before `augment_on` existed augmented in the loader.
        transform = ImageTransform(
            settings["image_size"], settings["mean"], settings["std"], settings.get("augment", "overhead"),
            settings.get("augment_on", "loader"), settings.get("load_size"),
        )
        return cls(modality, model, transform)
