import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
from dist_helpers import free_port, rank_env, spawn_with_deadline
from PIL import Image
from test_model import build_space

from geobind.binding.cache import cached_embeddings, embed_table
from geobind.data.manifest import read_dataset


def test_cache_is_reused_and_invalidated(tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data["root"], data)
    model = build_space(tiny_data)
    ground = model.encoder("ground")
    table = read_dataset(data / "stage1.csv")
    cache = tmp_path / "cache"

    e1, v1, info1 = cached_embeddings(ground, table, "ground", cache)
    assert not info1["hit"] and v1.all() and e1.dtype == torch.float16
    ref, _, _ = embed_table(ground, table, "ground")
    assert torch.equal(e1, ref.half())
    e2, v2, info2 = cached_embeddings(ground, table, "ground", cache)
    assert info2["hit"] and info2["path"] == info1["path"] and torch.equal(e1, e2)

    # A changed image file gives a new key.
    time.sleep(0.01)
    p = table.columns["ground"][0]
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(p)
    e3, _, info3 = cached_embeddings(ground, read_dataset(data / "stage1.csv"), "ground", cache)
    assert not info3["hit"] and not torch.equal(e3[0], e1[0]) and torch.equal(e3[1:], e1[1:])

    # A changed anchor gives a new key.
    with torch.no_grad():
        ground.clip.visual_projection.weight.add_(0.01)
    _, _, info4 = cached_embeddings(ground, read_dataset(data / "stage1.csv"), "ground", cache)
    assert not info4["hit"] and info4["path"] != info3["path"]

    # A changed manifest gives a new key.
    df_text = (data / "stage1.csv").read_text().splitlines()
    (data / "stage1.csv").write_text("\n".join(df_text[:-1]) + "\n")
    _, _, info5 = cached_embeddings(ground, read_dataset(data / "stage1.csv"), "ground", cache)
    assert not info5["hit"]
    assert len(list(cache.glob("*.safetensors"))) == 4

    # Changed preprocessing (a setting encoder.settings() reports) with the same weights gives
    # a new key: the same photos give other inputs, hence other embeddings.
    before = ground.settings()
    ground.transform.mean = (0.5, 0.5, 0.5)
    assert ground.settings() != before
    e6, _, info6 = cached_embeddings(ground, read_dataset(data / "stage1.csv"), "ground", cache)
    assert not info6["hit"] and info6["path"] != info5["path"]
    assert len(list(cache.glob("*.safetensors"))) == 5


def test_bad_rows_are_marked_invalid_and_counted(tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data["root"], data)
    table = read_dataset(data / "stage1.csv")
    (data / "ground" / "0001.png").write_bytes(b"")
    (data / "ground" / "0002.png").write_bytes(b"not a png at all")
    (data / "ground" / "0003.png").unlink()
    (data / "ground" / "0005.png").unlink()  # a reason met twice is counted twice
    model = build_space(tiny_data)
    emb, valid, info = cached_embeddings(model.encoder("ground"), table, "ground", tmp_path / "c")
    assert valid.tolist()[:7] == [True, False, False, False, True, False, True]
    assert info["bad"] == {"empty": 1, "undecodable": 1, "missing": 2}
    assert torch.all(emb[[1, 2, 3, 5]] == 0) and valid.sum() == len(table) - 4


def _mapped_from(t: torch.Tensor, path) -> bool:
    """Whether ``t``'s memory lies in a mapping of the file ``path`` (Linux)."""
    ptr = t.data_ptr()
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return len(parts) >= 6 and parts[5] == str(path)
    return False


