"""``GeoBind``: the encoders of one embedding space, saved and loaded as a model directory."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geobind.encoders.base import Encoder, get_encoder_class, quiet_transformers, write_json
from geobind.modality import get_modality

FORMAT_VERSION = 1
MODEL_FILE = "geobind.json"


class GeoBind(nn.Module):
    """One embedding space: an encoder per modality, all returning unit vectors of size ``dim``.

    >>> model = GeoBind.from_pretrained("runs/demo/model")          # doctest: +SKIP
    >>> sat = model.embed("satellite", ["tile.png"])                 # doctest: +SKIP
    >>> txt = model.embed("text", ["a quiet pine forest"])           # doctest: +SKIP
    >>> (sat @ txt.T).item()                                         # cosine similarity
    """

    def __init__(self, dim: int, encoders: dict[str, Encoder] | None = None, meta: dict[str, Any] | None = None):
        super().__init__()
        self.dim = int(dim)
        self.encoders = nn.ModuleDict()
        self.meta: dict[str, Any] = {"stages": [], "logit_scales": {}}
        if meta:
            self.meta.update(meta)
        for name, enc in (encoders or {}).items():
            self.add_encoder(name, enc)

    # -- structure ----------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        """Modalities this space can embed."""
        return list(self.encoders.keys())

    def add_encoder(self, modality: str, encoder: Encoder) -> None:
        """Add (or replace) the encoder serving ``modality``; its dimension must match the space."""
        get_modality(modality)
        if encoder.dim != self.dim:
            raise ValueError(
                f"encoder for {modality!r} returns {encoder.dim}-d vectors but the space has {self.dim} dims"
            )
        self.encoders[modality] = encoder

    def encoder(self, modality: str) -> Encoder:
        """The encoder serving ``modality``; a clear error if the space lacks it."""
        get_modality(modality)
        if modality not in self.encoders:
            raise ValueError(
                f"this model has no {modality!r} encoder; it embeds {', '.join(self.modalities)}"
            )
        return self.encoders[modality]

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # -- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def embed(
        self, modality: str, items: Sequence[Any] | Any, *, batch_size: int = 64, progress: bool = False
    ) -> torch.Tensor:
        """Embed ``items`` of one modality: an ``[N, dim]`` float32 tensor of unit rows (CPU).

        Items are file paths, PIL images, ``(waveform, sample_rate)`` pairs or strings, as the
        modality takes. A single string or path is treated as one item.
        """
        enc = self.encoder(modality)
        if isinstance(items, (str, Path)) or (isinstance(items, tuple) and len(items) == 2 and not isinstance(items[0], (str, Path))):
            items = [items]
        items = list(items)
        was_training = enc.training
        enc.eval()
        out = []
        try:
            rng = range(0, len(items), batch_size)
            if progress:
                from tqdm.auto import tqdm

                rng = tqdm(rng, desc=f"embed {modality}", unit="batch")
            for i in rng:
                batch = enc.collate([enc.load(x, train=False) for x in items[i : i + batch_size]])
                with autocast_for(enc.device):
                    out.append(enc(batch).float().cpu())
        finally:
            enc.train(was_training)
        if not out:
            return torch.empty(0, self.dim)
        return torch.cat(out)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix of unit embeddings (``a @ b.T``)."""
        return a @ b.T

    # -- persistence --------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        from geobind import __version__

        mods = {}
        for name, enc in self.encoders.items():
            mods[name] = {"encoder": enc.type_name, "path": enc.backbone_key(), "settings": enc.settings()}
        return {
            "format_version": FORMAT_VERSION,
            "geobind_version": __version__,
            "dim": self.dim,
            "modalities": mods,
            **{k: v for k, v in self.meta.items() if k not in ("format_version", "dim", "modalities")},
        }

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = True) -> Path:
        """Write the model directory: ``geobind.json`` plus one ``transformers`` directory per
        encoder backbone (safetensors). Written to a temporary directory and moved into place."""
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()) and not overwrite:
            raise FileExistsError(f"{directory} exists and is not empty")
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            saved: set[str] = set()
            with quiet_transformers():
                for enc in self.encoders.values():
                    key = enc.backbone_key()
                    if key not in saved:
                        enc.save(tmp / key)
                        saved.add(key)
            write_json(tmp / MODEL_FILE, self.config_dict())
            if directory.exists():
                old = directory.with_name(directory.name + ".old")
                if old.exists():
                    shutil.rmtree(old)
                directory.replace(old)
                tmp.replace(directory)
                shutil.rmtree(old)
            else:
                tmp.replace(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str | torch.device | None = None) -> GeoBind:
        """Load a model directory written by :meth:`save_pretrained` (or a hub id holding one).
        A local directory never touches the network."""
        path = Path(name_or_path).expanduser()
        if not path.exists():
            if str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
                raise FileNotFoundError(f"model directory {name_or_path} does not exist")
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(name_or_path)))
        cfg_path = path / MODEL_FILE
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"{path} is not a GeoBind model directory: {MODEL_FILE} is missing "
                "(train one with `geobind train` or `geobind demo`)"
            )
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{cfg_path} has format version {cfg['format_version']}; this geobind reads up to "
                f"{FORMAT_VERSION}. Upgrade geobind."
            )
        _import_builtin_encoders()
        shared: dict[str, Any] = {}
        encoders = {}
        with quiet_transformers():
            for name, m in cfg["modalities"].items():
                enc_cls = get_encoder_class(m["encoder"])
                encoders[name] = enc_cls.from_saved(
                    name, path / m["path"], m.get("settings", {}), cfg["dim"], shared
                )
        meta = {k: v for k, v in cfg.items() if k not in ("modalities", "dim")}
        model = cls(cfg["dim"], encoders, meta)
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def frozen(self, modalities: Iterable[str]) -> None:
        """Freeze the encoders of ``modalities`` (no gradients, eval mode)."""
        for m in modalities:
            self.encoder(m).requires_grad_(False).eval()


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _import_builtin_encoders() -> None:
    import geobind.encoders  # noqa: F401  (registers the built-in encoder types)
