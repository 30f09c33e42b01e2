from geobind.data.manifest import read_dataset


def test_integer_and_bad_coordinates(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("id,lat,lon,text\na,1,2,x\nb,91,0,y\nc,,5,z\nd,north,5,w\ne,-45.5,179.9,v\n")
    t = read_dataset(p)
    assert t.bad_rows == {1: "bad-coordinates", 2: "bad-coordinates", 3: "bad-coordinates"}
    assert (t.lat[0], t.lon[0]) == (1.0, 2.0)
    assert t.item("text", 4) == "v"


def test_unreadable_manifests_name_the_file_and_the_fix(tmp_path):
    import pytest

    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty.csv is empty: a manifest needs a header row"):
        read_dataset(empty)
    named = tmp_path / "named.csv"
    named.write_text("id,latitude,longitude,audio\na,1,2,x.wav\n")
    with pytest.raises(ValueError, match=r"missing column\(s\) lat, lon \(rename latitude -> lat, longitude -> lon\)"):
        read_dataset(named)
    t = read_dataset(_write(tmp_path / "ok.csv", "id,lat,lon,text\na,1,2,x\n"))
    with pytest.raises(ValueError, match="Add an 'audio' column"):
        t.require("audio")
    # A column that means a modality under another name is kept as metadata; the error names it.
    t = read_dataset(_write(tmp_path / "sat.csv", "id,lat,lon,sat,text\na,1,2,t.png,x\n"))
    with pytest.raises(ValueError, match=r"no 'satellite' column \(modality columns: text; others: sat\)\. "
                                         r"The column 'sat' looks like it: .*rename it to 'satellite'"):
        t.require("satellite")


def _write(path, text):
    path.write_text(text)
    return path


def test_raster_options_without_tif_tiles_are_refused(tmp_path):
    """``bands``/``scale`` change only .tif/.tiff tiles of image columns: for a manifest without
    any they would do nothing, so the mistake is reported; without them nothing changes."""
    import hashlib

    import pytest

    p = _write(tmp_path / "jpg.csv", "id,lat,lon,satellite,text\na,1,2,a.jpg,x\nb,1,2,b.TIF.png,y\n")
    with pytest.raises(ValueError, match=r"layout options bands and scale apply to \.tif/\.tiff tiles, but "
                                         r"its image columns \(satellite\) name none, so they would change"):
        read_dataset(p, bands=[4, 3, 2], scale=3000)
    with pytest.raises(ValueError, match=r"layout option scale applies to \.tif/\.tiff tiles, but its image"):
        read_dataset(p, scale=3000)
    text = _write(tmp_path / "text.csv", "id,lat,lon,text\na,1,2,x.tif\n")
    with pytest.raises(ValueError, match="layout option bands applies to .tif/.tiff tiles, but it has no "
                                         "image column, so it would change nothing"):
        read_dataset(text, bands="4,3,2")
    # The defaults, given or not, leave a manifest as it was: its identity is the file's hash.
    t = read_dataset(p, scale="auto")
    assert t.loaders == {} and t.identity == hashlib.sha256(p.read_bytes()).hexdigest()
    assert t.item("satellite", 0) == str(tmp_path / "a.jpg")


def test_raster_options_without_rasterio_say_what_to_install(tmp_path, monkeypatch):
    import sys

    import pytest

    p = _write(tmp_path / "tif.csv", "id,lat,lon,satellite\na,1,2,a.tif\n")
    monkeypatch.setitem(sys.modules, "rasterio", None)  # `import rasterio` fails
    with pytest.raises(ImportError, match=r"layout options bands and scale needs rasterio: pip install 'geobind\[geo\]'"):
        read_dataset(p, bands=[4, 3, 2])


def test_the_table_loader_workers_hold_gives_the_same_items_without_an_object_per_row(tmp_path):
    """``for_workers``: ids and string columns in Arrow arrays (forked workers then share their
    pages), every item, place and error as the table gives them; a column of other items stays."""
    import pickle

    import pytest

    from geobind.data.errors import BadSampleError
    from geobind.data.manifest import StringColumn, Table, for_loader_workers

    (tmp_path / "m.csv").write_text(
        "id,lat,lon,satellite,text\n"
        "a,1.5,2,tiles/a.png,a forest\n"
        "b,95,2,tiles/b.png,\n"  # bad coordinates, no caption
        "c,-3,170.25,,a city é\n"  # no tile
    )
    table = read_dataset(tmp_path / "m.csv")
    assert for_loader_workers(table, 0) is table
    view = for_loader_workers(table, 2)
    assert isinstance(view.ids, StringColumn) and all(isinstance(c, StringColumn) for c in view.columns.values())
    assert view.meta is None and len(view) == len(table) == 3 and view.identity == table.identity

    def outcome(t, m, i):
        try:
            return t.item(m, i)
        except BadSampleError as e:
            return str(e)

    for i in range(3):
        assert view.place(i) == table.place(i)
        for m in ("satellite", "text"):
            assert outcome(view, m, i) == outcome(table, m, i)
    assert view.columns["text"] == table.columns["text"] == ["a forest", None, "a city é"]
    assert view.columns["satellite"][-1] is None and view.columns["satellite"][:2] == table.columns["satellite"][:2]
    with pytest.raises(IndexError):
        view.columns["text"][3]
    again = pickle.loads(pickle.dumps(view))  # as a spawned worker receives it
    assert list(again.ids) == ["a", "b", "c"] and again.item("text", 0) == "a forest"
    # A registered layout's column of other items (arrays, say) is kept as it is.
    odd = Table("x", ["p"], [0.0], [0.0], {"satellite": [b"\x00"]})
    assert odd.for_workers().columns["satellite"] == [b"\x00"]
