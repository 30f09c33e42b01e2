"""``geobind data pack``: write WebDataset shards from a manifest (or any table layout).

Shard ``k`` holds rows ``[k * shard_size, (k + 1) * shard_size)`` of the source, so the split into
shards is deterministic and each shard is an independent unit of work: it is written to a
temporary file and renamed when complete, then recorded in ``OUT/.pack/``. Rerunning the same
command resumes (finished shards are kept); running it with another source or other settings
into the same folder is refused. When every shard is done the index (``shards.json`` +
``index.parquet``) is written and ``pack.json`` is marked complete.

Images are decoded (so broken files are caught here, not in training) and pre-resized so their
shorter side is at most ``image_size`` (never upscaled), then stored as JPEG (quality 95) or
PNG. Audio is copied as is, or, with ``audio_rate``, decoded, downmixed to mono, resampled with
soxr and stored at that rate (the encoder's rate, so training never resamples) as 24-bit FLAC,
or with ``audio_format="wav"`` as 16-bit PCM WAV: no decoding at all when training (a clip's
window is read as is), at 2 bytes per sample (FLAC's size depends on the audio).
Text goes to ``text.txt``; ``id``, ``lat``, ``lon`` and the metadata columns go to ``json``.
Rows with bad coordinates are left out; an unusable file leaves out that member only (the other
modalities of the row still serve other stages). Both are counted per reason.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geobind.data.errors import BadSampleError
from geobind.data.manifest import Table, read_dataset
from geobind.data.shards import SHARDS_FILE, _parse_meta, geobind_schema, write_index
from geobind.modality import get_modality
from geobind.search.common import exclusive_lock, write_text_atomic, writes_named

__all__ = ["pack", "PackResult", "PACK_FILE", "member_kind"]

PACK_FILE = "pack.json"
PACK_FORMAT = "geobind-pack"
_KEY_OK = re.compile(r"^[A-Za-z0-9_-]{1,120}$")
_ROW_KEY = re.compile(r"^s[0-9]{9}$")


@dataclass
class PackResult:
    """What a pack run did."""

    out: Path
    shards: int  # shards in the finished pack
    samples: int  # samples written over all shards
    resumed: int  # shards found complete from an earlier run
    bad: Counter = field(default_factory=Counter)  # problems per reason (rows and members)
    examples: list[str] = field(default_factory=list)  # the first few problems, for people
    complete: bool = True


def member_kind(modality: str) -> str:
    """``image``, ``audio``, ``text``, ``latlon`` or ``file``: how a modality is stored."""
    spec = get_modality(modality)
    if spec.source in ("text", "latlon"):
        return spec.source
    exts = {k.rsplit(".", 1)[-1].lower() for k in spec.shard_keys}
    if exts & {"jpg", "jpeg", "png"}:
        return "image"
    if exts & {"flac", "wav", "mp3", "ogg"}:
        return "audio"
    return "file"


def _settings(
    table: Table,
    source: str,
    layout: str,
    layout_options: dict,
    shard_size: int,
    image_size: int,
    image_format: str,
    audio_rate: int | None,
    audio_format: str = "flac",
) -> dict[str, Any]:
    extra = {} if audio_format == "flac" else {"audio_format": audio_format}  # packs made before keep resuming
    return {
        "source": source,
        "source_identity": table.identity,
        "layout": layout,
        "layout_options": layout_options,
        "rows": len(table),
        "shard_size": shard_size,
        "image_size": image_size,
        "image_format": image_format,
        "audio_rate": audio_rate,
        **extra,
    }


def _shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


def _json_scalar(v: Any) -> Any:
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return None if math.isnan(float(v)) else float(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if v is None or isinstance(v, (str, int, bool)):
        return v
    return str(v)


def _image_bytes(item: Any, size: int, fmt: str) -> bytes:
    from PIL import Image

    from geobind.data.media import load_image

    # Nothing to resize, and already in the target format: the file's own bytes, which the
    # reader decodes as it decodes the file (a re-encoded JPEG is larger, and lossier).
    own_bytes = (isinstance(item, (str, Path))
                 and Path(item).suffix.lower().lstrip(".") in (("jpg", "jpeg") if fmt == "jpg" else ("png",)))
    if own_bytes and size > 0:
        try:
            with Image.open(item) as head:  # the header's size, before a reduced-scale decode
                own_bytes = min(head.size) <= size
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            pass  # load_image names what is wrong with the file
    # Decodes (a bad file is a bad sample here, not in training); a large JPEG at a reduced
    # scale no smaller than the target, then resized as a full decode would be.
    img = load_image(item, min_side=0 if own_bytes else size)
    if own_bytes:
        return Path(item).read_bytes()
    w, h = img.size
    if size > 0 and min(w, h) > size:
        s = size / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format="PNG")
    return buf.getvalue()


# --audio-format -> (soundfile format, subtype) of resampled audio.
AUDIO_FORMATS = {"flac": ("FLAC", "PCM_24"), "wav": ("WAV", "PCM_16")}


def _audio_member(item: Any, rate: int | None, name: str, fmt: str = "flac") -> tuple[str, bytes]:
    import soundfile as sf

    from geobind.data.audio_io import load_audio

    if rate:
        wave = load_audio(item, rate, name=name)
        buf = io.BytesIO()
        container, subtype = AUDIO_FORMATS[fmt]
        sf.write(buf, np.clip(wave, -1.0, 1.0), rate, format=container, subtype=subtype)
        return fmt, buf.getvalue()
    if not isinstance(item, (str, Path)):
        raise BadSampleError(name, "bad-shape", "in-memory audio needs --audio-rate to be packed")
    p = Path(item)
    if not p.is_file():
        raise BadSampleError(name, "missing", "file does not exist")
    if p.stat().st_size == 0:
        raise BadSampleError(name, "empty", "file is empty (0 bytes)")
    ext = p.suffix.lower().lstrip(".")
    try:
        info = sf.info(str(p))  # header check only; `geobind data check` decodes every sample
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError
        raise BadSampleError(name, "undecodable", f"cannot decode audio: {e}") from None
    if info.frames == 0:
        raise BadSampleError(name, "silent-zero-length", "the recording holds no samples")
    if ext not in ("flac", "wav", "mp3"):  # the shard contract's audio members; others become FLAC
        wave = load_audio(str(p), info.samplerate, name=name)
        buf = io.BytesIO()
        sf.write(buf, wave, info.samplerate, format="FLAC", subtype="PCM_24")
        return "flac", buf.getvalue()
    return ext, p.read_bytes()


def _sample(table: Table, i: int, s: dict[str, Any], bad: Counter, examples: list[str]):
    """The shard sample of row ``i`` (or None), counting problems."""

    def problem(e: BadSampleError) -> None:
        bad[e.reason] += 1
        if len(examples) < 20:
            examples.append(str(e))

    if i in table.bad_rows:
        problem(BadSampleError(f"{table.source}#{table.ids[i]}", table.bad_rows[i]))
        return None
    sid = table.ids[i]
    # Ids that are not safe as tar keys get the row's own key; so do ids shaped like one, so
    # that two samples never share a key.
    key = sid if _KEY_OK.match(sid) and not _ROW_KEY.match(sid) else f"s{i:09d}"
    out: dict[str, Any] = {"__key__": key}
    for m in table.columns:
        kind = member_kind(m)
        if kind == "latlon":
            continue
        try:
            item = table.item(m, i)
            if kind == "image":
                out[f"{m}.{s['image_format']}"] = _image_bytes(
                    item, s["image_size"], s["image_format"]
                )
            elif kind == "audio":
                ext, data = _audio_member(
                    item, s["audio_rate"], str(item) if isinstance(item, (str, Path)) else sid,
                    s.get("audio_format", "flac"),
                )
                out[f"{m}.{ext}"] = data
            elif kind == "text":
                if not isinstance(item, str) or not item.strip():
                    raise BadSampleError(f"{table.source}#{sid}", "empty-text", "caption is empty")
                out[f"{m}.txt"] = item.encode("utf-8")
            else:
                p = Path(item)
                if not p.is_file():
                    raise BadSampleError(str(p), "missing", "file does not exist")
                suffix = (
                    get_modality(m).shard_keys[0]
                    if get_modality(m).shard_keys
                    else f"{m}{p.suffix}"
                )
                if get_modality(m).check is not None:  # caught now, not mid-run (as images are)
                    from geobind.data.check import check_item

                    check_item(m, item)
                out[suffix] = p.read_bytes()
        except BadSampleError as e:
            problem(e)
    if len(out) == 1:
        return None
    meta = {}
    if table.meta is not None and len(table.meta.columns):
        meta = {str(k): _json_scalar(v) for k, v in table.meta.iloc[i].items()}
    out["json"] = json.dumps(
        {"id": sid, "lat": float(table.lat[i]), "lon": float(table.lon[i]), **meta}
    ).encode()
    return out


# One table per pool process (set by the initializer, so it is sent once, not per shard).
_TABLE: Table | None = None


def _init_worker(table: Table) -> None:
    global _TABLE
    _TABLE = table
    # Ctrl-C reaches the whole process group: the parent stops the pack (and ends the workers);
    # a worker interrupted inside a tar write would only print tracebacks.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# What a failed write keeps, and how to go on.
RESUMABLE = "the shards already finished are kept: run the same command again to resume"


def _write_shard(
    k: int, rows: list[int], out: str, s: dict[str, Any], table: Table | None = None
) -> dict:
    import webdataset as wds

    table = table if table is not None else _TABLE
    bad: Counter = Counter()
    examples: list[str] = []
    entries = []
    schema = geobind_schema()
    final = Path(out) / _shard_name(k)
    tmp = final.with_name(final.name + ".tmp")
    suffixes: set[str] = set()
    with writes_named(final, RESUMABLE):
        try:
            with open(tmp, "wb") as f:
                writer = wds.TarWriter(f, encoder=False, mtime=0.0)
                try:
                    for i in rows:
                        sample = _sample(table, i, s, bad, examples)
                        if sample is None:
                            continue
                        writer.write(sample)
                        suffixes.update(k2 for k2 in sample if not k2.startswith("__"))
                        sid, lat, lon, kept, _ = _parse_meta(sample["json"], sample["__key__"], schema)
                        entries.append(
                            {"key": sample["__key__"], "id": sid, "lat": lat, "lon": lon, "problem": "", **kept}
                        )
                finally:
                    # Closed on every path: a tar stream left to the garbage collector after a Ctrl-C or
                    # a full disk prints "Exception ignored ... write to closed file" at exit.
                    with contextlib.suppress(Exception):
                        writer.close()
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    rec = {
        "shard": k,
        "url": final.name,
        "entries": entries,
        "bad": dict(bad),
        "examples": examples,
        "suffixes": sorted(suffixes),
        "rows": len(rows),
    }
    write_text_atomic(Path(out) / ".pack" / f"shard-{k:06d}.json", json.dumps(rec))
    return rec


def _write_state(state: Path, record: dict) -> None:
    """``pack.json``, atomically: a full disk or a stop never leaves it empty (which no rerun could
    resume)."""
    with writes_named(state, RESUMABLE):
        write_text_atomic(state, json.dumps(record, indent=1))


def pack(
    source: str | Path,
    out: str | Path,
    *,
    layout: str = "manifest",
    layout_options: dict | None = None,
    shard_size: int = 1000,
    image_size: int = 256,
    image_format: str = "jpg",
    audio_rate: int | None = None,
    audio_format: str = "flac",
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
) -> PackResult:
    """Write the rows of ``source`` into WebDataset shards in ``out`` (see the module docstring).

    Raises :class:`FileExistsError` if ``out`` holds something other than an unfinished pack of
    the same source with the same settings.
    """
    if shard_size < 1:
        raise ValueError("--shard-size must be at least 1")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"--image-format must be jpg or png, got {image_format!r}")
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"--audio-format must be {' or '.join(AUDIO_FORMATS)}, got {audio_format!r}")
    if audio_format != "flac" and not audio_rate:
        raise ValueError("--audio-format applies to re-encoded audio: give --audio-rate too "
                         "(without it audio files are copied as they are)")
    layout_options = dict(layout_options or {})
    table = read_dataset(source, layout, **layout_options)
    if not isinstance(table, Table):
        raise ValueError(
            f"{source} is already WebDataset shards; pack reads a manifest or a table layout"
        )
    if len(set(table.ids)) != len(table.ids):  # a key per sample: repeated ids would merge samples
        seen: set[str] = set()
        dup = next(i for i in table.ids if i in seen or seen.add(i))
        raise ValueError(f"{source}: the id {dup!r} is given to more than one place; ids must be unique")
    out = Path(out)
    if out.suffix.lower() in (".tar", ".tgz", ".gz") and not out.is_dir():
        raise ValueError(f"{out} looks like a file name; the output is a folder that will hold the shards "
                         f"(e.g. {out.with_suffix('')}/): name a folder")
    s = _settings(
        table,
        str(Path(source).resolve()),
        layout,
        layout_options,
        shard_size,
        image_size,
        image_format,
        audio_rate,
        audio_format,
    )
    state = out / PACK_FILE
    if out.exists() and any(out.iterdir()):
        if not state.is_file():
            raise FileExistsError(
                f"{out} exists and is not a GeoBind pack (no {PACK_FILE}); choose a new or empty folder"
            )
        try:
            prev = json.loads(state.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{state} does not read ({e}): the pack in {out} cannot be resumed; delete {out} "
                             "(or pack into a new folder) to start over") from None
        diff = [k for k in s if prev.get("settings", {}).get(k) != s[k]]
        if diff:
            detail = ", ".join(
                f"{k}: {prev.get('settings', {}).get(k)!r} there, {s[k]!r} now" for k in diff
            )
            raise FileExistsError(
                f"{out} holds a pack made from other data or settings ({detail}); pack into a new folder, "
                "or delete it to start over"
            )
        if prev.get("complete"):
            if log:
                log(
                    f"{out}: already complete ({prev.get('samples')} samples in {prev.get('shards')} shards); nothing to do"
                )
            return PackResult(
                out,
                prev.get("shards", 0),
                prev.get("samples", 0),
                prev.get("shards", 0),
                Counter(prev.get("bad", {})),
                [],
                True,
            )
    out.mkdir(parents=True, exist_ok=True)
    # pack.json first: a folder that holds nothing else (a full disk there) stays a new folder.
    _write_state(state, {"format": PACK_FORMAT, "version": 1, "settings": s, "complete": False})
    (out / ".pack").mkdir(exist_ok=True)
    # Held while this pack runs: a second one into the same folder would write the same shards.
    lock, holder = exclusive_lock(out / ".pack" / ".lock")
    if holder is not None:
        raise FileExistsError(f"{out} is being packed by another geobind data pack (pid {holder}); wait for it "
                              "to end, or stop it, or pack into another folder")
    try:
        return _pack_shards(table, out, s, state, shard_size, workers, progress, log)
    finally:
        if lock is not None:
            lock.close()


def _pack_shards(table, out: Path, s: dict, state: Path, shard_size: int, workers: int, progress: bool,
                 log) -> PackResult:
    """The shards ``pack`` has not written yet, then its index and ``pack.json``."""

    n = len(table)
    n_shards = math.ceil(n / shard_size)
    done: dict[int, dict] = {}
    for k in range(n_shards):
        rec_path = out / ".pack" / f"shard-{k:06d}.json"
        if rec_path.is_file() and (out / _shard_name(k)).is_file():
            done[k] = json.loads(rec_path.read_text())
    resumed = len(done)
    if resumed and log:
        log(f"{out}: resuming, {resumed} of {n_shards} shards already written")
    todo = [k for k in range(n_shards) if k not in done]
    pbar = None
    if progress:
        from tqdm.auto import tqdm

        pbar = tqdm(
            total=n,
            initial=sum(r["rows"] for r in done.values()),
            desc="pack",
            unit="row",
            dynamic_ncols=True,
        )
    try:
        rows_of = {k: list(range(k * shard_size, min(n, (k + 1) * shard_size))) for k in todo}
        if workers > 1 and len(todo) > 1:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(table,))
            try:
                futs = {pool.submit(_write_shard, k, rows_of[k], str(out), s): k for k in todo}
                for fut in as_completed(futs):
                    rec = fut.result()
                    done[rec["shard"]] = rec
                    if pbar is not None:
                        pbar.update(rec["rows"])
            except BaseException:
                # A stop (Ctrl-C, SIGTERM) or a failed shard: the shards not started are dropped
                # and the ones being written end with their workers (their temporary files are
                # removed by the next run, which writes them again); finished shards are kept.
                procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown forgets them
                pool.shutdown(wait=False, cancel_futures=True)
                for proc in procs:
                    proc.terminate()
                for proc in procs:  # ended before the pack's lock, which they share, is let go
                    proc.join(timeout=10)
                raise
            pool.shutdown()
        else:
            for k in todo:
                rec = _write_shard(k, rows_of[k], str(out), s, table)
                done[k] = rec
                if pbar is not None:
                    pbar.update(rec["rows"])
    finally:
        if pbar is not None:
            pbar.close()

    bad: Counter = Counter()
    examples: list[str] = []
    entries, counts, urls, suffixes = [], [], [], set()
    for k in range(n_shards):
        rec = done[k]
        bad.update(rec["bad"])
        examples.extend(rec["examples"])
        entries.extend(rec["entries"])
        counts.append(len(rec["entries"]))
        urls.append(str((out / rec["url"]).resolve()))
        suffixes.update(rec["suffixes"])
    index = (
        pd.DataFrame(entries)
        if entries
        else pd.DataFrame(columns=["key", "id", "lat", "lon", "problem"])
    )
    with writes_named(out / SHARDS_FILE, "every shard is written: run the same command again to finish"):
        try:
            write_index(out, urls, index, counts, sorted(suffixes), geobind_schema())
        except BaseException:
            for name in ("index.parquet.tmp", SHARDS_FILE + ".tmp"):
                (out / name).unlink(missing_ok=True)
            raise
    samples = len(entries)
    _write_state(state, {"format": PACK_FORMAT, "version": 1, "settings": s, "complete": True,
                         "shards": n_shards, "samples": samples, "bad": dict(bad)})
    shutil.rmtree(out / ".pack", ignore_errors=True)
    assert (out / SHARDS_FILE).is_file()
    return PackResult(out, n_shards, samples, resumed, bad, examples[:20], True)
