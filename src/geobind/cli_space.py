"""``geobind embed``, ``geobind index build|info``, ``geobind search``, ``geobind map``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from geobind.cli import _device, positive_float, positive_int, whole_number
from geobind.cli_data import add_layout_arguments, parse_layout_options

if TYPE_CHECKING:
    import torch

EPILOG_EMBED = """\
examples:
  geobind embed --model demo/model --data demo/world/test.csv --modality satellite --out sat.parquet
  geobind embed --model M --data tiles.csv --modality satellite --out sat.parquet --float16
  geobind embed --model M --data shards/ --modality satellite --out sat.parquet --compile   # on a GPU
  geobind embed ... --out sat.parquet          # run again after Ctrl-C: resumes from sat.parquet.parts/
  torchrun --nproc_per_node 4 -m geobind embed --model M --data tiles.csv --modality satellite --out sat.parquet

output: Parquet with id, lat, lon, embedding (unit vectors), and caption, item (the file or text)
and thumbnail (image modalities) where known;
the encoder's identity is recorded so indexes and maps refuse embeddings of another model.
Bad rows (missing or undecodable files, bad coordinates) are skipped and counted.
"""

EPILOG_INDEX = """\
examples:
  geobind index build sat.parquet --out tiles.index                     # exact below 1M items
  geobind index build sat.parquet --out tiles.index --kind ivfpq --check
  geobind index build sat.parquet --out tiles.index --kind hnsw --check --target-recall 0.98
  geobind index info tiles.index
"""

EPILOG_BUILD = """\
kinds:
  auto    exact below {threshold:,} items, ivfpq from there (when FAISS is installed)
  exact   every query scans all vectors (chunked matrix product): exact results
  hnsw    FAISS HNSW graph (fast, memory ~ the float vectors again)
  ivfpq   FAISS inverted lists + product quantisation, candidates re-scored exactly (compact)
Approximate kinds need FAISS: pip install 'geobind[faiss]'. Scores are always exact cosine
similarities; approximate kinds may miss some of the true top k (and ivfpq may return fewer
than k: it scans only --nprobe of its lists). --check measures recall@10 against exact search
(queries: midpoints of random pairs of indexed places) and, unless --nprobe / --ef-search is
given, raises it from its default to the smallest value that reaches --target-recall (nprobe up to
all the lists; never lowered below the default);
a value given is measured and kept. Midpoints lie close to the data; queries far from every
place (text, often) can see a lower recall: aim --target-recall higher if that matters.

examples:
  geobind index build sat.parquet --out tiles.index
  geobind index build sat.parquet --out tiles.index --kind ivfpq --check
  geobind index build sat.parquet --out tiles.index --kind hnsw --ef-search 256 --force
"""

EPILOG_SEARCH = """\
scores: cosine similarity between the query and each place's embedding (higher = closer;
compare scores within one query, not across models). Several query options combine: the
query vector is the sum of the items' unit embeddings, renormalised (each item weighs the same).

examples:
  geobind search --model demo/model --index demo/places.index --text "a dense tropical rainforest"
  geobind search --model M --index tiles.index --audio rain.wav --k 20 --json
  geobind search --model M --index tiles.index --text "forest" --audio rain.wav
  geobind search --model M --index tiles.index --image photo.jpg --exact
  geobind search --model M --index tiles.index --file unknown.bin     # image or audio, detected
"""

EPILOG_MAP = """\
scores: cosine similarity to the query by default; with --prompts, the softmax probability
that the query (rather than one of the prompts) describes the place, at the model's learned
logit scale (or --scale). Queries combine as in `geobind search`.

