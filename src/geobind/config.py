"""Run configuration: small frozen dataclasses loaded from YAML, validated before any work.

A run is an anchor (the initial space: a frozen CLIP giving ``ground`` and ``text``, or an
existing GeoBind model) followed by an ordered list of binding stages. Each stage trains one
modality against one already in the space. The fully resolved config is saved with every run.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from geobind.modality import GROUND, TEXT, get_modality

__all__ = [
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "LossConfig",
    "OptimConfig",
    "RunConfig",
    "StageConfig",
    "apply_overrides",
    "load_config",
    "parse_config",
    "plain",
    "validate",
]


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 1  # passes over the stage's training data
    max_steps: int = 0  # train this many optimizer steps, over as many epochs as they take (0: `epochs` decide)
    batch_size: int = 64  # global batch size (split evenly across ranks)
    lr: float = 5e-5  # peak learning rate (AdamW)
    weight_decay: float = 0.2  # AdamW decay; never applied to norms, biases, the temperature
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (CLIP/Sat2Cap)
    eps: float = 1e-6  # AdamW epsilon
    warmup_steps: int = 0  # linear warmup before the cosine decay
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max gradient norm (0: off)
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the trainable encoder (pays on GPUs over long runs)
    grad_checkpointing: bool = False  # recompute activations in the backward: ~1/3 more compute, larger batches fit
    num_workers: int | str = "auto"  # loader worker processes per rank; auto: 0 on CPU, up to 8 per GPU
    log_every: int = 10  # steps between metric rows in metrics.csv
    val_every: int = 0  # steps between validation runs (0: at the end of each epoch)
    ckpt_every: int = 200  # steps between checkpoints (0: only at epoch ends; always one at each epoch end)


@dataclass(frozen=True)
class LossConfig:
    symmetric: bool = False  # False: the paper's one-directional InfoNCE (train -> anchor)
    temperature: float = 0.07  # initial temperature, 0.01 to 1; logit scale 1/t, kept within [1, 100]
    learn_temperature: bool = True  # learn the temperature jointly
    queue_size: int = 0  # past frozen-anchor embeddings kept as extra negatives (Sat2Cap: 9000)


@dataclass(frozen=True)
class DataConfig:
    train: str  # training dataset: manifest (CSV/Parquet), shard folder/pattern or layout root
    val: str | None = None  # validation dataset for periodic retrieval (optional)
    layout: str = "manifest"  # manifest | shards | sat2cap | soundingearth | geotiff (or a registered one)
    strict: bool = False  # raise on the first bad sample instead of skipping and counting it
    layout_options: dict[str, Any] = field(default_factory=dict)  # the layout's options (geobind.data.layouts)
    shuffle_buffer: int = 1000  # shards: samples each loader worker holds to shuffle its stream


@dataclass(frozen=True)
class StageConfig:
    name: str  # stage name (used for its output folder and --set stages.NAME.key=value)
    train: str  # modality this stage adds to the space (its encoder is trained)
    bind_to: str  # modality already in the space that it binds to (frozen)
    encoder: dict[str, Any]  # encoder spec: {type: <registered encoder type>, ...type-specific keys}
    data: DataConfig  # paired dataset with columns for `train` and `bind_to`
    optim: OptimConfig = field(default_factory=OptimConfig)  # optimisation settings
    loss: LossConfig = field(default_factory=LossConfig)  # contrastive loss settings
    cache_anchor: bool = True  # embed the frozen side once and reuse it (exact for frozen anchors)


@dataclass(frozen=True)
class EvalConfig:
    data: str  # evaluation dataset (all modalities present are paired up)
    batch_size: int = 64  # embedding batch size
    layout: str = "manifest"  # how to read it
    layout_options: dict[str, Any] = field(default_factory=dict)  # the layout's options, as in a stage's data


@dataclass(frozen=True)
class RunConfig:
    output_dir: str  # where checkpoints, logs and the final model directory go
    stages: tuple[StageConfig, ...]  # binding stages, run in order
    anchor: dict[str, Any] | None = None  # frozen CLIP: {pretrained: dir|hub id} or {config, tokenizer}
    init_model: str | None = None  # start from an existing GeoBind model directory instead
    anchor_modalities: dict[str, str] = field(
        default_factory=lambda: {"image": GROUND, "text": TEXT}
    )  # which modalities the CLIP anchor's image and text towers serve
    eval: EvalConfig | None = None  # evaluation after training (optional)
    seed: int = 0  # seeds data order, augmentation and initialisation
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | cuda:N
    cache_dir: str | None = None  # anchor-embedding cache (default: <output_dir>/cache)

    def to_dict(self) -> dict[str, Any]:
        """The whole config as nested plain dicts and lists (tuples become lists), for YAML."""
        return plain(dataclasses.asdict(self))


def plain(x):
    """Dataclass-dict values made YAML-friendly: tuples become lists, recursively."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


