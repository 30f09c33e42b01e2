"""Queries: one or more items of any modality, combined into one unit vector of the space.

A combined query (``--text "forest" --audio rain.wav``) is the **sum of the unit embeddings of
its items, renormalised to unit length**. Every item weighs the same, so the result points
between the items' directions; its cosine similarity to a place is
``sum_i cos(q_i, place) / ||sum_i q_i||``, which ranks places by their mean similarity to the
items. One item gives exactly that item's embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from geobind.model import GeoBind

# Query keyword -> modality. ``image`` is a ground-level photo (CLIP's image side).
QUERY_MODALITIES = {"text": "text", "audio": "audio", "image": "ground", "satellite": "satellite"}

_IMAGE_MODALITIES = ("ground", "satellite")


@dataclass
class Query:
    """Items per modality, e.g. ``{"text": ["forest"], "audio": ["rain.wav"]}``."""

    items: dict[str, list[Any]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        *,
        text: str | Sequence[str] | None = None,
        audio: Any = None,
        image: Any = None,
        satellite: Any = None,
        queries: Mapping[str, Any] | None = None,
    ) -> Query:
        """Collect keyword items (a single item or a list each) and ``queries`` (modality ->
        item(s), for modalities without a keyword) into one query."""
        items: dict[str, list[Any]] = {}
        named = {"text": text, "audio": audio, "image": image, "satellite": satellite}
        for key, value in named.items():
            if value is not None:
                items.setdefault(QUERY_MODALITIES[key], []).extend(_as_list(value))
        for modality, value in (queries or {}).items():
            items.setdefault(modality, []).extend(_as_list(value))
        items = {m: v for m, v in items.items() if v}
        if not items:
            raise ValueError("empty query: give at least one of text, audio, image or satellite")
        return cls(items)

    @property
    def label(self) -> str:
        """A short human-readable form, used in titles and reports."""
        parts = []
        for modality, values in self.items.items():
            for v in values:
                if modality == "text":
                    parts.append(f'"{v}"')
                elif isinstance(v, (str, Path)):
                    parts.append(f"{modality} {Path(v).name}")
                elif (isinstance(v, tuple) and len(v) == 2
                      and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
                    parts.append(f"{modality} {v[0]:g},{v[1]:g}")  # a (lat, lon) query
                else:
                    parts.append(f"{modality} <{type(v).__name__}>")
        return " + ".join(parts)

    def check_files(self) -> None:
        """Fail early, naming the problem, when a query file is missing or of the wrong kind."""
        for modality, values in self.items.items():
            for v in values:
                if isinstance(v, (str, Path)) and modality != "text":
                    expect = (
                        "image"
                        if modality in _IMAGE_MODALITIES
                        else "audio"
                        if modality == "audio"
                        else None
                    )
                    if expect is None:
                        continue
                    kind = sniff_file(v)
                    if kind != expect:
                        flag = ("audio= (--audio)" if kind == "audio"
                                else "image= or satellite= (--image or --satellite)")
                        raise ValueError(
                            f"query file {v} is {kind}, not {expect}; pass it as {flag}"
                        )


def _as_list(value: Any) -> list[Any]:
    """A query keyword's items: one item as ``GeoBind.embed`` tells one (a path, a file's bytes,
    an image or array, a ``(waveform, sample_rate)`` pair), or a sequence's items (a tuple of
    two images is two items)."""
    from geobind.model import _single_item

    if _single_item(value) or isinstance(value, bytearray) or not isinstance(value, Sequence):
        return [value]
    return list(value)


def sniff_file(path: str | Path) -> str:
    """``"image"`` or ``"audio"`` by decoding the file's header; an error naming the file when it
    is missing, empty, or neither."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"query file {path} does not exist")
    if path.stat().st_size == 0:
        raise ValueError(f"query file {path} is empty")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.verify()
        return "image"
    except Image.DecompressionBombError:
        return "image"  # too large to decode: its decoding says so
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        pass
    import soundfile as sf

    try:
        info = sf.info(str(path))
        if info.frames > 0:
            return "audio"
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, EOFError):
        pass
    raise ValueError(
        f"query file {path} is neither an image nor an audio file that can be decoded "
        "(images: png, jpeg, tiff, ...; audio: wav, flac, ogg, mp3)"
    )


def embed_query(model: GeoBind, query: Query, *, batch_size: int = 32) -> torch.Tensor:
    """The query's unit vector ``[D]`` (float32): the renormalised sum of its items' unit
    embeddings."""
    query.check_files()
    total = torch.zeros(model.dim)
    for modality, values in query.items.items():
        known = getattr(model.encoder(modality), "known_words", None)
        for v in values if known is not None else ():
            if isinstance(v, str) and v.strip() and not known(v):
                raise ValueError(f"none of the words of the query {v!r} are in the model's vocabulary, so it "
                                 "would match as every such text does: rephrase it")
        total += model.embed(modality, values, batch_size=batch_size).sum(dim=0)
    norm = total.norm()
    if not torch.isfinite(norm) or norm < 1e-6:
        raise ValueError(f"query {query.label} sums to a zero vector (its items cancel out)")
    return total / norm


__all__ = ["Query", "QUERY_MODALITIES", "embed_query", "sniff_file"]
