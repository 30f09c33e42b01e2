"""Search: exact chunked search against brute force, FAISS indexes and their recall check,
index verification against the model, combined queries and the search command."""

import json
import sys

import numpy as np
import pytest
import torch
from space_helpers import clustered_unit_vectors, perturbed_copy, saved_space, synthetic_embeddings

from geobind import GeoBind
from geobind.cli import main
from geobind.search import (
    Index,
    Query,
    build_index,
    embed_query,
    exact_topk,
    recall_at_k,
    sniff_file,
)
from geobind.search import index as index_mod


@pytest.fixture(scope="module")
def space(tiny_data, tmp_path_factory):
    """The tiny saved model, its satellite embeddings of the test split, and an exact index."""
    from geobind.search.embed import embed_dataset

    root = tmp_path_factory.mktemp("space")
    model_dir = saved_space(tiny_data, root)
    model = GeoBind.from_pretrained(model_dir)
    emb = root / "sat.parquet"
    embed_dataset(model, tiny_data["test"], "satellite", emb, chunk_rows=5, log=None)
    build_index(emb, root / "sat.index", "exact", log=None)
    return {
        "root": root,
        "model_dir": model_dir,
        "model": model,
        "emb": emb,
        "index": root / "sat.index",
        "data": tiny_data,
    }


def test_exact_chunked_search_equals_brute_force():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(5000, 48)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q = rng.normal(size=(7, 48)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    full = torch.from_numpy(q) @ torch.from_numpy(v).T
    ref_s, ref_i = full.topk(10, dim=1)
    for chunk in (333, 1000, 5000, 100_000):
        s, i = exact_topk(v, q, 10, chunk_rows=chunk)
        assert np.array_equal(i, ref_i.numpy()), chunk
        np.testing.assert_allclose(s, ref_s.numpy(), atol=1e-5)
    # float16 storage is widened chunk by chunk: same as brute force over the widened vectors.
    h = v.astype(np.float16)
    ref16 = (torch.from_numpy(q) @ torch.from_numpy(h.astype(np.float32)).T).topk(10, dim=1)
    s, i = exact_topk(h, q, 10, chunk_rows=777)
    assert np.array_equal(i, ref16.indices.numpy())
    # k larger than the collection returns everything, sorted.
    s, i = exact_topk(v[:4], q, 10)
    assert i.shape == (7, 4) and np.all(np.diff(s, axis=1) <= 0)


def test_exact_index_round_trip_search_equals_brute_force(tmp_path):
    vec = clustered_unit_vectors(3000, 32)
    emb = synthetic_embeddings(vec.astype(np.float16))
    built = build_index(emb, tmp_path / "x.index", "exact", log=None)
    assert built.kind == "exact"
    index = Index.load(tmp_path / "x.index")
    assert len(index) == 3000 and index.dim == 32 and index.identity == "test-identity"
    q = clustered_unit_vectors(5, 32, seed=1)
    s, i = index.search(q, k=10)
    ref = (
        torch.from_numpy(q) @ torch.from_numpy(vec.astype(np.float16).astype(np.float32)).T
    ).topk(10, dim=1)
    assert np.array_equal(i, ref.indices.numpy())
    hits = index.hits(q[0], k=3)
    assert [h.rank for h in hits] == [1, 2, 3]
    assert hits[0].id == f"p{i[0, 0]}" and hits[0].caption == f"place {i[0, 0]}"
    assert hits[0].lat == pytest.approx(emb.lat[i[0, 0]])
    # memory-mapped loading gives the same answer
    s2, i2 = Index.load(tmp_path / "x.index", mmap=True).search(q, k=10)
    assert np.array_equal(i2, i)


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_index_recall_check(tmp_path, kind):
    pytest.importorskip("faiss")
    vec = clustered_unit_vectors(4000, 32)
    emb = synthetic_embeddings(vec)
    opts = {"nlist": 32, "pq_m": 8} if kind == "ivfpq" else {}
    index = build_index(
        emb, tmp_path / "a.index", kind, check=True, target_recall=0.9, log=None, **opts
    )
    check = index.header["check"]
    assert check["recall@10"] >= 0.9 and check["queries"] == 1000
    # The reported recall is what an independent computation of the same queries gives.
    loaded = Index.load(tmp_path / "a.index")
    assert loaded.header["check"] == check
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4000, 1000), rng.integers(0, 4000, 1000)
    q = vec[a] + vec[b]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    truth_s, truth = exact_topk(vec, q, 10)
    s, got = loaded.search(q, 10)
    assert recall_at_k(got, truth, s, truth_s) == pytest.approx(check["recall@10"], abs=1e-4)
    # Scores of approximate results are exact cosines of the returned items.
    np.testing.assert_allclose(s[:, 0], np.einsum("qd,qd->q", vec[got[:, 0]], q), atol=1e-5)
    # exact=True bypasses FAISS.
    _, e = loaded.search(q[:20], 10, exact=True)
    assert np.array_equal(e, truth[:20])


