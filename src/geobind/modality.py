"""Modality names and their registry.

The four modalities of the paper and ``location`` (a place's own lat/lon) are registered here;
further modalities (``sentinel2``, ...) register themselves with :func:`register_modality`.
Nothing else in the package hard-codes the list: code asks the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "AUDIO",
    "GROUND",
    "LOCATION",
    "SATELLITE",
    "TEXT",
    "ModalitySpec",
    "get_modality",
    "modalities",
    "register_modality",
]

SATELLITE = "satellite"
GROUND = "ground"
TEXT = "text"
AUDIO = "audio"
LOCATION = "location"


@dataclass(frozen=True)
class ModalitySpec:
    """What the data layer needs to know about one modality."""

    name: str
    # How a manifest cell is read: "path" (a file relative to the manifest), "text" (the
    # string itself) or "latlon" (taken from the row's lat/lon columns).
    source: str
    # File suffixes accepted inside WebDataset shards, in order of preference.
    shard_keys: tuple[str, ...] = ()
    description: str = ""
    # For modalities stored as plain files (not images, audio or text): decodes one item (a
    # path or a shard member's bytes) as the modality's encoder would, raising
    # geobind.data.errors.BadSampleError when it is unusable (any other exception counts as
    # undecodable); `geobind data check` calls it, and `geobind data pack` leaves out the files
    # it refuses. None: data check only sees that the file exists and is not empty.
    check: Callable[[Any], None] | None = field(default=None, compare=False)


_REGISTRY: dict[str, ModalitySpec] = {}


def register_modality(spec: ModalitySpec, *, exist_ok: bool = False) -> ModalitySpec:
    """Register a modality so configs, datasets and the model accept its name."""
    if spec.source not in ("path", "text", "latlon"):
        raise ValueError(
            f"modality {spec.name!r}: source must be 'path', 'text' or 'latlon', got {spec.source!r}"
        )
    old = _REGISTRY.get(spec.name)
    # The same name, source and shard keys is the same modality (a plugin registering the
    # built-in `location` again, say): its description may differ.
    same = old is not None and (old.source, old.shard_keys) == (spec.source, spec.shard_keys)
    if old is not None and not exist_ok and not same:
        raise ValueError(f"modality {spec.name!r} is already registered as {old}; pass exist_ok=True "
                         "to replace it")
    _REGISTRY[spec.name] = spec
    return spec


def get_modality(name: str) -> ModalitySpec:
    """The spec of a registered modality; an unknown name raises an error listing the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown modality {name!r}; known modalities: {', '.join(sorted(_REGISTRY))}. "
            "Register new ones with geobind.modality.register_modality (on the command line: name "
            "the module that does in GEOBIND_PLUGINS)."
        ) from None


def modalities() -> list[str]:
    """Names of all registered modalities."""
    return list(_REGISTRY)


register_modality(ModalitySpec(SATELLITE, "path", ("satellite.jpg", "satellite.png"), "overhead image tile"))
register_modality(ModalitySpec(GROUND, "path", ("ground.jpg", "ground.png"), "ground-level photo"))
register_modality(ModalitySpec(TEXT, "text", ("text.txt",), "caption or free text"))
register_modality(
    ModalitySpec(AUDIO, "path", ("audio.flac", "audio.wav", "audio.mp3", "audio.ogg"), "field recording")
)
register_modality(ModalitySpec(LOCATION, "latlon", (), "latitude/longitude of the place"))