def test_cache_stores_float16_and_reads_float32_files(tiny_data, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    model = build_space(tiny_data)
    ground = model.encoder("ground")
    table = read_dataset(tiny_data["stage1"])
    ref, v_ref, _ = embed_table(ground, table, "ground", batch_size=8)

    emb, valid, info = cached_embeddings(ground, table, "ground", tmp_path / "c", batch_size=8)
    assert emb.dtype == torch.float16 and torch.equal(emb, ref.half()) and torch.equal(valid, v_ref)
    with safe_open(info["path"], framework="pt") as f:
        assert f.get_slice("embeddings").get_dtype() == "F16"
    meta = json.loads(open(info["path"].replace(".safetensors", ".json")).read())
    assert meta["dtype"] == "float16" and meta["rows"] == len(table)
    # Rounding unit vectors to float16 moves each component by at most ~5e-4 of the norm.
    assert (emb.float() - ref).abs().max() <= 2**-11

    hit, hit_valid, hit_info = cached_embeddings(ground, table, "ground", tmp_path / "c")
    assert hit_info["hit"] and torch.equal(hit, emb) and torch.equal(hit_valid, valid)
    if os.path.exists("/proc/self/maps"):
        # Zero-copy: the tensor is the file's pages, shared by every process that maps it.
        assert _mapped_from(hit, os.path.realpath(info["path"]))

    # A float32 file as an earlier version wrote it, under the same name: read, not recomputed,
    # and exactly what a fresh float16 file holds.
    old = tmp_path / "old" / os.path.basename(info["path"])
    old.parent.mkdir()
    v_ref[5] = False  # marks the file as the one read
    save_file({"embeddings": ref.contiguous(), "valid": v_ref.to(torch.uint8)}, str(old))
    old.with_suffix(".json").write_text(json.dumps({"bad": {"missing": 1}}))
    e32, v32, i32 = cached_embeddings(ground, table, "ground", tmp_path / "old")
    assert i32["hit"] and i32["bad"] == {"missing": 1}
    assert e32.dtype == torch.float16 and torch.equal(e32, emb) and torch.equal(v32, v_ref)


def test_rank_bounds_cut_at_batches_or_shards(tiny_data, tmp_path, monkeypatch):
    from layout_fixtures import make_bad_shards

    from geobind.binding.cache import rank_bounds

    table = read_dataset(tiny_data["stage1"])  # 36 rows
    assert rank_bounds(table, 1, 4) == [0, 36]
    assert rank_bounds(table, 2, 4) == [0, 16, 36]
    assert rank_bounds(table, 3, 5) == [0, 10, 25, 36]
    assert rank_bounds(table, 4, 64) == [0, 0, 0, 36, 36]  # one batch: one rank takes it
    monkeypatch.setenv("GEOBIND_CACHE", str(tmp_path / "geobind-cache"))
    shards = read_dataset(make_bad_shards(tmp_path / "shards"))  # two shards of 6
    assert rank_bounds(shards, 2, 4) == [0, 6, 12]
    assert rank_bounds(shards, 3, 4) == [0, 6, 6, 12]


# -- several ranks ----------------------------------------------------------------------------

WORLD = 2


def _bad_manifests(tiny_data, root):
    """Copies of stage1 (36 rows): ``both`` has bad ground photos in rows 1-3 (rank 0's share at
    batch size 4) and 30 (rank 1's); ``late`` only in row 30."""
    import shutil

    import pandas as pd

    data = root / "data"
    shutil.copytree(tiny_data["root"], data)
    (data / "ground" / "empty.png").write_bytes(b"")
    (data / "ground" / "junk.png").write_bytes(b"not a png at all")
    df = pd.read_csv(data / "stage1.csv")
    late = df.copy()
    late.loc[30, "ground"] = "ground/nope.png"
    both = late.copy()
    both.loc[1, "ground"], both.loc[2, "ground"], both.loc[3, "ground"] = (
        "ground/empty.png", "ground/junk.png", "ground/nope.png")
    both.to_csv(data / "both.csv", index=False)
    late.to_csv(data / "late.csv", index=False)
    return data / "both.csv", data / "late.csv"


def _cache_worker(r: int, port: int, tiny_data, cases, root) -> None:
    from geobind import distributed as gbdist
    from geobind.binding import cache as cache_mod

    rank_env(r, port, WORLD)
    gbdist.init_distributed(backend="gloo")
    try:
        writes = []
        real_save = cache_mod.save_file

        def counting_save(tensors, path):
            writes.append(str(path))
            return real_save(tensors, path)

        cache_mod.save_file = counting_save
        model = build_space(tiny_data)
        out = {}
        for name, (path, modality, bs, gather_bytes) in cases.items():
            table, enc = read_dataset(path), model.encoder(modality)
            out[name] = [
                cached_embeddings(enc, table, modality, root / "cache", batch_size=bs,
                                  gather_bytes=gather_bytes)
                for _ in range(2)
            ]
        out["writes"] = list(writes)

        # Two machines without a shared filesystem (each rank its own folder, both local rank
        # 0): each machine keeps a copy, so the next run is a hit on both.
        os.environ["LOCAL_RANK"] = "0"
        path, modality, bs, _ = cases["shards"]
        enc = model.encoder(modality)
        out["nodes"] = [
            cached_embeddings(enc, read_dataset(path), modality, root / f"node{r}", batch_size=bs)[2]
            for _ in range(2)
        ]
        os.environ["LOCAL_RANK"] = str(r)

        # Under strict, a bad sample in rank 1's share stops both ranks (no hang).
        try:
            cached_embeddings(model.encoder("ground"), read_dataset(root / "data" / "late.csv"),
                              "ground", root / "strict", batch_size=4, strict=True)
            out["strict"] = "no error"
        except Exception as e:
            out["strict"] = f"{type(e).__name__}: {e}"

        # Rank 0 cannot write the file (a full disk): both ranks stop, rank 1 not left waiting.
        def full_disk(*args):
            raise OSError("No space left on device")

        real_write = cache_mod._write
        if r == 0:
            cache_mod._write = full_disk
        try:
            cached_embeddings(enc, read_dataset(path), modality, root / "full", batch_size=bs)
            out["full"] = "no error"
        except Exception as e:
            out["full"] = f"{type(e).__name__}: {e}"
        cache_mod._write = real_write
        both = root / "data" / "both.csv"
        out["shared"] = cache_mod.embed_table_shared(model.encoder("ground"), read_dataset(both), "ground",
                                                     batch_size=4)

        class _Local(Exception):  # defined here: cannot be unpickled by the other rank
            pass

        real_rows = cache_mod._embed_rows
        if r == 1:
            cache_mod._embed_rows = lambda *a, **k: (_ for _ in ()).throw(_Local("only on rank 1"))
        try:
            cache_mod.embed_table_shared(model.encoder("ground"), read_dataset(both), "ground", batch_size=4)
            out["unpicklable"] = "no error"
        except Exception as e:
            out["unpicklable"] = f"{type(e).__name__}: {e}"
        cache_mod._embed_rows = real_rows
        torch.save(out, root / f"rank{r}.pt")
    finally:
        gbdist.cleanup()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_share_the_work_and_match_one_process(tiny_data, tmp_path, monkeypatch):
    from layout_fixtures import make_bad_shards

    monkeypatch.setenv("GEOBIND_CACHE", str(tmp_path / "geobind-cache"))
    both, _ = _bad_manifests(tiny_data, tmp_path)
    shard_dir = make_bad_shards(tmp_path / "shards")
    # name -> (data, modality, batch size, gather buffer bytes); 32-d float16 rows are 64 B, so
    # 512 B moves the manifest in rounds of 4 rows per rank.
    cases = {"table": (both, "ground", 4, 512), "shards": (shard_dir, "satellite", 3, 256 * 2**20)}
    expected_bad = {"table": {"empty": 1, "undecodable": 1, "missing": 2},
                    "shards": {"missing-satellite": 1, "undecodable": 1, "bad-metadata": 1,
                               "bad-coordinates": 1, "bad-shard": 1, "duplicate-id": 1}}

    # Single-process references, one thread like the workers.
    model = build_space(tiny_data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        refs = {}
        for name, (path, modality, bs, _) in cases.items():
            table = read_dataset(path)  # builds the shard index once, before the workers
            emb, valid, info = cached_embeddings(model.encoder(modality), table, modality,
                                                 tmp_path / "single", batch_size=bs)
            e32, v32, c32 = embed_table(model.encoder(modality), table, modality, batch_size=bs)
            assert torch.equal(emb, e32.half()) and torch.equal(valid, v32)
            assert info["bad"] == dict(c32) == expected_bad[name], name
            refs[name] = (emb, valid)
    finally:
        torch.set_num_threads(threads)

    spawn_with_deadline(_cache_worker, (free_port(), tiny_data, cases, tmp_path), WORLD, seconds=300)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    for name in cases:
        ref_emb, ref_valid = refs[name]
        paths = set()
        for r in range(WORLD):
            (e1, v1, i1), (e2, v2, i2) = got[r][name]
            assert (i1["hit"], i2["hit"]) == (False, True), (name, r)
            assert e1.dtype == torch.float16
            assert torch.equal(e1, ref_emb) and torch.equal(e2, ref_emb), (name, r)
            assert torch.equal(v1, ref_valid) and torch.equal(v2, ref_valid), (name, r)
            assert i1["bad"] == i2["bad"] == expected_bad[name], (name, r)
            paths |= {i1["path"], i2["path"]}
        assert len(paths) == 1
        # The file is the same as a single process writes (same key, same bytes).
        single = tmp_path / "single" / os.path.basename(paths.pop())
        assert open(tmp_path / "cache" / single.name, "rb").read() == single.read_bytes()
    # Written once, by rank 0, with nothing temporary left behind.
    assert len(got[0]["writes"]) == len(cases) and got[1]["writes"] == []
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) == [".json"] * 2 + [".safetensors"] * 2

    for r in range(WORLD):
        assert [i["hit"] for i in got[r]["nodes"]] == [False, True]
        assert len(list((tmp_path / f"node{r}").glob("*.safetensors"))) == 1
    # One rank's error is every rank's: rank 0 reports rank 1's bad sample as a bad sample.
    assert got[1]["strict"].startswith("BadSampleError") and got[0]["strict"] == got[1]["strict"]
    assert not list((tmp_path / "strict").glob("*.safetensors"))
    assert got[0]["full"] == got[1]["full"] == "OSError: No space left on device"
    # Validation's embedding shared over the ranks: the single process's numbers on each.
    e32, v32, _ = embed_table(model.encoder("ground"), read_dataset(both), "ground", batch_size=4)
    for r in range(WORLD):
        emb, valid = got[r]["shared"]
        assert torch.equal(valid, v32) and torch.allclose(emb, e32, atol=1e-6), r
    assert got[0]["unpicklable"] == "RuntimeError: embedding failed on rank 1: _Local: only on rank 1"


def test_a_damaged_cache_file_is_computed_again_and_files_are_readable_by_others(tiny_data, tmp_path):
    model = build_space(tiny_data)
    ground = model.encoder("ground")
    table = read_dataset(tiny_data["stage1"])
    cache = tmp_path / "cache"
    old = os.umask(0o022)
    try:
        e1, _, info = cached_embeddings(ground, table, "ground", cache)
        e1 = e1.clone()  # not a view of the file damaged below
    finally:
        os.umask(old)
    path = cache / os.path.basename(info["path"])
    # safetensors writes 0600 whatever the umask; the cache is shared, so it gets the umask's mode.
    assert path.stat().st_mode & 0o777 == 0o644
    path.write_bytes(path.read_bytes()[:40])  # cut short, as a full disk or a killed copy leaves it
    said = []
    e2, _, info2 = cached_embeddings(ground, table, "ground", cache, say=said.append)
    assert not info2["hit"] and torch.equal(e1, e2)
    assert len(said) == 1 and f"anchor cache {path} cannot be read" in said[0] and "computing it again" in said[0]
    assert cached_embeddings(ground, table, "ground", cache)[2]["hit"]


def test_the_text_anchor_cache_key_covers_the_tokenizer(tiny_data, tmp_path):
    """Another tokenizer of the same size gives other token ids, so other embeddings."""
    from geobind.binding.cache import _cache_key, tokenizer_fingerprint

    model = build_space(tiny_data)
    text, ground = model.encoder("text"), model.encoder("ground")
    table = read_dataset(tiny_data["stage1"])
    assert tokenizer_fingerprint(ground) == ""  # encoders that read no text keep their keys
    before = _cache_key(text, table, "text")
    text.tokenizer.backend_tokenizer.add_tokens(["zzqq"])  # the same weights, another tokenizer
    assert _cache_key(text, table, "text") != before


def test_the_anchor_cache_is_computed_in_the_stages_precision(tiny_data, tmp_path):
    """A stage trained in bf16 caches what its anchor computes in bf16 (on CPU here; on CUDA the
    same holds for a stage in fp32), under a key of its own; the usual precision keeps its key."""
    import glob

    from fixtures import tiny_config
    from safetensors.torch import load_file

    from geobind.binding.trainer import train
    from geobind.config import parse_config
    from geobind.model import GeoBind

    def run(out, precision):
        d = tiny_config(tiny_data, out, steps=1, audio=False)
        d["stages"][0]["optim"]["precision"] = precision
        d["eval"] = None
        model = train(parse_config(d), progress=False, log=None)
        files = glob.glob(str(out / "cache" / "anchor-ground-*.safetensors"))
        assert len(files) == 1
        return model, files[0], load_file(files[0])["embeddings"].float()

    model, f32_file, c32 = run(tmp_path / "fp32", "fp32")
    _, auto_file, _ = run(tmp_path / "auto", "auto")
    _, bf16_file, c16 = run(tmp_path / "bf16", "bf16")
    assert os.path.basename(auto_file) == os.path.basename(f32_file) != os.path.basename(bf16_file)
    anchor = GeoBind.from_pretrained(model).encoder("ground")
    table = read_dataset(tiny_data["stage1"])
    items = anchor.collate([anchor.load(table.item("ground", i), train=False) for i in range(len(table))])
    with torch.no_grad():  # what a step without the cache computes, in each precision
        fp32 = anchor(items).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = anchor(items).float()
    assert (c32 - fp32).abs().max() <= 2**-11 and (c16 - bf16.float()).abs().max() <= 2**-11
    assert (c16 - fp32).abs().max() > 2**-11  # the precisions differ by more than the storage
