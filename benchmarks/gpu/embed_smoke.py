"""``geobind embed`` end to end on generated shards: tiles/s from tar to Parquet, on a GPU.

The training benchmark times the encoder's forward alone (``infer`` in its JSON); this runs the
command's own code path (:func:`geobind.search.embed_dataset`: shard streaming, decoding in the
loader workers, ``torch.compile``, bf16, resumable parts, Parquet) over WebDataset shards of
256 px JPEG tiles, as ``geobind data pack`` writes them, for a ViT-B/32 satellite encoder with
random weights. Each variant runs twice; the second run is timed (the first compiles).

Figures per variant: ``tiles_per_s`` (the timed run, start to merged Parquet) and
``steady_tiles_per_s`` (rows of the parts written after the first one, over the time between the
first part and the last: what a long run gets once the loader is full). ``forward_tiles_per_s``
is the compiled encoder alone on uint8 tiles at the same batch. The vectors of the first rows are
checked against the encoder in float32 on the CPU (``cos_min``): the GPU path (prefetched copies,
vectors taken one batch later) must keep every vector with its row.

    python benchmarks/gpu/embed_smoke.py --out embed.json                        # on a GPU
    python benchmarks/gpu/embed_smoke.py --out embed.json --size tiny --tiles 96   # CPU check
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SIZES = {
    # name: (CLIPVisionConfig overrides, encoder input px, packed tile px)
    "b32": ({"image_size": 224, "patch_size": 32, "projection_dim": 512}, 224, 256),
    "tiny": ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 32, "patch_size": 8, "projection_dim": 32}, 32, 40),
}


def tile(i: int, px: int):
    """Tile ``i``: smooth random colour fields plus pixel noise, so its JPEG is about as large as
    a real satellite tile's (a smooth image alone would decode unrealistically fast)."""
    from PIL import Image

    rng = np.random.default_rng([7, i])
    coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((px, px), Image.BICUBIC)
    noisy = np.asarray(coarse, np.int16) + rng.integers(-16, 17, (px, px, 3), dtype=np.int16)
    return Image.fromarray(noisy.clip(0, 255).astype(np.uint8))


def write_shard(path: Path, start: int, stop: int, px: int) -> int:
    """Samples ``start..stop-1`` as ``<key>.satellite.jpg`` + ``<key>.json`` (the pack format)."""
    size = 0
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in range(start, stop):
            buf = io.BytesIO()
            tile(i, px).save(buf, format="JPEG", quality=90)
            meta = json.dumps({"id": f"t{i:07d}", "lat": -60 + 120 * (i % 997) / 997,
                               "lon": -170 + 340 * (i % 991) / 991}).encode()
            for name, data in ((f"t{i:07d}.satellite.jpg", buf.getvalue()), (f"t{i:07d}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            size += len(buf.getvalue())
    tmp.replace(path)
    return size


def make_shards(root: Path, n: int, px: int, per_shard: int) -> dict:
    from concurrent.futures import ProcessPoolExecutor

    root.mkdir(parents=True, exist_ok=True)
    bounds = [(a, min(a + per_shard, n)) for a in range(0, n, per_shard)]
    t = time.perf_counter()
    with ProcessPoolExecutor(max(1, min(os.cpu_count() or 1, len(bounds)))) as pool:
        sizes = list(pool.map(write_shard, [root / f"tiles-{k:05d}.tar" for k in range(len(bounds))],
                              *zip(*bounds), [px] * len(bounds)))
    return {"tiles": n, "shards": len(bounds), "mean_jpeg_kb": round(sum(sizes) / n / 1024, 1),
            "seconds": round(time.perf_counter() - t, 1)}


class PartWatcher:
    """Records when each part file of ``OUT.parts/`` first appears (polled every 10 ms)."""

    def __init__(self, parts: Path):
        self.parts, self.seen, self._stop = parts, {}, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            if self.parts.is_dir():
                now = time.perf_counter()
                for p in self.parts.glob("chunk-*.parquet"):
                    self.seen.setdefault(p.name, now)
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def build_model(size: str, device):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from geobind.encoders.clip import ClipVisionEncoder
    from geobind.encoders.images import SATELLITE_MEAN, SATELLITE_STD, ImageTransform
    from geobind.model import GeoBind

    cfg, px, _ = SIZES[size]
    torch.manual_seed(0)
    enc = ClipVisionEncoder("satellite", CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg)),
                            ImageTransform(px, SATELLITE_MEAN, SATELLITE_STD))
    return GeoBind(enc.dim, {"satellite": enc}).to(device).eval()


def forward_rate(model, batch: int, px: int, device, steps: int = 20) -> float:
    """The compiled encoder alone: uint8 tiles at the encoder's size, as the loader hands them."""
    import torch

    from geobind.encoders.base import compile_for_inference, uncompile
    from geobind.model import autocast_for

    enc = model.encoder("satellite")
    # channels-last, as the loader collates them (the compiled graph is then reused by the runs).
    pixels = torch.randint(0, 256, (batch, 3, px, px), dtype=torch.uint8, device=device)
    tiles = {"pixels": pixels.contiguous(memory_format=torch.channels_last)}
    compile_for_inference(enc)  # as `geobind embed --compile` does
    try:
        with torch.no_grad(), autocast_for(device):
            for _ in range(3):
                enc(tiles)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(steps):
                enc(tiles)
            if device.type == "cuda":
                torch.cuda.synchronize()
    finally:
        uncompile(enc)
    return batch * steps / (time.perf_counter() - t)


