"""Bad input never loses the run: `geobind data check` counts exactly, and training skips and
counts the same samples for the same reasons (or stops on the first under strict)."""

from __future__ import annotations

import csv
import json

import pytest
from fixtures import tiny_config
from layout_fixtures import (
    BAD_MANIFEST_REASONS,
    BAD_SHARD_REASONS,
    make_bad_manifest,
    make_bad_shards,
)

from geobind.binding.trainer import train
from geobind.cli import main
from geobind.config import parse_config
from geobind.data.check import check_dataset


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GEOBIND_CACHE", str(tmp_path / "geobind-cache"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    return make_bad_manifest(root / "manifest"), make_bad_shards(root / "shards")


@pytest.mark.parametrize("workers", [0, 2])
def test_check_counts_every_reason_of_a_manifest_exactly(bad, workers):
    report = check_dataset(bad[0], num_workers=workers, max_examples=20)
    assert dict(report.reasons) == BAD_MANIFEST_REASONS
    assert (report.samples, report.usable, report.bad) == (24, 13, 11)
    named = {(f.rsplit("/", 1)[-1], r) for f, r, _ in report.examples}
    assert named == {
        ("001.png", "missing"),
        ("nope.wav", "missing"),
        ("003.png", "empty"),
        ("004.wav", "empty"),
        ("005.png", "undecodable"),
        ("006.png", "undecodable"),
        ("007.wav", "undecodable"),
        ("008.wav", "silent-zero-length"),
        ("bad.csv#b009", "bad-coordinates"),
        ("bad.csv#b010", "bad-coordinates"),
        ("bad.csv#b011", "empty-text"),
    }


def test_check_counts_every_reason_of_shards_exactly(bad):
    report = check_dataset(bad[1], num_workers=2)
    assert dict(report.reasons) == BAD_SHARD_REASONS
    assert (report.samples, report.usable) == (12, 6)
    assert list(report.shard_errors) == [str(bad[1] / "part-1.tar")]
    assert "part-0.tar#s02.satellite.png" in " ".join(f for f, _, _ in report.examples)


def _rows_of(manifest, rows: slice, out):
    """A manifest of some rows of ``manifest``, written to ``out`` beside links to its files."""
    picked = list(csv.DictReader(open(manifest)))[rows]
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(picked[0]))
        w.writeheader()
        w.writerows(picked)
    for d in ("sat", "audio"):
        if not (out.parent / d).exists():
            (out.parent / d).symlink_to(manifest.parent / d)
    return out


def test_check_cli_prints_counts_and_fails_under_strict(bad, tmp_path, capsys):
    assert main(["data", "check", str(bad[0]), "--examples", "3"]) == 0
    out = capsys.readouterr().out
    assert "usable: 13" in out and "bad:    11" in out and "undecodable         3" in out
    assert "sat/001.png: missing (file does not exist)" in out and "first 3 problems" in out
    assert main(["data", "check", str(bad[0]), "--strict", "--json", str(tmp_path / "r.json")]) == 1
    assert "11 bad samples (--strict)" in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["reasons"] == BAD_MANIFEST_REASONS
    # An existing report is kept unless --force: refused before any checking.
    assert main(["data", "check", str(bad[0]), "--json", str(tmp_path / "r.json")]) == 2
    assert "r.json exists; pass --force to overwrite it" in capsys.readouterr().err
    (tmp_path / "r.json").write_text("mine")
    assert main(["data", "check", str(bad[0]), "--json", str(tmp_path / "r.json"), "--force"]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["reasons"] == BAD_MANIFEST_REASONS
    # --force replaces a report, never a folder.
    capsys.readouterr()
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "keep.txt").write_text("mine")
    assert main(["data", "check", str(bad[0]), "--json", str(tmp_path / "reports"), "--force"]) == 2
    captured = capsys.readouterr()  # refused before checking: no report printed
    assert "is a folder" in captured.err and not captured.out and (tmp_path / "reports" / "keep.txt").is_file()
    assert main(["data", "check", str(bad[0]), "--modalities", "text", "--strict"]) == 1
    good = _rows_of(bad[0], slice(12, None), tmp_path / "good.csv")
    assert main(["data", "check", str(good), "--strict"]) == 0
    assert main(["data", "check", str(tmp_path / "nothing.csv")]) == 2
    err = capsys.readouterr().err
    assert "geobind data check: error: dataset " in err and "does not exist" in err


