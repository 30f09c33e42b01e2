"""Seeded generators of datasets in the published layouts (Sat2Cap shards, SoundingEarth,
GeoTIFF tiles) and of datasets with known bad files. No binary blobs: everything is made here."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from fixtures import CLASSES, COLORS, TONES
from PIL import Image


def _image(rng, c: int, size: int, ground: bool = False) -> np.ndarray:
    base = COLORS[c][::-1] if ground else COLORS[c]
    img = np.clip(base + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    if ground:
        img[: size // 3] = [135, 180, 235]
    return img


def _encode(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt)
    return buf.getvalue()


def _tone(rng, c: int, seconds: float = 1.0, rate: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    w = 0.3 * np.sin(2 * np.pi * TONES[c] * t * rng.uniform(0.95, 1.05)) + 0.05 * rng.normal(
        size=t.size
    )
    w = w.astype(np.float32)
    return np.stack([w, 0.5 * w], axis=1) if channels == 2 else w


def make_sat2cap(
    root: Path, n: int = 36, shard_size: int = 10, seed: int = 1, image_size: int = 40,
    keys_per_shard: bool = False,
) -> Path:
    """Sat2Cap-style shards: ``<key>.overhead.jpg``, ``<key>.groundlevel.jpg``,
    ``<key>.metadata.json`` (latitude, longitude, date_taken); keys are Flickr-like numbers, or
    with ``keys_per_shard`` a counter that restarts in every shard (legal: keys need only be
    unique within a tar)."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in range((n + shard_size - 1) // shard_size):
        with wds.TarWriter(str(root / f"yfcc-{s:04d}.tar"), encoder=False, mtime=0.0) as w:
            for i in range(s * shard_size, min(n, (s + 1) * shard_size)):
                c = i % len(CLASSES)
                meta = {
                    "latitude": float(rng.uniform(-60, 60)),
                    "longitude": float(rng.uniform(-170, 170)),
                    "date_taken": f"2012-0{1 + i % 9}-1{i % 10} 12:00:00.0",
                }
                w.write(
                    {
                        "__key__": f"{i - s * shard_size:06d}" if keys_per_shard else f"{9000000 + i * 37}",
                        "overhead.jpg": _encode(_image(rng, c, image_size), "JPEG"),
                        "groundlevel.jpg": _encode(_image(rng, c, image_size, ground=True), "JPEG"),
                        "metadata.json": json.dumps(meta).encode(),
                    }
                )
    return root


def make_soundingearth(
    root: Path,
    n: int = 32,
    seed: int = 2,
    image_size: int = 40,
    image_dir: str = "images/googleEarth",
) -> Path:
    """A SoundingEarth folder as GeoCLAP lays it out: ``final_metadata_with_captions.csv``,
    ``images/googleEarth/{key}.jpg``, ``raw_audio/{long_key}/{mp3name}``. Recordings cycle
    through MP3, FLAC, WAV and OGG at 22.05/44.1/16 kHz, some stereo, 1-3 s long."""
    rng = np.random.default_rng(seed)
    (root / image_dir).mkdir(parents=True, exist_ok=True)
    formats = [
        ("mp3", "MP3", None),
        ("flac", "FLAC", None),
        ("wav", "WAV", None),
        ("ogg", "OGG", "VORBIS"),
    ]
    rates = [22050, 44100, 16000]
    rows = []
    for i in range(n):
        c = i % len(CLASSES)
        key = f"{100 + i}"
        long_key = f"aporee_{i:04d}_{1000 + 7 * i}"
        ext, fmt, subtype = formats[i % len(formats)]
        mp3name = f"rec_{i:04d}.{ext}"
        Image.fromarray(_image(rng, c, image_size)).save(
            root / image_dir / f"{key}.jpg", quality=92
        )
        (root / "raw_audio" / long_key).mkdir(parents=True, exist_ok=True)
        rate = rates[i % len(rates)]
        wave = _tone(rng, c, seconds=1.0 + (i % 3), rate=rate, channels=1 + (i % 2))
        sf.write(root / "raw_audio" / long_key / mp3name, wave, rate, format=fmt, subtype=subtype)
        rows.append(
            {
                "key": key,
                "long_key": long_key,
                "mp3name": mp3name,
                "latitude": float(rng.uniform(-60, 60)),
                "longitude": float(rng.uniform(-170, 170)),
                "description": f"the sound of a {CLASSES[c]} at dawn",
                "caption": f"This is a sound of {CLASSES[c]}. The location of the sound is somewhere.",
                "address": f"Somewhere {i}",
                "mp3samplerate": rate,
            }
        )
    pd.DataFrame(rows).to_csv(root / "final_metadata_with_captions.csv", index=False)
    return root / "final_metadata_with_captions.csv"