class ConfigError(ValueError):
    """A config problem, raised before any training starts."""


def with_guesses(keys, known) -> list[str]:
    """Each of ``keys`` as text, with the closest of ``known`` where one is close: ``"lrr (did
    you mean lr?)"``."""
    import difflib

    out = []
    for k in keys:
        guess = difflib.get_close_matches(str(k), list(known), n=1)
        out.append(f"{k} (did you mean {guess[0]}?)" if guess else str(k))
    return out


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(with_guesses(sorted(unknown, key=str), fields))}; "
            f"valid keys: {', '.join(fields)}"
        )
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
    kwargs = {}
    for name, value in data.items():
        sub = {"optim": OptimConfig, "loss": LossConfig, "data": DataConfig, "eval": EvalConfig}.get(name)
        if value is None and cls is StageConfig and name in ("optim", "loss"):
            value = {}  # an empty section (every key commented out): its defaults
        if value is None and cls is StageConfig and name in ("data", "encoder"):
            raise ConfigError(f"{where}.{name}: empty; give a mapping, e.g. "
                              + ("{train: data/train.csv}" if name == "data" else "{type: clip_vision}"))
        if sub is not None and value is not None and cls in (StageConfig, RunConfig):
            if name == "data" and isinstance(value, str):
                value = {"train": value}
            value = _build(sub, value, f"{where}.{name}")
        elif name == "stages":
            if not isinstance(value, list) or not value:
                raise ConfigError(f"{where}.stages: give a non-empty list of stages")
            value = tuple(_build(StageConfig, s, f"{where}.stages[{i}]") for i, s in enumerate(value))
        elif name == "betas":
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}.betas: two numbers, e.g. [0.9, 0.98]; got {value!r}") from None
        else:
            value = _coerce(fields[name], value, f"{where}.{name}")
        kwargs[name] = value
    for name, value in kwargs.items():
        t = fields[name].type if isinstance(fields[name].type, str) else str(fields[name].type)
        if t.startswith("dict") and value is not None and not isinstance(value, dict):
            raise ConfigError(f"{where}.{name}: expected a mapping (key: value, e.g. {{type: clip_vision}}), "
                              f"got {value!r}")
    return cls(**kwargs)


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if t == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if t == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t == "bool":
            if not isinstance(value, bool):
                raise ValueError
            return value
        if t == "str":
            if value is None:
                raise ValueError
            return str(value)
    except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
        raise ConfigError(f"{where}: expected {t}, got {value!r}") from None
    return value


def parse_config(data: dict[str, Any], base_dir: str | Path = ".") -> RunConfig:
    """Validate a config mapping and make relative paths absolute, relative to ``base_dir``."""
    data = copy.deepcopy(data)
    base = Path(base_dir)

    def rel(p):
        if p is None or "://" in str(p) or str(p).startswith("pipe:"):
            return p
        q = Path(str(p)).expanduser()
        # Absolute, so the config saved with the run works from any folder, and a run resumes
        # whichever folder the command starts in.
        return os.path.abspath(q if q.is_absolute() else (base / q))

    cfg = _build(RunConfig, data, "config")
    cfg = dataclasses.replace(
        cfg,
        output_dir=rel(cfg.output_dir),
        init_model=rel(cfg.init_model),
        cache_dir=rel(cfg.cache_dir),
        anchor=_resolve_anchor_paths(cfg.anchor, rel, base),
        stages=tuple(
            dataclasses.replace(
                s,
                data=dataclasses.replace(s.data, train=rel(s.data.train), val=rel(s.data.val)),
                encoder=_resolve_encoder_paths(s.encoder, rel, base),
            )
            for s in cfg.stages
        ),
        eval=dataclasses.replace(cfg.eval, data=rel(cfg.eval.data)) if cfg.eval else None,
    )
    validate(cfg)
    return cfg


