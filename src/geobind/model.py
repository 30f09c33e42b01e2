"""``GeoBind``: the encoders of one embedding space, saved and loaded as a model directory."""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from geobind.data.errors import BadSampleError
from geobind.encoders.base import (
    Encoder,
    get_encoder_class,
    names_local_path,
    quiet_transformers,
    unknown_texts,
    usual_mode,
    write_json,
)
from geobind.modality import get_modality
from geobind.search.common import not_clutter

__all__ = ["FORMAT_VERSION", "MODEL_FILE", "GeoBind", "autocast_for"]

FORMAT_VERSION = 1
MODEL_FILE = "geobind.json"
# Held while an encoder in training mode is switched to eval for GeoBind.embed and back.
_MODE_LOCK = threading.RLock()


def _holds_cwd(directory: Path) -> bool:
    """Whether the working folder is ``directory`` or inside it."""
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        return False
    return cwd == directory or directory in cwd.parents


def _not_model_files(directory: Path) -> list[str]:
    """Names in ``directory`` that its ``geobind.json`` does not account for (all of them when
    there is no readable ``geobind.json``): what replacing the folder would delete. Operating
    systems' own clutter (``.DS_Store``, ``._*``, ``Thumbs.db``) does not count."""
    names = {p.name for p in not_clutter(directory)}
    try:
        meta = json.loads((directory / MODEL_FILE).read_text())
        own = {MODEL_FILE} | {str(m["path"]).split("/")[0] for m in meta["modalities"].values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return sorted(names)
    return sorted(names - own)


def _single_item(items: Any) -> bool:
    """Whether ``embed``'s ``items`` is one item rather than a sequence of them: a path or
    string, an image, a numeric array (an image), or one ``(waveform, sample_rate)`` pair (a
    number second). An array of strings or objects (``df["text"].values``) is a sequence."""
    from PIL import Image

    if isinstance(items, np.ndarray):
        return items.dtype.kind in "biuf"
    if isinstance(items, (str, Path, bytes, Image.Image)) or hasattr(items, "detach"):
        return True
    if (isinstance(items, tuple) and len(items) == 2 and isinstance(items[1], str)
            and (isinstance(items[0], np.ndarray) or hasattr(items[0], "detach"))):
        # Else two items: the waveform (taken at the encoder's rate) and a path named "16000".
        raise ValueError(f"a (waveform, sample_rate) pair takes the rate as a number, got {items[1]!r} (a "
                         "string): pass (waveform, int(rate))")
    return (isinstance(items, tuple) and len(items) == 2 and not isinstance(items[1], bool)
            and isinstance(items[1], (int, float, np.integer, np.floating)))


class GeoBind(nn.Module):
    """One embedding space: an encoder per modality, all returning unit vectors of size ``dim``.

    >>> model = GeoBind.from_pretrained("runs/demo/model")          # doctest: +SKIP
    >>> sat = model.embed("satellite", ["tile.png"])                 # doctest: +SKIP
    >>> txt = model.embed("text", ["a quiet pine forest"])           # doctest: +SKIP
    >>> (sat @ txt.T).item()                                         # doctest: +SKIP
    """

    def __init__(self, dim: int, encoders: dict[str, Encoder] | None = None, meta: dict[str, Any] | None = None):
        """A space of ``dim`` dimensions served by ``encoders`` (modality -> encoder), with
        ``meta`` (stage history, logit scales) as ``geobind.json`` records it. Load a trained
        one with :meth:`from_pretrained`."""
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

    @property
    def stages(self) -> list[dict[str, Any]]:
        """The binding stages that trained this space, in order (name, modalities, data, steps,
        validation, ...), as ``geobind.json`` records them."""
        return list(self.meta.get("stages", []))

    @property
    def logit_scales(self) -> dict[str, float]:
        """Each trained pair's learned logit scale (``"satellite->ground": 35.2``, say): the
        inverse temperature its scores were trained at."""
        return {k: float(v) for k, v in self.meta.get("logit_scales", {}).items()}

    def __repr__(self) -> str:
        # A summary (``model.encoders`` prints the module tree).
        encoders = ", ".join(f"{m}: {enc.type_name}" for m, enc in self.encoders.items())
        return f"GeoBind(dim={self.dim}, encoders={{{encoders}}}, device={self.device})"

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
        if not isinstance(modality, str):
            raise TypeError(f"the modality is a name ({', '.join(map(repr, self.modalities))}), not "
                            f"{type(modality).__name__}: call embed(modality, items)")
        if modality not in self.encoders:
            try:
                get_modality(modality)
            except ValueError:
                import difflib

                guess = difflib.get_close_matches(modality.lower(), self.modalities, n=1)
                hint = f" (did you mean {guess[0]!r}?)" if guess else ""
                if not guess and modality.lower() in ("image", "photo", "images", "photos", "picture"):
                    hint = " (ground-level photos are 'ground', overhead tiles 'satellite')"
                raise ValueError(
                    f"unknown modality {modality!r}{hint}; this model embeds {', '.join(self.modalities)}"
                ) from None
            raise ValueError(
                f"this model has no {modality!r} encoder; it embeds {', '.join(self.modalities)}"
            )
        return self.encoders[modality]

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (CPU if it has none)."""
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    # -- inference ----------------------------------------------------------------------------
    @torch.no_grad()
    def embed(
        self, modality: str, items: Sequence[Any] | Any, *, batch_size: int = 64, progress: bool = False
    ) -> torch.Tensor:
        """Embed ``items`` of one modality: an ``[N, dim]`` float32 tensor of unit rows (CPU).

        Items are file paths, PIL images, ``HxWx3`` arrays, ``(waveform, sample_rate)`` pairs
        or strings, as the modality takes; a waveform is ``[T]``, ``[channels, T]`` or
        ``[T, channels]``, and one given without its rate is taken to be at the encoder's rate.
        One item given alone (not in a list) counts as one item. An item that cannot be used
        raises :class:`~geobind.data.errors.BadSampleError` (a ``ValueError``) naming its position.

        On a CUDA device the encoders run under bfloat16 autocast (vectors within about 1e-3 of
        float32; a text's vector can move that much with the batch it is padded in); on the CPU
        they run in float32. Texts with no word the vocabulary knows are warned of: each embeds
        to the same vector.
        """
        enc = self.encoder(modality)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of 1 or more, not {batch_size!r}")
        if isinstance(items, dict):
            raise TypeError(f"embed({modality!r}, ...) got a dict; pass one item or a list of items "
                            "(one call per modality)")
        items = [items] if _single_item(items) or not isinstance(items, Iterable) else list(items)

        def load(j: int, item: Any):
            where = f"item {j} of {len(items)}: " if len(items) > 1 else ""
            try:
                return enc.load(item, train=False)
            except BadSampleError as e:
                if not where:
                    raise
                raise BadSampleError(f"{where}{e.path}", e.reason, e.detail) from None
            except (TypeError, ValueError) as e:  # an item of the wrong kind or with a bad value
                reason = "bad-type" if isinstance(e, TypeError) else "bad-value"
                raise BadSampleError(f"{where}<{type(item).__name__}>", reason, str(e)) from None

        # An encoder in eval mode is used as it is (concurrent calls are safe); one in training
        # mode is switched to eval for the call and back, one call at a time, so that no call
        # switches it back while another runs it. Its mode is read under the lock, which every
        # switch holds.
        with _MODE_LOCK:
            if enc.training:
                return self._embed_eval(enc, modality, items, load, batch_size, progress)
        return self._embed_eval(enc, modality, items, load, batch_size, progress)

    def _embed_eval(self, enc: Encoder, modality: str, items: list, load, batch_size: int,
                    progress: bool) -> torch.Tensor:
        was_training = enc.training
        enc.eval()
        out = []
        try:
            rng = range(0, len(items), batch_size)
            if progress:
                from tqdm.auto import tqdm

                rng = tqdm(rng, desc=f"embed {modality}", unit="batch")
            unknown: list[int] = []
            for i in rng:
                loaded = [load(i + j, x) for j, x in enumerate(items[i : i + batch_size])]
                unknown += [i + j for j in unknown_texts(enc, loaded)]
                batch = enc.collate(loaded)
                with autocast_for(enc.device):
                    out.append(enc(batch).float().cpu())
        finally:
            enc.train(was_training)
        if unknown:
            import warnings

            shown = ", ".join(f"item {j} ({items[j]!r})" for j in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
            warnings.warn(f"{len(unknown)} of {len(items)} texts have no word the model's vocabulary knows "
                          f"({shown}): each embeds to the same vector as every such text", stacklevel=4)
        if not out:
            return torch.empty(0, self.dim)
        return torch.cat(out)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Cosine similarity matrix of unit embeddings (``a @ b.T``); a 1-D vector (an
        :meth:`embed_query` result) on either side gives a 1-D result."""
        return a @ (b.mT if b.ndim >= 2 else b)

    # -- persistence --------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The contents of ``geobind.json``: format version, the version of geobind writing it,
        the space's dimension, each modality's encoder and settings, and the stored metadata
        (stage history, logit scales, ...)."""
        from geobind import __version__

        mods = {}
        for name, enc in self.encoders.items():
            mods[name] = {"encoder": enc.type_name, "path": enc.backbone_key(), "settings": enc.settings()}
            module = type(enc).__module__
            if module.split(".")[0] != "geobind":  # a plugin's: loading the model needs it imported
                mods[name]["module"] = module
        return {
            "format_version": FORMAT_VERSION,
            "geobind_version": __version__,
            "dim": self.dim,
            "modalities": mods,
            # The version is the writer's: a model loaded and saved again says which wrote it.
            **{k: v for k, v in self.meta.items()
               if k not in ("format_version", "geobind_version", "dim", "modalities")},
        }

    def save_pretrained(self, directory: str | Path, *, overwrite: bool = True) -> Path:
        """Write the model directory: ``geobind.json`` plus one ``transformers`` directory per
        encoder backbone (safetensors). Written to a temporary directory and moved into place.

        An existing GeoBind model directory is replaced (``overwrite=True``, the default),
        its encoder folders whole: files of your own inside them are deleted too (keep them
        outside). A folder holding anything else (other files, or files beside a model) is
        refused, and a file path too."""
        directory = Path(directory).expanduser().resolve()
        if directory.exists():
            if not directory.is_dir():
                raise FileExistsError(f"{directory} exists and is not a folder; save the model to a folder")
            if any(directory.iterdir()):
                if not overwrite:
                    raise FileExistsError(f"{directory} exists and is not empty")
                foreign = _not_model_files(directory)
                if foreign:
                    shown = ", ".join(sorted(foreign)[:5]) + (" ..." if len(foreign) > 5 else "")
                    raise FileExistsError(
                        f"{directory} holds files that are not part of a GeoBind model ({shown}); "
                        "save to a new or empty folder, or move those files first (nothing was written)"
                    )
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        usual_mode(tmp)  # a folder like any other the user makes, not mkdtemp's 0700
        try:
            saved: set[str] = set()
            with quiet_transformers():
                for enc in self.encoders.values():
                    key = enc.backbone_key()
                    if key not in saved:
                        enc.save(tmp / key)
                        saved.add(key)
                for enc in self.encoders.values():
                    enc.save_preprocessing(tmp / enc.backbone_key())
            write_json(tmp / MODEL_FILE, self.config_dict())
            for f in tmp.rglob("*"):  # so that others the umask lets read the folder can load it
                usual_mode(f)
            if directory.exists() and (_holds_cwd(directory) or not not_clutter(directory)):
                # An empty folder, or the process's own working folder (which must not be renamed
                # away): the model's entries move into it, and the folder itself stays.
                for entry in not_clutter(directory):
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
                for entry in tmp.iterdir():
                    entry.rename(directory / entry.name)
                tmp.rmdir()
            elif directory.exists():
                # A name of its own for the old model while the new one moves in: a folder
                # the user keeps beside it (``model.old``, say) is never touched.
                old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
                old.rmdir()
                directory.rename(old)
                tmp.replace(directory)
                shutil.rmtree(old)
            else:
                tmp.replace(directory)
        except BaseException as e:
            from geobind.search.common import write_failure

            # safetensors reports a full disk as its own SafetensorError, naming no file.
            failure = write_failure(directory, e, kept="a model already there is kept")
            shutil.rmtree(tmp, ignore_errors=True)
            if failure is not None:
                raise failure from e
            raise
        return directory

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str | torch.device | None = None) -> GeoBind:
        """Load a model directory written by :meth:`save_pretrained` (or a hub id holding one).
        A local directory never touches the network."""
        path = Path(name_or_path).expanduser()
        if path.exists():
            path = path.resolve()  # encoder folders are joined to it: never a bare, hub-like name
        if not path.exists():
            # save_pretrained stopped between moving the old model aside and the new one in.
            aside = sorted(p for p in path.parent.glob(f".{path.name}.old.*") if (p / MODEL_FILE).is_file())
            if aside:
                raise FileNotFoundError(f"model directory {name_or_path} does not exist; a save into it was "
                                        f"interrupted, and the model it replaced is at {aside[-1]}: rename that "
                                        "folder back, or save the model again")
            if names_local_path(name_or_path) or str(name_or_path).count("/") != 1:
                raise FileNotFoundError(f"model directory {name_or_path} does not exist")
            from huggingface_hub import snapshot_download

            try:
                path = Path(snapshot_download(str(name_or_path)))
            except Exception as e:  # offline, unknown repository, no access: all say the same
                why = (str(e).strip().splitlines() or [""])[0]  # the hub's messages run to several lines
                raise OSError(
                    f"{name_or_path} is not a local directory, and as a Hugging Face Hub id it could not "
                    f"be downloaded ({type(e).__name__}: {why}). Check the path, or download it where "
                    "there is a network"
                ) from e
        cfg_path = path / MODEL_FILE
        if path.is_file():
            hint = f"pass its folder, {path.parent}" if path.name == MODEL_FILE else "pass the model's folder"
            raise FileNotFoundError(f"{path} is a file; a GeoBind model is a folder ({hint})")
        if not cfg_path.is_file():
            # A run's or the demo's output folder holds the model in model/.
            inner = path / "model"
            hint = (f"; the model is in {inner}" if (inner / MODEL_FILE).is_file()
                    else f"; {path} is one of its encoder folders: pass the model, {path.parent}"
                    if (path.parent / MODEL_FILE).is_file()
                    else " (train one with `geobind train` or `geobind demo`)")
            raise FileNotFoundError(f"{path} is not a GeoBind model directory: {MODEL_FILE} is missing{hint}")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            if not isinstance(cfg, dict) or not isinstance(cfg.get("modalities"), dict) or "dim" not in cfg:
                raise ValueError("it lacks 'modalities' or 'dim'")
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not a readable GeoBind model description ({e}); the model "
                             "directory is damaged: save or copy it again") from None
        version = cfg.get("format_version", 0)
        if isinstance(version, bool) or not isinstance(version, (int, float)):
            raise ValueError(f"{cfg_path}: format_version is {version!r}, not a number; the model "
                             "directory is damaged: save or copy it again")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{cfg_path} has format version {cfg['format_version']}; this geobind reads up to "
                f"{FORMAT_VERSION}. Upgrade geobind."
            )
        _import_builtin_encoders()
        shared: dict[str, Any] = {}
        encoders = {}
        with quiet_transformers():
            for name, m in cfg["modalities"].items():
                try:
                    enc_cls = get_encoder_class(m["encoder"])
                except ValueError as e:
                    plugin = m.get("module")
                    hint = (f"; the model was saved with it from the module {plugin!r}: import it first "
                            f"(on the command line: GEOBIND_PLUGINS={plugin})" if plugin else
                            "; import the module that registers it first (on the command line: name it "
                            "in GEOBIND_PLUGINS)")
                    raise ValueError(f"{path}: the {name} encoder: {str(e).rstrip('.')}{hint}") from None
                try:
                    encoders[name] = enc_cls.from_saved(
                        name, path / m["path"], m.get("settings", {}), cfg["dim"], shared
                    )
                except (FileNotFoundError, ImportError):
                    raise
                except Exception as e:  # a truncated weights file, say: name the part that failed
                    where = f"{path}: the {name} encoder ({m['encoder']}, in {path / m['path']}) could not be loaded"
                    if isinstance(e, ValueError):  # settings that do not fit the weights, say
                        raise ValueError(f"{where}: {e}") from e
                    raise OSError(f"{where}: {type(e).__name__}: {e}") from e
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

    # -- using the space: identity, search, maps ------------------------------------------------
    def identity(self, modality: str) -> str:
        """Fingerprint (sha256 hex) of the encoder serving ``modality``: its type, settings,
        dimension and every weight. Embeddings files and indexes record it, and are refused by
        a model whose encoder differs. Cached until a weight changes in place."""
        import hashlib

        from geobind.binding.cache import weights_fingerprint

        enc = self.encoder(modality)
        state = enc.state_dict()
        version = tuple((k, t.data_ptr(), t._version) for k, t in state.items())
        cache = self.__dict__.setdefault("_identity_cache", {})
        hit = cache.get(modality)
        if hit is not None and hit[0] == version:
            return hit[1]
        h = hashlib.sha256()
        h.update(json.dumps({"modality": modality, "encoder": enc.type_name, "dim": self.dim,
                             "settings": enc.settings()}, sort_keys=True).encode())
        h.update(weights_fingerprint(enc).encode())
        value = h.hexdigest()
        cache[modality] = (version, value)
        return value

    def embed_query(
        self, *, text: Any = None, audio: Any = None, image: Any = None, satellite: Any = None,
        queries: dict[str, Any] | None = None, batch_size: int = 32,
    ) -> torch.Tensor:
        """One unit query vector ``[dim]`` from any mix of items: the **sum of the items' unit
        embeddings, renormalised** (every item weighs the same; one item gives its own
        embedding). ``image`` is a ground-level photo, ``satellite`` an overhead tile; each
        keyword takes one item or a list; ``queries`` maps further modalities to items."""
        from geobind.search.query import Query, embed_query

        q = Query.build(text=text, audio=audio, image=image, satellite=satellite, queries=queries)
        return embed_query(self, q, batch_size=batch_size)

    def search(
        self, index: Any, *, text: Any = None, audio: Any = None, image: Any = None, satellite: Any = None,
        queries: dict[str, Any] | None = None, k: int = 10, exact: bool | None = None,
    ) -> list:
        """The ``k`` places of ``index`` (a path or a loaded :class:`geobind.search.Index`) most
        similar to the query, best first (an ``ivfpq`` index can return fewer when the lists it
        scans hold fewer; ``exact=True`` ranks them all), as :class:`geobind.search.Hit` records (rank, id,
        lat, lon, score, caption). Scores are cosine similarities. The index must have been
        built with this model (checked: dimension and encoder identity). Queries combine as in
        :meth:`embed_query`. ``exact=True`` bypasses an approximate index.

        >>> hits = model.search("tiles.index", text="a forest", audio="rain.wav", k=5)  # doctest: +SKIP
        """
        from geobind.search.index import Index

        if not isinstance(index, Index):
            index = Index.load(index)
        index.verify(self)
        q = self.embed_query(text=text, audio=audio, image=image, satellite=satellite, queries=queries)
        return index.hits(q, k, exact=exact)

    def map(
        self, *, text: Any = None, audio: Any = None, image: Any = None, satellite: Any = None,
        queries: dict[str, Any] | None = None, raster: str | Path | None = None, tile_size: int | None = None,
        stride: int | None = None, bands: Sequence[int] | None = None, embeddings: Any = None,
        resolution: float | None = None, prompts: Sequence[str] | None = None, scale: float | None = None,
        out: str | Path | None = None, png: str | Path | None = None, csv: str | Path | None = None,
        force: bool = False, batch_size: int = 32, progress: bool = False, pixel_scale: str | float = "auto",
    ) -> Any:
        """A zero-shot map of the query (combined as in :meth:`embed_query`) over a ``raster``
        (tiles of ``tile_size`` px every ``stride`` px, embedded as ``satellite``) or over point
        ``embeddings`` (a ``geobind embed`` Parquet path, an :class:`~geobind.search.Embeddings`
        or an :class:`~geobind.search.Index`, built with this model).

        ``embeddings`` may also be an index folder. ``pixel_scale`` turns a raster's raw values
        into 8-bit pixels as the ``geotiff`` layout's ``scale`` does for training and embedding:
        ``"auto"`` (8-bit as is, other rasters stretched per tile), a number (the value shown as
        white, e.g. 3000 for Sentinel-2) or ``"raster"`` (one stretch over the whole raster).

        Scores are cosine similarities; with ``prompts`` (texts), the softmax probability of the
        query over ``[query, *prompts]`` at logit ``scale`` (default: the model's learned scale,
        else 100). Returns a :class:`geobind.search.MapResult`; with ``out`` (``map.tif``) it
        also writes the GeoTIFF and, unless given otherwise, ``map.png`` and ``map.csv``; without
        ``out``, the ``png`` and ``csv`` given (a point map then needs no rasterio). All writes
        are atomic, with no overwrite without ``force``. See :mod:`geobind.search.maps`.

        >>> result = model.map(text="a forest", raster="region.tif", tile_size=224, out="forest.tif")  # doctest: +SKIP
        """
        from geobind.search import maps
        from geobind.search.common import check_writable
        from geobind.search.embed import Embeddings, read_embeddings
        from geobind.search.index import Index
        from geobind.search.query import Query, embed_query

        if (raster is None) == (embeddings is None):
            raise ValueError("give exactly one of raster= (with tile_size=) or embeddings=")
        paths = maps.output_paths(out, png, csv) if out is not None or png or csv else {}
        if paths:
            check_writable(*paths.values(), force=force)
        if isinstance(embeddings, (str, Path)) and Path(embeddings).is_dir():
            embeddings = Index.load(embeddings)  # an index folder
        if raster is not None:
            pixel_scale = maps.check_pixel_scale(pixel_scale)
        if scale is not None and not scale > 0:
            raise ValueError(f"scale={scale}: the softmax logit scale is a positive number (the model's "
                             "learned one when not given)")
        q = Query.build(text=text, audio=audio, image=image, satellite=satellite, queries=queries)
        qvec = embed_query(self, q, batch_size=batch_size)
        pvec = self.embed("text", list(prompts), batch_size=batch_size) if prompts else None
        if scale is None:
            scale = self.logit_scale_for(q.items)
        if raster is not None:
            if not tile_size:
                raise ValueError("a raster map needs tile_size (pixels per tile)")
            result = maps.map_raster(self, qvec, raster, tile_size, stride, bands=bands, prompts=pvec,
                                     scale=scale, label=q.label, batch_size=batch_size, progress=progress,
                                     pixel_scale=pixel_scale)
        else:
            if isinstance(embeddings, Index):
                embeddings.verify(self)
                # the index keeps its float32 copy, so repeated maps (a server) widen only once
                vec, lat, lon, ids = embeddings.vectors_f32(), embeddings.lat, embeddings.lon, embeddings.ids
            else:
                # ids, coordinates and vectors only: a file's thumbnails (GBs at millions of rows)
                # are not needed for a map
                emb = embeddings if isinstance(embeddings, Embeddings) else read_embeddings(embeddings, extras=False)
                self.check_embeddings(emb)
                vec, lat, lon, ids = emb.vectors, emb.lat, emb.lon, emb.ids
            result = maps.map_points(vec, lat, lon, ids, qvec, resolution=resolution, prompts=pvec, scale=scale,
                                     label=q.label)
        if prompts:
            result.prompts, result.logit_scale = list(prompts), float(scale)
        if paths:
            result.write(paths["tif"], png=paths["png"], csv=paths["csv"], force=force)
        return result

    def check_embeddings(self, emb: Any) -> None:
        """Raise a ``ValueError`` naming the problem unless ``emb`` (an
        :class:`~geobind.search.Embeddings`) was embedded by this model's encoder."""
        where = emb.header.get("dataset", {}).get("source", "the embeddings")
        if emb.dim != self.dim:
            raise ValueError(f"embeddings of {where} have {emb.dim} dims but the model's space has {self.dim}: "
                             "they were made with another model")
        if emb.modality not in self.modalities or emb.identity != self.identity(emb.modality):
            raise ValueError(f"embeddings of {where} were made with another model ({emb.modality} encoder "
                             f"identity {emb.identity[:16]}); re-embed them with this model (`geobind embed`)")

    def logit_scale_for(self, modalities: Iterable[str]) -> float:
        """The learned logit scale to turn cosine similarities of ``modalities`` against places
        into softmax probabilities: a stage's scale that involves one of them, else the mean of
        all stages' scales, else 100 (CLIP's)."""
        scales = {k: float(v) for k, v in self.meta.get("logit_scales", {}).items()}
        for m in modalities:
            for pair, v in scales.items():
                if m in pair.split("->"):
                    return v
        return sum(scales.values()) / len(scales) if scales else 100.0


def autocast_for(device: torch.device):
    """bf16 autocast on CUDA, a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _import_builtin_encoders() -> None:
    import geobind.encoders  # noqa: F401  (registers the built-in encoder types)
