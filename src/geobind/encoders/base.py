"""The encoder contract and the registry of encoder types.

An :class:`Encoder` turns raw items of one modality (file paths, PIL images, ``(waveform,
sample_rate)`` pairs, strings, ...) into unit-length float32 vectors of the space's dimension.
It is split in three so the heavy parts can run where they belong:

* :meth:`Encoder.load` turns one raw item into a per-sample CPU input (runs in data-loader
  workers; decoding, resizing, cropping);
* :meth:`Encoder.collate` stacks per-sample inputs into a batch;
* :meth:`Encoder.forward` runs the backbone on a batch on the model's device and returns unit
  vectors.

Encoder types register by name with :func:`register_encoder`; configs and ``geobind.json`` name
them, so a new modality needs one registered module and no edits elsewhere.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = [
    "Encoder",
    "check_config_keys",
    "compile_for_inference",
    "eagerly",
    "encoder_types",
    "get_encoder_class",
    "l2_normalize",
    "names_local_path",
    "quiet_transformers",
    "register_encoder",
    "uncompile",
    "usual_mode",
    "write_json",
]

_ENCODERS: dict[str, type[Encoder]] = {}


def register_encoder(name: str) -> Callable[[type[Encoder]], type[Encoder]]:
    """Class decorator registering an :class:`Encoder` subclass under ``name``."""

    def wrap(cls: type[Encoder]) -> type[Encoder]:
        if name in _ENCODERS and _ENCODERS[name] is not cls:
            raise ValueError(f"encoder type {name!r} is already registered by {_ENCODERS[name]}")
        cls.type_name = name
        _ENCODERS[name] = cls
        return cls

    return wrap


def get_encoder_class(name: str) -> type[Encoder]:
    """The encoder class registered as ``name``; unknown names raise an error listing known ones."""
    try:
        return _ENCODERS[name]
    except KeyError:
        raise ValueError(
            f"unknown encoder type {name!r}; registered types: {', '.join(sorted(_ENCODERS))}. "
            "Register one with @geobind.encoders.register_encoder('name')."
        ) from None


def encoder_types() -> list[str]:
    """Names of all registered encoder types."""
    return sorted(_ENCODERS)


class Encoder(nn.Module):
    """Base class of every modality encoder.

    Subclasses set ``modality`` on instances, implement ``load``/``collate``/``forward``,
    ``settings`` (JSON-able preprocessing settings written to ``geobind.json``), ``create``
    (build from a stage's config, possibly initialised from encoders already in the space),
    ``save`` and ``from_saved``.
    """

    type_name: ClassVar[str] = ""

    def __init__(self, modality: str, dim: int):
        super().__init__()
        self.modality = modality
        self.dim = int(dim)

    # -- data side -------------------------------------------------------------------------
    def load(self, item: Any, *, train: bool = False) -> Any:
        """One raw item -> one per-sample CPU input. ``train`` enables augmentation.

        An item is what the dataset holds for the modality: a path (manifests), the member's
        bytes (shards), the text, or ``(lat, lon)`` for a ``latlon`` modality. Raise
        :class:`geobind.data.errors.BadSampleError` for an unusable item (missing, empty,
        undecodable): training skips and counts it; any other exception stops the run."""
        raise NotImplementedError

    def collate(self, samples: list[Any]) -> Any:
        """Per-sample inputs -> one batch (default: ``torch.stack``)."""
        return torch.stack(samples)

    # -- model side ------------------------------------------------------------------------
    def forward(self, batch: Any) -> torch.Tensor:  # pragma: no cover - abstract
        """A collated batch -> ``[B, dim]`` float32 unit vectors."""
        raise NotImplementedError

    def set_grad_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in the backward pass instead of keeping them (``optim.
        grad_checkpointing``): more compute per step, much less activation memory. Encoders
        that support it override this."""
        if enabled:
            raise ValueError(f"encoder {type(self).__name__} does not support optim.grad_checkpointing")

    @property
    def device(self) -> torch.device:
        """The device of the encoder's first parameter, else of its first buffer, else CPU."""
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def settings(self) -> dict[str, Any]:
        """JSON-able settings (preprocessing, head sizes) needed to rebuild this encoder."""
        return {}

    def backbone_key(self) -> str:
        """Name of the subdirectory holding this encoder's weights (shared backbones share it)."""
        return self.modality

    # What the encoder reads ("image", "audio", "text" or "latlon"), checked against the kind of
    # data of the modality a stage trains; None: anything (the encoder checks its own inputs).
    input_kind: str | None = None

    # -- construction and persistence -------------------------------------------------------
    @classmethod
    def check_spec(cls, spec: dict[str, Any]) -> None:
        """Raise ``ValueError`` for a config ``spec`` that :meth:`create` would refuse, without
        building anything (so a config is checked whole before any stage trains)."""

    @classmethod
    def create(cls, modality: str, spec: dict[str, Any], dim: int, space: dict[str, Encoder]) -> Encoder:
        """Build a new encoder for ``modality`` from a config ``spec``.

        ``space`` maps modalities already in the space to their encoders (e.g. to initialise the
        satellite tower from the anchor's image tower).
        """
        raise NotImplementedError

    def save(self, directory: str | Path) -> None:
        """Write the backbone to ``directory`` in its own (``transformers``) format."""
        raise NotImplementedError

    def save_preprocessing(self, directory: str | Path) -> None:
        """Write, beside the backbone, the ``transformers`` preprocessing config that reproduces
        this encoder's evaluation input (e.g. ``preprocessor_config.json``), so the folder works
        on its own in ``transformers``. Nothing by default."""

    @classmethod
    def from_saved(
        cls,
        modality: str,
        directory: str | Path,
        settings: dict[str, Any],
        dim: int,
        shared: dict[str, Any],
    ) -> Encoder:
        """Rebuild from :meth:`save`'s output. ``shared`` caches backbones loaded by path."""
        raise NotImplementedError


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' per-file progress bars while GeoBind saves or loads a model."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def compile_for_inference(module: nn.Module) -> None:
    """:meth:`torch.nn.Module.compile` for embedding with weights that stay as they are.

    Inductor's freezing treats the weights as constants of the graph, so the bf16 casts that
    autocast makes of them on every call are made once, and a layer's query, key and value
    products run as one (CUDA). Vectors are the eager ones up to float rounding. The frozen graph
    does not see later changes to the weights: call :func:`uncompile` before training on.
    """
    module.compile(options={"freezing": True})


def uncompile(module: nn.Module) -> None:
    """Undo :meth:`torch.nn.Module.compile` on ``module``: later calls run it eagerly again (on
    other devices or without gradients the compiled graphs would only be rebuilt)."""
    module._compiled_call_impl = None


@contextlib.contextmanager
def eagerly(module: nn.Module):
    """Within the block, calls of a compiled ``module`` (:meth:`torch.nn.Module.compile`) run
    eagerly (validation in eval mode and without gradients would otherwise compile a second
    graph, and its last, smaller batch a third); the compiled training graph is kept for after."""
    compiled = getattr(module, "_compiled_call_impl", None)
    module._compiled_call_impl = None
    try:
        yield module
    finally:
        module._compiled_call_impl = compiled


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length, in float32 (the space's contract)."""
    return torch.nn.functional.normalize(x.float(), dim=-1)


def names_local_path(name: str | Path) -> bool:
    """Whether a name that exists nowhere here must still mean a local path, not a Hugging Face
    Hub id (so it is reported missing instead of looked up online): it starts with ``.``,
    ``/`` or ``~``, holds more than one ``/``, or its first part is a folder here (a mistyped
    ``runs/modle`` beside ``runs/``)."""
    s = str(name)
    return s.startswith((".", "/", "~")) or s.count("/") > 1 or ("/" in s and Path(s.split("/")[0]).is_dir())


def check_config_keys(config_class: type, config: Any, where: str) -> None:
    """Raise ``ValueError`` for keys of ``config`` (a dict of ``transformers`` config fields) that
    ``config_class`` does not have: transformers keeps an unknown keyword as a plain attribute,
    so a misspelt field (``num_hiden_layers``) would be ignored without a word. Nested
    ``text_config`` / ``vision_config`` / ``audio_config`` dicts are checked against their own
    classes."""
    from geobind.config import with_guesses

    if not isinstance(config, dict):
        raise ValueError(f"{where}: a mapping of {config_class.__name__} fields, got {config!r}")
    fields = config_class().to_dict()
    subs = getattr(config_class, "sub_configs", None) or {}
    unknown = []
    for key, value in config.items():
        if key in subs and isinstance(value, dict):
            check_config_keys(subs[key], value, f"{where}.{key}")
        elif key not in fields:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{where}: unknown {config_class.__name__} field(s) "
                         f"{', '.join(with_guesses(unknown, fields))}")


def unknown_texts(encoder: Any, items: Sequence[Any]) -> list[int]:
    """Positions of the texts among ``items`` of which ``encoder`` knows no word (every token its
    tokenizer's unknown one): each embeds to the same vector. Empty for an encoder without a
    word-level vocabulary; other items and blank texts are passed over."""
    find = getattr(encoder, "unknown_texts", None)
    if find is None:
        return []
    at = [i for i, t in enumerate(items) if isinstance(t, str) and t.strip()]
    return [at[j] for j in find([items[i] for i in at])]


def usual_mode(path: str | Path) -> None:
    """Give ``path`` the mode a file (or folder) the user makes gets under the process's umask:
    ``mkdtemp`` makes folders 0700, and safetensors 0.8 writes its files 0600 whatever the umask
    (safetensors#782), so others the umask lets read them could not."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    path = Path(path)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    from geobind.search.common import write_text_atomic

    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")

