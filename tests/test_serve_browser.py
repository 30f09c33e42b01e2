"""End to end: the explorer served by uvicorn on a free port, driven in headless Chromium.

Needs Debian's ``chromium`` (``/usr/bin/chromium``; `.ci/run` installs it) and Playwright for
Python (the ``test`` extra). ``playwright install`` is never run: it would download a browser.
"""

from __future__ import annotations

import importlib.util
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    # A fake microphone that needs no permission prompt: the recording test records from it.
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("playwright") is None,
        reason="Playwright for Python is not installed (pip install playwright)",
    ),
    pytest.mark.skipif(
        not CHROMIUM.is_file(),
        reason=f"no Chromium at {CHROMIUM} (apt-get install chromium); the browser test needs it",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("fastapi") is None,
        reason="the serve extra is not installed: pip install 'geobind[serve]'",
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_data, tmp_path_factory):
    """The app on a free local port, run by uvicorn in a thread; its base URL."""
    import uvicorn
    from test_serve import make_served

    from geobind.serve import create_app

    parts = make_served(tiny_data, tmp_path_factory.mktemp("serve_browser"))
    port = free_port()
    srv = uvicorn.Server(
        uvicorn.Config(
            create_app(parts["model"], parts["index"]),
            host="127.0.0.1",
            port=port,
            log_level="warning",
        )
    )
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", **parts}
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_text_query_shows_markers_overlay_and_popups(server, browser):
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    requests: list[str] = []
    errors: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server["url"] + "/")
    page.wait_for_function("document.getElementById('info').textContent.includes('places')")
    # Before any query: grey cells where the indexed places are.
    page.wait_for_selector("img.leaflet-image-layer:not(.land)", timeout=20_000)
    import importlib.util

    if importlib.util.find_spec("global_land_mask"):  # the land layer under everything
        page.wait_for_selector("img.leaflet-image-layer.land", state="attached", timeout=20_000)
    assert f"the {len(server['index'])} indexed places" in page.inner_text("#status")
    # The overlays are latitude/longitude grids: each latitude is drawn where the map puts it
    # (with Web Mercator, 60 degrees north would land some 60 px off at this size).
    import json
    import urllib.request

    (south, _), (north, _) = json.load(urllib.request.urlopen(server["url"] + "/api/coverage"))["bounds"]
    for lat in (60.0, 20.0, -40.0):
        drawn, placed = page.evaluate(
            """([lat, south, north]) => {
                const img = document.querySelector('img.leaflet-image-layer:not(.land)').getBoundingClientRect();
                const box = document.getElementById('map').getBoundingClientRect();
                return [img.top + (north - lat) / (north - south) * img.height,
                        box.top + window.geobindMap.latLngToContainerPoint([lat, 0]).y];
            }""",
            [lat, south, north],
        )
        assert abs(drawn - placed) < 1.0, (lat, drawn, placed)
    page.fill("#text", "a photo of a forest")
    page.fill("#k", "5")
    page.click("#submit")
    page.wait_for_selector("img.leaflet-image-layer:not(.land)", timeout=20_000)
    page.wait_for_function("document.querySelectorAll('.leaflet-marker-icon').length === 5")
    assert page.locator("img.leaflet-image-layer:not(.land)").count() == 1  # the heat map replaced the coverage
    overlay_src = page.get_attribute("img.leaflet-image-layer:not(.land)", "src")
    assert overlay_src.startswith("data:image/png;base64,")
    assert page.locator("#results li").count() == 5
    # The best place's popup opens with its thumbnail (served by id), caption and score.
    page.wait_for_selector(".leaflet-popup img")
    best = server["model"].search(server["index"], text="a photo of a forest", k=1)[0]
    popup = page.inner_text(".leaflet-popup-content")
    assert f"{best.score:.4f}" in popup and best.id in popup
    assert page.evaluate("document.querySelector('.leaflet-popup img').naturalWidth") > 0
    assert "cosine similarity" in page.inner_text("#legend")
    # Nothing was fetched from anywhere but this server (no CDN, no tiles).
    # The page's own images are data: or blob: URLs of what the server sent (the land layer).
    assert all(u.startswith((server["url"], "data:", "blob:" + server["url"])) for u in requests), requests
    # Clear: back to the grey cells where the places are.
    page.click("#clear")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('grey:')")
    assert page.locator("img.leaflet-image-layer:not(.land)").count() == 1 and page.locator(".leaflet-marker-icon").count() == 0
    assert not errors, errors
    page.close()


