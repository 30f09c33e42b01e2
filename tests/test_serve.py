"""``geobind serve``: the JSON API on a tiny model and index (FastAPI's test client)."""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

pytest.importorskip(
    "fastapi", reason="the serve extra is not installed: pip install 'geobind[serve]'"
)
pytest.importorskip("multipart", reason="python-multipart is not installed")

from fastapi.testclient import TestClient  # noqa: E402
from space_helpers import saved_space  # noqa: E402

from geobind.cli import main  # noqa: E402
from geobind.model import GeoBind  # noqa: E402
from geobind.search.index import Index, build_index  # noqa: E402
from geobind.serve import create_app  # noqa: E402


def make_served(tiny_data, root):
    """The tiny four-modality model (saved under ``root``) and an exact index of its satellite
    embeddings of the test split, with thumbnails and captions."""
    from geobind.search.embed import embed_dataset

    model_dir = saved_space(tiny_data, root)
    model = GeoBind.from_pretrained(model_dir)
    embed_dataset(model, tiny_data["test"], "satellite", root / "sat.parquet", log=None)
    build_index(root / "sat.parquet", root / "sat.index", "exact", log=None)
    return {
        "model": model,
        "model_dir": model_dir,
        "index": Index.load(root / "sat.index"),
        "index_dir": root / "sat.index",
    }


@pytest.fixture(scope="module")
def served(tiny_data, tmp_path_factory):
    """:func:`make_served` plus a test client of the app over them."""
    parts = make_served(tiny_data, tmp_path_factory.mktemp("serve"))
    return {**parts, "client": TestClient(create_app(parts["model"], parts["index"]))}


def png_bytes(size: int = 32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 1.0, fmt: str = "WAV") -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000, format=fmt)
    return buf.getvalue()


def upload(client, data: bytes, name: str, **form):
    return client.post("/api/search", data=form, files={"file": (name, data)})


# -- good requests ---------------------------------------------------------------------------
def test_health_names_the_model_and_index(served):
    h = served["client"].get("/api/health").json()
    assert h["status"] == "ok"
    assert h["index"]["count"] == len(served["index"]) and h["index"]["modality"] == "satellite"
    assert h["model"]["identity"]["satellite"] == served["index"].identity
    assert set(h["model"]["modalities"]) == {"satellite", "ground", "text", "audio"}
    assert h["max_upload_mb"] == 20


def test_search_results_link_thumbnails_without_reading_them(served):
    # Each result's thumbnail_url comes from an id lookup: a search reads no thumbnail row group
    # (a few MB each at 1024 thumbnails a group), the page's own fetches do.
    index = served["index"]
    cached = index._thumbnail_file.groups
    cached.clear()
    r = served["client"].post("/api/search", data={"text": "a photo of a forest", "k": 5})
    assert r.status_code == 200, r.text
    assert all(x["thumbnail_url"] == f"/api/thumbnail/{x['id']}" for x in r.json()["results"])
    assert not cached


def test_text_search_equals_the_python_api(served):
    r = served["client"].post("/api/search", data={"text": "a photo of a forest", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = served["model"].search(served["index"], text="a photo of a forest", k=5)
    assert [x["id"] for x in body["results"]] == [h.id for h in ref]
    np.testing.assert_allclose(
        [x["score"] for x in body["results"]], [h.score for h in ref], atol=1e-5
    )
    first = body["results"][0]
    assert set(first) >= {"id", "lat", "lon", "score", "caption", "thumbnail_url", "rank"}
    assert first["caption"] == served["index"].caption(first["id"])
    assert first["thumbnail_url"] == f"/api/thumbnail/{first['id']}"
    assert "cosine" in body["score_help"] and "map" not in body


def test_image_and_audio_uploads_search(served):
    client, model, index = served["client"], served["model"], served["index"]
    img = png_bytes()
    body = upload(client, img, "photo.png", k=3).json()
    ref = model.search(index, image=Image.open(io.BytesIO(img)), k=3)
    assert [x["id"] for x in body["results"]] == [h.id for h in ref]
    assert body["query"] == "ground-photo upload"  # which encoder read it
    # A satellite hint embeds the image with the satellite encoder instead.
    body = upload(client, img, "tile.png", modality="satellite", k=3).json()
    ref = model.search(index, satellite=Image.open(io.BytesIO(img)), k=3)
    assert [x["id"] for x in body["results"]] == [h.id for h in ref]
    for fmt, name in (("WAV", "clip.wav"), ("FLAC", "clip.flac"), ("OGG", "clip.ogg")):
        r = upload(client, wav_bytes(fmt=fmt), name, k=4)
        assert r.status_code == 200, (fmt, r.text)
        assert len(r.json()["results"]) == 4 and r.json()["query"] == "audio upload"
    # Text and a file together: one combined query.
    r = client.post(
        "/api/search", data={"text": "a forest", "k": 2}, files={"file": ("a.wav", wav_bytes())}
    )
    assert r.status_code == 200 and r.json()["query"] == '"a forest" + audio upload'


def test_map_overlay_covers_the_places(served):
    client, index = served["client"], served["index"]
    for r in (
        client.post("/api/map", data={"text": "a photo of a desert"}),
        client.post("/api/search", data={"text": "a photo of a desert", "map": "true"}),
    ):
        assert r.status_code == 200, r.text
        m = r.json().get("map", r.json())
        assert m["overlay"].startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(m["overlay"].split(",", 1)[1])))
        assert img.mode == "RGBA" and img.width >= 1
        (south, west), (north, east) = m["bounds"]
        assert south <= index.lat.min() and north >= index.lat.max()
        assert west <= index.lon.min() and east >= index.lon.max()
        assert m["min"] <= m["max"] and m["score"] == "cosine"


