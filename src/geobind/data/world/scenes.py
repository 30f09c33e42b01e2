"""The fixed list of scenes of the embedded world, with the text prompts used to classify them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scene:
    """One scene: its identifier, a bare label and the label with its article."""

    name: str
    label: str  # "tropical rainforest"
    phrase: str  # "a tropical rainforest" (for prompts: "a photo of {phrase}")


SCENES: tuple[Scene, ...] = (
    Scene("open_ocean", "open ocean", "the open ocean"),
    Scene("coast", "coast", "a coast"),
    Scene("tropical_rainforest", "tropical rainforest", "a tropical rainforest"),
    Scene("savanna", "savanna", "a savanna"),
    Scene("desert", "desert", "a desert"),
    Scene("grassland", "grassland", "a grassland"),
    Scene("farmland", "farmland", "farmland"),
    Scene("temperate_forest", "temperate forest", "a temperate forest"),
    Scene("boreal_forest", "boreal forest", "a boreal forest"),
    Scene("tundra", "tundra", "tundra"),
    Scene("ice", "ice sheet", "an ice sheet"),
    Scene("mountains", "mountains", "mountains"),
    Scene("town", "town", "a town"),
    Scene("city_centre", "city centre", "a city centre"),
)
SCENE_NAMES: tuple[str, ...] = tuple(s.name for s in SCENES)
SCENE_INDEX: dict[str, int] = {n: i for i, n in enumerate(SCENE_NAMES)}

# Zero-shot prompt per modality; "{phrase}" is filled with Scene.phrase.
PROMPT_TEMPLATES: dict[str, str] = {
    "satellite": "a satellite image of {phrase}",
    "ground": "a photo of {phrase}",
    "audio": "the sound of {phrase}",
    "text": "a photo of {phrase}",
}


def scene_prompts(modality: str = "ground") -> list[str]:
    """The zero-shot prompt of every scene, in :data:`SCENES` order, for ``modality``."""
    template = PROMPT_TEMPLATES.get(modality, PROMPT_TEMPLATES["ground"])
    return [template.format(phrase=s.phrase, label=s.label) for s in SCENES]