def write_geotiff(
    path: Path, data: np.ndarray, crs: str | None, left: float, top: float, res: float
) -> None:
    """A GeoTIFF with ``data`` [bands, H, W], north-up, ``res`` units per pixel."""
    import rasterio
    from rasterio.transform import from_origin

    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        height=data.shape[1],
        width=data.shape[2],
        count=data.shape[0],
        dtype=data.dtype,
        crs=crs,
        transform=from_origin(left, top, res, res),
    ) as dst:
        dst.write(data)


def make_geotiff(root: Path, seed: int = 3) -> dict[str, Path]:
    """Tiles in WGS84 and UTM (north and south), a 16-bit 4-band tile, one without a CRS, and
    a text sidecar. Returns their paths by name."""
    rng = np.random.default_rng(seed)
    px = 16
    rgb = lambda c: np.moveaxis(_image(rng, c, px), -1, 0)  # noqa: E731
    out = {}
    # WGS84, centred on (lat 48.0, lon 11.0): 16 px of 0.01 degrees.
    out["wgs84"] = root / "bavaria" / "wgs84.tif"
    write_geotiff(out["wgs84"], rgb(0), "EPSG:4326", 11.0 - 0.08, 48.0 + 0.08, 0.01)
    (root / "bavaria" / "wgs84.txt").write_text("a photo of a forest\n")
    # UTM 33N centred on the central meridian at the equator: exactly (0, 15).
    out["utm_north"] = root / "utm" / "north.tif"
    write_geotiff(out["utm_north"], rgb(1), "EPSG:32633", 500000 - 80, 0 + 80, 10)
    # UTM 33S (false northing 10,000 km), centred 100 km east of the central meridian.
    out["utm_south"] = root / "utm" / "south.tif"
    write_geotiff(out["utm_south"], rgb(2), "EPSG:32733", 600000 - 80, 10_000_000 + 80, 10)
    # Sentinel-2-like: 4 bands of uint16 reflectance.
    out["uint16"] = root / "s2" / "tile.tif"
    write_geotiff(
        out["uint16"],
        rng.integers(0, 4000, (4, px, px)).astype(np.uint16),
        "EPSG:4326",
        -3.0,
        40.0,
        0.001,
    )
    # No georeference at all.
    out["no_crs"] = root / "plain" / "nocrs.tif"
    write_geotiff(out["no_crs"], rgb(3), None, 0, 0, 1)
    return out


# --- known bad files -------------------------------------------------------------------------

# What `make_bad_manifest` breaks, by reason (one problem per bad row).
BAD_MANIFEST_REASONS = {
    "missing": 2,  # a satellite tile and a recording that do not exist
    "empty": 2,  # a 0-byte tile and a 0-byte recording
    "undecodable": 3,  # a truncated PNG, a text file named .png, a truncated WAV header
    "silent-zero-length": 1,  # a WAV with no frames
    "bad-coordinates": 2,  # latitude 95, longitude "abc"
    "empty-text": 1,  # an empty caption cell
}


