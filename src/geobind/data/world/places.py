"""Places on the real Earth: candidate sampling, scene rules, attributes and nearest cities.

A place's scene follows from real data, in priority order: sea (open ocean or coast, by the land
fraction around it), the gazetteer (city centre or town), a mixed land/sea neighbourhood (coast),
snow and ice (Koeppen ``EF`` or white Blue Marble pixels), relief (mountains), then climate
(Koeppen-Geiger) refined by the Blue Marble colour (dark green = closed forest) and population
density (dense countryside = farmland).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geobind.data.world.geodata import (
    BM_H,
    BM_W,
    FEAT_BLOCK,
    Geo,
    bm_index,
    city_radius_km,
    latlon_to_xyz,
)
from geobind.data.world.scenes import SCENE_INDEX

EARTH_RADIUS_KM = 6371.0
# Places stay off the polar caps, where an equirectangular tile degenerates.
MAX_ABS_LAT = 80.0

# Typical annual mean temperature (deg C) and wetness (0..1) of each Koeppen-Geiger zone.
_KG_TEMP = {
    "Af": 26, "Am": 26, "As": 26, "Aw": 25, "BSh": 23, "BSk": 10, "BWh": 25, "BWk": 11,
    "Cfa": 16, "Cfb": 10, "Cfc": 5, "Csa": 17, "Csb": 13, "Csc": 7, "Cwa": 19, "Cwb": 15,
    "Cwc": 8, "Dfa": 8, "Dfb": 4, "Dfc": -3, "Dfd": -12, "Dsa": 8, "Dsb": 4, "Dsc": -2,
    "Dsd": -10, "Dwa": 6, "Dwb": 2, "Dwc": -5, "Dwd": -13, "EF": -25, "ET": -7,
}  # fmt: skip
_KG_WET = {
    "Af": 0.95, "Am": 0.85, "As": 0.55, "Aw": 0.55, "BSh": 0.2, "BSk": 0.25, "BWh": 0.03,
    "BWk": 0.06, "EF": 0.2, "ET": 0.45, "Ocean": 1.0,
}  # fmt: skip
_KG_WET_BY_SEASON = {"f": 0.75, "s": 0.4, "w": 0.55}

TEMPERATURE_BANDS: tuple[tuple[float, str], ...] = (
    (-5.0, "freezing"),
    (5.0, "cold"),
    (14.0, "mild"),
    (21.0, "warm"),
    (np.inf, "hot"),
)
BOREAL = {"Dfc", "Dfd", "Dwc", "Dwd", "Dsc", "Dsd", "Cfc"}
# Density (people / km^2) above which open countryside is farmed.
FARM_DENSITY = 25.0
FARM_DENSITY_DRY = 120.0


@dataclass
class Places:
    """Columnar table of places (all arrays have the same length)."""

    lat: np.ndarray
    lon: np.ndarray
    scene: np.ndarray  # int index into SCENES
    attrs: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.lat)

    def take(self, idx: np.ndarray) -> Places:
        """The places selected by ``idx`` (integer indices or a boolean mask), as a new table."""
        return Places(
            self.lat[idx],
            self.lon[idx],
            self.scene[idx],
            {k: v[idx] for k, v in self.attrs.items()},
        )


def temperature_band(temp_c: np.ndarray) -> np.ndarray:
    """Names the band ("freezing" .. "hot") of each temperature."""
    edges = np.array([e for e, _ in TEMPERATURE_BANDS[:-1]])
    names = np.array([n for _, n in TEMPERATURE_BANDS])
    return names[np.searchsorted(edges, temp_c)]


def describe(geo: Geo, lat: np.ndarray, lon: np.ndarray) -> Places:
    """Scene and attributes of arbitrary points, from the real rasters only (deterministic)."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    r, c = bm_index(lat, lon)
    fr, fc = r // FEAT_BLOCK, c // FEAT_BLOCK
    land = geo.land[r, c]
    lf = geo.land_frac[fr, fc]
    col = geo.colour[fr, fc]
    rug = geo.rugged[fr, fc] * land
    dens = geo.density[fr, fc].astype(np.float64)
    urb = geo.urban[r, c]
    kr, kc = bm_index(lat, lon, 36)
    kz = np.array(geo.koeppen_names, dtype=object)[geo.koeppen[kr, kc]]
    group = np.array([z[:1] if z else "" for z in kz])
    bright = col.mean(axis=-1)
    green = col[:, 1] - 0.5 * (col[:, 0] + col[:, 2])
    white = col.min(axis=-1)
    rainy = np.isin(kz, ["Af", "Am"])

    s = SCENE_INDEX
    forest_dark = (bright < 0.15) & (green > 0.03)
    tropical = np.where(
        (rainy & (bright < 0.16)) | (bright < 0.11),
        s["tropical_rainforest"],
        np.where(dens > FARM_DENSITY_DRY, s["farmland"], s["savanna"]),
    )
    dry = np.where(
        dens > FARM_DENSITY_DRY,
        s["farmland"],
        np.select(
            [kz == "BWh", kz == "BWk", kz == "BSh"],
            [s["desert"]] * 2 + [s["savanna"]],
            s["grassland"],
        ),
    )
    boreal = np.where(bright > 0.4, s["tundra"], s["boreal_forest"])
    temperate = np.select(
        [forest_dark, dens > FARM_DENSITY], [s["temperate_forest"], s["farmland"]], s["grassland"]
    )
    scene = np.select(
        [
            ~land & (lf < 0.12),
            ~land,
            urb == 2,
            urb == 1,
            (lf < 0.7) | (kz == "Ocean"),
            (kz == "EF") | (white > 0.7),
            (rug > 0.65) | ((kz == "ET") & (rug > 0.45)),
            kz == "ET",
            group == "A",
            group == "B",
            np.isin(kz, list(BOREAL)),
        ],
        [
            s["open_ocean"],
            s["coast"],
            s["city_centre"],
            s["town"],
            s["coast"],
            s["ice"],
            s["mountains"],
            s["tundra"],
            tropical,
            dry,
            boreal,
        ],
        temperate,
    ).astype(np.int64)

    base_t = np.array([_KG_TEMP.get(z, np.nan) for z in kz], dtype=np.float64)
    sea_t = 29.0 * np.cos(np.radians(lat)) ** 2 - 1.5
    temp = np.where(np.isnan(base_t) | ~land, sea_t, base_t - 6.0 * rug)
    wet_kg = np.array(
        [_KG_WET.get(z, _KG_WET_BY_SEASON.get(z[1:2], 0.5)) if z else 0.5 for z in kz]
    )
    wet = np.where(land, np.clip(0.6 * wet_kg + 0.4 * np.clip(green / 0.08, 0, 1), 0, 1), 1.0)
    attrs = {
        "climate": np.where(land, kz, "Ocean").astype(str),
        "temperature_c": np.round(temp, 1),
        "temperature_band": temperature_band(temp),
        "wetness": np.round(wet, 3),
        "ruggedness": np.round(rug.astype(np.float64), 3),
        "population_density": np.round(np.where(land, dens, 0.0), 1),
        "land_fraction": np.round(lf.astype(np.float64), 3),
    }
    return Places(lat, lon, scene, attrs)