def _stage(tiny_data, data, out, bind_to, batch_size, **data_extra):
    d = tiny_config(tiny_data, out, audio=False)
    st = d["stages"][0]
    st["bind_to"] = bind_to
    st["data"] = {"train": str(data), **data_extra}
    st["optim"].update(max_steps=0, epochs=1, batch_size=batch_size)
    d["eval"] = None
    return d


def test_training_skips_and_counts_what_check_reports(bad, tiny_data, tmp_path):
    # satellite -> text over the bad manifest: 21 usable anchors, batches of 7 see every one.
    d = _stage(tiny_data, bad[0], tmp_path / "run", "text", 7)
    train(parse_config(d), progress=False, log=None)
    stage = tmp_path / "run" / "stages" / "01-satellite"
    done = json.loads((stage / "done.json").read_text())
    expected = check_dataset(bad[0], modalities=["satellite", "text"]).reasons
    assert (
        done["bad_samples"]
        == dict(expected)
        == {"missing": 1, "empty": 1, "undecodable": 2, "bad-coordinates": 2, "empty-text": 1}
    )
    log = (tmp_path / "run" / "train.log").read_text()
    assert "skipping bad sample" in log and "sat/006.png: undecodable" in log
    assert "epoch 1: skipped 4 bad samples (" in log and "so far in this stage: " in log and "{" not in log
    # Rows left out before reading (their coordinates) are named too, with what is wrong.
    assert "stage satellite: skipping 2 of " in log and "b009 (bad-coordinates, lat " in log
    rows = list(csv.DictReader(open(stage / "metrics.csv")))
    assert rows[-1]["bad_undecodable"] == "2"
    d["stages"][0]["data"]["strict"] = True
    d["output_dir"] = str(tmp_path / "strict")
    with pytest.raises(Exception, match=r"b009: bad-coordinates"):
        train(parse_config(d), progress=False, log=None)


def test_training_from_bad_shards_skips_and_counts(bad, tiny_data, tmp_path):
    # 8 rows usable on the ground side (metadata, coordinates, ids and the cut shard rule out
    # 4): batches of 2 see every one, the garbage tile and the missing one included.
    d = _stage(tiny_data, bad[1], tmp_path / "run", "ground", 2, shuffle_buffer=4)
    train(parse_config(d), progress=False, log=None)
    done = json.loads((tmp_path / "run" / "stages" / "01-satellite" / "done.json").read_text())
    assert done["bad_samples"] == BAD_SHARD_REASONS
    d["stages"][0]["data"]["strict"] = True
    d["output_dir"] = str(tmp_path / "strict")
    with pytest.raises(Exception, match=r"part-0.tar#s03: bad-metadata"):
        train(parse_config(d), progress=False, log=None)


def test_no_allocator_thread_that_could_hang_forked_loader_workers():
    """Importing geobind's data layer (pandas -> pyarrow) starts no jemalloc purging thread,
    which can hold a lock at the moment a loader worker is forked and hang it."""
    import os
    import subprocess
    import sys

    code = (
        "import os, geobind.data.manifest, pandas, pyarrow\n"
        "print(sorted(open(f'/proc/self/task/{t}/comm').read().strip() for t in os.listdir('/proc/self/task')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "JE_ARROW_MALLOC_CONF"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "jemalloc_bg_thd" not in out.stdout, out.stdout


def test_problems_say_what_was_wrong_and_pack_drops_what_check_reports(bad, tmp_path, capsys):
    from geobind.data.pack import pack

    report = check_dataset(bad[0], max_examples=20)
    details = {r: d for _, r, d in report.examples}
    assert "lat 95.0" in details["bad-coordinates"] or "lon nan" in details["bad-coordinates"]
    assert "not an image format PIL can read" in [d for _, r, d in report.examples if r == "undecodable"]
    # pack leaves out the same bad files as check (a recording with no frames included).
    res = pack(bad[0], tmp_path / "shards", shard_size=50, progress=False, log=None)
    assert res.bad["silent-zero-length"] == 1 and res.bad["bad-coordinates"] == 2
    with pytest.raises(ValueError, match="looks like a file name"):
        pack(bad[0], tmp_path / "train.tar", progress=False, log=None)
    # With nothing usable, check fails without --strict too.
    only_bad = _rows_of(bad[0], slice(1, 3), tmp_path / "only-bad.csv")
    assert main(["data", "check", str(only_bad)]) == 1
    assert "no sample is usable" in capsys.readouterr().err