def test_faiss_missing_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    emb = synthetic_embeddings(clustered_unit_vectors(300, 16))
    with pytest.raises(ImportError, match=r"pip install 'geobind\[faiss\]'"):
        Index.build(emb, "hnsw")
    # auto above the threshold falls back to exact, saying why.
    monkeypatch.setattr(index_mod, "APPROX_THRESHOLD", 100)
    said = []
    assert Index.build(emb, "auto", log=said.append).kind == "exact"
    assert "geobind[faiss]" in said[0]


def test_ivfpq_refuses_too_few_embeddings_to_train_on():
    pytest.importorskip("faiss")
    emb = synthetic_embeddings(clustered_unit_vectors(140, 16))
    with pytest.raises(ValueError, match="ivfpq needs at least 624 embeddings to train its codebooks, got 140"):
        Index.build(emb, "ivfpq")


def test_auto_kind_uses_approximate_above_threshold(monkeypatch):
    pytest.importorskip("faiss")
    emb = synthetic_embeddings(clustered_unit_vectors(2000, 16))
    assert Index.build(emb, "auto").kind == "exact"
    monkeypatch.setattr(index_mod, "APPROX_THRESHOLD", 1000)
    assert Index.build(emb, "auto").kind == "ivfpq"


def test_index_refuses_another_model(space, tmp_path):
    model = space["model"]
    index = Index.load(space["index"])
    index.verify(model)  # the model it was built with
    other = perturbed_copy(model)
    with pytest.raises(ValueError, match="built with another model"):
        index.verify(other)
    with pytest.raises(ValueError, match="built with another model"):
        other.search(index, text="a forest")
    # a different dimension
    emb = synthetic_embeddings(clustered_unit_vectors(50, 16), identity=model.identity("satellite"))
    small = Index.build(emb, "exact")
    with pytest.raises(
        ValueError, match="16-d satellite embeddings but the model's space has 32 dims"
    ):
        small.verify(model)
    # the CLI says the same and exits 2
    other.save_pretrained(tmp_path / "other")
    assert (
        main(
            [
                "search",
                "--model",
                str(tmp_path / "other"),
                "--index",
                str(space["index"]),
                "--text",
                "x",
            ]
        )
        == 2
    )


def test_identity_is_stable_and_tracks_weights(space):
    model = space["model"]
    a = model.identity("satellite")
    assert (
        a
        == model.identity("satellite")
        == GeoBind.from_pretrained(space["model_dir"]).identity("satellite")
    )
    assert a != model.identity("audio")
    assert perturbed_copy(model).identity("satellite") != a


def test_combined_query_is_renormalised_sum_and_search_matches_brute_force(space):
    model = space["model"]
    root = space["data"]["root"]
    wav = str(root / "audio" / "0001.wav")
    q = model.embed_query(text="a photo of a forest", audio=wav)
    t = model.embed("text", ["a photo of a forest"])[0]
    a = model.embed("audio", [wav])[0]
    expect = (t + a) / (t + a).norm()
    assert torch.allclose(q, expect, atol=1e-6) and q.norm().item() == pytest.approx(1.0, abs=1e-6)
    # one item is its own embedding
    assert torch.allclose(model.embed_query(text="a photo of a forest"), t, atol=1e-6)
    index = Index.load(space["index"])
    hits = model.search(index, text="a photo of a forest", audio=wav, k=5)
    full = torch.from_numpy(np.asarray(index.vectors, np.float32)) @ expect
    ref = full.topk(5)
    assert [h.id for h in hits] == [index.ids[i] for i in ref.indices.tolist()]
    np.testing.assert_allclose([h.score for h in hits], ref.values.numpy(), atol=1e-5)


