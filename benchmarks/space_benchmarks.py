"""Benchmarks of using the space: point maps, exact and approximate search, embedding throughput.

Figures go into ``benchmarks/RESULTS.md`` (section "Using the space"). Not part of the test suite
(``tests/`` runs this script only at a tiny size).

Data. Search and map speed do not depend on what the vectors mean, but approximate-search
*recall* does: uniformly random 512-d vectors have no neighbourhood structure at all (every
point is nearly equidistant from every other), which no real embedding set looks like. The
collection is therefore synthetic but embedding-like: unit vectors from a mixture of
``--clusters`` Gaussian clusters in a ``--latent``-dimensional subspace, plus isotropic noise
(seeded). Queries for the recall check are midpoints of random pairs of collection vectors
(renormalised), as ``geobind index build --check`` uses.

Embedding throughput uses the real encoders with random weights (speed does not depend on the
weights, and CLIP's cannot be downloaded offline): the paper's ViT-B/32 at 224 px and the demo's
small ViT at 64 px, on PNG tiles written to a temporary folder (decode + resize + forward).

    python benchmarks/space_benchmarks.py --out benchmarks/space_results.json       # full (1M x 512)
    python benchmarks/space_benchmarks.py --n 20000 --dim 64 --tiles 8 --quick       # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def embedding_like(
    n: int, dim: int, *, clusters: int, latent: int, noise: float, seed: int, chunk: int = 100_000
) -> np.ndarray:
    """Seeded unit vectors [n, dim] float32: a mixture of ``clusters`` clusters (within-cluster
    spread 0.6 of the between-cluster one) in a random ``latent``-d subspace, plus isotropic
    noise carrying the fraction ``noise`` of the total variance."""
    rng = np.random.default_rng(seed)
    basis = (rng.normal(size=(latent, dim)) / np.sqrt(dim)).astype(np.float32)
    centres = rng.normal(size=(clusters, latent)).astype(np.float32)
    # signal variance per vector ~ latent * (1 + 0.36) * (|basis row|^2 = 1); noise per dim:
    sigma = np.sqrt(noise / (1 - noise) * latent * 1.36 / dim)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        z = centres[rng.integers(0, clusters, m)] + 0.6 * rng.normal(size=(m, latent)).astype(
            np.float32
        )
        x = z @ basis + sigma * rng.normal(size=(m, dim)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s : s + m] = x
    return out


def timed(fn, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` runs (seconds)."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def midpoint_queries(vectors: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, len(vectors), n), rng.integers(0, len(vectors), n)
    q = vectors[a] + vectors[b]
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def bench_maps(vectors: np.ndarray, lat, lon, ids, log) -> dict:
    from geobind.search.maps import map_points_many, score_matrix

    q = midpoint_queries(vectors, 10, seed=1)
    res: dict = {"places": len(vectors), "queries": 10}
    res["scores_10_queries_s"] = round(timed(lambda: score_matrix(vectors, q)), 3)
    res["maps_10_queries_s"] = round(
        timed(lambda: map_points_many(vectors, lat, lon, ids, q, resolution=0.25)), 3
    )
    half = vectors.astype(np.float16)
    res["scores_10_queries_float16_s"] = round(timed(lambda: score_matrix(half, q)), 3)
    log(f"maps: {res}")
    return res


def bench_exact(vectors: np.ndarray, log) -> dict:
    from geobind.search.index import exact_topk

    out = {}
    for batch in (1, 10, 100):
        q = midpoint_queries(vectors, batch, seed=2)
        t = timed(lambda q=q: exact_topk(vectors, q, 10), repeat=3 if batch < 100 else 2)
        out[f"batch_{batch}"] = {"seconds": round(t, 4), "queries_per_s": round(batch / t, 1)}
    log(f"exact top-10: {out}")
    return out


def bench_approx(kind: str, vectors: np.ndarray, emb, log, n_queries: int, **opts) -> dict:
    from geobind.search.index import Index, exact_topk, recall_at_k

    t = time.perf_counter()
    index = Index.build(emb, kind, log=log, **opts)
    build = time.perf_counter() - t
    check = index.check(n_queries=n_queries, target_recall=0.95, log=log)
    # Single queries (latency) on the tuned setting, against exact single queries.
    q = midpoint_queries(vectors, 50, seed=3)
    t = time.perf_counter()
    for row in q:
        index.search(row, 10)
    approx1 = (time.perf_counter() - t) / len(q)
    t = time.perf_counter()
    for row in q[:5]:
        exact_topk(vectors, row, 10)
    exact1 = (time.perf_counter() - t) / 5
    _, truth = exact_topk(vectors, q, 10)
    _, got = index.search(q, 10)
    out = {
        "build_s": round(build, 1),
        **check,
        "single_query": {
            "approx_ms": round(approx1 * 1e3, 2),
            "exact_ms": round(exact1 * 1e3, 1),
            "speedup": round(exact1 / approx1, 1),
            "recall@10": round(recall_at_k(got, truth), 4),
        },
        "settings": index.header.get("faiss", {}),
        "search": index.header.get("search", {}),
    }
    log(f"{kind}: {out}")
    return out


def bench_embedding(n_tiles: int, log, quick: bool) -> dict:
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from geobind.encoders.clip import ClipVisionEncoder
    from geobind.encoders.images import SATELLITE_MEAN, SATELLITE_STD, ImageTransform
    from geobind.model import GeoBind
    from geobind.search.embed import embed_dataset

    sizes = {
        "vit-b32-224 (paper)": (dict(patch_size=32, projection_dim=512), 224),
        "demo-vit-64": (
            dict(
                hidden_size=128,
                intermediate_size=256,
                num_hidden_layers=3,
                num_attention_heads=4,
                patch_size=8,
                projection_dim=128,
                image_size=64,
            ),
            64,
        ),
    }
    if quick:
        sizes = {
            "tiny-32": (
                dict(
                    hidden_size=32,
                    intermediate_size=64,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    patch_size=8,
                    projection_dim=32,
                    image_size=32,
                ),
                32,
            )
        }
    out = {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = []
        for i in range(n_tiles):
            arr = rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp / f"{i}.png")
            rows.append(f"t{i},{rng.uniform(-60, 60):.4f},{rng.uniform(-170, 170):.4f},{i}.png")
        (tmp / "tiles.csv").write_text("id,lat,lon,satellite\n" + "\n".join(rows) + "\n")
        for name, (cfg, size) in sizes.items():
            torch.manual_seed(0)
            vis = CLIPVisionModelWithProjection(CLIPVisionConfig(**{"image_size": size, **cfg}))
            enc = ClipVisionEncoder(
                "satellite", vis, ImageTransform(size, SATELLITE_MEAN, SATELLITE_STD, "none")
            )
            model = GeoBind(enc.dim, {"satellite": enc}).eval()
            batch = enc.collate([enc.load(np.zeros((size, size, 3), np.uint8)) for _ in range(32)])
            with torch.no_grad():
                enc(batch)
                fwd = timed(lambda b=batch, e=enc: e(b), repeat=3)
            res = {"image_size": size, "dim": enc.dim, "forward_tiles_per_s": round(32 / fwd, 1)}
            for thumbs in (False, True):
                out_p = tmp / f"e{thumbs}.parquet"
                t = time.perf_counter()
                embed_dataset(
                    model,
                    tmp / "tiles.csv",
                    "satellite",
                    out_p,
                    batch_size=32,
                    thumbnails=thumbs,
                    force=True,
                    log=None,
                )
                e2e = time.perf_counter() - t
                res["end_to_end_tiles_per_s" + ("_with_thumbnails" if thumbs else "")] = round(
                    n_tiles / e2e, 1
                )
            out[name] = res
            log(f"embedding {name}: {res}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=int, default=1_000_000, help="collection size (default 1M)")
    p.add_argument("--dim", type=int, default=512, help="embedding dimension (default 512)")
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--latent", type=int, default=64, help="dimension of the clustered subspace")
    p.add_argument(
        "--noise", type=float, default=0.1, help="fraction of the variance that is isotropic noise"
    )
    p.add_argument(
        "--hnsw-n", type=int, help="HNSW on the first N vectors only (build time); default --n"
    )
    p.add_argument(
        "--skip", nargs="*", default=[], choices=["maps", "exact", "ivfpq", "hnsw", "embed"]
    )
    p.add_argument("--check-queries", type=int, default=1000)
    p.add_argument("--tiles", type=int, default=256, help="PNG tiles for the embedding benchmark")
    p.add_argument("--quick", action="store_true", help="tiny encoders only (smoke run)")
    p.add_argument("--out", help="write results JSON here")
    args = p.parse_args(argv)

    from geobind.search.embed import FORMAT, Embeddings

    def log(msg):
        print(msg, flush=True)

    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.is_available(),
        "torch": torch.__version__,
    }
    try:
        import faiss

        machine["faiss"] = faiss.__version__
    except ImportError:
        machine["faiss"] = None
    results: dict = {
        "machine": machine,
        "data": {
            "n": args.n,
            "dim": args.dim,
            "clusters": args.clusters,
            "latent": args.latent,
            "noise": args.noise,
        },
    }
    t = time.perf_counter()
    vectors = embedding_like(
        args.n, args.dim, clusters=args.clusters, latent=args.latent, noise=args.noise, seed=0
    )
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 75, args.n), rng.uniform(-180, 180, args.n)
    ids = [f"p{i}" for i in range(args.n)]
    log(f"data: {args.n} x {args.dim} in {time.perf_counter() - t:.1f} s")
    header = {
        "format": FORMAT,
        "format_version": 1,
        "modality": "satellite",
        "dim": args.dim,
        "dtype": "float32",
        "model": {"identity": "benchmark", "encoder": "synthetic"},
        "dataset": {"source": "synthetic"},
    }
    emb = Embeddings(ids, lat, lon, vectors, header)
    if "maps" not in args.skip:
        results["maps"] = bench_maps(vectors, lat, lon, ids, log)
    if "exact" not in args.skip:
        results["exact"] = bench_exact(vectors, log)
    if "ivfpq" not in args.skip:
        results["ivfpq"] = bench_approx("ivfpq", vectors, emb, log, args.check_queries)
    if "hnsw" not in args.skip:
        m = args.hnsw_n or args.n
        sub = Embeddings(ids[:m], lat[:m], lon[:m], vectors[:m], header)
        results["hnsw"] = {
            "n": m,
            **bench_approx("hnsw", vectors[:m], sub, log, args.check_queries),
        }
    if "embed" not in args.skip:
        results["embedding"] = bench_embedding(args.tiles, log, args.quick)
    print(json.dumps(results, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