def test_bad_query_shows_the_message(server, browser):
    page = browser.new_page()
    page.goto(server["url"] + "/")
    page.wait_for_function("document.getElementById('info').textContent.includes('places')")
    page.set_input_files(
        "#file",
        files=[
            {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image or a sound"}
        ],
    )
    page.click("#submit")
    page.wait_for_selector("#status.error")
    assert "neither an image nor an audio" in page.inner_text("#status")
    page.close()


def test_stale_results_never_stay_up_and_the_page_works_from_the_keyboard_and_narrow(server, browser):
    """Clear during a slow search drops its late answer; an error after a search takes the old
    results and legend away; a list entry opens its place from the keyboard; a chosen file says it
    joins the text; an unreachable server is said in words; at 400 px the map stays usable."""
    import time

    page = browser.new_page(viewport={"width": 1100, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server["url"] + "/")
    page.wait_for_function("document.getElementById('info').textContent.includes('places')")
    slow = lambda route: (time.sleep(1.5), route.continue_())  # noqa: E731
    page.route("**/api/search", slow)
    page.fill("#text", "a photo of a forest")
    page.click("#submit")
    page.wait_for_function("document.getElementById('status').textContent === 'searching…'")
    page.click("#clear")
    time.sleep(2.5)  # the answer would have arrived by now
    assert page.locator(".leaflet-marker-icon").count() == 0 and page.locator("#results li").count() == 0
    assert page.inner_text("#vmax") == "" and not page.is_disabled("#submit")
    page.unroute("**/api/search")
    # A search, then a failing one: nothing of the first stays.
    page.fill("#text", "a photo of a forest")
    page.fill("#k", "3")
    page.press("#text", "Enter")
    page.wait_for_function("document.querySelectorAll('#results li').length === 3")
    assert page.inner_text("#vmax") != ""
    page.fill("#text", "x" * 2000)  # over the server's limit
    page.click("#submit")
    page.wait_for_selector("#status.error")
    assert page.locator("#results li").count() == 0 and page.inner_text("#vmax") == ""
    # The list from the keyboard: Enter on an entry opens its place.
    page.fill("#text", "a photo of a forest")
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('#results li').length === 3")
    page.focus("#results li:nth-child(2)")
    page.keyboard.press("Enter")
    page.wait_for_function("[...document.querySelectorAll('.leaflet-popup-content')]"
                           ".some((e) => e.textContent.includes('#2 '))")
    # A chosen file says it joins the text, and can be removed.
    assert page.is_hidden("#fileinfo")
    page.set_input_files("#file", files=[{"name": "a.png", "mimeType": "image/png", "buffer": b"\x89PNG"}])
    assert page.is_visible("#fileinfo") and "together with any text" in page.inner_text("#fileinfo")
    page.click("#nofile")
    assert page.is_hidden("#fileinfo") and page.evaluate("document.getElementById('file').files.length") == 0
    # The server gone: said in words.
    page.route("**/api/search", lambda route: route.abort())
    page.click("#submit")
    page.wait_for_selector("#status.error")
    assert "cannot reach the geobind server" in page.inner_text("#status")
    page.unroute("**/api/search")
    # Narrow: the panel above the map, and the map keeps a usable height.
    page.set_viewport_size({"width": 400, "height": 800})
    box = page.locator("#map").bounding_box()
    assert box["width"] >= 390 and box["height"] >= 300
    assert not errors, errors
    page.close()


def luminance(css: str) -> float:
    r, g, b = (int(v) for v in css[css.index("(") + 1 : css.index(")")].split(",")[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def test_pins_show_rank_and_score_and_their_legend_reads_on_a_phone(server, browser):
    """Pins are coloured by score (darker is closer), the best ten numbered, the best drawn on
    top, rank and score in their title and tooltip; the map's legend says what the score is and
    stays inside the map, legible, at 375 px, where it steps aside while a popup is open."""
    page = browser.new_page(viewport={"width": 1100, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server["url"] + "/")
    page.wait_for_function("document.getElementById('info').textContent.includes('places')")
    page.fill("#text", "a photo of a forest")
    page.fill("#k", "12")
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('.leaflet-marker-icon').length === 12")
    page.wait_for_selector(".leaflet-popup")
    pins = page.evaluate("""() => [...document.querySelectorAll('.leaflet-marker-icon.pin')].map((e) => ({
        title: e.title, text: e.textContent, z: +e.style.zIndex, width: e.offsetWidth,
        colour: getComputedStyle(e.firstElementChild).backgroundColor}))""")
    by_rank = {int(p["title"].split(":")[0].lstrip("#")): p for p in pins}
    assert sorted(by_rank) == list(range(1, 13))
    ranked = [by_rank[r] for r in range(1, 13)]
    assert [p["text"] for p in ranked] == [str(r) for r in range(1, 11)] + ["", ""]
    assert ranked[0]["width"] > ranked[-1]["width"]  # numbered pins are the larger ones
    z = [p["z"] for p in ranked]
    assert z == sorted(z, reverse=True) and len(set(z)) == 12  # the best on top of the rest
    shade = [luminance(p["colour"]) for p in ranked]
    assert shade == sorted(shade) and shade[0] < shade[-1] - 50  # darker is closer
    hits = server["model"].search(server["index"], text="a photo of a forest", k=12)
    assert ranked[1]["title"].startswith("#2: ") and f"score {hits[1].score:.4f}" in ranked[1]["title"]
    page.focus('.leaflet-marker-icon[title^="#2: "]')  # the tooltip opens from the keyboard too
    page.wait_for_selector(".leaflet-tooltip")
    assert page.inner_text(".leaflet-tooltip") == f"#2 · {hits[1].score:.4f}"
    legend = page.inner_text(".pin-legend")
    assert "cosine similarity of unit vectors" in legend and "higher = closer" in legend
    assert f"{hits[-1].score:.3f}" in legend and f"{hits[0].score:.3f}" in legend and "top 12" in legend
    # A phone: the legend inside the map, its text at 11 px or more and nothing cut off.
    page.set_viewport_size({"width": 375, "height": 740})
    page.evaluate("window.geobindMap.closePopup()")
    page.wait_for_timeout(300)
    box = page.evaluate("""() => {
        const l = document.querySelector('.pin-legend'), m = document.getElementById('map');
        const a = l.getBoundingClientRect(), b = m.getBoundingClientRect();
        return {inside: a.left >= b.left && a.right <= b.right && a.top >= b.top && a.bottom <= b.bottom,
                width: a.width, height: a.height, map: [b.width, b.height],
                font: parseFloat(getComputedStyle(l).fontSize), cut: l.scrollWidth > l.clientWidth,
                pinFont: parseFloat(getComputedStyle(document.querySelector('.pin span')).fontSize)};
    }""")
    assert box["inside"] and not box["cut"], box
    assert box["width"] <= 0.45 * box["map"][0] and box["height"] <= 0.35 * box["map"][1], box
    assert box["font"] >= 11 and box["pinFont"] >= 11, box
    page.focus('.leaflet-marker-icon[title^="#1: "]')
    page.keyboard.press("Enter")
    page.wait_for_selector(".leaflet-popup")
    assert page.is_hidden(".pin-legend")
    page.evaluate("window.geobindMap.closePopup()")
    assert page.is_visible(".pin-legend")
    assert not errors, errors
    page.close()


def test_recordings_play_in_popups_and_query_clips_before_searching(server, browser):
    """A result with a recording plays it from the server; a chosen sound file, and a recording
    from the microphone, can be heard before they are searched (a photo has no player)."""
    from test_serve import png_bytes, wav_bytes

    page = browser.new_page(viewport={"width": 1100, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server["url"] + "/")
    page.wait_for_function("document.getElementById('info').textContent.includes('places')")
    assert f"{len(server['index'])} with a recording to play" in page.inner_text("#info")
    page.fill("#text", "a photo of a forest")
    page.fill("#k", "3")
    page.click("#submit")
    page.wait_for_function("document.querySelectorAll('#results li').length === 3")
    assert page.locator("#results li .heard").count() == 3
    page.wait_for_selector(".leaflet-popup audio")
    best = server["model"].search(server["index"], text="a photo of a forest", k=1)[0]
    assert page.get_attribute(".leaflet-popup audio", "src") == f"/api/audio/{best.id}"
    page.evaluate("(() => { const a = document.querySelector('.leaflet-popup audio'); a.preload = 'metadata'; a.load(); })()")
    page.wait_for_function("document.querySelector('.leaflet-popup audio').readyState >= 1")
    assert abs(page.evaluate("document.querySelector('.leaflet-popup audio').duration") - 1.0) < 0.05
    # A chosen sound file: its player appears, and plays the file itself (2 s), before Search.
    player = "document.getElementById('queryaudio')"
    assert page.is_hidden("#queryaudio")
    page.set_input_files("#file", files=[{"name": "clip.wav", "mimeType": "audio/wav", "buffer": wav_bytes(2.0)}])
    page.wait_for_function(f"{player}.readyState >= 1")
    assert page.is_visible("#queryaudio") and page.evaluate(f"{player}.src").startswith("blob:")
    assert abs(page.evaluate(f"{player}.duration") - 2.0) < 0.05
    page.set_input_files("#file", files=[{"name": "a.png", "mimeType": "image/png", "buffer": png_bytes()}])
    assert page.is_hidden("#queryaudio")
    page.set_input_files("#file", files=[{"name": "clip.wav", "mimeType": "audio/wav", "buffer": wav_bytes(2.0)}])
    assert page.is_visible("#queryaudio")
    page.click("#nofile")
    assert page.is_hidden("#queryaudio") and not page.evaluate(f"{player}.getAttribute('src')")
    # A recording (Chromium's fake microphone): heard first, then searched.
    page.wait_for_selector("#record", state="visible")
    page.click("#record")
    page.wait_for_function("document.getElementById('record').textContent.includes('Stop')")
    time.sleep(1.0)
    page.click("#record")
    page.wait_for_function("document.getElementById('recinfo').textContent.includes('ready')", timeout=20_000)
    page.wait_for_function(f"{player}.readyState >= 1")
    assert page.is_visible("#queryaudio") and page.evaluate(f"{player}.duration") > 0.5
    page.fill("#text", "")
    page.click("#submit")
    page.wait_for_function("document.getElementById('status').textContent.includes('audio upload')", timeout=20_000)
    assert page.locator("#results li").count() == 3
    assert not errors, errors
    page.close()
