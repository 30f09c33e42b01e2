"""Encoders: one per modality, registered by type name."""

from geobind.encoders.audio import ClapAudioEncoder  # registers clap_audio
from geobind.encoders.base import (
    Encoder,
    encoder_types,
    get_encoder_class,
    l2_normalize,
    register_encoder,
)
from geobind.encoders.clip import (
    ClipImageEncoder,
    ClipTextEncoder,
    ClipVisionEncoder,
    anchor_encoders,
    build_anchor,
    build_clip,
    load_clip,
)

__all__ = [
    "Encoder",
    "register_encoder",
    "get_encoder_class",
    "encoder_types",
    "l2_normalize",
    "ClipImageEncoder",
    "ClipTextEncoder",
    "ClipVisionEncoder",
    "ClapAudioEncoder",
    "anchor_encoders",
    "build_anchor",
    "build_clip",
    "load_clip",
]