def test_query_files_are_checked(space, tmp_path):
    root = space["data"]["root"]
    wav, png = root / "audio" / "0001.wav", root / "sat" / "0001.png"
    assert sniff_file(wav) == "audio" and sniff_file(png) == "image"
    junk = tmp_path / "notes.bin"
    junk.write_bytes(b"this is neither audio nor an image" * 10)
    with pytest.raises(ValueError, match="neither an image nor an audio file"):
        sniff_file(junk)
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(ValueError, match="is empty"):
        sniff_file(tmp_path / "empty.wav")
    with pytest.raises(ValueError, match=r"is audio, not image; pass it as audio= \(--audio\)"):
        embed_query(space["model"], Query.build(image=str(wav)))
    with pytest.raises(ValueError, match="is image, not audio"):
        embed_query(space["model"], Query.build(audio=str(png)))
    with pytest.raises(ValueError, match="empty query"):
        Query.build()


def test_search_cli(space, tmp_path, capsys):
    root = space["data"]["root"]
    base = ["search", "--model", str(space["model_dir"]), "--index", str(space["index"])]
    assert main(base + ["--text", "a photo of a desert", "--k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["score"] == "cosine similarity" and len(out["results"]) == 3
    assert {"rank", "id", "lat", "lon", "score", "caption"} <= set(out["results"][0])
    assert out["results"][0]["caption"].startswith("a photo of a")
    # --file detects the kind; combined with text
    assert main(base + ["--text", "forest", "--file", str(root / "audio" / "0002.wav")]) == 0
    assert "audio 0002.wav" in capsys.readouterr().out
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x00\x01garbage" * 50)
    assert main(base + ["--file", str(junk)]) == 2
    assert "neither an image nor an audio file" in capsys.readouterr().err
    assert main(base) == 2
    assert "no query" in capsys.readouterr().err


def test_index_keeps_thumbnails_and_captions(space):
    index = Index.load(space["index"])
    assert index.has_thumbnails
    first = index.ids[0]
    jpeg = index.thumbnail(first)
    assert jpeg[:2] == b"\xff\xd8"  # JPEG
    assert index.thumbnail("no-such-id") is None
    assert index.caption(first).startswith("a photo of a")


def test_index_build_cli_and_no_overwrite(space, tmp_path, capsys):
    out = tmp_path / "t.index"
    assert main(["index", "build", str(space["emb"]), "--out", str(out)]) == 0
    assert "exact index of 12 satellite embeddings" in capsys.readouterr().out
    assert main(["index", "build", str(space["emb"]), "--out", str(out)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (
        main(["index", "build", str(space["emb"]), "--out", str(out), "--force", "--no-thumbnails"])
        == 0
    )
    assert not Index.load(out).has_thumbnails
    capsys.readouterr()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left
    assert main(["index", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 12
    bad = tmp_path / "bad.parquet"
    bad.write_text("id,lat,lon\n")
    assert main(["index", "build", str(bad), "--out", str(tmp_path / "b.index")]) == 2
    assert "not a Parquet file" in capsys.readouterr().err


def test_index_build_cli_check_reports_recall(tmp_path, capsys):
    pytest.importorskip("faiss")
    from geobind.search import write_embeddings

    emb = synthetic_embeddings(clustered_unit_vectors(3000, 32))
    write_embeddings(emb, tmp_path / "e.parquet")
    rc = main(
        [
            "index",
            "build",
            str(tmp_path / "e.parquet"),
            "--out",
            str(tmp_path / "e.index"),
            "--kind",
            "ivfpq",
            "--nlist",
            "32",
            "--check",
            "--target-recall",
            "0.9",
        ]
    )
    assert rc == 0
    assert "recall@10" in capsys.readouterr().out
    assert Index.load(tmp_path / "e.index").header["check"]["recall@10"] >= 0.9


def test_space_benchmarks_run_at_a_tiny_size(tmp_path):
    """The benchmark script (benchmarks/space_benchmarks.py) end to end, tiny: it stays runnable."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "space_benchmarks.py"
    spec = importlib.util.spec_from_file_location("space_benchmarks", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    skip = [] if _has_faiss() else ["ivfpq", "hnsw"]
    out = tmp_path / "r.json"
    argv = [
        "--n",
        "3000",
        "--dim",
        "32",
        "--clusters",
        "50",
        "--latent",
        "8",
        "--tiles",
        "4",
        "--quick",
        "--check-queries",
        "100",
        "--out",
        str(out),
        *(["--skip", *skip] if skip else []),
    ]
    assert bench.main(argv) == 0
    res = json.loads(out.read_text())
    assert res["maps"]["places"] == 3000 and res["exact"]["batch_1"]["queries_per_s"] > 0
    assert res["embedding"]["tiny-32"]["end_to_end_tiles_per_s"] > 0
    if not skip:
        assert res["ivfpq"]["recall@10"] >= 0.95


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


# -- scores, short results, tuning and the command line's edges -----------------------------
@pytest.mark.parametrize("kind", ["exact", "hnsw", "ivfpq"])
def test_scores_of_a_float16_index_stay_within_minus_one_and_one(kind):
    if kind != "exact":
        pytest.importorskip("faiss")
    vec = clustered_unit_vectors(700, 16).astype(np.float16)  # rounded: norms up to ~1.0002
    wide = vec.astype(np.float32)
    row = int(np.argmax(np.linalg.norm(wide, axis=1)))
    q = wide[row] / np.linalg.norm(wide[row])
    assert q @ wide[row] > 1.0  # the raw cosine of this row overshoots
    index = Index.build(synthetic_embeddings(vec), kind)
    s, i = index.search(q, k=5)
    assert i[0, 0] == row and s[0, 0] == 1.0 and (s <= 1.0).all() and (s >= -1.0).all()
    assert index.hits(q, k=5)[0].score == 1.0
    s, _ = index.search(q, k=800)  # rows past the item count stay -inf, not clamped to -1
    assert np.isneginf(s[0, 700:]).all()
    if kind == "exact":  # map scores too, from float16 and from float32 tensors
        from geobind.search.maps import score_matrix

        for vectors in (vec, torch.from_numpy(wide)):
            m = score_matrix(vectors, q)
            assert m[row, 0] == 1.0 and (np.abs(m) <= 1.0).all()


def test_search_cli_notes_when_ivfpq_returns_fewer_than_k(space, tmp_path, capsys):
    pytest.importorskip("faiss")
    model = space["model"]
    # Places embedded "by this model" (its identity), enough to train ivfpq; 1 of 16 lists scanned.
    emb = synthetic_embeddings(
        clustered_unit_vectors(700, model.dim), identity=model.identity("satellite")
    )
    build_index(emb, tmp_path / "pq.index", "ivfpq", nlist=16, nprobe=1, log=None)
    base = ["search", "--model", str(space["model_dir"]), "--index", str(tmp_path / "pq.index")]
    assert main(base + ["--text", "forest", "--k", "700"]) == 0
    out = capsys.readouterr().out
    assert "note: " in out and "not 700" in out and "1 of its 16 lists" in out and "--exact" in out
    assert main(base + ["--text", "forest", "--k", "700", "--json"]) == 0
    got = capsys.readouterr()
    assert len(json.loads(got.out)["results"]) < 700 and "--exact" in got.err
    assert main(base + ["--text", "forest", "--k", "700", "--exact"]) == 0
    assert "note:" not in capsys.readouterr().out


@pytest.mark.parametrize("text", ["", "   "])
def test_search_cli_refuses_empty_text(space, capsys, text):
    base = ["search", "--model", str(space["model_dir"]), "--index", str(space["index"])]
    assert main(base + ["--text", text]) == 2
    assert "--text is empty: give words to search for" in capsys.readouterr().err


def test_closed_pipe_ends_the_command_quietly(space):
    """`geobind ... --json | head -1`: the reader goes away; no error message, no traceback."""
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", "geobind", "index", "info", str(space["index"]), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before the command writes anything
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert err == b""


def test_a_broken_pipe_elsewhere_is_an_error(space, monkeypatch, capsys):
    import geobind.cli_space as cli_space

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe (a worker's)")

    monkeypatch.setattr(cli_space, "cmd_index_info", broken)
    assert main(["index", "info", str(space["index"]), "--json"]) == 2
    assert "error: [Errno 32] Broken pipe (a worker's)" in capsys.readouterr().err


def test_check_keeps_a_search_setting_given_and_tunes_one_not_given(tmp_path, capsys):
    pytest.importorskip("faiss")
    from geobind.search import write_embeddings

    write_embeddings(synthetic_embeddings(clustered_unit_vectors(1000, 16)), tmp_path / "e.parquet")
    build = ["index", "build", str(tmp_path / "e.parquet"), "--kind", "hnsw", "--check"]
    assert main(build + ["--out", str(tmp_path / "a.index"), "--ef-search", "256"]) == 0
    out = capsys.readouterr().out
    header = Index.load(tmp_path / "a.index").header
    assert header["search"]["ef_search"] == 256 and header["check"]["ef_search"] == 256
    assert "ef_search=256 as given" in out
    summary = out.strip().splitlines()[-1]
    assert sum(w in summary for w in ("x faster than", "x slower than", "as fast as")) == 1
    assert main(build + ["--out", str(tmp_path / "b.index")]) == 0
    out = capsys.readouterr().out
    tuned = Index.load(tmp_path / "b.index").header["search"]["ef_search"]
    # Easy midpoint probes reach the target at the default: kept, never lowered.
    assert tuned == 128 and "ef_search=128:" in out
    # A target the default misses is tuned upward.
    assert main(build + ["--out", str(tmp_path / "c.index"), "--target-recall", "1.0", "--hnsw-m", "2"]) == 0
    out = capsys.readouterr().out
    tuned = Index.load(tmp_path / "c.index").header["search"]["ef_search"]
    assert tuned > 128 and f"ef_search set to {tuned} (was 128)" in out and "--ef-search" in out


def test_ivfpq_check_scans_up_to_every_list_and_suggests_rerank():
    pytest.importorskip("faiss")
    emb = synthetic_embeddings(clustered_unit_vectors(800, 16))
    # nlist 20 is no power of two; coarse 2-byte codes and no re-ranking keep recall low.
    index = Index.build(emb, "ivfpq", nlist=20, pq_m=2, rerank=1)
    said = []
    result = index.check(target_recall=0.99, log=said.append)
    assert result["recall@10"] < 0.99
    assert index.header["search"]["nprobe"] == 20 and "nprobe=20:" in " ".join(said)
    assert any("raise --rerank (now 1)" in s for s in said)


def test_speed_is_worded_as_faster_or_slower():
    assert index_mod.speed_phrase(2.0) == "2.0x faster than exact search"
    assert index_mod.speed_phrase(0.25) == "4.0x slower than exact search"
    assert index_mod.speed_phrase(0.97) == "as fast as exact search"


def test_nlist_help_states_the_default_the_code_uses(capsys):
    assert index_mod._default_nlist(790) == 790 // 39  # 4 sqrt(N) ~ 112 is capped at N/39
    assert index_mod._default_nlist(1_000_000) == 4096
    with pytest.raises(SystemExit):
        main(["index", "build", "--help"])
    assert "at most N/39" in " ".join(capsys.readouterr().out.split())


def test_a_k_above_the_index_size_ranks_every_item_without_padding(tmp_path):
    vec = clustered_unit_vectors(50, 16)
    index = build_index(synthetic_embeddings(vec), tmp_path / "x.index", "exact", log=None)
    s, i = index.search(vec[:2], k=10**9)  # no k-sized allocation
    assert s.shape == (2, 50) and sorted(i[0]) == list(range(50))


def test_index_settings_are_checked_before_building(tmp_path):
    emb = synthetic_embeddings(clustered_unit_vectors(1000, 16))
    for opts, said in (({"nprobe": 0}, "nprobe=0: give a whole number of at least 1"),
                       ({"hnsw_m": 0}, "hnsw_m=0: give a whole number of at least 2"),
                       ({"ef_search": -1}, "ef_search=-1"), ({"rerank": 0}, "rerank=0"),
                       ({"nlist": 0}, "nlist=0"), ({"thumbnail_size": 0}, "thumbnail_size=0")):
        with pytest.raises(ValueError, match=said):
            build_index(emb, tmp_path / "x.index", "exact", log=None, **opts)
    with pytest.raises(ValueError, match="target_recall=2: a recall is in"):
        build_index(emb, tmp_path / "x.index", "exact", target_recall=2, log=None)
    if _has_faiss():
        with pytest.raises(ValueError, match=r"nlist=100000 lists for 1000 embeddings: .* at most 25"):
            build_index(emb, tmp_path / "x.index", "ivfpq", nlist=100_000, log=None)
    assert not (tmp_path / "x.index").exists()


def test_an_image_too_large_to_decode_is_a_bad_item_not_a_crash(space, tmp_path, capsys):
    from PIL import Image

    from geobind.data.errors import BadSampleError
    from geobind.data.media import load_image

    big = tmp_path / "scene.png"
    Image.frombytes("L", (15000, 15000), bytes(15000 * 15000)).save(big)  # 225 M pixels, 200 KB
    with pytest.raises(BadSampleError, match="too-large .*cut it into tiles"):
        load_image(big)
    assert main(["search", "--model", str(space["model_dir"]), "--index", str(space["index"]),
                 "--file", str(big)]) == 2
    err = capsys.readouterr().err
    assert "too-large" in err and "Traceback" not in err


def test_recall_check_counts_a_duplicate_of_a_true_hit_as_found():
    """Items tied with the k-th exact result (duplicate vectors) are as good an answer: the
    check must not report low recall, and tune to the slowest setting, for perfect results."""
    pytest.importorskip("faiss")
    vec = np.repeat(clustered_unit_vectors(1000, 32), 4, axis=0)
    vec = vec[np.random.default_rng(0).permutation(len(vec))]
    index = Index.build(synthetic_embeddings(vec), "hnsw")
    check = index.check(n_queries=300, target_recall=0.95)
    assert check["recall@10"] >= 0.95 and check["ef_search"] < 1024


def test_an_index_of_non_finite_rows_is_refused():
    """A NaN row would rank first for every query; the build names the rows instead."""
    vec = clustered_unit_vectors(20, 8)
    vec[[3, 7]] = np.nan
    with pytest.raises(ValueError, match=r"2 embedding row\(s\) are not finite .* ids 'p3', 'p7'"):
        Index.build(synthetic_embeddings(vec), "exact")


def test_a_damaged_index_says_rebuild_it(tmp_path):
    index = Index.build(synthetic_embeddings(clustered_unit_vectors(20, 8)), "exact")
    index.save(tmp_path / "a.index")
    (tmp_path / "a.index" / "vectors.npy").write_bytes(b"\x93NUMPY")  # cut short
    with pytest.raises(ValueError, match=r"a.index is damaged .*rebuild it with `geobind index build`"):
        Index.load(tmp_path / "a.index")
    (tmp_path / "a.index" / "vectors.npy").unlink()
    with pytest.raises(ValueError, match="is damaged: vectors.npy missing; rebuild it"):
        Index.load(tmp_path / "a.index")
    (tmp_path / "a.index" / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="is damaged: index.json does not read"):
        Index.load(tmp_path / "a.index")


def test_index_info_imports_no_torch(space):
    """Describing an index reads a JSON header: it loads neither torch nor the training stack."""
    import subprocess

    code = ("import sys; from geobind.cli import main; rc = main(['index', 'info', sys.argv[1]]); "
            "print(rc, sorted(m for m in ('torch', 'transformers', 'geobind.binding.trainer') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(space["index"])], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout + out.stderr
