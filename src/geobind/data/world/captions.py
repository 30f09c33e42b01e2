"""Captions: natural sentences from varied templates naming the scene, its attributes and the
nearest real city and country ("a quiet pine forest outside Oslo, Norway")."""

from __future__ import annotations

from typing import Any

import numpy as np

# (article, noun phrase) pairs per scene; the article is adjusted when an adjective is inserted.
_NOUNS: dict[str, list[tuple[str, str]]] = {
    "open_ocean": [
        ("the", "open ocean"),
        ("the", "open sea"),
        ("an", "empty ocean"),
        ("", "deep blue water"),
        ("", "rolling ocean swells"),
    ],
    "coast": [
        ("a", "beach"),
        ("the", "coastline"),
        ("a", "rocky shore"),
        ("the", "seaside"),
        ("a", "stretch of coast"),
    ],
    "tropical_rainforest": [
        ("a", "tropical rainforest"),
        ("a", "humid jungle"),
        ("", "lush rainforest"),
        ("a", "dense jungle canopy"),
    ],
    "savanna": [
        ("an", "open savanna"),
        ("an", "acacia savanna"),
        ("", "golden savanna grass"),
        ("the", "savanna"),
    ],
    "desert": [
        ("", "sand dunes"),
        ("a", "barren desert"),
        ("an", "empty desert"),
        ("", "desert sands"),
        ("a", "desert plain"),
    ],
    "grassland": [
        ("an", "open grassland"),
        ("", "grassy plains"),
        ("the", "steppe"),
        ("a", "wide meadow"),
        ("", "prairie grass"),
    ],
    "farmland": [
        ("", "farmland"),
        ("", "crop fields"),
        ("", "farm fields"),
        ("", "agricultural land"),
        ("", "fields of wheat and maize"),
    ],
    "temperate_forest": [
        ("a", "deciduous forest"),
        ("a", "leafy woodland"),
        ("a", "temperate forest"),
        ("", "broadleaf woods"),
    ],
    "boreal_forest": [
        ("a", "pine forest"),
        ("a", "spruce forest"),
        ("the", "taiga"),
        ("", "dark conifer woods"),
        ("a", "boreal forest"),
    ],
    "tundra": [
        ("", "bare tundra"),
        ("the", "arctic tundra"),
        ("", "treeless tundra"),
        ("", "mossy tundra"),
    ],
    "ice": [
        ("an", "ice sheet"),
        ("a", "vast field of snow and ice"),
        ("a", "glacier"),
        ("", "frozen plains of ice"),
    ],
    "mountains": [
        ("", "mountains"),
        ("", "rugged mountain peaks"),
        ("a", "high mountain range"),
        ("", "steep alpine slopes"),
    ],
    "town": [
        ("a", "small town"),
        ("a", "village"),
        ("", "houses along a quiet street"),
        ("a", "suburb"),
        ("a", "market town"),
    ],
    "city_centre": [
        ("the", "city centre"),
        ("", "downtown streets"),
        ("", "high-rise buildings"),
        ("a", "crowded city street"),
        ("", "skyscrapers"),
    ],
}

_DETAILS: dict[str, list[str]] = {
    "open_ocean": [
        "with whitecaps to the horizon",
        "with no land in sight",
        "under a wide sky",
        "with the sound of waves and wind",
    ],
    "coast": [
        "where waves break on the shore",
        "with gulls overhead",
        "by the sea",
        "with the surf rolling in",
    ],
    "tropical_rainforest": [
        "with a dense green canopy",
        "full of birds and insects",
        "dripping with rain",
        "with tall trees and vines",
    ],
    "savanna": [
        "with scattered acacia trees",
        "with dry golden grass",
        "under a huge sky",
        "with insects buzzing in the grass",
    ],
    "desert": [
        "with dunes under a pale sky",
        "with nothing but sand and wind",
        "baking in the sun",
        "with hardly a plant in sight",
    ],
    "grassland": [
        "with grass waving in the wind",
        "with crickets in the grass",
        "stretching to the horizon",
        "with rolling hills",
    ],
    "farmland": [
        "with fields in neat rows",
        "with a farmhouse and a tractor",
        "with cattle grazing nearby",
        "with crops ready for harvest",
    ],
    "temperate_forest": [
        "with birdsong in the trees",
        "with sunlight through the leaves",
        "with oak and beech trees",
        "with a path between the trees",
    ],
    "boreal_forest": [
        "with tall spruce and pine",
        "with the wind in the conifers",
        "with moss under the trees",
        "quiet except for a woodpecker",
    ],
    "tundra": [
        "with low moss and lichen",
        "swept by a cold wind",
        "with meltwater pools",
        "without a single tree",
    ],
    "ice": [
        "silent and white",
        "with nothing but snow to the horizon",
        "under a pale polar sky",
        "where the ice cracks now and then",
    ],
    "mountains": [
        "with snow on the peaks",
        "with a cold wind on the ridges",
        "with a stream in the valley",
        "with rocky summits",
    ],
    "town": [
        "with small houses and gardens",
        "with a church tower",
        "with a few cars passing",
        "with dogs barking in the distance",
    ],
    "city_centre": [
        "with heavy traffic and tall buildings",
        "with crowds on the pavements",
        "with sirens and car horns",
        "with office towers and busy roads",
    ],
}

_TEMP_ADJ = {
    "freezing": ["freezing", "frozen", "icy"],
    "cold": ["cold", "chilly"],
    "mild": ["mild", "cool"],
    "warm": ["warm", "sunny"],
    "hot": ["hot", "sweltering"],
}
_QUIET_SCENES = {"open_ocean", "ice", "desert", "tundra", "mountains", "boreal_forest"}