def test_coverage_overlay_shows_where_the_places_are(served):
    from geobind.search.maps import points_grid

    client, index = served["client"], served["index"]
    r = client.get("/api/coverage")
    assert r.status_code == 200, r.text
    c = r.json()

    def png(overlay):
        return Image.open(io.BytesIO(base64.b64decode(overlay.split(",", 1)[1])))

    img, alpha = png(c["overlay"]), np.asarray(png(c["overlay"]))[..., 3]
    # The heat map's grid: same bounds, same cells.
    heat = client.post("/api/map", data={"text": "a photo of a desert"}).json()
    assert c["bounds"] == heat["bounds"] and img.size == png(heat["overlay"]).size
    cell, rows, cols, _ = points_grid(np.asarray(index.lat, np.float64), np.asarray(index.lon, np.float64),
                                      c["resolution_deg"])
    assert alpha.shape == (rows, cols)
    assert c["cells"] == int((alpha > 0).sum()) == len(set(cell.tolist()))
    assert (alpha.reshape(-1)[cell] > 0).all() and c["places"] == len(index)


def test_land_layer_is_the_world_extra_land_mask(served, monkeypatch):
    """Land under the overlays (0.2-degree cells over the whole world, north up): Paris is land,
    the middle of the Pacific is not; without the land mask the layer is a 404, once."""
    pytest.importorskip("global_land_mask")
    client = served["client"]
    r = client.get("/api/land")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    alpha = np.asarray(Image.open(io.BytesIO(r.content)))[..., 3]
    assert alpha.shape == (900, 1800)

    def at(lat, lon):
        return alpha[int((90 - lat) / 0.2), int((lon + 180) / 0.2)]

    assert at(48.85, 2.35) == 255 and at(-5.0, -140.0) == 0 and at(-80.0, 30.0) == 255  # Paris, Pacific, Antarctica
    assert 0.25 < (alpha > 0).mean() < 0.4
    from geobind.serve.app import Explorer

    ex = Explorer.__new__(Explorer)  # only its land layer
    ex._land, ex._land_lock = None, threading.Lock()
    import geobind.data.world.geodata as geodata

    def missing():
        raise ImportError("global-land-mask is not installed")

    monkeypatch.setattr(geodata, "land_at_bm_pixels", missing)  # as without the world extra
    assert ex.land() == b""