def make_bad_manifest(root: Path, n: int = 24, seed: int = 4) -> Path:
    """A manifest of ``n`` rows (satellite, text, audio) with exactly the problems of
    :data:`BAD_MANIFEST_REASONS`, one per bad row, in rows 1..11."""
    rng = np.random.default_rng(seed)
    for d in ("sat", "audio"):
        (root / d).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        c = i % len(CLASSES)
        Image.fromarray(_image(rng, c, 32)).save(root / "sat" / f"{i:03d}.png")
        sf.write(root / "audio" / f"{i:03d}.wav", _tone(rng, c), 16000)
        rows.append(
            {
                "id": f"b{i:03d}",
                "lat": f"{rng.uniform(-60, 60):.5f}",
                "lon": f"{rng.uniform(-170, 170):.5f}",
                "satellite": f"sat/{i:03d}.png",
                "text": f"a {CLASSES[c]}",
                "audio": f"audio/{i:03d}.wav",
            }
        )
    (root / "sat" / "001.png").unlink()  # missing
    rows[2]["audio"] = "audio/nope.wav"  # missing
    (root / "sat" / "003.png").write_bytes(b"")  # empty
    (root / "audio" / "004.wav").write_bytes(b"")  # empty
    png = (root / "sat" / "005.png").read_bytes()
    (root / "sat" / "005.png").write_bytes(png[: len(png) // 2])  # truncated
    (root / "sat" / "006.png").write_text("this is not an image")  # undecodable
    (root / "audio" / "007.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEfmt ")  # truncated header
    sf.write(root / "audio" / "008.wav", np.zeros(0, np.float32), 16000)  # zero frames
    rows[9]["lat"] = "95.0"
    rows[10]["lon"] = "abc"
    rows[11]["text"] = ""
    path = root / "bad.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


BAD_SHARD_REASONS = {
    "missing-satellite": 1,  # a sample without its tile
    "undecodable": 1,  # a tile of garbage bytes
    "bad-metadata": 1,  # json that is not JSON
    "bad-coordinates": 1,  # latitude out of range
    "bad-shard": 1,  # the last sample of a truncated shard
    "duplicate-id": 1,  # a second sample with the id of the first
}


def make_bad_shards(root: Path, seed: int = 5) -> Path:
    """Two GeoBind-layout shards of 6 samples with exactly :data:`BAD_SHARD_REASONS`."""
    import webdataset as wds

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for s in range(2):
        path = root / f"part-{s}.tar"
        with wds.TarWriter(str(path), encoder=False, mtime=0.0) as w:
            for j in range(6):
                i = s * 6 + j
                c = i % len(CLASSES)
                meta = {
                    "id": f"s{i:02d}",
                    "lat": float(rng.uniform(-50, 50)),
                    "lon": float(rng.uniform(-50, 50)),
                }
                sample = {
                    "__key__": f"s{i:02d}",
                    "satellite.png": _encode(_image(rng, c, 24), "PNG"),
                    "ground.png": _encode(_image(rng, c, 24, ground=True), "PNG"),
                    "json": json.dumps(meta).encode(),
                }
                if i == 1:
                    del sample["satellite.png"]
                if i == 2:
                    sample["satellite.png"] = b"garbage, not a png"
                if i == 3:
                    sample["json"] = b"{not json"
                if i == 4:
                    sample["json"] = json.dumps({**meta, "lat": 123.0}).encode()
                if i == 7:
                    sample["json"] = json.dumps({**meta, "id": "s00"}).encode()
                w.write(sample)
        if s == 1:
            # Cut the shard inside the data of the last sample's first member: it ends early and
            # that sample never arrives (tarfile only locates the cut; the tar was written above).
            import tarfile

            with tarfile.open(path) as t:
                first = next(m for m in t.getmembers() if m.name.startswith("s11."))
            data = path.read_bytes()
            path.write_bytes(data[: first.offset_data + first.size // 2])
    return root