outputs: OUT (GeoTIFF, float32, NaN = no data, in the raster's CRS or EPSG:4326 for points),
OUT with .png (colour bar, query in the title) and .csv (lat, lon, score per tile or place).
Nothing is overwritten without --force.

examples:
  geobind map --model M --text "a snowy frozen landscape" --raster region.tif --tile-size 224 --out snow.tif
  geobind map --model M --audio waves.wav --raster region.tif --tile-size 224 --stride 112 --out waves.tif
  geobind map --model M --text "a desert" --embeddings sat.parquet --out desert.tif
  geobind map --model M --text "a desert" --prompts "a forest" "a city" "the sea" --embeddings tiles.index --out desert.tif
"""


def _add_query_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("query (one or more; several combine)")
    g.add_argument(
        "--text", action="append", default=[], metavar="TEXT", help="free text; repeatable"
    )
    g.add_argument(
        "--audio", action="append", default=[], metavar="FILE", help="an audio file; repeatable"
    )
    g.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="a ground-level photo; repeatable",
    )
    g.add_argument(
        "--satellite",
        action="append",
        default=[],
        metavar="FILE",
        help="a satellite/overhead tile; repeatable",
    )
    g.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="FILE",
        help="an image (taken as a ground photo) or an audio file, detected from its content",
    )
    g.add_argument(
        "--query",
        action="append",
        default=[],
        metavar="MODALITY=VALUE",
        help="an item of any modality of the model (a plugin's too): a file, or lat,lon for a "
        "latlon modality (--query sentinel2=tile.tif, --query location=48.1,11.6); repeatable",
    )


def _query_kwargs(args) -> dict:
    from geobind.search.query import sniff_file

    kw = {
        "text": list(args.text),
        "audio": list(args.audio),
        "image": list(args.image),
        "satellite": list(args.satellite),
    }
    if any(not t.strip() for t in kw["text"]):
        raise ValueError("--text is empty: give words to search for")
    for f in args.file:
        kw["audio" if sniff_file(f) == "audio" else "image"].append(f)
    from geobind.modality import get_modality

    queries: dict[str, list] = {}
    for q in getattr(args, "query", []):
        modality, eq, value = q.partition("=")
        modality = modality.strip()
        if not eq or not modality or not value.strip():
            raise ValueError(f"--query {q!r}: write MODALITY=VALUE, e.g. --query sentinel2=tile.tif")
        source = get_modality(modality).source
        if source == "latlon":
            try:
                lat, lon = (float(v) for v in value.split(","))
            except ValueError:
                raise ValueError(f"--query {q!r}: {modality} takes lat,lon in degrees, e.g. "
                                 f"{modality}=48.1,11.6") from None
            queries.setdefault(modality, []).append((lat, lon))
        elif source == "text":
            queries.setdefault(modality, []).append(value)
        else:
            if not Path(value).is_file():
                raise FileNotFoundError(f"--query {q!r}: query file {value} does not exist")
            queries.setdefault(modality, []).append(value)
    if not any(kw.values()) and not queries:
        raise ValueError("no query: give --text, --audio, --image, --satellite, --file or --query")
    return {**{k: v or None for k, v in kw.items()}, "queries": queries or None}


def add_space_parsers(sub) -> None:
    """Register ``embed``, ``index``, ``search`` and ``map`` on the ``geobind`` subparsers."""
    from geobind.search.common import APPROX_THRESHOLD

    fmt = argparse.RawDescriptionHelpFormatter
    e = sub.add_parser(
        "embed",
        help="embed one modality of a dataset into Parquet",
        description="Embed one modality of every row of a dataset with a GeoBind model into a Parquet "
        "file (resumable; bad rows are skipped and counted), for `geobind index build` and `geobind map`.",
        formatter_class=fmt,
        epilog=EPILOG_EMBED,
    )
    e.add_argument("--model", required=True, help="GeoBind model directory")
    e.add_argument(
        "--data", required=True,
        help="dataset: manifest CSV/Parquet, shard folder/pattern, or a --layout's root or CSV",
    )
    add_layout_arguments(e)
    e.add_argument(
        "--modality", required=True, help="column to embed (satellite, ground, text, audio, ...)"
    )
    e.add_argument("--out", required=True, help="output Parquet file")
    e.add_argument(
        "--float16", action="store_true", help="store embeddings as float16 (half the size)"
    )
    e.add_argument(
        "--batch-size", type=_batch_arg, default="auto",
        help="items per forward pass: a number, or auto (default: 64 on a CPU; on a GPU 512, 128 for audio)",
    )
    e.add_argument(
        "--workers",
        type=_workers_arg,
        default="auto",
        help="data-loader worker processes: a number, or auto (default: none on a CPU, up to 8 "
        "per GPU)",
    )
    e.add_argument(
        "--compile", action="store_true", help="torch.compile the encoder (pays on GPUs, large runs)"
    )
    e.add_argument(
        "--preprocess-on",
        default="loader",
        choices=["loader", "device"],
        help="image resizing: in the loader workers (default, PIL) or on the model's device "
        "(frees the workers on a GPU; vectors differ by resampling rounding). Tiles are "
        "normalised on the model's device either way",
    )
    e.add_argument(
        "--no-thumbnails", action="store_true", help="do not store thumbnails of image items"
    )
    e.add_argument(
        "--thumbnail-size", type=positive_int, default=128, help="thumbnail size in px (default: 128)"
    )
    e.add_argument(
        "--chunk-rows", type=positive_int, default=4096, help="rows per resumable part (default: 4096)"
    )
    e.add_argument(
        "--device", default="auto", help="auto | cpu | cuda | cuda:N (torchrun: the rank's GPU)"
    )
    e.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_embed)

    ix = sub.add_parser(
        "index", help="build or inspect a search index", formatter_class=fmt, epilog=EPILOG_INDEX
    )
    isub = ix.add_subparsers(dest="index_command", metavar="ACTION")
    b = isub.add_parser(
        "build",
        help="build an index from `geobind embed` output",
        description="Build a search index (exact, or FAISS ivfpq / hnsw) from the Parquet embeddings "
        "that `geobind embed` writes; `--check` measures its recall against exact search.",
        formatter_class=fmt,
        epilog=EPILOG_BUILD.format(threshold=APPROX_THRESHOLD),
    )
    b.add_argument("embeddings", help="embeddings Parquet written by `geobind embed`")
    b.add_argument("--out", required=True, help="index folder to write (e.g. tiles.index)")
    b.add_argument("--kind", default="auto", choices=["auto", "exact", "hnsw", "ivfpq"])
    b.add_argument(
        "--check", action="store_true", help="measure recall@10 against exact search (and tune)"
    )
    b.add_argument(
        "--target-recall",
        type=float,
        default=0.95,
        help="recall@10 --check tunes for (default 0.95)",
    )
    b.add_argument(
        "--no-thumbnails", action="store_true", help="do not store thumbnails of image items"
    )
    b.add_argument(
        "--thumbnail-size", type=positive_int, default=128, help="thumbnail size in px (default: 128)"
    )
    b.add_argument(
        "--nlist",
        type=int,
        help="ivfpq: inverted lists (default ~4 sqrt(N) as a power of two, at most N/39)",
    )
    b.add_argument("--pq-m", type=int, help="ivfpq: bytes per vector (default dim/8)")
    b.add_argument(
        "--nprobe",
        type=int,
        help="ivfpq: lists scanned per query (default 32, or what --check tunes)",
    )
    b.add_argument(
        "--rerank", type=int, default=8, help="ivfpq: k x RERANK candidates re-scored (default 8)"
    )
    b.add_argument("--hnsw-m", type=int, default=32, help="hnsw: links per node (default 32)")
    b.add_argument(
        "--ef-search", type=int, help="hnsw: search breadth (default 128, or what --check tunes)"
    )
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    b.set_defaults(func=cmd_index_build)
    info = isub.add_parser(
        "info",
        help="what an index holds",
        description="What an index holds: its kind, size, model, modality, search settings, thumbnails "
        "and the recall its --check measured.",
        formatter_class=fmt,
        epilog="examples:\n  geobind index info tiles.index\n  geobind index info tiles.index --json\n",
    )
    info.add_argument("index", help="index folder")
    info.add_argument("--json", action="store_true", help="print the header as JSON")
    info.set_defaults(func=cmd_index_info)
    ix.set_defaults(func=lambda args: (ix.print_help(), 0)[1])

    s = sub.add_parser(
        "search",
        help="find places by text, audio or image",
        description="Find the places of an index most similar to a query: text, an audio file, a "
        "ground photo or a satellite tile, or several of them combined.",
        formatter_class=fmt,
        epilog=EPILOG_SEARCH,
    )
    s.add_argument(
        "--model", required=True, help="GeoBind model directory (the one the index was built with)"
    )
    s.add_argument("--index", required=True, help="index folder from `geobind index build`")
    _add_query_args(s)
    s.add_argument("--k", type=positive_int, default=10, help="number of results (default 10)")
    s.add_argument(
        "--exact", action="store_true", help="exact search even when the index is approximate"
    )
    s.add_argument("--json", action="store_true", help="print results as JSON")
    s.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default: cpu)")
    s.set_defaults(func=cmd_search)

    m = sub.add_parser(
        "map",
        help="map a query's similarity over a raster or a set of places",
        description="Map how similar each tile of a georeferenced raster, or each place of an index or "
        "embeddings file, is to a query: GeoTIFF, PNG and CSV.",
        formatter_class=fmt,
        epilog=EPILOG_MAP,
    )
    m.add_argument("--model", required=True, help="GeoBind model directory")
    _add_query_args(m)
    src = m.add_argument_group("what to map (one)")
    src.add_argument("--raster", help="georeferenced raster (GeoTIFF) to cut into tiles")
    src.add_argument("--tile-size", type=positive_int, help="tile size in raster pixels (with --raster)")
    src.add_argument("--stride", type=positive_int, help="tile step in pixels (default: the tile size)")
    src.add_argument(
        "--bands", help="raster bands to use as RGB, 1-based (default 1,2,3, or 1 as grey)"
    )
    src.add_argument(
        "--pixel-scale", default="auto", metavar="auto|raster|N",
        help="raw raster values to 8-bit pixels, as the geotiff layout's `scale` does in training and "
        "embed: auto (8-bit as is, other rasters stretched per tile), N (the value shown as white, "
        "e.g. 3000 for Sentinel-2) or raster (one stretch over the whole raster) (default: auto)",
    )
    src.add_argument("--embeddings", help="`geobind embed` Parquet or an index folder (point map)")
    src.add_argument(
        "--resolution", type=positive_float, help="point map grid step in degrees (default: from the points)"
    )
    m.add_argument(
        "--prompts",
        nargs="+",
        metavar="TEXT",
        help="score as softmax over the query and these texts",
    )
    m.add_argument(
        "--scale",
        type=float,
        help="softmax logit scale (default: the model's learned one, else 100)",
    )
    m.add_argument(
        "--out",
        required=True,
        help="output GeoTIFF (map.tif); map.png and map.csv are written beside it (a name ending in "
        ".png or .csv names that file, and the GeoTIFF goes beside it)",
    )
    m.add_argument("--png", help="PNG path (default: OUT with .png)")
    m.add_argument("--csv", help="CSV path (default: OUT with .csv)")
    m.add_argument(
        "--batch-size", type=_batch_arg, default="auto",
        help="tiles per forward pass: a number, or auto (default: 32 on a CPU, 512 on a GPU)",
    )
    m.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    m.add_argument("--force", action="store_true", help="overwrite existing outputs")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.set_defaults(func=cmd_map)


def _batch_arg(value: str) -> int | str:
    return value if value == "auto" else positive_int(value)


# ``--batch-size auto`` on a GPU: large enough that the forward runs at the card's rate (a
# ViT-B/32 forward at 64 tiles leaves an H100 mostly idle), small enough for any recent card;
# HTS-AT's activations per clip are much larger than a ViT's per tile.
GPU_BATCH = 512
GPU_AUDIO_BATCH = 128


def inference_batch_size(setting: int | str, device: torch.device, input_kind: str | None, cpu: int) -> int:
    """``--batch-size`` as a number: ``auto`` is ``cpu`` off CUDA and, on a GPU,
    :data:`GPU_BATCH` items (:data:`GPU_AUDIO_BATCH` for audio encoders)."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return cpu
    return GPU_AUDIO_BATCH if input_kind == "audio" else GPU_BATCH


def _workers_arg(value: str) -> int | str:
    return value if value == "auto" else whole_number(value, 0, "auto or a number >= 0")


def cmd_embed(args) -> int:
    """``geobind embed``: embed one modality of a dataset to Parquet; returns the exit code."""
    from geobind import distributed
    from geobind.model import GeoBind
    from geobind.search.embed import embed_dataset

    info = distributed.init_distributed(device=args.device)
    device = info.device if info.distributed else _device(args.device)
    model = GeoBind.from_pretrained(args.model, device=device)
    workers = distributed.loader_workers(args.workers, device)
    embed_dataset(
        model,
        args.data,
        args.modality,
        args.out,
        layout=args.layout,
        layout_options=parse_layout_options(args.layout_options),
        batch_size=inference_batch_size(args.batch_size, model.device,
                                        model.encoder(args.modality).input_kind
                                        if args.modality in model.modalities else None, cpu=64),
        float16=args.float16,
        chunk_rows=args.chunk_rows,
        num_workers=workers,
        compile=args.compile,
        preprocess_on=args.preprocess_on,
        thumbnails=False if args.no_thumbnails else None,
        thumbnail_size=args.thumbnail_size,
        force=args.force,
        progress=not args.no_progress and info.is_main,
        model_name=args.model,
        log=print if info.is_main else None,
    )
    # Left on a clean exit only: after a failure another rank may be gone (its Ctrl-C, its error),
    # and the barrier of leaving would bury this rank's own error under the process group's.
    distributed.cleanup()
    return 0


def cmd_index_build(args) -> int:
    """``geobind index build``: build a search index from embeddings; returns the exit code."""
    from geobind.search.index import build_index, speed_phrase, tuned_setting

    opts = {
        "thumbnails": not args.no_thumbnails,
        "thumbnail_size": args.thumbnail_size,
        "nlist": args.nlist,
        "pq_m": args.pq_m,
        "rerank": args.rerank,
        "hnsw_m": args.hnsw_m,
    }
    # Settings given on the command line are kept by --check (measured, not tuned).
    given = {k: v for k, v in (("nprobe", args.nprobe), ("ef_search", args.ef_search)) if v is not None}
    index = build_index(
        args.embeddings,
        args.out,
        args.kind,
        check=args.check,
        target_recall=args.target_recall,
        keep=set(given),
        force=args.force,
        progress=True,
        **opts,
        **given,
    )
    check = index.header.get("check")
    extra = ""
    if check:
        key = tuned_setting(index.kind)
        extra = (
            f"; recall@10 {check['recall@10']} (on midpoints of stored places) vs exact at {key}={check[key]}, "
            f"{speed_phrase(check['approx_queries_per_s'] / check['exact_queries_per_s'])} "
            f"({check['approx_queries_per_s']} vs {check['exact_queries_per_s']} queries/s)"
        )
    thumbs = index.header.get("thumbnails", {}).get("count", 0)
    print(
        f"{index.kind} index of {len(index)} {index.modality} embeddings ({index.dim}-d, {thumbs} thumbnails) "
        f"-> {args.out}{extra}"
    )
    return 0


def cmd_index_info(args) -> int:
    """``geobind index info``: describe an index (text or JSON); returns the exit code."""
    from geobind.search.index import Index

    index = Index.load(args.index, mmap=True)
    d = index.describe()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(
        f"{d['path']}: {d['kind']} index, {d['count']} {index.modality} embeddings, {d['dim']}-d {d['dtype']}"
    )
    print(f"  model identity ({index.modality} encoder): {index.identity}")
    if d.get("search"):
        print(f"  search settings: {json.dumps(d['search'])}")
    if d.get("check"):
        print(f"  check: {json.dumps(d['check'])}")
    print(
        f"  captions: {'yes' if index.captions is not None else 'no'}; "
        f"thumbnails: {d.get('thumbnails', {}).get('count', 0)}"
    )
    return 0


def cmd_search(args) -> int:
    """``geobind search``: print the indexed places nearest a query; returns the exit code."""
    from geobind.model import GeoBind
    from geobind.search.index import Index
    from geobind.search.query import Query

    kw = _query_kwargs(args)
    # Mapped, not read: one query scans an exact index once (reading it whole first doubles the
    # work), and an approximate one re-scores only its candidates' rows.
    index = Index.load(args.index, mmap=True)
    model = GeoBind.from_pretrained(args.model, device=_device(args.device))
    hits = model.search(index, k=args.k, exact=True if args.exact else None, **kw)
    label = Query.build(**kw).label
    note = None
    if len(hits) < min(args.k, len(index)):
        why = ""
        if index.kind == "ivfpq":
            nprobe = index.header.get("search", {}).get("nprobe")
            why = f" in the {nprobe} of its {index.header['faiss']['nlist']} lists it scans"
        note = (
            f"note: {len(hits)} results, not {args.k}: the {index.kind} search found no more "
            f"candidates{why}; add --exact to rank all {len(index)} places"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "query": label,
                    "index": str(args.index),
                    "kind": "exact" if args.exact else index.kind,
                    "score": "cosine similarity",
                    "results": [h.to_dict() for h in hits],
                },
                indent=2,
            )
        )
        if note:
            print(note, file=sys.stderr)
        return 0
    print(
        f"query: {label}   (score: cosine similarity; {'exact' if args.exact else index.kind} search over {len(index)} "
        f"{index.modality} embeddings)"
    )
    print(f"{'rank':>4}  {'score':>7}  {'id':<20} {'lat':>9} {'lon':>10}  caption")
    for h in hits:
        cap = (h.caption or "")[:60]
        print(f"{h.rank:>4}  {h.score:7.4f}  {h.id:<20} {h.lat:9.4f} {h.lon:10.4f}  {cap}")
    if note:
        print(note)
    return 0


