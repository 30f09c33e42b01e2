"""Real-world data as people have it: what is read as meant, and what is refused with a message
that names the file or field and the fix (never read silently wrong)."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from layout_fixtures import write_geotiff
from PIL import Image

from geobind.data.manifest import read_dataset

rasterio = pytest.importorskip("rasterio")


def _tile(path, crs="EPSG:4326", left=10.0, top=50.0, res=0.01, bands=3):
    data = np.random.default_rng(0).integers(0, 255, (bands, 8, 8)).astype(np.uint8)
    write_geotiff(path, data, crs, left, top, res)


def test_geotiff_tiles_are_placed_or_refused_as_they_are(tmp_path):
    # A CRS without a geotransform: pixel coordinates, no place.
    (tmp_path / "t").mkdir()
    with rasterio.open(tmp_path / "t" / "pixels.tif", "w", driver="GTiff", height=8, width=8, count=3,
                       dtype="uint8", crs="EPSG:32632") as dst:
        dst.write(np.zeros((3, 8, 8), np.uint8))
    _tile(tmp_path / "t" / "east.tif", left=200.0, top=10.0)  # longitudes given as 0-360
    t = read_dataset(tmp_path / "t", "geotiff")
    row = {i: k for k, i in enumerate(t.ids)}
    assert t.bad_rows == {row["pixels"]: "no-georeference"}
    assert t.lat[row["east"]] == pytest.approx(10.0 - 0.04)
    assert t.lon[row["east"]] == pytest.approx(200.04 - 360)


def test_geotiff_ids_bands_scale_and_captions_are_checked_when_read(tmp_path):
    _tile(tmp_path / "a" / "x.tif")
    _tile(tmp_path / "a" / "x.TIFF")
    with pytest.raises(ValueError, match=r"x\.(TIFF|tif) and .*x\.(tif|TIFF) both give the place id 'x'"):
        read_dataset(tmp_path / "a", "geotiff")
    _tile(tmp_path / "b" / "s2.tif", bands=4)
    # The command line's spelling of a band list works like YAML's.
    t = read_dataset(tmp_path / "b", "geotiff", bands="4,3,2", scale="200")
    assert t.item("satellite", 0).shape == (8, 8, 3)
    for bands in ([0, 1, 2], [4, 3], "red"):
        with pytest.raises(ValueError, match="give 1 or 3 band numbers counted from 1"):
            read_dataset(tmp_path / "b", "geotiff", bands=bands)
    for scale in ("abc", 0, -5):
        with pytest.raises(ValueError, match="layout option scale=.*give auto"):
            read_dataset(tmp_path / "b", "geotiff", scale=scale)
    (tmp_path / "b" / "s2.txt").write_bytes("forêt".encode("latin-1"))
    with pytest.raises(ValueError, match=r"s2\.txt: not UTF-8 text; save the caption as UTF-8"):
        read_dataset(tmp_path / "b", "geotiff")


def test_parquet_with_pandas_missing_values(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    df = pd.DataFrame({
        "id": pd.array(["1", "2", "3"], dtype="string"),
        "lat": pd.array([1.0, None, 3.0], dtype="Float64"),
        "lon": pd.array([4.0, 5.0, 6.0], dtype="Float64"),
        "satellite": pd.array(["a.png", "a.png", None], dtype="string"),
        "text": pd.array(["a forest", None, "a lake"], dtype="string"),
    })
    df.to_parquet(tmp_path / "m.parquet")
    t = read_dataset(tmp_path / "m.parquet")
    assert t.columns["text"] == ["a forest", None, "a lake"]  # not the caption "<NA>"
    assert t.bad_rows == {1: "bad-coordinates"}
    assert t.columns["satellite"][2] is None
    df["id"] = pd.array([1, None, 3], dtype="Int64")
    df.to_parquet(tmp_path / "noid.parquet")
    with pytest.raises(ValueError, match=r"1 row\(s\) have no id \(the first is data row 2\)"):
        read_dataset(tmp_path / "noid.parquet")


def test_spreadsheet_csvs(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    # Trailing blank rows are no places, and a split writes the rows it read.
    (tmp_path / "blank.csv").write_text("id,lat,lon,satellite\r\n" + "".join(
        f"p{i},{i % 50}.5,{i % 90}.5,a.png\r\n" for i in range(40)) + ",,,\r\n,,,\r\n")
    t = read_dataset(tmp_path / "blank.csv")
    assert len(t) == 40 and not t.bad_rows
    from geobind.data.splits import write_split

    write_split(tmp_path / "blank.csv", tmp_path / "split", method="random", val=0.2, test=0.2)
    parts = [pd.read_csv(p, dtype={"id": str}) for p in sorted((tmp_path / "split").glob("*.csv"))]
    assert sorted(i for p in parts for i in p["id"]) == sorted(t.ids)
    assert all((p["lat"] == [float(i[1:]) % 50 + 0.5 for i in p["id"]]).all() for p in parts)
    # Other separators, spaced headers and capitalised modality columns: said, not guessed.
    (tmp_path / "semi.csv").write_text("id;lat;lon;satellite\np1;1;2;a.png\n")
    with pytest.raises(ValueError, match="separated by ';': save it with commas"):
        read_dataset(tmp_path / "semi.csv")
    (tmp_path / "space.csv").write_text("id, lat, lon, satellite\np1,1,2,a.png\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) lat, lon \(some column names have spaces"):
        read_dataset(tmp_path / "space.csv")
    (tmp_path / "caps.csv").write_text("id,lat,lon,Satellite\np1,1,2,a.png\n")
    with pytest.raises(ValueError, match="column 'Satellite' looks like the modality 'satellite'"):
        read_dataset(tmp_path / "caps.csv")
    (tmp_path / "latin.csv").write_bytes("id,lat,lon,text\np1,1,2,forêt\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.csv: not UTF-8 text .*save it as UTF-8"):
        read_dataset(tmp_path / "latin.csv")


def test_a_soundingearth_csv_that_does_not_read_is_named(tmp_path):
    (tmp_path / "se").mkdir()
    (tmp_path / "se" / "metadata.csv").write_bytes(
        "key,mp3name,latitude,longitude,description\nk1,a.mp3,1,2,forêt\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"metadata\.csv: not UTF-8 text"):
        read_dataset(tmp_path / "se", "soundingearth")


def test_a_shard_folder_given_with_a_tilde(tiny_data, tmp_path, monkeypatch):
    from geobind.data.pack import pack
    from geobind.data.shards import ShardSet

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("GEOBIND_CACHE", str(tmp_path / "cache"))
    pack(tiny_data["test"], tmp_path / "shards", shard_size=10, image_size=16, progress=False, log=None)
    assert isinstance(read_dataset("~/shards"), ShardSet)


def test_a_random_split_refuses_a_buffer(tmp_path):
    from geobind.data.splits import write_split

    (tmp_path / "m.csv").write_text("id,lat,lon,text\n" + "".join(f"p{i},1,{i},x\n" for i in range(20)))
    with pytest.raises(ValueError, match="a buffer .* applies to spatial splits"):
        write_split(tmp_path / "m.csv", tmp_path / "s", method="random", buffer_cells=2)


def test_windows_paths_in_a_manifest_find_their_files(tmp_path):
    (tmp_path / "tiles").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "tiles" / "0001.png")
    (tmp_path / "m.csv").write_text("id,lat,lon,satellite\np1,1,2,tiles\\0001.png\np2,1,2,tiles\\0002.png\n")
    t = read_dataset(tmp_path / "m.csv")
    assert t.columns["satellite"][0] == str(tmp_path / "tiles" / "0001.png")
    assert Path(t.item("satellite", 0)).is_file()
    assert t.columns["satellite"][1].endswith("tiles\\0002.png")  # missing either way: as written