def _looks_local(p: str) -> bool:
    return str(p).startswith((".", "/", "~")) or not ("/" in str(p) and str(p).count("/") == 1)


def _model_path(p, rel, base: Path):
    """A model given as a local folder (relative to the config's folder) or a Hub id
    (``org/name``): an ``org/name`` that exists as a folder beside the config is the folder."""
    if not p:
        return p
    if _looks_local(p) or (base / Path(str(p)).expanduser()).exists():
        return rel(p)
    return p


def _resolve_anchor_paths(anchor, rel, base: Path):
    if anchor is None:
        return None
    anchor = dict(anchor)
    for k in ("pretrained", "tokenizer"):
        if anchor.get(k):
            anchor[k] = _model_path(anchor[k], rel, base)
    return anchor


def _resolve_encoder_paths(spec, rel, base: Path):
    spec = dict(spec)
    if spec.get("pretrained"):
        spec["pretrained"] = _model_path(spec["pretrained"], rel, base)
    return spec


def validate(cfg: RunConfig) -> None:
    """Check the stage chain: modalities known, each stage binds to one already in the space."""
    if (cfg.anchor is None) == (cfg.init_model is None):
        raise ConfigError("config: give exactly one of `anchor` (a CLIP) or `init_model` (a GeoBind model)")
    if cfg.anchor is not None:
        if cfg.anchor.get("type", "clip") != "clip":
            raise ConfigError(f"config.anchor.type: only 'clip' anchors exist, got {cfg.anchor['type']!r}")
        unknown = set(cfg.anchor) - {"type", "pretrained", "config", "tokenizer"}
        if unknown:
            raise ConfigError(f"config.anchor: unknown key(s) {sorted(unknown)}; use pretrained, or config "
                              "and tokenizer")
        if not cfg.anchor.get("pretrained") and (cfg.anchor.get("config") is None or not cfg.anchor.get("tokenizer")):
            raise ConfigError("config.anchor: give `pretrained` (a CLIP folder or hub id, e.g. "
                              "openai/clip-vit-base-patch32), or `config` (random weights) and `tokenizer`")
        if cfg.anchor.get("config") is not None:
            from transformers import CLIPConfig

            from geobind.encoders.base import check_config_keys

            try:
                check_config_keys(CLIPConfig, cfg.anchor["config"], "config.anchor.config")
            except ValueError as e:
                raise ConfigError(str(e)) from None
        am = cfg.anchor_modalities
        if not isinstance(am, dict) or set(am) != {"image", "text"}:
            raise ConfigError("config.anchor_modalities: a mapping of the CLIP anchor's two towers to "
                              f"modalities, e.g. {{image: ground, text: text}}; got {am!r}")
        if am["image"] == am["text"]:
            raise ConfigError(f"config.anchor_modalities: the image and text towers serve two different "
                              f"modalities; both are {am['image']!r}")
        space = set(am.values())
    else:
        import json

        p = Path(cfg.init_model) / "geobind.json"
        if not p.is_file():
            raise ConfigError(f"config.init_model: {p} not found; point it at a GeoBind model directory")
        space = set(json.loads(p.read_text())["modalities"])
    for m in space:
        _check_modality(m, "config.anchor_modalities")
    names = set()
    for i, s in enumerate(cfg.stages):
        where = f"config.stages[{i}] ({s.name})"
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", s.name) or s.name in (".", ".."):
            raise ConfigError(f"{where}.name: letters, digits, '_', '-' and '.' only (it names the stage's "
                              f"folder), got {s.name!r}")
        if s.name in names:
            raise ConfigError(f"{where}: duplicate stage name")
        names.add(s.name)
        _check_modality(s.train, f"{where}.train")
        _check_modality(s.bind_to, f"{where}.bind_to")
        if s.bind_to not in space:
            raise ConfigError(
                f"{where}: binds to {s.bind_to!r}, which is not in the space yet (it has "
                f"{', '.join(sorted(space))}). Put a stage that trains {s.bind_to!r} earlier."
            )
        if s.train == s.bind_to:
            raise ConfigError(f"{where}: train and bind_to are both {s.train!r}")
        if "type" not in s.encoder:
            raise ConfigError(f"{where}.encoder: needs `type` (a registered encoder type)")
        from geobind.encoders import Encoder, encoder_types, get_encoder_class

        try:
            encoder_cls = get_encoder_class(s.encoder["type"])
            encoder_cls.check_spec(s.encoder)
        except ValueError as e:
            raise ConfigError(f"{where}.encoder: {e}") from None
        if encoder_cls.create.__func__ is Encoder.create.__func__:  # serves a space, is never built new
            trainable = [t for t in encoder_types() if get_encoder_class(t).create.__func__ is not Encoder.create.__func__]
            raise ConfigError(f"{where}.encoder: type {s.encoder['type']} is not trained by a stage (it serves the "
                              f"anchor's towers); a stage trains one of: {', '.join(trainable)}")
        from geobind.data.pack import member_kind

        kind = member_kind(s.train)
        # A plugin's "file" modality may suit an image (or other) encoder, but never one that
        # reads only (lat, lon): it would fail mid-run on the first path.
        if encoder_cls.input_kind and kind != encoder_cls.input_kind and (
                kind != "file" or encoder_cls.input_kind == "latlon"):
            raise ConfigError(f"{where}.encoder: type {s.encoder['type']} reads {encoder_cls.input_kind}, but "
                              f"{s.train!r} is {kind} data; give an encoder that reads {kind}")
        o = s.optim
        if o.batch_size < 2:
            raise ConfigError(f"{where}.optim.batch_size: contrastive training needs at least 2")
        if o.epochs < 1:
            raise ConfigError(f"{where}.optim.epochs: at least 1 (use optim.max_steps to stop earlier), got {o.epochs}")
        for name in ("max_steps", "warmup_steps", "val_every", "ckpt_every"):
            if getattr(o, name) < 0:
                raise ConfigError(f"{where}.optim.{name}: 0 or more, got {getattr(o, name)}")
        if o.log_every < 1:
            raise ConfigError(f"{where}.optim.log_every: at least 1 step, got {o.log_every}")
        if not (math.isfinite(o.lr) and o.lr > 0):
            raise ConfigError(f"{where}.optim.lr: a positive number, got {o.lr}")
        for name in ("weight_decay", "grad_clip"):
            v = getattr(o, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{where}.optim.{name}: 0 (off) or a positive number, got {v}")
        if not (math.isfinite(o.eps) and o.eps > 0):
            raise ConfigError(f"{where}.optim.eps: a small positive number (e.g. 1e-6), got {o.eps}")
        if not 0 <= o.min_lr_ratio <= 1:
            raise ConfigError(f"{where}.optim.min_lr_ratio: a fraction of lr from 0 to 1, got {o.min_lr_ratio}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            raise ConfigError(f"{where}.optim.betas: two numbers in [0, 1), e.g. [0.9, 0.98]; got {list(o.betas)}")
        if s.loss.queue_size < 0:
            raise ConfigError(f"{where}.loss.queue_size: 0 (no queue) or more, got {s.loss.queue_size}")
        if s.data.shuffle_buffer < 0:
            raise ConfigError(f"{where}.data.shuffle_buffer: must be 0 (no shuffle buffer) or more")
        _check_layout(s.data.layout, s.data.layout_options, f"{where}.data")
        if o.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"{where}.optim.precision: use auto, fp32, bf16 or fp16")
        if o.num_workers != "auto" and not (isinstance(o.num_workers, int) and not isinstance(o.num_workers, bool)
                                            and o.num_workers >= 0):
            raise ConfigError(f"{where}.optim.num_workers: use auto or a number >= 0, got {o.num_workers!r}")
        if not isinstance(o.compile, bool):
            raise ConfigError(f"{where}.optim.compile: use true or false, got {o.compile!r}")
        if not isinstance(o.grad_checkpointing, bool):
            raise ConfigError(f"{where}.optim.grad_checkpointing: use true or false, got {o.grad_checkpointing!r}")
        if not (math.isfinite(s.loss.temperature) and 0.01 <= s.loss.temperature <= 1):
            raise ConfigError(f"{where}.loss.temperature: from 0.01 to 1 (the logit scale 1/t is kept within "
                              f"[1, 100]; CLIP starts at 0.07), got {s.loss.temperature}")
        space.add(s.train)
    if cfg.eval is not None:
        _check_layout(cfg.eval.layout, cfg.eval.layout_options, "config.eval")
        if cfg.eval.batch_size < 1:
            raise ConfigError(f"config.eval.batch_size: at least 1, got {cfg.eval.batch_size}")
    # The form only: whether this machine has the device named is checked where the run starts.
    if cfg.device != "auto":
        import torch

        try:
            torch.device(cfg.device)
        except (RuntimeError, TypeError):
            raise ConfigError(f"config.device: use auto, cpu, cuda or cuda:N; got {cfg.device!r}") from None


def _check_layout(layout: str, options: Any, where: str) -> None:
    from geobind.data.manifest import check_layout_options, layouts

    if layout not in layouts():
        raise ConfigError(f"{where}.layout: unknown layout {layout!r}; use one of {', '.join(layouts())}")
    if not isinstance(options, dict):
        raise ConfigError(f"{where}.layout_options: expected a mapping of option: value")
    try:
        check_layout_options(layout, options)
    except ValueError as e:
        raise ConfigError(f"{where}.layout_options: {e}") from None


def _check_modality(name: str, where: str) -> None:
    try:
        get_modality(name)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML). Stages are addressed by index
    or by name: ``stages.0.optim.lr=1e-4`` or ``stages.satellite.optim.epochs=2``."""
    data = copy.deepcopy(data)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"--set {ov!r}: expected key=value")
        key, raw = ov.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {ov!r}: the value is not valid YAML ({e.__class__.__name__}); "
                              "quote it") from None
        parts = key.strip().split(".")
        node: Any = data
        for j, part in enumerate(parts[:-1]):
            node = _child(node, part, ".".join(parts[: j + 1]), create=True)
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key)] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:-1])} is a {type(node).__name__}, not a "
                              "section with keys")
    return data


def _index(lst: list, part: str, where: str) -> int:
    if part.lstrip("-").isdigit():
        i = int(part)
        if not -len(lst) <= i < len(lst):
            raise ConfigError(f"--set {where}: index {i} out of range ({len(lst)} items)")
        return i
    for i, item in enumerate(lst):
        if isinstance(item, dict) and item.get("name") == part:
            return i
    names = [str(item["name"]) for item in lst if isinstance(item, dict) and item.get("name")]
    known = f"; the stages are {', '.join(names)}" if names else ""
    raise ConfigError(f"--set {where}: no stage named {part!r}{known}")


def _child(node, part, where, create):
    if isinstance(node, list):
        return node[_index(node, part, where)]
    if not isinstance(node, dict):
        raise ConfigError(f"--set {where}: cannot descend into a {type(node).__name__}")
    if part not in node or node[part] is None:
        if not create:
            raise ConfigError(f"--set {where}: no such key")
        node[part] = {}
    return node[part]


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load, override and validate a YAML run config. Relative paths are relative to its folder."""
    path = Path(path)
    if path.is_dir():
        hint = " (it holds config.yaml)" if (path / "config.yaml").is_file() else ""
        raise FileNotFoundError(f"{path} is a folder{hint}; give the run's YAML config file")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    try:
        with open(path) as f:  # a stream, so the error's position names the file
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config is a YAML mapping (output_dir, anchor, stages, ...), "
                          f"got a {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_config(data, path.parent)