def test_thumbnails_by_id_only(served):
    client, index = served["client"], served["index"]
    item = index.ids[0]
    r = client.get(f"/api/thumbnail/{item}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert r.content == index.thumbnail(item)
    Image.open(io.BytesIO(r.content)).verify()
    assert "no place with id 'nope'" in client.get("/api/thumbnail/nope").json()["detail"]
    for bad in ("nope", "..%2F..%2Fetc%2Fpasswd", "../sat.index/index.json"):
        r = client.get(f"/api/thumbnail/{bad}")
        # (the client resolves a literal "../" itself: that one misses every route)
        assert r.status_code == 404, bad


def test_page_docs_and_static_files_are_local(served):
    client = served["client"]
    page = client.get("/")
    assert page.status_code == 200 and "leaflet.js" in page.text
    assert "http://" not in page.text and "https://" not in page.text
    for path in (
        "/static/app.js",
        "/static/style.css",
        "/static/vendor/leaflet/leaflet.js",
        "/static/vendor/leaflet/leaflet.css",
        "/static/vendor/leaflet/images/marker-icon.png",
    ):
        assert client.get(path).status_code == 200, path
    assert "https://" not in client.get("/static/app.js").text
    paths = client.get("/openapi.json").json()["paths"]
    assert paths.keys() >= {"/api/search", "/api/map", "/api/health"}
    # The error statuses a query can get are documented, and a thumbnail is a JPEG.
    assert {"400", "413", "415", "422"} <= paths["/api/search"]["post"]["responses"].keys()
    assert "image/jpeg" in paths["/api/thumbnail/{item_id}"]["get"]["responses"]["200"]["content"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    try:
        import swagger_ui_bundle  # noqa: F401
    except ImportError:
        return
    assert (
        "cdn." not in docs.text
        and client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    )
    # The schema the docs page renders (OpenAPI 3.0) makes the upload a file picker, and an
    # optional field nullable, as Swagger UI 4 reads them.
    schema = client.get("/docs/openapi.json").json()
    ref = schema["paths"]["/api/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][ref["$ref"].rsplit("/", 1)[1]]["properties"]
    assert form["file"]["format"] == "binary" and form["file"]["nullable"] is True
    assert form["text"] == {**form["text"], "type": "string", "nullable": True}
    assert "contentMediaType" not in json.dumps(schema) and '"type": "null"' not in json.dumps(schema)


def test_a_text_longer_than_the_model_reads_is_said(served):
    model = served["model"]
    limit = model.encoder("text").max_length
    long = " ".join(["forest"] * (limit + 20))
    body = served["client"].post("/api/search", data={"text": long, "k": 2}).json()
    assert body["notes"] == [f"the text is {limit + 22} tokens long; this model reads only its first {limit}, "
                             "the rest was ignored"]
    assert served["client"].post("/api/search", data={"text": "a forest", "k": 2}).json()["notes"] == []


def test_concurrent_requests_agree(served):
    client = served["client"]
    texts = ["a photo of a forest", "a photo of a desert", "a photo of a city"] * 3
    expected = {
        t: client.post("/api/search", data={"text": t, "k": 3}).json()["results"]
        for t in set(texts)
    }
    got: dict[int, object] = {}

    def ask(i, t):
        got[i] = client.post("/api/search", data={"text": t, "k": 3}).json()["results"]

    threads = [threading.Thread(target=ask, args=(i, t)) for i, t in enumerate(texts)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i, t in enumerate(texts):
        assert [x["id"] for x in got[i]] == [x["id"] for x in expected[t]]


def test_cheap_endpoints_answer_while_maps_hold_many_workers(served):
    # More slow searches or maps than the app has worker threads (40) must not queue health and
    # thumbnails behind them: at most MAX_HEAVY run at once, the rest wait without a thread.
    from geobind.serve.app import MAX_HEAVY

    app = create_app(served["model"], served["index"])
    ex, release, running = app.state.explorer, threading.Event(), []
    slow_map = ex.heat_map

    def held_map(q, label):
        running.append(label)
        release.wait(20)
        return slow_map(q, label)

    ex.heat_map = held_map
    item = served["index"].ids[0]
    with TestClient(app) as client:
        codes: list[int] = []
        maps = [threading.Thread(target=lambda: codes.append(
            client.post("/api/map", data={"text": "a photo of a forest"}).status_code)) for _ in range(45)]
        for th in maps:
            th.start()
        try:
            for _ in range(200):
                if len(running) >= MAX_HEAVY:
                    break
                threading.Event().wait(0.05)
            cheap: dict[str, int] = {}
            ask = threading.Thread(target=lambda: cheap.update(
                health=client.get("/api/health").status_code,
                thumbnail=client.get(f"/api/thumbnail/{item}").status_code))
            ask.start()
            ask.join(5)
            assert cheap == {"health": 200, "thumbnail": 200}, "cheap endpoints waited behind the maps"
            assert len(running) == MAX_HEAVY
        finally:
            release.set()
            for th in maps:
                th.join()
    assert codes == [200] * 45


def test_decoded_uploads_are_bounded_until_embedded(served):
    # A decoded 40-megapixel photo is ~150 MB: one waiting for the model lock holds that as much
    # as one being decoded, so at most MAX_DECODING are alive at once, decoding to embedding.
    import time

    from geobind.serve.app import MAX_DECODING

    app = create_app(served["model"], served["index"])
    ex, lock = app.state.explorer, threading.Lock()
    alive, peak = [0], [0]
    decode, vector = ex._decode, ex.query_vector

    def counted_decode(*args):
        out = decode(*args)
        with lock:
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
        return out

    def counted_vector(*, text, upload):
        try:
            time.sleep(0.05)  # as if waiting for the model lock
            return vector(text=text, upload=upload)
        finally:
            if upload is not None:
                with lock:
                    alive[0] -= 1

    ex._decode, ex.query_vector = counted_decode, counted_vector
    with TestClient(app) as client:
        codes: list[int] = []
        asks = [threading.Thread(target=lambda: codes.append(upload(client, png_bytes(), "q.png").status_code))
                for _ in range(16)]
        for th in asks:
            th.start()
        for th in asks:
            th.join()
    assert codes == [200] * 16
    assert 1 <= peak[0] <= MAX_DECODING


def test_results_play_the_places_recordings(served):
    """The index's dataset has an audio column: each result links its recording, served by id
    from the dataset's own files, with byte ranges (a player seeks without fetching it all)."""
    from geobind.data.manifest import read_dataset

    client, index = served["client"], served["index"]
    h = client.get("/api/health").json()
    assert h["index"]["audio"] == len(index) and "recordings of" in h["audio"]
    body = client.post("/api/search", data={"text": "a photo of a forest", "k": 3}).json()
    table = read_dataset(index.header["source"]["source"])
    for hit in body["results"]:
        assert hit["audio_url"] == f"/api/audio/{hit['id']}"
        r = client.get(hit["audio_url"])
        wav = Path(table.columns["audio"][table.ids.index(hit["id"])]).read_bytes()
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav" and r.content == wav
    r = client.get(body["results"][0]["audio_url"], headers={"Range": "bytes=0-3"})
    assert r.status_code == 206 and r.content == b"RIFF"
    assert "no place with id 'nope'" in client.get("/api/audio/nope").json()["detail"]


def media_index(model, manifest, **header):
    """An in-memory satellite index of ``manifest``'s places (random vectors), recording it as
    the dataset it was embedded from."""
    from geobind.data.manifest import read_dataset

    table = read_dataset(manifest)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((len(table), model.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    head = {
        "kind": "exact",
        "count": len(table),
        "dim": model.dim,
        "model": {"identity": model.identity("satellite"), "modality": "satellite"},
        "source": {"source": str(manifest), "identity": table.identity, "layout": "manifest"},
        **header,
    }
    return Index(head, table.ids, np.array(table.lat), np.array(table.lon), vectors)


def test_recordings_of_a_dataset_read_with_layout_options(served, tmp_path):
    """An index embedded from a dataset read with layout options (a SoundingEarth caption column
    here) finds its recordings: the dataset is read again with the options it was embedded with,
    which are part of its identity."""
    from layout_fixtures import make_soundingearth

    from geobind.search.embed import embed_dataset
    from geobind.serve.app import PlaceAudio

    csv = make_soundingearth(tmp_path / "se", n=6)
    embed_dataset(served["model"], csv, "satellite", tmp_path / "se.parquet", layout="soundingearth",
                  layout_options={"text": "caption"}, log=None)
    build_index(tmp_path / "se.parquet", tmp_path / "se.index", "exact", log=None)
    index = Index.load(tmp_path / "se.index")
    assert index.header["source"]["layout_options"] == {"text": "caption"}
    audio = PlaceAudio.of(index)
    assert len(audio) == 6, audio.note


def test_recordings_are_served_only_from_inside_the_dataset(served, tmp_path):
    """Only audio files inside the dataset's folder are ever read: a cell that climbs out with
    ``..``, an absolute path elsewhere, a link that leads out, a file that is not audio and a
    missing one are not served, nor is anything a request path names."""
    import os
    from urllib.parse import quote

    model = served["model"]
    root = tmp_path / "data"
    (root / "audio").mkdir(parents=True)
    outside = tmp_path / "outside.wav"
    outside.write_bytes(wav_bytes(0.5))
    secret = outside.read_bytes()
    ok = wav_bytes(0.25)
    (root / "audio" / "ok.wav").write_bytes(ok)
    (root / "audio" / "notes.txt").write_text("not a recording")
    os.symlink(outside, root / "audio" / "link.wav")
    cells = {
        "ok": "audio/ok.wav",
        "abs-inside": str(root / "audio" / "ok.wav"),
        "up": "../outside.wav",
        "up-inside": "audio/../../outside.wav",
        "abs-outside": str(outside),
        "link": "audio/link.wav",
        "text": "audio/notes.txt",
        "gone": "audio/missing.wav",
        "none": "",
    }
    manifest = root / "places.csv"
    manifest.write_text("id,lat,lon,audio\n" + "".join(f"{k},{i},{i},{v}\n" for i, (k, v) in enumerate(cells.items())))
    index = media_index(model, manifest)
    client = TestClient(create_app(model, index))
    served_ids = {"ok", "abs-inside"}
    results = client.post("/api/search", data={"text": "a forest", "k": len(cells)}).json()["results"]
    assert {r["id"] for r in results if r["audio_url"]} == served_ids
    health = client.get("/api/health").json()
    assert health["index"]["audio"] == 4  # link and gone fail when served
    # Cells that lead outside are counted, with what serves them (a split's manifest names ../).
    assert "(3 lead outside it, which are never served: pass --data" in health["audio"]
    for item in cells:
        r = client.get(f"/api/audio/{quote(item)}")
        if item in served_ids:
            assert r.status_code == 200 and r.content == ok, item
        else:
            assert r.status_code == 404 and secret not in r.content, item
    # A request path is an id, never a file name.
    for path in ("..%2Foutside.wav", "..%2F..%2Foutside.wav", quote(str(outside), safe=""), str(outside),
                 "ok%2F..%2F..%2F..%2Foutside.wav", "audio%2Fok.wav", quote(str(root / "places.csv"), safe="")):
        r = client.get(f"/api/audio/{path}")
        assert r.status_code == 404 and secret not in r.content, path
    # Another dataset at the recorded path (its rows may be other places), or media off: none.
    changed = TestClient(create_app(model, media_index(model, manifest, source={
        "source": str(manifest), "identity": "0" * 64, "layout": "manifest"})))
    assert "changed since" in changed.get("/api/health").json()["audio"]
    assert changed.get("/api/audio/ok").status_code == 404
    off = TestClient(create_app(model, index, media=False))
    assert off.get("/api/audio/ok").status_code == 404 and off.get("/api/health").json()["index"]["audio"] == 0
    # A dataset named explicitly is used as it is.
    named = TestClient(create_app(model, media_index(model, manifest, source={}), data=manifest))
    assert named.get("/api/audio/ok").content == ok


def test_head_answers_as_get_without_a_body(served):
    client, index = served["client"], served["index"]
    for path in ("/", "/api/health", "/static/app.js", f"/api/thumbnail/{index.ids[0]}", f"/api/audio/{index.ids[0]}"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
        assert int(head.headers["content-length"]) == len(get.content), path
    assert client.head("/api/thumbnail/nope").status_code == 404
    r = client.head("/api/search")  # POST only
    assert r.status_code == 405 and "POST" in r.headers["allow"]


def multipart(*parts: tuple, charset: str | None = None) -> dict:
    """A hand-made multipart body: ``(name, bytes)`` fields and ``(name, bytes, filename)`` files,
    as the keyword arguments of a test client's post."""
    body = b""
    for name, value, *filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename[0]}"' if filename else "")
        body += f"--b\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    ctype = "multipart/form-data; boundary=b" + (f"; charset={charset}" if charset else "")
    return {"content": body + b"--b--\r\n", "headers": {"content-type": ctype}}


def test_form_fields_that_are_not_utf8_get_400(served):
    """Text that is not UTF-8 is refused, naming the field, not read as Latin-1; a file's bytes
    are its own, and a charset named in the Content-Type header is honoured."""
    client = served["client"]
    for path in ("/api/search", "/api/map"):
        r = client.post(path, **multipart(("text", b"a forest caf\xe9")))
        assert r.status_code == 400 and "'text' is not UTF-8" in r.json()["detail"], path
    r = client.post("/api/search", **multipart(("file", wav_bytes(), "a.wav"), ("modality", b"aud\xedo")))
    assert r.status_code == 400 and "'modality' is not UTF-8" in r.json()["detail"]
    r = client.post("/api/search", content=b"text=a+forest+caf%E9",
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "'text' is not UTF-8" in r.json()["detail"]
    # A file sent as a plain field is refused as not a file, whatever its bytes.
    r = client.post("/api/search", **multipart(("file", b"\x89PNG\xff\xfe")))
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "file"]
    # The same text as UTF-8, or as Latin-1 said so, is read as written.
    for form in (multipart(("text", "a forest café".encode())),
                 multipart(("text", b"a forest caf\xe9"), charset="latin-1")):
        r = client.post("/api/search", **form)
        assert r.status_code == 200 and r.json()["query"] == '"a forest café"', r.text
    r = client.post("/api/search", **multipart(("text", b"a forest"), ("file", wav_bytes(), "a.wav")))
    assert r.status_code == 200 and r.json()["query"] == '"a forest" + audio upload'


def test_a_field_given_twice_gets_400(served):
    """Two files (or two texts) in one query are refused, not one of them silently dropped."""
    client = served["client"]
    r = client.post("/api/search", files=[("file", ("a.wav", wav_bytes())), ("file", ("b.png", png_bytes()))])
    assert r.status_code == 400 and "more than one 'file' part" in r.json()["detail"]
    r = client.post("/api/map", data={"text": ["a forest", "a desert"]})
    assert r.status_code == 400 and "'text' more than once" in r.json()["detail"]
    r = client.post("/api/search", content=b"text=a+forest&k=2&k=3",
                    headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "'k' more than once" in r.json()["detail"]
    assert client.post("/api/search", files={"file": ("a.wav", wav_bytes())}).status_code == 200


# -- bad requests ----------------------------------------------------------------------------
def scene_png_bytes(side: int = 15000) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("L", (side, side), bytes(side * side)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, data, form, status, words",
    [
        ("notes.txt", b"just some text, not media", {}, 415, "neither an image nor an audio"),
        ("empty.png", b"", {}, 400, "empty"),
        (
            "half.png",
            png_bytes(64)[: len(png_bytes(64)) // 2],
            {},
            422,
            "could not be decoded as image",
        ),
        ("header.wav", wav_bytes()[:44], {}, 422, "could not be decoded as audio"),
        ("cut.flac", wav_bytes(fmt="FLAC")[:200], {}, 422, "could not be decoded as audio"),
        (
            "photo.png",
            png_bytes(),
            {"modality": "audio"},
            415,
            "is image, but the query asked for audio",
        ),
        ("clip.wav", wav_bytes(), {"modality": "satellite"}, 415, "is audio"),
        ("photo.png", png_bytes(), {"modality": "video"}, 422, "modality must be one of"),
        ("scene.png", scene_png_bytes(), {}, 413, "queries take images up to 40 megapixels"),  # 225 MP, 200 KB
        ("big.png", scene_png_bytes(7000), {}, 413, "is 7000 x 7000 pixels; queries take images up to 40"),
        ("photo.png", png_bytes(), {"k": 0}, 422, ""),
        ("photo.png", png_bytes(), {"k": 1000}, 422, ""),
    ],
)
def test_bad_uploads_get_a_clear_4xx(served, name, data, form, status, words):
    r = upload(served["client"], data, name, **form)
    assert r.status_code == status, r.text
    assert words in str(r.json()["detail"])


def test_uploads_cost_only_what_the_encoder_reads(served, monkeypatch):
    """A long recording (Ogg, which does not seek exactly, too) has only the clip the encoder
    hears decoded, and searches as the Python API's path query does; a 1 Hz file is refused
    before resampling; a 1 x 300,000 pixel strip (a 1 KB PNG) is searched without a huge
    intermediate image."""
    import geobind.data.audio_io as audio_io

    client, model, index = served["client"], served["model"], served["index"]
    rng = np.random.default_rng(5)
    long = (0.2 * rng.standard_normal(16000 * 60)).astype(np.float32)  # a minute at 16 kHz
    for fmt in ("OGG", "FLAC"):
        buf = io.BytesIO()
        sf.write(buf, long, 16000, format=fmt)
        ref = model.search(index, audio=buf.getvalue(), k=3)
        monkeypatch.setattr(audio_io, "_decode", lambda *a, **k: pytest.fail("decoded whole"))
        r = upload(client, buf.getvalue(), f"minute.{fmt.lower()}", k=3)
        monkeypatch.undo()
        assert r.status_code == 200, r.text
        assert [x["id"] for x in r.json()["results"]] == [h.id for h in ref], fmt
        np.testing.assert_allclose([x["score"] for x in r.json()["results"]], [h.score for h in ref], atol=1e-5)
    buf = io.BytesIO()
    sf.write(buf, long[:30000], 1, format="WAV")
    r = upload(client, buf.getvalue(), "one-hertz.wav")
    assert r.status_code == 422 and "bad-rate" in r.json()["detail"] and "1 Hz" in r.json()["detail"]
    buf = io.BytesIO()
    Image.new("RGB", (1, 300_000), (40, 120, 40)).save(buf, "PNG")
    assert len(buf.getvalue()) < 5000
    r = upload(client, buf.getvalue(), "strip.png", k=2)
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_errors_are_json_and_never_echo_the_request(served, monkeypatch):
    """FastAPI's own 422 says where and why without sending a field's value back (a 1 MB
    field would come back whole); an unexpected failure is a JSON 500, not plain text."""
    client = served["client"]
    r = client.post("/api/search", data={"text": "forest", "k": "x" * 100_000})
    assert r.status_code == 422 and len(r.content) < 1000
    (err,) = r.json()["detail"]
    assert err["loc"] == ["body", "k"] and "input" not in err
    app = create_app(served["model"], served["index"])
    monkeypatch.setattr(app.state.explorer, "search", lambda q, k: 1 / 0)
    r = TestClient(app, raise_server_exceptions=False).post("/api/search", data={"text": "forest"})
    assert r.status_code == 500 and "ZeroDivisionError" in r.json()["detail"]


def test_a_text_of_unknown_words_only_is_refused(served):
    """With a word-level vocabulary, a text none of whose words it knows would embed like any
    other such text: refused with a 422 that says so (the Python API raises the same)."""
    r = served["client"].post("/api/search", data={"text": "日本の雪山"})
    assert r.status_code == 422 and "none of the words of the query" in r.json()["detail"]
    with pytest.raises(ValueError, match="are in the model's vocabulary"):
        served["model"].search(served["index"], text="🏔🏔", k=3)
    assert served["client"].post("/api/search", data={"text": "a forest 🏔"}).status_code == 200


def test_a_json_body_is_told_to_send_form_fields(served):
    r = served["client"].post("/api/search", json={"text": "a forest"})
    assert r.status_code == 415 and "send form fields" in r.json()["detail"]


def test_query_without_text_or_file_is_400(served):
    for data in ({}, {"text": "   "}):
        r = served["client"].post("/api/search", data=data)
        assert r.status_code == 400 and "give a text query" in r.json()["detail"]
    r = served["client"].post("/api/search", data={"text": "x" * 5000})
    assert r.status_code == 422 and "longer than" in r.json()["detail"]


def test_uploads_over_the_limit_get_413(served):
    app = create_app(served["model"], served["index"], max_upload_mb=0.01)  # ~10 KB
    client = TestClient(app)
    # Over the file limit, within the body allowance for the form: checked on the file.
    r = upload(client, png_bytes(96), "big.png")
    assert len(png_bytes(96)) > 0.01 * 2**20
    assert r.status_code == 413 and "limit is 0.01 MB" in r.json()["detail"]
    # Far over: refused from the request's size before the form is parsed, also when chunked.
    big = b"\0" * (2 * 2**20)
    r = upload(client, big, "huge.bin")
    assert r.status_code == 413 and "too large" in r.json()["detail"]

    def chunks():
        for _ in range(64):
            yield b"x" * 32768

    r = client.post(
        "/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert r.status_code == 413
    # Small uploads still work on this app.
    assert upload(client, png_bytes(), "small.png").status_code == 200


def test_app_refuses_an_index_of_another_model(served, tiny_data):
    import torch
    from test_model import build_space

    other = build_space(tiny_data)
    with torch.no_grad():
        next(other.encoder("satellite").parameters()).add_(0.01)
    with pytest.raises(ValueError, match="another model"):
        create_app(other, served["index"])


# -- command line ----------------------------------------------------------------------------
def test_serve_cli_binds_localhost_and_prints_the_url(served, monkeypatch, capsys):
    import uvicorn

    calls = {}

    def run(server, sockets=None):
        (sock,) = sockets
        calls.update(app=server.config.app, host=server.config.host, port=sock.getsockname()[1])
        calls["name"] = sock.getsockname()[0]
        calls["printed"] = capsys.readouterr().out  # the URL is out before the server runs

    monkeypatch.setattr(uvicorn.Server, "run", run)
    argv = ["serve", "--model", str(served["model_dir"]), "--index", str(served["index_dir"])]
    assert main(argv + ["--port", "0"]) == 0
    # Bound first: --port 0 prints the port the system gave, the one the server listens on.
    assert calls["host"] == "127.0.0.1" and calls["name"] == "127.0.0.1" and calls["port"] > 0
    assert f"http://127.0.0.1:{calls['port']}/" in calls["printed"]
    local = TestClient(calls["app"], base_url=f"http://127.0.0.1:{calls['port']}")
    assert local.get("/api/health").json()["index"]["count"] == len(served["index"])
    # Bound to this machine only, it answers only requests addressed to it by a loopback name.
    assert TestClient(calls["app"], base_url="http://localhost").get("/api/health").status_code == 200
    r = TestClient(calls["app"], base_url="http://attacker.example").get("/api/health")
    assert r.status_code == 400 and "attacker.example" in r.json()["detail"]
    assert "no login" not in calls["printed"]
    # A missing index is an error message and exit status 2, not a traceback.
    assert (
        main(["serve", "--model", str(served["model_dir"]), "--index", "/nonexistent.index"]) == 2
    )
    assert "does not exist" in capsys.readouterr().err


def test_serve_cli_on_all_addresses_says_anyone_can_reach_it(served, monkeypatch, capsys):
    import uvicorn

    from geobind.serve.app import loopback_hosts

    calls = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: calls.update(app=server.config.app))
    argv = ["serve", "--model", str(served["model_dir"]), "--index", str(served["index_dir"])]
    assert main(argv + ["--port", "0", "--host", "0.0.0.0"]) == 0
    assert "no login" in capsys.readouterr().out
    assert TestClient(calls["app"], base_url="http://203.0.113.7").get("/api/health").status_code == 200
    assert loopback_hosts("0.0.0.0") is None and loopback_hosts("192.0.2.1") is None
    assert "localhost" in loopback_hosts("LOCALHOST")
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert {"127.0.0.1", "localhost", "::1", host} <= set(loopback_hosts(host)), host
    app = create_app(served["model"], served["index"], allowed_hosts=loopback_hosts("::1"))
    assert TestClient(app, base_url="http://[::1]:8000").get("/api/health").status_code == 200


def test_an_approximate_index_without_faiss_is_refused_at_start_and_by_search(served, tmp_path, monkeypatch,
                                                                                capsys):
    """Without FAISS an hnsw index would start a server whose every search fails (HTTP 500):
    serve refuses it at once, and search names its own --exact, both in one line."""
    import sys

    import uvicorn

    build_index(served["model_dir"].parent / "sat.parquet", tmp_path / "hnsw.index", "hnsw", log=None)
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: pytest.fail("the server started"))
    monkeypatch.setitem(sys.modules, "faiss", None)
    assert main(["serve", "--model", str(served["model_dir"]), "--index", str(tmp_path / "hnsw.index"),
                 "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "serving it needs FAISS, which is not installed: pip install 'geobind[faiss]'" in err, err
    assert "--kind exact" in err and "geobind search --exact" not in err, err  # serve has no --exact
    assert len(err.strip().splitlines()) == 1
    assert main(["search", "--model", str(served["model_dir"]), "--index", str(tmp_path / "hnsw.index"),
                 "--text", "a forest"]) == 2
    assert "`geobind search --exact`" in capsys.readouterr().err
    assert main(["search", "--model", str(served["model_dir"]), "--index", str(tmp_path / "hnsw.index"),
                 "--text", "a forest", "--exact"]) == 0


def test_an_approximate_index_is_read_once_before_the_first_requests(served, tmp_path, monkeypatch):
    faiss = pytest.importorskip("faiss")
    build_index(served["model_dir"].parent / "sat.parquet", tmp_path / "hnsw.index", "hnsw", log=None)
    reads = []
    read_index = faiss.read_index
    monkeypatch.setattr(faiss, "read_index", lambda *a: reads.append(a) or read_index(*a))
    client = TestClient(create_app(served["model"], Index.load(tmp_path / "hnsw.index")))
    assert len(reads) == 1
    asks = [threading.Thread(target=lambda: client.post("/api/search", data={"text": "a forest"}))
            for _ in range(6)]
    for th in asks:
        th.start()
    for th in asks:
        th.join()
    assert len(reads) == 1


def test_serve_cli_says_where_recordings_come_from_and_can_serve_none(served, monkeypatch, capsys):
    import uvicorn

    calls = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda server, sockets=None: calls.update(app=server.config.app))
    argv = ["serve", "--model", str(served["model_dir"]), "--index", str(served["index_dir"]), "--port", "0"]
    assert main(argv) == 0
    assert f"recordings: recordings of {len(served['index'])} places from" in capsys.readouterr().out
    assert main(argv + ["--no-media"]) == 0
    assert "recordings: recordings are not served" in capsys.readouterr().out
    h = TestClient(calls["app"], base_url="http://127.0.0.1").get("/api/health").json()
    assert h["index"]["audio"] == 0
    # --data names the manifest to take them from; it must exist, and cannot go with --no-media.
    source = served["index"].header["source"]["source"]
    assert main(argv + ["--data", source]) == 0
    assert "recordings: recordings of" in capsys.readouterr().out
    assert main(argv + ["--data", source, "--no-media"]) == 2
    assert "give one" in capsys.readouterr().err
    assert main(argv + ["--data", str(served["index_dir"]) + "-nope.csv"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_serve_cli_names_a_port_in_use(served, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--model", str(served["model_dir"]), "--index", str(served["index_dir"])]
        assert main(argv + ["--port", str(port)]) == 2
    got = capsys.readouterr()
    assert "GeoBind explorer" not in got.out  # no URL for a server that never ran
    assert f"port {port} on 127.0.0.1 is already in use" in got.err and "--port 0" in got.err
    assert len(got.err.strip().splitlines()) == 1


def test_serve_socket_turns_nagle_off_on_its_connections():
    # asyncio sets TCP_NODELAY only on sockets whose proto is TCP: with Nagle on, each response
    # after the first on a kept-alive connection (thumbnails, searches from the page) waited
    # ~40 ms for the client's delayed ACK.
    import asyncio
    import socket

    from geobind.cli_serve import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    seen = []

    async def run():
        def accepted(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(accepted, sock=sock)
        reader, writer = await asyncio.open_connection(*sock.getsockname()[:2])
        await reader.read()
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(run())
    assert seen and seen[0] != 0


def test_serve_help_has_examples(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--max-upload-mb" in out and "127.0.0.1" in out