def cmd_map(args) -> int:
    """``geobind map``: write a zero-shot map (GeoTIFF, PNG, CSV); returns the exit code."""
    from geobind.model import GeoBind
    from geobind.search.index import Index
    from geobind.search.maps import describe, output_paths

    if (args.raster is None) == (args.embeddings is None):
        raise ValueError("give exactly one of --raster (with --tile-size) or --embeddings")
    if args.raster is not None and not args.tile_size:
        raise ValueError("--raster needs --tile-size (pixels per tile)")
    kw = _query_kwargs(args)
    outs = output_paths(args.out, args.png, args.csv, hint=" (see --out, --png, --csv)")
    for flag, given in (("--raster", args.raster), ("--embeddings", args.embeddings)):
        same = [p for p in outs.values() if given and p is not None and Path(p).resolve() == Path(given).resolve()]
        if same:  # --force would replace the input with the map made from it
            raise ValueError(f"{same[0]} is the input being mapped ({flag}): name the map's outputs otherwise")
    from geobind.search.common import check_writable

    check_writable(*outs.values(), force=args.force)
    try:
        bands = [int(b) for b in args.bands.split(",")] if args.bands else None
    except ValueError:
        raise ValueError(f"--bands {args.bands}: give band numbers counted from 1, e.g. --bands 4,3,2") from None
    embeddings = args.embeddings
    if embeddings is not None and Path(embeddings).is_dir():
        embeddings = Index.load(embeddings)
    model = GeoBind.from_pretrained(args.model, device=_device(args.device))
    result = model.map(
        raster=args.raster,
        tile_size=args.tile_size,
        stride=args.stride,
        bands=bands,
        pixel_scale=args.pixel_scale,
        embeddings=embeddings,
        resolution=args.resolution,
        prompts=args.prompts,
        scale=args.scale,
        out=outs["tif"],
        png=outs["png"],
        csv=outs["csv"],
        force=args.force,
        batch_size=inference_batch_size(args.batch_size, model.device, "image", cpu=32),
        progress=not args.no_progress,
        **kw,
    )
    print(describe(result))
    print("wrote " + ", ".join(str(p) for p in result.paths.values()))
    return 0
