"""Chunked retrieval metrics against a brute-force reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geobind.metrics import (
    retrieval_metrics,
    retrieval_ranks,
    top1_predictions,
    zero_shot_accuracy,
)


def _brute_ranks(q: np.ndarray, g: np.ndarray) -> np.ndarray:
    sim = q.astype(np.float64) @ g.astype(np.float64).T
    ranks = []
    for i in range(len(q)):
        ranks.append(1 + sum(1 for j in range(len(g)) if sim[i, j] > sim[i, i]))
    return np.array(ranks)


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    a = rng.standard_normal((n, d)).astype(np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk", [1, 7, 16, 37, 64, 4096])
def test_chunked_matches_brute_force(chunk):
    rng = np.random.default_rng(0)
    g = _unit(rng, 37, 8)
    q = _unit(rng, 37, 8) + 0.8 * g  # correlated so ranks spread over 1..N
    ref = _brute_ranks(q, g)
    ranks = retrieval_ranks(torch.from_numpy(q), g, chunk_size=chunk)
    assert ranks.dtype == torch.long
    assert ranks.tolist() == ref.tolist()

    m = retrieval_metrics(q, torch.from_numpy(g), ks=(1, 5, 10), chunk_size=chunk)
    assert set(m) == {"R@1", "R@5", "R@10", "median_rank", "mean_rank", "n"}
    for k in (1, 5, 10):
        assert m[f"R@{k}"] == pytest.approx(float(np.mean(ref <= k)))
        assert type(m[f"R@{k}"]) is float
    assert m["median_rank"] == pytest.approx(float(np.median(ref)))
    assert m["mean_rank"] == pytest.approx(float(np.mean(ref)))
    assert m["n"] == 37 and type(m["n"]) is int


def test_extra_gallery_distractors():
    rng = np.random.default_rng(1)
    g = _unit(rng, 30, 6)
    q = _unit(rng, 20, 6) + g[:20]
    sim = q.astype(np.float64) @ g.astype(np.float64).T
    ref = 1 + (sim > sim[np.arange(20), np.arange(20)][:, None]).sum(1)
    assert retrieval_ranks(q, g, chunk_size=6).tolist() == ref.tolist()


def test_perfect_retrieval():
    e = torch.eye(12)
    m = retrieval_metrics(e, e)
    assert m["R@1"] == 1.0 and m["median_rank"] == 1.0 and m["mean_rank"] == 1.0


@pytest.mark.parametrize("k", [1, 2, 5, 10])
def test_rank_exactly_k_off_by_one(k):
    # Query 0's match scores below exactly k-1 distractors, so it ranks exactly k.
    n = 12
    g = torch.eye(n)
    q = torch.zeros(n, n)
    q[0, 0] = 1.0
    for j in range(1, k):
        q[0, j] = 2.0
    q[1:] = g[1:]
    ranks = retrieval_ranks(q[:1], g)
    assert ranks.tolist() == [k]
    m = retrieval_metrics(q[:1], g, ks=tuple(sorted({k, max(k - 1, 1)})))
    assert m[f"R@{k}"] == 1.0
    if k > 1:
        assert m[f"R@{k - 1}"] == 0.0


def test_ties_are_pessimistic_so_collapse_and_nan_rank_last():
    g = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert retrieval_ranks(g, g).tolist() == [2, 2, 1]  # a duplicate ranks ahead of the match
    collapsed = torch.ones(50, 8) / 8**0.5
    m = retrieval_metrics(collapsed, collapsed)
    assert m["R@10"] == 0.0 and m["median_rank"] == 50
    q = torch.eye(4)
    q[1, 0] = float("nan")
    assert retrieval_ranks(q, torch.eye(4)).tolist() == [1, 4, 1, 1]


def test_zero_shot_accuracy_matches_reference():
    rng = np.random.default_rng(2)
    classes = _unit(rng, 5, 8)
    labels = rng.integers(0, 5, size=50)
    emb = classes[labels] + 0.9 * _unit(rng, 50, 8)
    ref_pred = np.argmax(emb.astype(np.float64) @ classes.astype(np.float64).T, axis=1)
    for chunk in (3, 50, 4096):
        pred = top1_predictions(emb, classes, chunk_size=chunk)
        assert pred.tolist() == ref_pred.tolist()
        acc = zero_shot_accuracy(torch.from_numpy(emb), classes, labels, chunk_size=chunk)
        assert acc == pytest.approx(float(np.mean(ref_pred == labels)))
    assert 0.0 < acc < 1.0  # the case is not degenerate


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_tensors():
    rng = np.random.default_rng(3)
    g = _unit(rng, 50, 8)
    q = _unit(rng, 50, 8) + g
    cpu = retrieval_metrics(q, g, chunk_size=7)
    gpu = retrieval_metrics(torch.from_numpy(q).cuda(), torch.from_numpy(g).cuda(), chunk_size=7)
    assert gpu == pytest.approx(cpu)


@pytest.mark.parametrize("ks", [(0,), (-1,), (1.5,), ("5",), (True,)])
def test_ks_must_be_whole_numbers_from_one(ks):
    x = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    with pytest.raises(ValueError, match="each k is a whole number >= 1"):
        retrieval_metrics(x, x, ks=ks)
    assert set(retrieval_metrics(x, x, ks=(1, 2.0, np.int64(3)))) >= {"R@1", "R@2", "R@3"}
    one = retrieval_metrics(x, x, ks=2)  # a single k need not be a tuple
    assert "R@2" in one and "R@1" not in one


def test_median_rank_of_an_even_count_is_the_mean_of_the_two_middle_ranks():
    """Ranks 1, 2, 3 and 10 give median_rank 2.5, not the lower (2) or upper (3) middle rank.
    The gallery is the identity, so each query row holds its similarities to the 10 items."""
    g = torch.eye(10)
    q = torch.zeros(4, 10)
    q[0, 0] = 1.0  # alone on top: rank 1
    q[1, 1], q[1, 5] = 0.5, 0.9  # one item ahead: rank 2
    q[2, 2], q[2, [6, 7]] = 0.5, 0.9  # two ahead: rank 3
    q[3, 3], q[3, [0, 1, 2, 4, 5, 6, 7, 8, 9]] = 0.1, 0.9  # all nine others ahead: rank 10
    assert retrieval_ranks(q, g).tolist() == [1, 2, 3, 10]
    m = retrieval_metrics(q, g, ks=(1, 3))
    assert m["median_rank"] == 2.5 and m["mean_rank"] == 4.0
    assert (m["R@1"], m["R@3"]) == (0.25, 0.75)


def test_eval_tables_say_when_recall_is_full_by_construction_and_which_pairs_went_unranked():
    from geobind.evaluate import format_pairs, format_skipped

    m = {"R@1": 0.5, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.5, "mean_rank": 2.0}
    text = format_pairs({"audio->text": {**m, "n": 8}, "text->audio": {**m, "n": 40}})
    assert "note: R@10 is 1.0 by construction for a pair of n <= 10 rows" in text
    assert "by construction" not in format_pairs({"audio->text": {**m, "n": 40}})
    line = format_skipped({"skipped": {"audio": {"undecodable": 3}}, "unranked_pairs": ["audio->text", "text->audio"]})
    assert line.splitlines() == ["skipped unusable rows: audio 3 (undecodable 3)",
                                 "not ranked (fewer than 2 rows usable in both): audio->text, text->audio"]
    assert format_skipped({"skipped": {}}) == ""


def test_eval_notes_texts_that_repeat_or_that_the_vocabulary_does_not_know(tiny_data, tmp_path):
    """Both make rows that cannot be told apart, so their pairs score below what the model can do
    (and below the chance line): the report says so."""
    import pandas as pd
    from test_model import build_space

    from geobind.data.manifest import read_dataset
    from geobind.evaluate import evaluate, format_skipped

    model = build_space(tiny_data)
    df = pd.read_csv(tiny_data["test"], dtype={"id": str}, keep_default_na=False)
    df.loc[[1, 2], "text"] = df.loc[0, "text"]
    df.loc[3, "text"] = "森林"
    for col in ("satellite", "ground"):
        df[col] = [str(tiny_data["test"].parent / p) for p in df[col]]
    df.to_csv(tmp_path / "eval-notes.csv", index=False)
    report = evaluate(model, read_dataset(tmp_path / "eval-notes.csv"))
    notes = "\n".join(report["notes"])
    assert f"text: 1 of {len(df)} rows have no word the model's vocabulary knows" in notes
    assert f"text: {len(df)} rows hold {len(df) - 2} distinct values" in notes
    assert "note: text: 1 of" in format_skipped(report)
    assert "notes" not in evaluate(model, read_dataset(tiny_data["test"]))


def test_pair_report_ranks_among_a_seeded_subset_of_candidates():
    """``candidates``: each pair ranks among the same seeded subset of its valid rows, exactly as
    the metrics of those rows alone; fewer valid rows than asked: all of them."""
    from geobind.evaluate import pair_report

    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=1)
    b = torch.nn.functional.normalize(a + 0.8 * torch.randn(50, 8, generator=g), dim=1)
    va, vb = torch.ones(50, dtype=torch.bool), torch.ones(50, dtype=torch.bool)
    vb[[3, 7]] = False
    emb = {"x": (a, va), "y": (b, vb)}
    rep = pair_report(emb, ks=(1, 5, 10, 20), candidates=20, seed=3)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(3))
    rows = order[(va & vb)[order]][:20].sort().values
    assert rep["x->y"] == retrieval_metrics(a[rows], b[rows], ks=(1, 5, 10, 20))
    assert rep["y->x"] == retrieval_metrics(b[rows], a[rows], ks=(1, 5, 10, 20))
    assert rep["x->y"]["n"] == 20 and rep != pair_report(emb, ks=(1, 5, 10, 20), candidates=20, seed=4)
    full = pair_report(emb)
    assert pair_report(emb, candidates=48) == full == pair_report(emb, candidates=1000)


def test_eval_cli_reports_the_ks_asked_and_among_how_many(tiny_data, tmp_path, capsys):
    import json

    from test_model import build_space

    from geobind.cli import main

    build_space(tiny_data).save_pretrained(tmp_path / "m")
    base = ["eval", "--model", str(tmp_path / "m"), "--data", str(tiny_data["test"]), "--no-progress"]
    assert main([*base, "--ks", "2,1,100", "--candidates", "6", "--out", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    m = report["pairs"]["satellite->ground"]
    assert [k for k in m if k.startswith("R@")] == ["R@1", "R@2", "R@5", "R@10", "R@100"] and m["n"] == 6
    assert report["candidates"] == {"max": 6, "seed": 0}
    out = capsys.readouterr().out
    assert "R@2" in out and "R@100" in out
    for bad in ("0,5", "five", ""):
        with pytest.raises(SystemExit) as e:
            main([*base, "--ks", bad])
        assert e.value.code == 2 and "give whole numbers >= 1 separated by commas" in capsys.readouterr().err


def test_eval_says_when_pairs_have_fewer_rows_than_the_candidates_asked(tiny_data, tmp_path, capsys):
    """--candidates larger than a pair's rows ranks among all of them: eval says so, since those
    numbers are not the among-N numbers a paper reports."""
    from test_model import build_space

    from geobind.cli import main

    build_space(tiny_data).save_pretrained(tmp_path / "m")
    base = ["eval", "--model", str(tmp_path / "m"), "--data", str(tiny_data["test"]), "--no-progress"]
    assert main([*base, "--candidates", "10000"]) == 0
    assert "pairs of n <= " in capsys.readouterr().out
    assert main([*base, "--candidates", "6"]) == 0
    assert "were ranked among all their rows" not in capsys.readouterr().out


def test_evaluate_always_reports_r_at_1_5_10(tiny_data):
    """The report's R@1/5/10 (which format_pairs prints) are there whatever ks the Python API is given."""
    from test_model import build_space

    from geobind.data.manifest import read_dataset
    from geobind.evaluate import evaluate, format_pairs

    report = evaluate(build_space(tiny_data), read_dataset(tiny_data["test"]), ks=(100,))
    m = next(iter(report["pairs"].values()))
    assert [k for k in m if k.startswith("R@")] == ["R@1", "R@5", "R@10", "R@100"]
    assert "R@100" in format_pairs(report["pairs"]).splitlines()[0]
