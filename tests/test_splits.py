"""Spatial (default) and random splits: whole cells per split, buffers, and the CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from layout_fixtures import make_soundingearth

from geobind.cli import main
from geobind.data.manifest import read_dataset
from geobind.data.splits import cells, random_split, spatial_split


def _places(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    # Clustered like real data: towns of various sizes, a few near the antimeridian.
    centres = np.column_stack([rng.uniform(-60, 70, 80), rng.uniform(-180, 180, 80)])
    centres[:3, 1] = [179.7, -179.6, 179.9]
    which = rng.integers(0, 80, n)
    lat = np.clip(centres[which, 0] + rng.normal(0, 1.5, n), -89.9, 89.9)
    lon = (centres[which, 1] + rng.normal(0, 1.5, n) + 180) % 360 - 180
    return lat, lon


def test_spatial_split_holds_out_whole_cells_at_the_requested_shares():
    lat, lon = _places()
    labels = spatial_split(lat, lon, cell_deg=1.0, val=0.1, test=0.2, seed=0)
    r, c = cells(lat, lon, 1.0)
    by_cell = pd.Series(labels).groupby(r * 360 + c).nunique()
    assert (by_cell == 1).all()  # no cell is shared between splits
    share = pd.Series(labels).value_counts(normalize=True)
    assert share["test"] == pytest.approx(0.2, abs=0.02) and share["val"] == pytest.approx(
        0.1, abs=0.02
    )
    assert np.array_equal(labels, spatial_split(lat, lon, cell_deg=1.0, val=0.1, test=0.2, seed=0))
    assert not np.array_equal(
        labels, spatial_split(lat, lon, cell_deg=1.0, val=0.1, test=0.2, seed=1)
    )


def test_buffer_cells_keep_training_places_away_from_held_out_ones():
    lat, lon = _places()
    labels = spatial_split(lat, lon, cell_deg=1.0, val=0.1, test=0.1, seed=0, buffer_cells=1)
    r, c = cells(lat, lon, 1.0)
    held = {(a, b) for a, b, x in zip(r, c, labels) if x in ("val", "test")}
    assert (labels == "buffer").any()
    for a, b, x in zip(r, c, labels):
        if x == "train":
            # Neighbouring cells, with longitude wrapping at the antimeridian (360 columns).
            assert not any(
                (a + da, (b + db) % 360) in held for da in (-1, 0, 1) for db in (-1, 0, 1)
            )
    # Every training place is at least one cell (~111 km in latitude) from every held-out place.
    tr = labels == "train"
    ho = np.isin(labels, ["val", "test"])
    dlat = np.abs(lat[tr][:, None] - lat[ho][None, :])
    dlon = np.abs((lon[tr][:, None] - lon[ho][None, :] + 180) % 360 - 180)
    assert (np.maximum(dlat, dlon) > 1.0 - 1e-9).all()


def test_random_split_exists_but_mixes_cells():
    lat, lon = _places(seed=2)
    labels = random_split(len(lat), val=0.1, test=0.1, seed=0, lat=lat, lon=lon)
    assert pd.Series(labels).value_counts()["test"] == round(0.1 * len(lat))
    r, c = cells(lat, lon, 1.0)
    assert (pd.Series(labels).groupby(r * 360 + c).nunique() > 1).any()
    with pytest.raises(ValueError, match="sum to less than 1"):
        spatial_split(lat, lon, val=0.5, test=0.5)


def test_cli_split_writes_manifests_that_train_reads(tiny_data, tmp_path, capsys):
    src = tiny_data["stage1"]
    out = tmp_path / "splits"
    assert (
        main(
            [
                "data",
                "split",
                str(src),
                "--cell-deg",
                "10",
                "--val",
                "0.15",
                "--test",
                "0.15",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "train" in printed and "cells" in printed
    summary = json.loads((out / "stage1.split.json").read_text())
    assert summary["method"] == "spatial" and sum(summary["counts"].values()) == 36
    full = read_dataset(src)
    parts = {s: read_dataset(out / f"stage1.{s}.csv") for s in ("train", "val", "test")}
    assert sorted(i for p in parts.values() for i in p.ids) == sorted(full.ids)
    for p in parts.values():  # paths were rewritten relative to the new folder and still resolve
        got = [os.path.realpath(x) for x in p.columns["satellite"]]
        assert got == [
            os.path.realpath(full.columns["satellite"][full.ids.index(i)]) for i in p.ids
        ]
    cell = {
        i: (math.floor((a + 90) / 10), math.floor((o + 180) / 10))
        for i, a, o in zip(full.ids, full.lat, full.lon)
    }
    for s in ("val", "test"):
        assert not {cell[i] for i in parts[s].ids} & {cell[i] for i in parts["train"].ids}
    # Existing files are not overwritten without --force; --random is a different split.
    assert main(["data", "split", str(src), "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["data", "split", str(src), "--out", str(out), "--random", "--force"]) == 0
    assert json.loads((out / "stage1.split.json").read_text())["method"] == "random"


def test_split_of_a_soundingearth_csv_keeps_its_format(tmp_path, monkeypatch, capsys):
    csv = make_soundingearth(tmp_path / "se", n=24)
    assert main(["data", "split", str(csv), "--layout", "soundingearth", "--cell-deg", "30"]) == 0
    parts = [
        read_dataset(csv.parent / f"{csv.stem}.{s}.csv", "soundingearth")
        for s in ("train", "val", "test")
    ]
    assert sum(len(p) for p in parts) == 24
    assert all(
        p.columns["audio"][0].endswith((".mp3", ".flac", ".wav", ".ogg")) for p in parts if len(p)
    )
    # Written elsewhere (given by a relative path), the parts are read back with the root the
    # split names: an absolute one.
    out = tmp_path / "parts"
    monkeypatch.chdir(tmp_path)
    assert main(["data", "split", "se/" + csv.name, "--layout", "soundingearth", "--cell-deg", "30",
                 "--out", "parts"]) == 0
    note = json.loads((out / f"{csv.stem}.split.json").read_text())["note"]
    root = note.split("--layout-option root=")[1].split(" ")[0]
    assert Path(root).is_absolute() and Path(root) == csv.parent.resolve()
    part = read_dataset(out / f"{csv.stem}.test.csv", "soundingearth", root=root)
    assert all(Path(p).is_file() for p in part.columns["satellite"])
    # Split reads only what it can write back, and says what to do instead.
    assert main(["data", "split", str(csv), "--layout", "geotiff"]) == 2
    assert "list the tiles in a manifest" in capsys.readouterr().err


def _one_big_cell():
    """1000 places: 600 in one 1-degree cell, the other 400 in 40 cells of 10."""
    lat = np.concatenate([np.full(600, 0.5), np.repeat(10.5 + np.arange(40), 10)])
    lon = np.concatenate([np.full(600, 0.5), np.full(400, 20.5)])
    return lat, lon


@pytest.mark.parametrize("seed", range(5))
def test_a_cell_larger_than_a_share_is_never_held_out(seed):
    """A cell is dealt to a held-out split only when it brings that split closer to its share:
    the cell of 60% of the places stays in train whatever the shuffle, and test and val get their
    10% each from the small cells."""
    lat, lon = _one_big_cell()
    labels = spatial_split(lat, lon, cell_deg=1.0, val=0.1, test=0.1, seed=seed)
    assert (labels[:600] == "train").all()
    share = pd.Series(labels).value_counts(normalize=True)
    assert share["test"] == pytest.approx(0.1, abs=0.01) and share["val"] == pytest.approx(0.1, abs=0.01)


def test_coordinates_out_of_range_are_invalid():
    """Latitudes beyond +-90 and longitudes beyond +-180 (as NaN) are set aside as ``invalid``
    by both split methods, not clipped into an edge cell."""
    lat, lon = _places(200)
    lat, lon = lat.copy(), lon.copy()
    lat[[3, 4]], lon[[5, 6]] = [95.0, -90.5], [200.0, -180.5]
    lat[7] = np.nan
    bad = [3, 4, 5, 6, 7]
    for labels in (spatial_split(lat, lon, seed=0), random_split(200, seed=0, lat=lat, lon=lon)):
        assert (labels[bad] == "invalid").all()
        assert (np.delete(labels, bad) != "invalid").all()
    edge = spatial_split(np.array([90.0, -90.0, 0.0]), np.array([180.0, -180.0, 0.0]), val=0, test=0)
    assert edge.tolist() == ["train"] * 3  # the bounds themselves are valid


def test_a_split_whose_write_fails_leaves_no_part_and_says_what_to_do(tiny_data, tmp_path, monkeypatch):
    """The parts are renamed into place together once all are written: a full disk while the
    test part is written leaves none of them (a cut-short CSV would read as a smaller dataset),
    and says so, naming the file. An existing split.json is not replaced without force."""
    import errno

    from geobind.data.splits import write_split

    real, calls = pd.DataFrame.to_csv, [0]

    def to_csv(self, path, *a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, path, *a, **k)

    monkeypatch.setattr(pd.DataFrame, "to_csv", to_csv)
    out = tmp_path / "splits"
    out.mkdir()
    with pytest.raises(OSError, match=r"cannot write .*stage1\.test\.csv: the disk holding .* is full \(nothing was "
                                      r"replaced\); free some space"):
        write_split(tiny_data["stage1"], out, cell_deg=10, val=0.2, test=0.2)
    assert list(out.iterdir()) == []
    monkeypatch.undo()
    (out / "stage1.split.json").write_text("{}")
    with pytest.raises(FileExistsError, match="stage1.split.json exists; pass --force"):
        write_split(tiny_data["stage1"], out, cell_deg=10, val=0.2, test=0.2)
    write_split(tiny_data["stage1"], out, cell_deg=10, val=0.2, test=0.2, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["stage1.split.json", "stage1.test.csv", "stage1.train.csv",
                                                     "stage1.val.csv"]


def test_an_output_folder_that_takes_no_files_is_refused_before_the_work(tmp_path):
    from geobind.search.common import OutputWriteError, check_writable

    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputWriteError, match=r"cannot write .*afile/out.parquet: .*afile is a file, not a folder"):
        check_writable(tmp_path / "afile" / "out.parquet")
    with pytest.raises(OutputWriteError, match=r"cannot write /proc/out.parquet: cannot create files in /proc"):
        check_writable(Path("/proc/out.parquet"))