def _density_adj(density: float, scene: str) -> list[str]:
    if scene == "city_centre":
        return ["busy", "bustling", "crowded", "noisy"]
    if density < 1:
        return ["remote", "empty", "lonely", "wild"]
    if density < 30:
        return ["quiet", "peaceful", "remote"]
    if density < 300:
        return ["quiet", "peaceful", "busy"]
    return ["busy", "crowded"]


def _wet_adj(wet: float) -> list[str]:
    if wet < 0.15:
        return ["arid", "parched", "dry"]
    if wet < 0.4:
        return ["dry", "dusty"]
    if wet < 0.7:
        return ["green"]
    return ["lush", "humid", "rainy"]


def _rug_adj(rug: float) -> list[str]:
    return ["flat", "level"] if rug < 0.15 else (["hilly", "rolling"] if rug < 0.5 else ["rugged"])


def _noun_phrase(rng: np.random.Generator, scene: str, adj: str | None) -> str:
    article, noun = _NOUNS[scene][int(rng.integers(len(_NOUNS[scene])))]
    if adj and (adj in noun or adj[:4] in noun):  # no "frozen frozen plains"
        adj = None
    words = [w for w in (adj, noun) if w]
    body = " ".join(words)
    if article in ("a", "an"):
        article = "an" if body[:1].lower() in "aeiou" else "a"
    return f"{article} {body}".strip()


def _round_km(km: float) -> int:
    return int(5 * round(km / 5)) if km < 100 else int(10 * round(km / 10))


def _where(rng: np.random.Generator, scene: str, p: dict[str, Any]) -> str:
    city, country = p["city"], p["country"]
    km, direction = float(p["city_km"]), p["city_direction"]
    if p["lat"] < -60:
        return str(
            rng.choice(
                [
                    "in Antarctica",
                    "deep in Antarctica",
                    "on the Antarctic plateau",
                    "in the far south of Antarctica",
                ]
            )
        )
    at = f"{city}, {country}"
    if scene == "city_centre":
        return str(
            rng.choice(
                [
                    f"in {at}",
                    f"in central {city}, {country}",
                    f"in the heart of {at}",
                    f"in downtown {city}, {country}",
                ]
            )
        )
    if scene == "town":
        if km < 8:
            return str(rng.choice([f"in {at}", f"on the edge of {at}", f"in the town of {at}"]))
        return f"about {_round_km(km)} km {direction} of {at}"
    if scene == "open_ocean":
        if km > 600:
            return str(
                rng.choice(
                    [
                        f"far out at sea, over {_round_km(km)} km from {at}",
                        "far out in the ocean",
                        f"in the middle of the sea off {country}",
                    ]
                )
            )
        return str(
            rng.choice(
                [
                    f"{_round_km(km)} km off {at}",
                    f"at sea, {direction} of {at}",
                    f"in the open water {_round_km(km)} km {direction} of {at}",
                ]
            )
        )
    if km < 20:
        return str(rng.choice([f"just outside {at}", f"near {at}", f"on the outskirts of {at}"]))
    if km < 150:
        return str(
            rng.choice(
                [
                    f"about {_round_km(km)} km {direction} of {at}",
                    f"{direction} of {at}",
                    f"in the countryside near {at}",
                    f"outside {at}",
                ]
            )
        )
    return str(
        rng.choice(
            [
                f"in remote {country}",
                f"far from any city, {_round_km(km)} km {direction} of {at}",
                f"in the wilds of {country}",
                f"hundreds of kilometres from {at}",
            ]
        )
    )


def make_caption(rng: np.random.Generator, scene: str, place: dict[str, Any]) -> str:
    """One caption for a place: ``place`` holds the manifest's attributes plus ``lat``, ``city``,
    ``country``, ``city_km`` and ``city_direction``."""
    pick = lambda xs: str(xs[int(rng.integers(len(xs)))])  # noqa: E731
    adjs = [
        pick(_TEMP_ADJ[place["temperature_band"]]),
        pick(_density_adj(float(place["population_density"]), scene)),
        pick(_wet_adj(float(place["wetness"]))) if scene not in ("open_ocean", "ice") else None,
        pick(_rug_adj(float(place["ruggedness"])))
        if scene not in ("open_ocean", "mountains")
        else None,
    ]
    if scene in _QUIET_SCENES and adjs[1] in ("busy", "crowded"):
        adjs[1] = "quiet"
    adjs = [a for a in adjs if a]
    adj = pick(adjs) if rng.random() < 0.75 else None
    form = int(rng.integers(7))
    weather = pick(
        [place["temperature_band"]] + (["rainy"] if float(place["wetness"]) > 0.7 else [])
    )
    if form == 4 and adj in _TEMP_ADJ[place["temperature_band"]] + ["rainy"]:
        adj = None  # not "a mild day: a mild suburb"
    noun = _noun_phrase(rng, scene, adj)
    where = _where(rng, scene, place)
    detail = pick(_DETAILS[scene])
    if form == 0:
        text = f"a photo of {noun} {where}."
    elif form == 1:
        text = f"{noun} {where}, {detail}."
    elif form == 2:
        text = f"{noun} {where}."
    elif form == 3:
        text = f"view of {noun} {where} {detail}."
    elif form == 4:
        text = f"a {weather} day: {noun} {where}."
    elif form == 5:
        text = f"{noun} {detail}, {where}."
    else:
        text = f"looking out over {noun} {where}."
    return text[0].upper() + text[1:]


__all__ = ["make_caption"]
