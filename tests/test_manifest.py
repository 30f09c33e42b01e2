from geobind.data.manifest import read_dataset


def test_integer_and_bad_coordinates(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("id,lat,lon,text\na,1,2,x\nb,91,0,y\nc,,5,z\nd,north,5,w\ne,-45.5,179.9,v\n")
    t = read_dataset(p)
    assert t.bad_rows == {1: "bad-coordinates", 2: "bad-coordinates", 3: "bad-coordinates"}
    assert (t.lat[0], t.lon[0]) == (1.0, 2.0)
    assert t.item("text", 4) == "v"
