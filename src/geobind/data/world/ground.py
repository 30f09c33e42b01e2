"""Procedural ground-level photos: a sky, a horizon and the scene's landscape, drawn with PIL.

Each photo is drawn at twice the output size and downsampled (anti-aliasing). The scene fixes
the kind of landscape; the place's attributes shift it (temperature: snow and autumn colours;
wetness: greenness and rain; ruggedness: hills; population density: roads and houses in the
countryside); the place's own random generator picks the time of day, the weather, the layout,
counts, sizes and colours, so that two places of one scene do not look alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

Colour = tuple[int, int, int]

# Sky (top, horizon) colours per light condition.
_SKIES: dict[str, tuple[Colour, Colour]] = {
    "day": ((60, 120, 215), (175, 210, 240)),
    "hazy": ((150, 175, 205), (225, 225, 215)),
    "overcast": ((120, 125, 135), (185, 188, 192)),
    "golden": ((70, 95, 170), (250, 185, 110)),
    "dusk": ((35, 40, 95), (230, 120, 95)),
    "night": ((8, 10, 30), (40, 45, 80)),
    "polar": ((120, 160, 210), (225, 235, 245)),
}


def _c(rng: np.random.Generator, base: Colour, spread: float = 18.0) -> Colour:
    """``base`` with a random shift, so no two places share exact colours."""
    v = np.asarray(base, dtype=np.float64) + rng.normal(0.0, spread, 3)
    return tuple(int(x) for x in np.clip(v, 0, 255))  # type: ignore[return-value]


def _lerp(a: Colour, b: Colour, t: float) -> Colour:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))  # type: ignore[return-value]


def _gradient(h: int, w: int, top: Colour, bottom: Colour, y0: int = 0, y1: int | None = None):
    y1 = h if y1 is None else y1
    t = np.clip((np.arange(h) - y0) / max(1, y1 - y0), 0.0, 1.0)[:, None, None]
    col = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(bottom, np.float32)
    return np.broadcast_to(col, (h, w, 3))


def _sky(rng: np.random.Generator, light: str, s: int, horizon: int) -> np.ndarray:
    top, bottom = _SKIES[light]
    return _gradient(s, s, _c(rng, top, 12), _c(rng, bottom, 12), 0, horizon).copy()


def _clouds(d: ImageDraw.ImageDraw, rng, s: int, horizon: int, n: int, light: str) -> None:
    grey = {"overcast": 165, "night": 45, "dusk": 150}.get(light, 240)
    for _ in range(n):
        cx, cy = rng.uniform(0, s), rng.uniform(0.02 * s, max(0.05 * s, horizon * 0.8))
        w, h = rng.uniform(0.08, 0.3) * s, rng.uniform(0.03, 0.08) * s
        for _ in range(int(rng.integers(2, 5))):
            ox, oy = rng.normal(0, w * 0.3), rng.normal(0, h * 0.3)
            g = int(np.clip(grey + rng.normal(0, 10), 0, 255))
            d.ellipse(
                [cx + ox - w / 2, cy + oy - h / 2, cx + ox + w / 2, cy + oy + h / 2],
                fill=(g, g, min(255, g + 5)),
            )


def _ridge(rng, s: int, base: float, amp: float, n: int = 8) -> list:
    """Polygon of a hill or mountain line at height ``base`` (pixels) closed to the bottom."""
    xs = np.linspace(0, s, n * 4 + 1)
    phase = rng.uniform(0, 2 * np.pi, 3)
    freq = rng.uniform(0.5, 2.5, 3)
    y = base - amp * sum(np.sin(xs / s * np.pi * f + p) for f, p in zip(freq, phase)) / 3
    return [(0, s)] + list(zip(xs.tolist(), y.tolist())) + [(s, s)]


def _peaks(rng, s: int, base: float, height: float, n: int) -> list:
    """Jagged mountain range: alternating peaks and saddles."""
    xs = np.sort(rng.uniform(-0.1 * s, 1.1 * s, 2 * n + 1))
    ys = [
        base - height * (rng.uniform(0.55, 1.0) if i % 2 else rng.uniform(0.0, 0.35))
        for i in range(len(xs))
    ]
    return (
        [(-0.2 * s, s), (-0.2 * s, base)]
        + list(zip(xs.tolist(), ys))
        + [(1.2 * s, base), (1.2 * s, s)]
    )


def _grass(d, rng, s, y0, colour: Colour, n: int) -> None:
    for _ in range(n):
        x, y = rng.uniform(0, s), rng.uniform(y0, s)
        ln = (y - y0) / (s - y0 + 1) * 0.06 * s + 1
        d.line([(x, y), (x + rng.normal(0, 1), y - ln)], fill=_c(rng, colour, 25), width=1)


def _round_tree(d, rng, x, y, size, leaf: Colour, trunk: Colour = (90, 60, 35)) -> None:
    d.rectangle([x - size * 0.08, y - size * 0.5, x + size * 0.08, y], fill=_c(rng, trunk, 10))
    for _ in range(int(rng.integers(2, 5))):
        ox, oy = rng.normal(0, size * 0.15), rng.normal(0, size * 0.1)
        r = size * rng.uniform(0.3, 0.45)
        cy = y - size * 0.75 + oy
        d.ellipse([x + ox - r, cy - r, x + ox + r, cy + r], fill=_c(rng, leaf, 14))


def _conifer(d, rng, x, y, size, leaf: Colour, snow: bool) -> None:
    d.rectangle([x - size * 0.05, y - size * 0.2, x + size * 0.05, y], fill=(70, 50, 35))
    col = _c(rng, leaf, 10)
    for k in range(3):
        top = y - size * (0.45 + 0.3 * k)
        half = size * (0.32 - 0.07 * k)
        bot = y - size * (0.15 + 0.3 * k)
        d.polygon([(x - half, bot), (x + half, bot), (x, top)], fill=col)
        if snow:
            d.polygon(
                [
                    (x - half * 0.4, top + (bot - top) * 0.4),
                    (x + half * 0.4, top + (bot - top) * 0.4),
                    (x, top),
                ],
                fill=(235, 240, 245),
            )


def _house(d, rng, x, y, w, h, wall: Colour, roof: Colour, lit: bool) -> None:
    d.rectangle([x, y - h, x + w, y], fill=_c(rng, wall, 20))
    d.polygon(
        [(x - w * 0.1, y - h), (x + w * 1.1, y - h), (x + w / 2, y - h - w * 0.5)],
        fill=_c(rng, roof, 15),
    )
    win = (250, 215, 120) if lit else (70, 85, 110)
    for k in range(int(rng.integers(1, 3))):
        wx = x + w * (0.2 + 0.45 * k)
        d.rectangle([wx, y - h * 0.7, wx + w * 0.2, y - h * 0.4], fill=win)


def _rain(d, rng, s, n: int) -> None:
    for _ in range(n):
        x, y = rng.uniform(0, s), rng.uniform(0, s)
        d.line([(x, y), (x - 1.5, y + 0.06 * s)], fill=(190, 195, 205), width=1)


# --- scenes -------------------------------------------------------------------------------------
# Each painter draws onto the canvas below the sky and may return the horizon it used.


def _open_ocean(d, rng, s, h, a, light) -> None:
    top = _c(rng, (25, 70, 120), 15)
    for y in range(h, s):
        t = (y - h) / max(1, s - h)
        d.line([(0, y), (s, y)], fill=_lerp(top, _c(rng, (10, 45, 95), 3), t))
    for _ in range(int(rng.integers(40, 120))):
        y = rng.uniform(h + 1, s)
        t = (y - h) / (s - h)
        x, ln = rng.uniform(0, s), (0.02 + 0.12 * t) * s
        d.line([(x, y), (x + ln, y)], fill=_c(rng, (200, 220, 235), 20), width=1 + int(t * 2))
    if light in ("golden", "dusk"):  # broken glitter path under a low sun
        cx = rng.uniform(0.3, 0.7) * s
        for y in range(h + 1, s, 3):
            w = (y - h) * 0.12 + 1
            x = cx + rng.normal(0, w * 0.5)
            d.line(
                [(x - w * rng.uniform(0.2, 0.8), y), (x + w * rng.uniform(0.2, 0.8), y)],
                fill=_c(rng, (245, 185, 120), 15),
            )
    if rng.random() < 0.2:  # a distant ship
        x = rng.uniform(0.1, 0.8) * s
        d.rectangle([x, h - 0.02 * s, x + 0.08 * s, h + 0.005 * s], fill=(60, 60, 65))


def _coast(d, rng, s, h, a, light) -> None:
    _open_ocean(d, rng, s, h, a, light)
    warm = a["temperature_c"] > 18
    sand = _c(rng, (225, 205, 160) if warm else (150, 140, 125), 15)
    shore = h + rng.uniform(0.2, 0.45) * (s - h)
    slope = rng.uniform(-0.4, 0.4) * s
    d.polygon([(0, shore + slope / 2), (s, shore - slope / 2), (s, s), (0, s)], fill=sand)
    d.line([(0, shore + slope / 2), (s, shore - slope / 2)], fill=(245, 248, 250), width=3)
    for _ in range(int(rng.integers(5, 30))):  # pebbles / shells
        x, y = rng.uniform(0, s), rng.uniform(shore + abs(slope) / 2, s)
        r = rng.uniform(0.3, 1.2)
        d.ellipse([x - r, y - r, x + r, y + r], fill=_c(rng, (120, 110, 100), 25))
    if warm and rng.random() < 0.6:  # palms
        for _ in range(int(rng.integers(1, 3))):
            x, y = rng.uniform(0.05, 0.95) * s, rng.uniform(shore + 5, s)
            tall = rng.uniform(0.25, 0.45) * s
            d.line([(x, y), (x + rng.normal(0, 4), y - tall)], fill=(110, 80, 50), width=3)
            for ang in np.linspace(0, 2 * np.pi, 7)[:-1]:
                d.line(
                    [
                        (x, y - tall),
                        (x + np.cos(ang) * 0.1 * s, y - tall + np.sin(ang) * 0.04 * s + 3),
                    ],
                    fill=(40, 110, 40),
                    width=2,
                )
    elif rng.random() < 0.5:  # cliff or rocks
        x = rng.choice([0.0, 0.75]) * s
        d.polygon(
            [(x, shore + 4), (x + 0.1 * s, h - 0.15 * s), (x + 0.25 * s, shore)],
            fill=_c(rng, (95, 90, 80)),
        )


def _rainforest(d, rng, s, h, a, light) -> None:
    d.rectangle([0, h, s, s], fill=_c(rng, (30, 60, 25), 8))
    for layer in range(4):
        y0 = h - 0.15 * s + layer * 0.22 * s
        shade = 0.55 + 0.15 * layer
        for _ in range(int(rng.integers(12, 24))):
            x, y = rng.uniform(-0.05, 1.05) * s, y0 + rng.uniform(0, 0.25 * s)
            r = rng.uniform(0.05, 0.13) * s
            g = _c(rng, (int(30 * shade), int(120 * shade), int(40 * shade)), 18)
            d.ellipse([x - r, y - r * 0.8, x + r, y + r * 0.8], fill=g)
        if layer == 2:
            for _ in range(int(rng.integers(2, 6))):
                x = rng.uniform(0, s)
                d.line([(x, y0), (x + rng.normal(0, 2), s)], fill=(80, 60, 40), width=2)
    if rng.random() < 0.4:  # vines and flowers
        for _ in range(int(rng.integers(3, 9))):
            x, y = rng.uniform(0, s), rng.uniform(h, s)
            d.ellipse([x - 1, y - 1, x + 1, y + 1], fill=_c(rng, (220, 60, 90), 30))


def _savanna(d, rng, s, h, a, light) -> None:
    grass = _c(rng, (200, 170, 85) if a["wetness"] < 0.5 else (170, 170, 80), 15)
    d.rectangle([0, h, s, s], fill=grass)
    _grass(d, rng, s, h, (150, 125, 60), int(rng.integers(60, 140)))
    for _ in range(int(rng.integers(1, 5))):  # acacias: thin trunks, flat crowns
        x = rng.uniform(0.05, 0.95) * s
        y = h + rng.uniform(0.05, 0.5) * (s - h)
        sz = (0.08 + 0.25 * (y - h) / (s - h)) * s
        d.line([(x, y), (x, y - sz)], fill=(70, 50, 30), width=max(1, int(sz / 12)))
        d.ellipse(
            [x - sz * 0.7, y - sz * 1.15, x + sz * 0.7, y - sz * 0.85],
            fill=_c(rng, (70, 90, 35), 12),
        )
    if rng.random() < 0.4:  # grazing animals far away
        for _ in range(int(rng.integers(2, 7))):
            x, y = rng.uniform(0, s), h + rng.uniform(0.02, 0.15) * (s - h)
            d.ellipse([x, y - 2, x + 4, y], fill=(60, 45, 30))


def _desert(d, rng, s, h, a, light) -> None:
    hot = a["temperature_c"] > 15
    sand = (225, 180, 115) if hot else (185, 165, 135)
    for k in range(4):
        col = _lerp(_c(rng, sand, 12), (255, 230, 180), 0.1 * k)
        d.polygon(_ridge(rng, s, h + k * (s - h) / 4, rng.uniform(0.02, 0.1) * s), fill=col)
    if a["ruggedness"] > 0.3 or rng.random() < 0.25:  # a mesa on the horizon
        x = rng.uniform(0, 0.7) * s
        w = rng.uniform(0.1, 0.3) * s
        d.polygon(
            [
                (x, h + 1),
                (x + 0.05 * s, h - 0.1 * s),
                (x + w, h - 0.1 * s),
                (x + w + 0.05 * s, h + 1),
            ],
            fill=_c(rng, (170, 110, 70)),
        )
    for _ in range(int(rng.integers(0, 4))):  # scrub
        x, y = rng.uniform(0, s), rng.uniform(h, s)
        d.ellipse([x - 1.5, y - 1, x + 1.5, y + 1], fill=(120, 110, 70))


def _grassland(d, rng, s, h, a, light) -> None:
    base = _lerp((200, 185, 100), (95, 160, 60), float(a["wetness"]))
    for k in range(3):
        d.polygon(
            _ridge(rng, s, h + k * (s - h) / 3, (0.02 + 0.08 * a["ruggedness"]) * s),
            fill=_c(rng, _lerp(base, (60, 110, 40), 0.15 * k), 12),
        )
    _grass(d, rng, s, h, _lerp(base, (40, 90, 30), 0.4), int(rng.integers(80, 200)))
    for _ in range(int(rng.integers(0, 25))):  # wild flowers
        x, y = rng.uniform(0, s), rng.uniform(h, s)
        d.point((x, y), fill=_c(rng, (230, 220, 90), 40))


def _farmland(d, rng, s, h, a, light) -> None:
    vx = rng.uniform(0.2, 0.8) * s
    crops = [(120, 170, 60), (215, 190, 90), (140, 105, 65), (90, 150, 50), (200, 200, 120)]
    xs = np.sort(rng.uniform(-1.5 * s, 2.5 * s, int(rng.integers(6, 14))))
    xs = np.concatenate([[-3 * s], xs, [4 * s]])
    for x0, x1 in zip(xs[:-1], xs[1:]):
        col = _c(rng, crops[int(rng.integers(len(crops)))], 14)
        d.polygon([(vx, h), (x0, s * 1.5), (x1, s * 1.5)], fill=col)
        # furrows converge on the vanishing point
        for t in np.linspace(0.1, 0.9, int(rng.integers(2, 5))):
            xf = x0 + (x1 - x0) * t
            d.line([(vx, h), (xf, s * 1.5)], fill=_lerp(col, (60, 50, 30), 0.3), width=1)
    if rng.random() < 0.7:  # tree line / farmstead on the horizon
        for _ in range(int(rng.integers(3, 10))):
            x = rng.uniform(0, s)
            r = rng.uniform(0.02, 0.04) * s
            d.ellipse([x - r, h - 2 * r, x + r, h], fill=_c(rng, (50, 90, 40), 10))
    if rng.random() < 0.5:
        x = rng.uniform(0.05, 0.8) * s
        _house(d, rng, x, h + 2, 0.1 * s, 0.06 * s, (160, 40, 35), (90, 70, 60), light == "night")
    if rng.random() < 0.5:  # fence posts
        for k in range(8):
            x = k * s / 7
            d.line([(x, s * 0.92), (x, s * 0.8)], fill=(100, 75, 50), width=2)
        d.line([(0, s * 0.84), (s, s * 0.84)], fill=(110, 85, 60), width=1)


def _temperate_forest(d, rng, s, h, a, light) -> None:
    autumn = a["temperature_c"] < 14 and rng.random() < 0.35
    palette = [(60, 120, 45), (80, 140, 55), (45, 100, 40)]
    if autumn:
        palette = [(200, 120, 40), (180, 60, 35), (210, 170, 50), (90, 120, 45)]
    d.rectangle([0, h, s, s], fill=_c(rng, (70, 90, 45), 10))
    d.polygon(_ridge(rng, s, h, 0.05 * s), fill=_c(rng, (55, 95, 60), 8))
    rows = int(rng.integers(3, 6))
    for k in range(rows):
        y = h + (k + 0.5) / rows * (s - h) * 1.1
        sz = (0.12 + 0.3 * k / rows) * s
        for _ in range(int(rng.integers(3, 8))):
            leaf = palette[int(rng.integers(len(palette)))]
            _round_tree(d, rng, rng.uniform(-0.05, 1.05) * s, y + rng.normal(0, 2), sz, leaf)


def _boreal_forest(d, rng, s, h, a, light) -> None:
    snow = a["temperature_c"] < 0 and rng.random() < 0.6
    d.rectangle([0, h, s, s], fill=(230, 235, 240) if snow else _c(rng, (80, 85, 55), 10))
    rows = int(rng.integers(3, 6))
    for k in range(rows):
        y = h + (k + 0.3) / rows * (s - h) * 1.1
        sz = (0.15 + 0.45 * k / rows) * s
        for _ in range(int(rng.integers(4, 10))):
            _conifer(
                d, rng, rng.uniform(-0.05, 1.05) * s, y + rng.normal(0, 2), sz, (25, 65, 45), snow
            )


def _tundra(d, rng, s, h, a, light) -> None:
    base = _c(rng, (125, 120, 90), 15)
    d.rectangle([0, h, s, s], fill=base)
    if rng.random() < 0.6:
        d.polygon(_ridge(rng, s, h + 1, 0.04 * s), fill=_c(rng, (110, 105, 95), 8))
    for _ in range(int(rng.integers(20, 60))):  # lichen, moss, stones
        x, y = rng.uniform(0, s), rng.uniform(h, s)
        r = rng.uniform(0.5, 2.5)
        col = [(150, 110, 70), (90, 110, 60), (140, 140, 135), (170, 160, 120)][
            int(rng.integers(4))
        ]
        d.ellipse([x - r, y - r * 0.5, x + r, y + r * 0.5], fill=_c(rng, col, 12))
    for _ in range(int(rng.integers(0, 4))):  # meltwater pools
        x, y = rng.uniform(0, s), rng.uniform(h + 3, s)
        w = rng.uniform(0.05, 0.15) * s
        d.ellipse([x - w, y - w * 0.15, x + w, y + w * 0.15], fill=_c(rng, (120, 140, 160), 10))
    if a["temperature_c"] < -4 and rng.random() < 0.5:  # snow patches
        for _ in range(int(rng.integers(2, 6))):
            x, y = rng.uniform(0, s), rng.uniform(h, s)
            w = rng.uniform(0.05, 0.2) * s
            d.ellipse([x - w, y - w * 0.1, x + w, y + w * 0.1], fill=(235, 238, 242))


def _ice(d, rng, s, h, a, light) -> None:
    d.rectangle([0, h, s, s], fill=_c(rng, (225, 232, 240), 6))
    if rng.random() < 0.6:  # ice cliffs or nunataks on the horizon
        d.polygon(
            _peaks(rng, s, h + 1, 0.08 * s, int(rng.integers(2, 5))),
            fill=_c(rng, (200, 215, 230), 8),
        )
    for _ in range(int(rng.integers(5, 20))):  # sastrugi and ridges
        y = rng.uniform(h + 2, s)
        x, ln = rng.uniform(0, s), rng.uniform(0.05, 0.3) * s
        d.line([(x, y), (x + ln, y + rng.normal(0, 1))], fill=_c(rng, (185, 205, 225), 8), width=1)
    if rng.random() < 0.3:  # a crevasse
        x = rng.uniform(0.1, 0.9) * s
        d.line([(x, h + 3), (x + rng.normal(0, 8), s)], fill=(120, 160, 200), width=2)


def _mountains(d, rng, s, h, a, light) -> None:
    snowline = 0.35 + 0.5 * np.clip((a["temperature_c"] + 5) / 30, 0, 1)
    far = _c(rng, (120, 130, 150), 10)
    near = _c(rng, (105, 90, 75), 15)
    for k, col in enumerate([far, _lerp(far, near, 0.5), near]):
        top = h - (0.45 - 0.1 * k) * s
        pts = _peaks(rng, s, h + k * 0.1 * s, h + k * 0.1 * s - top, int(rng.integers(2, 5)))
        d.polygon(pts, fill=col)
        if a["temperature_c"] < 12 or rng.random() < 0.4:
            # snow caps: the peak tips above the snowline
            for (x0, y0), (x1, y1), (x2, y2) in zip(pts[1:-2], pts[2:-1], pts[3:]):
                if y1 < y0 and y1 < y2 and (h - y1) > snowline * (h - top):
                    f = 0.3
                    d.polygon(
                        [
                            (x1 + (x0 - x1) * f, y1 + (y0 - y1) * f),
                            (x1, y1),
                            (x1 + (x2 - x1) * f, y1 + (y2 - y1) * f),
                        ],
                        fill=(240, 242, 248),
                    )
    green = a["wetness"] > 0.4
    d.polygon(
        _ridge(rng, s, s * 0.85, 0.05 * s),
        fill=_c(rng, (70, 110, 50) if green else (130, 115, 90), 12),
    )


def _town(d, rng, s, h, a, light) -> None:
    lit = light in ("night", "dusk")
    d.rectangle([0, h, s, s], fill=_c(rng, (95, 130, 70), 15))
    n = int(rng.integers(3, 9))
    walls = [(230, 220, 200), (210, 180, 150), (240, 240, 235), (200, 150, 120), (180, 190, 200)]
    roofs = [(160, 60, 45), (90, 80, 80), (120, 70, 50), (60, 70, 90)]
    if rng.random() < 0.4:  # a church tower
        x = rng.uniform(0.1, 0.85) * s
        d.rectangle([x, h - 0.25 * s, x + 0.06 * s, h + 2], fill=_c(rng, (200, 195, 185)))
        d.polygon(
            [(x - 1, h - 0.25 * s), (x + 0.06 * s + 1, h - 0.25 * s), (x + 0.03 * s, h - 0.36 * s)],
            fill=(80, 90, 100),
        )
    for i in range(n):
        w = rng.uniform(0.1, 0.2) * s
        x = (i + rng.uniform(0, 0.4)) * s / n - 0.05 * s
        _house(
            d,
            rng,
            x,
            h + rng.uniform(0.02, 0.1) * s,
            w,
            w * rng.uniform(0.6, 1.0),
            walls[int(rng.integers(len(walls)))],
            roofs[int(rng.integers(len(roofs)))],
            lit,
        )
    road_y = h + rng.uniform(0.3, 0.45) * (s - h)
    d.rectangle([0, road_y, s, road_y + 0.12 * s], fill=_c(rng, (90, 90, 92), 8))
    for k in range(6):
        d.line(
            [(k * s / 5, road_y + 0.06 * s), (k * s / 5 + 0.08 * s, road_y + 0.06 * s)],
            fill=(230, 230, 220),
        )
    for _ in range(int(rng.integers(1, 5))):
        _round_tree(
            d,
            rng,
            rng.uniform(0, s),
            s * rng.uniform(0.85, 1.0),
            rng.uniform(0.2, 0.35) * s,
            (60, 120, 50),
        )
    if lit:
        for _ in range(3):
            x = rng.uniform(0, s)
            d.ellipse(
                [x - 2, road_y - 0.2 * s - 2, x + 2, road_y - 0.2 * s + 2], fill=(255, 220, 140)
            )


def _city_centre(d, rng, s, h, a, light) -> None:
    lit = light in ("night", "dusk")
    facades = [(120, 130, 145), (170, 170, 165), (90, 110, 140), (200, 195, 185), (60, 70, 85)]
    for layer in range(2):
        x = -rng.uniform(0, 0.1) * s
        while x < s:
            w = rng.uniform(0.1, 0.22) * s
            tall = rng.uniform(0.35, 0.8 if layer == 0 else 0.6) * s
            col = _c(rng, facades[int(rng.integers(len(facades)))], 14)
            if layer == 1:
                col = _lerp(col, (40, 40, 45), 0.2)
            top = h + 0.1 * s - tall + layer * 0.15 * s
            d.rectangle([x, top, x + w, s], fill=col)
            win_on = (245, 210, 110) if lit else _lerp(col, (200, 220, 240), 0.5)
            win_off = _lerp(col, (20, 20, 30), 0.5)
            for wy in np.arange(top + 2, s * 0.85, 4):
                for wx in np.arange(x + 2, x + w - 2, 4):
                    on = rng.random() < (0.6 if lit else 0.8)
                    d.rectangle([wx, wy, wx + 1.5, wy + 1.5], fill=win_on if on else win_off)
            x += w + rng.uniform(0.0, 0.04) * s
    d.rectangle([0, s * 0.85, s, s], fill=(70, 70, 74))
    for _ in range(int(rng.integers(2, 7))):  # cars
        x = rng.uniform(0, s)
        y = s * rng.uniform(0.87, 0.95)
        d.rectangle([x, y, x + 0.08 * s, y + 0.04 * s], fill=_c(rng, (150, 150, 150), 70))
        if lit:
            d.point((x + 0.08 * s, y + 0.02 * s), fill=(255, 240, 200))


_PAINTERS: dict[str, Callable[..., None]] = {
    "open_ocean": _open_ocean,
    "coast": _coast,
    "tropical_rainforest": _rainforest,
    "savanna": _savanna,
    "desert": _desert,
    "grassland": _grassland,
    "farmland": _farmland,
    "temperate_forest": _temperate_forest,
    "boreal_forest": _boreal_forest,
    "tundra": _tundra,
    "ice": _ice,
    "mountains": _mountains,
    "town": _town,
    "city_centre": _city_centre,
}

# Horizon height (fraction of the image) range per scene: forests and cities crowd the sky.
_HORIZON: dict[str, tuple[float, float]] = {
    "tropical_rainforest": (0.2, 0.35),
    "city_centre": (0.45, 0.6),
    "mountains": (0.55, 0.7),
    "farmland": (0.3, 0.45),
}


def _light(rng: np.random.Generator, scene: str, a: dict[str, Any]) -> str:
    if scene in ("city_centre", "town") and rng.random() < 0.25:
        return "night"
    if scene in ("ice", "tundra") or a["temperature_c"] < -5:
        return str(rng.choice(["polar", "overcast", "day", "golden"], p=[0.45, 0.3, 0.15, 0.1]))
    if scene == "desert":
        return str(rng.choice(["hazy", "day", "golden"], p=[0.5, 0.35, 0.15]))
    if scene == "tropical_rainforest":
        return str(rng.choice(["hazy", "overcast", "day"], p=[0.45, 0.3, 0.25]))
    cloudy = float(np.clip(a["wetness"], 0, 1)) * 0.4
    return str(
        rng.choice(["day", "overcast", "golden", "dusk"], p=[0.7 - cloudy, cloudy, 0.18, 0.12])
    )


def render_ground(
    scene: str, attrs: dict[str, Any], rng: np.random.Generator, size: int = 64
) -> Image.Image:
    """Draw a ground-level photo of ``scene`` with the place's ``attrs`` (as in the manifests:
    ``temperature_c``, ``wetness``, ``ruggedness``, ``population_density``)."""
    s = 2 * size
    light = _light(rng, scene, attrs)
    lo, hi = _HORIZON.get(scene, (0.38, 0.6))
    h = int(rng.uniform(lo, hi) * s)
    canvas = Image.fromarray(_sky(rng, light, s, h).astype(np.uint8))
    d = ImageDraw.Draw(canvas)
    if light == "night":
        for _ in range(int(rng.integers(5, 30))):
            d.point((rng.uniform(0, s), rng.uniform(0, h)), fill=(220, 220, 200))
    elif light in ("day", "golden", "dusk", "polar") and rng.random() < 0.5:
        sx, sy = rng.uniform(0.1, 0.9) * s, rng.uniform(0.1, 0.8) * h
        r = 0.04 * s
        sun = {"golden": (255, 210, 140), "dusk": (255, 150, 100)}.get(light, (255, 250, 225))
        d.ellipse([sx - r, sy - r, sx + r, sy + r], fill=sun)
    n_clouds = int(rng.integers(0, 3) + (5 if light == "overcast" else 0) + 3 * attrs["wetness"])
    _clouds(d, rng, s, h, n_clouds, light)
    _PAINTERS[scene](d, rng, s, h, attrs, light)
    if scene not in ("town", "city_centre", "open_ocean", "ice") and rng.random() < min(
        0.5, float(attrs["population_density"]) / 200.0
    ):  # signs of people in the countryside: a pole line
        x = rng.uniform(0, s)
        d.line([(x, h + 0.3 * (s - h)), (x, h - 0.05 * s)], fill=(70, 60, 50), width=2)
    if light == "overcast" and attrs["wetness"] > 0.55 and rng.random() < 0.5:
        _rain(d, rng, s, int(rng.integers(20, 60)))
    arr = np.asarray(canvas, dtype=np.float32)
    if light == "night" and scene not in ("town", "city_centre"):
        arr *= 0.35
    elif light == "dusk":
        arr *= 0.8
    arr += rng.normal(0.0, rng.uniform(2.0, 7.0), arr.shape).astype(np.float32)  # sensor noise
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))  # slight defocus
    return img.resize((size, size), Image.Resampling.LANCZOS)


__all__ = ["render_ground"]