def check_rows(out: Path, model, px: int, n: int = 64) -> float:
    """Smallest cosine between the stored vectors of the first ``n`` tiles and the same tiles
    embedded in float32 on the CPU (same PIL preprocessing as the loader path)."""
    import copy

    import torch

    from geobind.search import read_embeddings

    got = read_embeddings(out)
    row = {pid: i for i, pid in enumerate(got.ids)}
    cpu = copy.deepcopy(model).to("cpu").float()
    ids = [f"t{i:07d}" for i in range(n)]
    ref = cpu.embed("satellite", [tile(i, px) for i in range(n)]).numpy()
    mine = np.stack([got.vectors[row[i]] for i in ids]).astype(np.float32)
    return float(torch.nn.functional.cosine_similarity(torch.from_numpy(mine), torch.from_numpy(ref)).min())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="b32 on CUDA by default, tiny elsewhere")
    ap.add_argument("--tiles", type=int, default=65536)
    ap.add_argument("--per-shard", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=None, help="default 1024 (b32), 16 (tiny)")
    ap.add_argument("--chunk-rows", type=int, default=None, help="rows per part (default: 2 batches)")
    ap.add_argument("--workers", nargs="+", default=["auto"], help="loader workers to try (a number or auto)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--work", default=None, help="scratch folder for shards and outputs (default: a temp dir)")
    ap.add_argument("--out", help="write the results as JSON")
    a = ap.parse_args(argv)

    import torch

    from geobind.data.shards import open_shards
    from geobind.distributed import loader_workers
    from geobind.search import embed_dataset

    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    size = a.size or ("b32" if device.type == "cuda" else "tiny")
    batch = a.batch or (1024 if size == "b32" else 16)
    chunk_rows = a.chunk_rows or 2 * batch
    work = Path(a.work or tempfile.mkdtemp(prefix="geobind-embed-"))
    os.environ.setdefault("GEOBIND_CACHE", str(work / "cache"))
    _, px, pack_px = SIZES[size]
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "size": size, "batch": batch, "chunk_rows": chunk_rows,
                     "cpus": os.cpu_count(), "variants": {}}

    def save():
        if a.out:
            tmp = Path(a.out + ".tmp")
            tmp.write_text(json.dumps(results, indent=2))
            tmp.replace(a.out)

    results["data"] = make_shards(work / "shards", a.tiles, pack_px, a.per_shard)
    t = time.perf_counter()
    shards = open_shards(str(work / "shards"), workers=os.cpu_count())
    results["data"]["index_seconds"] = round(time.perf_counter() - t, 1)
    print(f"data: {results['data']}", flush=True)
    save()
    model = build_model(size, device)
    results["forward_tiles_per_s"] = round(forward_rate(model, batch, px, device))
    print(f"forward only (compiled, batch {batch}): {results['forward_tiles_per_s']} tiles/s", flush=True)
    save()
    variants = [("loader", False, w) for w in a.workers] + [("device", False, w) for w in a.workers]
    variants.append(("device", True, a.workers[0]))
    for preprocess, thumbs, w in variants:
        workers = loader_workers(w if w == "auto" else int(w), device)
        name = f"{'dev-thumbs' if thumbs else preprocess}-w{workers}"
        out = work / f"{name}.parquet"
        try:
            for _run in ("compile", "timed"):  # the first compiles; the second is timed
                with PartWatcher(out.with_name(out.name + ".parts")) as watch:
                    t0 = time.perf_counter()
                    summary = embed_dataset(model, shards, "satellite", out, batch_size=batch, chunk_rows=chunk_rows,
                                            num_workers=workers, compile=True, preprocess_on=preprocess,
                                            thumbnails=thumbs, force=True, log=None)
                    wall = time.perf_counter() - t0
            times = sorted(watch.seen.values())
            r = {"workers": workers, "rows": summary["rows"], "seconds": round(wall, 2),
                 "tiles_per_s": round(summary["rows"] / wall)}
            if len(times) > 2 and times[-1] > times[0]:
                r["steady_tiles_per_s"] = round((len(times) - 1) * chunk_rows / (times[-1] - times[0]))
            r["cos_min"] = round(check_rows(out, model, pack_px), 5)
            r["ok"] = r["rows"] == a.tiles and r["cos_min"] > (0.99 if preprocess == "loader" else 0.95)
        except Exception as e:  # noqa: BLE001 - recorded; the other variants still run
            r = {"workers": workers, "ok": False, "error": f"{type(e).__name__}: {e}"[:300]}
        results["variants"][name] = r
        print(f"{name}: {r}", flush=True)
        save()
    print(f"\n{'variant':<22}{'tiles/s':>10}{'steady':>10}{'cos_min':>9}")
    for name, r in results["variants"].items():
        print(f"{name:<22}{r.get('tiles_per_s', '-'):>10}{r.get('steady_tiles_per_s', '-'):>10}"
              f"{r.get('cos_min', r.get('error', '-'))!s:>9}")
    print(f"{'forward only':<22}{results['forward_tiles_per_s']:>10}")
    results["ok"] = all(r.get("ok") for r in results["variants"].values())
    save()
    return results


if __name__ == "__main__":
    raise SystemExit(0 if main()["ok"] else 1)