def _uniform_sphere(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    z0, z1 = np.sin(np.radians([-MAX_ABS_LAT, MAX_ABS_LAT]))
    lat = np.degrees(np.arcsin(rng.uniform(z0, z1, n)))
    lon = rng.uniform(-180.0, 180.0, n)
    return lat, lon


def _near_cities(geo: Geo, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One point per city, inside its dense centre (big cities) or its built-up area (towns).

    Random points almost never fall inside a city, so urban scenes are sampled here.
    """
    cities = geo.cities
    centre, town = city_radius_km(cities.pop)
    radius = np.where(centre > 0, centre, town) * np.sqrt(rng.uniform(0, 1, len(cities.pop)))
    angle = rng.uniform(0, 2 * np.pi, len(cities.pop))
    dlat = radius * np.cos(angle) / 111.32
    dlon = radius * np.sin(angle) / (111.32 * np.maximum(np.cos(np.radians(cities.lat)), 0.1))
    lat = np.clip(cities.lat + dlat, -MAX_ABS_LAT, MAX_ABS_LAT)
    lon = (cities.lon + dlon + 180.0) % 360.0 - 180.0
    return lat, lon


def candidates(geo: Geo, rng: np.random.Generator, n_uniform: int) -> Places:
    """A pool of candidate places: uniform on the sphere plus one near every city.

    At most one candidate per Blue Marble pixel, so no two places share satellite pixels at
    their centre.
    """
    ulat, ulon = _uniform_sphere(rng, n_uniform)
    clat, clon = _near_cities(geo, rng)
    lat = np.concatenate([clat, ulat])
    lon = np.concatenate([clon, ulon])
    r, c = bm_index(lat, lon)
    _, first = np.unique(r * BM_W + c, return_index=True)
    keep = np.sort(first)
    return describe(geo, lat[keep], lon[keep])


def grid_points(geo: Geo, step_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Cell centres of a regular ``step_deg`` grid over the whole Earth that lie on land."""
    lats = 90.0 - step_deg * (np.arange(int(round(180 / step_deg))) + 0.5)
    lons = -180.0 + step_deg * (np.arange(int(round(360 / step_deg))) + 0.5)
    la, lo = np.meshgrid(lats, lons, indexing="ij")
    la, lo = la.ravel(), lo.ravel()
    r, c = bm_index(la, lo)
    land = geo.land[np.clip(r, 0, BM_H - 1), c]
    return la[land], lo[land]


_COMPASS = (
    "north",
    "north-east",
    "east",
    "south-east",
    "south",
    "south-west",
    "west",
    "north-west",
)


def nearest_city(
    geo: Geo, lat: np.ndarray, lon: np.ndarray, min_pop: np.ndarray | float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index of the nearest gazetteer city (population >= ``min_pop``, per point or scalar),
    its great-circle distance in km, and the compass direction from the city to the point."""
    cities = geo.cities
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    min_pop = np.broadcast_to(np.asarray(min_pop, dtype=np.float64), lat.shape)
    xyz = latlon_to_xyz(lat, lon)
    idx = np.empty(len(lat), dtype=np.int64)
    for thr in np.unique(min_pop):
        rows = np.flatnonzero(min_pop == thr)
        pool = np.flatnonzero(cities.pop >= thr)
        for s in range(0, len(rows), 2048):
            chunk = rows[s : s + 2048]
            idx[chunk] = pool[np.argmax(xyz[chunk] @ cities.xyz[pool].T, axis=1)]
    cos = np.clip(np.sum(xyz * cities.xyz[idx], axis=1), -1.0, 1.0)
    km = np.degrees(np.arccos(cos)) * np.pi / 180.0 * EARTH_RADIUS_KM
    dlat = lat - cities.lat[idx]
    dlon = ((lon - cities.lon[idx] + 180.0) % 360.0 - 180.0) * np.cos(np.radians(lat))
    sector = np.round(np.degrees(np.arctan2(dlon, dlat)) / 45.0).astype(np.int64) % 8
    return idx, km, np.array(_COMPASS)[sector]


def cell_of(lat: np.ndarray, lon: np.ndarray, cell_deg: float) -> np.ndarray:
    """Integer id of the ``cell_deg`` x ``cell_deg`` geographic cell holding each point."""
    n_lon = int(np.ceil(360.0 / cell_deg))
    row = np.floor((90.0 - np.asarray(lat)) / cell_deg).astype(np.int64)
    col = np.floor((np.asarray(lon) + 180.0) / cell_deg).astype(np.int64) % n_lon
    return row * n_lon + col


def distance_to_cell_edge_km(lat: np.ndarray, lon: np.ndarray, cell_deg: float) -> np.ndarray:
    """Great-circle distance from each point to the boundary of its own cell.

    Two points in different cells are at least the sum of their two distances apart (the path
    between them leaves one cell and enters the other), which is what the split buffer relies on.
    """
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    top = 90.0 - np.floor((90.0 - lat) / cell_deg) * cell_deg
    bottom = top - cell_deg
    dlat = np.minimum(top - lat, lat - bottom)
    # The pole is a point of the polar cells, not part of their boundary.
    dlat = np.where(top >= 90.0, lat - bottom, np.where(bottom <= -90.0, top - lat, dlat))
    west = -180.0 + np.floor((lon + 180.0) / cell_deg) * cell_deg
    dlon = np.minimum(lon - west, west + cell_deg - lon)
    # Distance to a meridian: asin(cos(lat) * sin(dlon)).
    across = np.degrees(
        np.arcsin(np.clip(np.cos(np.radians(lat)) * np.sin(np.radians(dlon)), 0, 1))
    )
    return np.minimum(dlat, across) * np.pi / 180.0 * EARTH_RADIUS_KM


__all__ = [
    "Places",
    "candidates",
    "cell_of",
    "describe",
    "distance_to_cell_edge_km",
    "grid_points",
    "nearest_city",
    "temperature_band",
]
