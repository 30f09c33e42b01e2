// GeoBind explorer page: query form -> POST /api/search (with the heat map) -> Leaflet layers.
// Everything is served by the app itself; no tiles or scripts come from the internet.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  // Plate carrée (EPSG:4326): the overlays are latitude/longitude grids, so rows of equal
  // latitude steps must be drawn at equal heights (Leaflet's default Web Mercator would put a
  // cell at 60 degrees north where 77 degrees is). No tiles are used, so nothing else depends on it.
  const map = L.map("map", { crs: L.CRS.EPSG4326, minZoom: 0, maxZoom: 12, zoomSnap: 0.5, worldCopyJump: false })
    .fitBounds([[-60, -180], [85, 180]]);
  window.geobindMap = map; // for scripts driving the page
  map.attributionControl.setPrefix("Leaflet");

  // A plain background: a graticule every 30 degrees (no tile server is needed or used).
  const grid = L.layerGroup().addTo(map);
  for (let lat = -90; lat <= 90; lat += 30) {
    L.polyline([[lat, -180], [lat, 180]], { color: "#8fa3b3", weight: lat === 0 ? 1.5 : 0.7, interactive: false }).addTo(grid);
  }
  for (let lon = -180; lon <= 180; lon += 30) {
    L.polyline([[-90, lon], [90, lon]], { color: "#8fa3b3", weight: lon === 0 ? 1.5 : 0.7, interactive: false }).addTo(grid);
  }

  // Land under everything, from the server's land mask (the world extra; a 404 without it).
  fetch("/api/land").then((r) => (r.ok ? r.blob() : null)).then((b) => {
    if (b) L.imageOverlay(URL.createObjectURL(b), [[-90, -180], [90, 180]], { interactive: false, className: "land" }).addTo(map).bringToBack();
  }).catch(() => {});

  const results = L.layerGroup().addTo(map);
  let overlay = null;
  let coverage = null; // grey cells where the indexed places are, until the first heat map

  let coverageData = null;
  let asked = false; // a query was sent: the coverage no longer speaks in the status line
  let framed = false; // the first view is fitted to where the places are
  const showCoverage = () => {
    if (!coverageData || coverage || overlay) return;
    const c = coverageData;
    coverage = L.imageOverlay(c.overlay, c.bounds, { opacity: 0.8, interactive: false }).addTo(map);
    if (!framed) { framed = true; map.fitBounds(c.bounds, { padding: [20, 20], maxZoom: 6 }); }
    if (!asked) {
      status(`grey: the ${c.places} indexed places (${c.cells} cells of ${c.resolution_deg.toFixed(2)}°); ask a query`);
    }
  };
  fetch("/api/coverage").then((r) => r.json()).then((c) => { coverageData = c; showCoverage(); }).catch(() => {});
  let recording = null; // a File made from the microphone, used instead of the file input
  let markers = [];

  // Pins are coloured by score on a scale of their own (the heat map under them is viridis),
  // from this query's lowest result score to its highest; the best NUMBERED show their rank.
  const NUMBERED = 10;
  const PIN_STOPS = [[255, 237, 160], [254, 178, 76], [240, 59, 32], [189, 0, 38], [103, 0, 13]];
  const pinColour = (t) => {
    const x = Math.max(0, Math.min(1, t)) * (PIN_STOPS.length - 1), i = Math.min(Math.floor(x), PIN_STOPS.length - 2), f = x - i;
    const c = PIN_STOPS[i].map((v, j) => Math.round(v + (PIN_STOPS[i + 1][j] - v) * f));
    return `rgb(${c.join(",")})`;
  };
  const pinLegend = L.control({ position: "bottomright" });
  pinLegend.onAdd = () => {
    const div = L.DomUtil.create("div", "pin-legend");
    div.innerHTML = pinLegend.html;
    L.DomEvent.disableClickPropagation(div);
    return div;
  };
  pinLegend.show = (n, lo, hi) => {
    const stops = PIN_STOPS.map((c) => `rgb(${c.join(",")})`).join(",");
    const numbered = n <= NUMBERED ? "numbered by rank" : `best ${NUMBERED} numbered`;
    pinLegend.html = `<div><b>Pins</b>: top ${n}, ${numbered}</div>` +
      `<div class="pin-bar" style="background:linear-gradient(to right,${stops})"></div>` +
      `<div class="pin-ends"><span>${lo.toFixed(3)}</span><span>${hi.toFixed(3)}</span></div>` +
      `<div class="muted">colour = score: cosine similarity of unit vectors; higher = closer</div>`;
    pinLegend.remove();
    return pinLegend;
  };
  const narrow = window.matchMedia("(max-width: 700px)");
  map.on("popupopen", () => map.getContainer().classList.add("popup-open"));
  map.on("popupclose", () => map.getContainer().classList.remove("popup-open"));
  // One sound at a time: a player that starts pauses the others.
  document.addEventListener("play", (e) => {
    document.querySelectorAll("audio").forEach((a) => { if (a !== e.target) a.pause(); });
  }, true);

  const esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const status = (msg, error) => { $("status").textContent = msg; $("status").className = error ? "error" : ""; };

  fetch("/api/health").then((r) => r.json()).then((h) => {
    const heard = h.index.audio ? `, ${h.index.audio} with a recording to play` : "";
    $("info").textContent = `${h.index.count} places (${h.index.modality} embeddings${heard}); ` +
      `model embeds ${h.model.modalities.join(", ")}; uploads up to ${h.max_upload_mb} MB.`;
    $("legend-modality").textContent = h.index.modality;
    if (h.model.modalities.includes("audio") && navigator.mediaDevices && window.MediaRecorder) {
      $("record").hidden = false;
    }
  }).catch(() => status("the server does not answer /api/health", true));

  function errorText(body, res) {
    const d = body && body.detail;
    if (Array.isArray(d)) return d.map((e) => `${(e.loc || []).slice(-1)[0]}: ${e.msg}`).join("; ");
    return d || `${res.status} ${res.statusText}`;
  }

  // Results of an earlier query never stay up under a new error, or after Clear.
  function clearResults() {
    results.clearLayers();
    markers = [];
    pinLegend.remove();
    if (overlay) { map.removeLayer(overlay); overlay = null; }
    $("results").innerHTML = "";
    $("vmin").textContent = ""; $("vmax").textContent = "";
  }

  function render(data) {
    clearResults();
    const m = data.map;
    if (m) {
      if (coverage) { map.removeLayer(coverage); coverage = null; }
      overlay = L.imageOverlay(m.overlay, m.bounds, { opacity: 0.85, interactive: false }).addTo(map);
      $("vmin").textContent = m.min.toFixed(4);
      $("vmax").textContent = m.max.toFixed(4);
    }
    const list = $("results");
    list.innerHTML = "";
    const n = data.results.length;
    const scores = data.results.map((r) => r.score);
    const lo = Math.min(...scores), hi = Math.max(...scores);
    if (n) pinLegend.show(n, lo, hi).addTo(map);
    // Popups keep clear of the legend in the map's corner; on a narrow screen, where the map is
    // too short for both, the legend steps aside while a popup is open instead (style.css).
    const legendBox = n && !narrow.matches ? pinLegend.getContainer().getBoundingClientRect() : { height: 0 };
    const below = L.point(10, Math.ceil(legendBox.height) + 16);
    data.results.forEach((r) => {
      const t = hi > lo ? (r.score - lo) / (hi - lo) : 1, colour = pinColour(t);
      const html = `<div class="popup">` +
        (r.thumbnail_url ? `<img src="${esc(r.thumbnail_url)}" alt="thumbnail of ${esc(r.id)}">` : "") +
        `<div class="score">#${r.rank} · score ${r.score.toFixed(4)}</div>` +
        (r.caption ? `<div>${esc(r.caption)}</div>` : "") +
        (r.audio_url ? `<audio controls preload="none" src="${esc(r.audio_url)}" aria-label="recording of ${esc(r.id)}"></audio>` : "") +
        `<div class="muted small">${esc(r.id)} · ${r.lat.toFixed(2)}, ${r.lon.toFixed(2)}</div></div>`;
      const label = `#${r.rank}: ${r.caption || r.id}, score ${r.score.toFixed(4)}`;
      const numbered = r.rank <= NUMBERED, size = numbered ? 24 : 14;
      const icon = L.divIcon({
        className: `pin${numbered ? " pin-numbered" : ""}`,
        html: `<span style="background:${colour};color:${t > 0.5 ? "#fff" : "#1d232a"}">${numbered ? r.rank : ""}</span>`,
        iconSize: [size, size], iconAnchor: [size / 2, size / 2], popupAnchor: [0, -size / 2],
      });
      // Rank decides which pin is drawn on top where pins overlap (Leaflet's own order is by
      // latitude), with a margin above any offset it adds by position.
      const mk = L.marker([r.lat, r.lon], {
        icon, title: label, riseOnHover: true, riseOffset: 1e6, zIndexOffset: (n - r.rank + 1) * 1000,
      }).bindPopup(html, { maxWidth: 240, autoPanPaddingTopLeft: L.point(56, 10), autoPanPaddingBottomRight: below })
        .bindTooltip(`#${r.rank} · ${r.score.toFixed(4)}`, { direction: "top", offset: [0, -size / 2] })
        .addTo(results);
      markers.push(mk);
      const li = document.createElement("li");
      const where = `${r.lat.toFixed(2)}, ${r.lon.toFixed(2)}`;
      li.innerHTML = `<span class="swatch" style="background:${colour}"></span><span class="score">${r.score.toFixed(4)}</span> ` +
        (r.caption ? esc(r.caption) : `${esc(r.id)} <span class="muted small">(${where})</span>`) +
        (r.audio_url ? ` <span class="heard" title="has a recording: open the place to play it">♪</span>` : "");
      li.tabIndex = 0; // reachable and usable from the keyboard, as the markers are
      // The popup opens once the map has stopped: opened during the move, Leaflet's auto-pan
      // is computed for the old view and the popup can end up past the map's edge.
      const show = () => { map.once("moveend", () => mk.openPopup()); map.setView(mk.getLatLng(), Math.max(map.getZoom(), 4)); };
      li.addEventListener("click", show);
      li.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); show(); } });
      list.appendChild(li);
    });
    if (markers.length) {
      // Opened once the map has stopped, as from the list (auto-pan during the move is computed
      // for the old view, and the popup can end up past the map's edge).
      const best = markers[0];
      map.once("moveend", () => { if (markers[0] === best) best.openPopup(); });
      map.fitBounds(L.featureGroup(markers).getBounds().pad(0.3), { maxZoom: 5 });
    }
    const q = data.query.length > 120 ? data.query.slice(0, 117) + "…\"" : data.query;
    status(`${n} ${n === 1 ? "place" : "places"} for ${q}`);
    if (data.notes && data.notes.length) $("status").textContent += ` (${data.notes.join("; ")})`;
  }

  let asking = null; // the running request: Clear (or a newer query) abandons it
  // The query clip (a chosen sound file or the recording) can be heard before it is searched.
  let clipUrl = null;
  const isAudio = (f) => /^audio\//.test(f.type) || /\.(wav|flac|ogg|oga|opus|mp3|m4a|webm|aac)$/i.test(f.name);
  const fileChosen = () => {
    const file = recording || $("file").files[0];
    $("fileinfo").hidden = !file;
    const player = $("queryaudio");
    if (clipUrl) { player.pause(); player.removeAttribute("src"); player.load(); URL.revokeObjectURL(clipUrl); clipUrl = null; }
    player.hidden = !(file && isAudio(file));
    if (!player.hidden) { clipUrl = URL.createObjectURL(file); player.src = clipUrl; }
  };

  $("query").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const form = new FormData();
    const text = $("text").value.trim();
    const file = recording || $("file").files[0];
    if (!text && !file) { status("type a query, choose a file or record a sound", true); return; }
    if (text) form.append("text", text);
    if (file) form.append("file", file, file.name);
    form.append("modality", recording ? "audio" : $("modality").value);
    form.append("k", $("k").value || "10");
    form.append("map", "true");
    asked = true;
    if (asking) asking.abort();
    const mine = new AbortController();
    asking = mine;
    status("searching…");
    $("submit").disabled = true;
    document.body.classList.add("busy");
    const failed = (msg) => { clearResults(); showCoverage(); status(msg, true); };
    try {
      const res = await fetch("/api/search", { method: "POST", body: form, signal: mine.signal });
      const body = await res.json().catch(() => null);
      if (asking !== mine) return; // cleared, or a newer query was asked meanwhile
      if (!res.ok) { failed(errorText(body, res)); return; }
      render(body);
    } catch (e) {
      if (asking !== mine) return;
      failed(e instanceof TypeError ? "cannot reach the geobind server: is it still running?" : `request failed: ${e}`);
    } finally {
      if (asking === mine) {
        asking = null;
        $("submit").disabled = false;
        document.body.classList.remove("busy");
      }
    }
  });

  $("file").addEventListener("change", () => { recording = null; $("recinfo").textContent = ""; fileChosen(); });
  $("nofile").addEventListener("click", () => {
    $("file").value = ""; recording = null; $("recinfo").textContent = ""; fileChosen();
  });
  $("clear").addEventListener("click", () => {
    if (asking) { asking.abort(); asking = null; }
    $("submit").disabled = false;
    document.body.classList.remove("busy");
    $("query").reset(); recording = null; $("recinfo").textContent = ""; fileChosen();
    clearResults(); status("");
    asked = false;
    showCoverage(); // back to where the places are
  });

  // Microphone: MediaRecorder gives webm/ogg (not every server-side decoder reads webm), so
  // the clip is decoded by the browser and uploaded as 16-bit mono WAV.
  let recorder = null;
  $("record").addEventListener("click", async () => {
    if (recorder && recorder.state === "recording") { recorder.stop(); return; }
    let stream;
    try { stream = await navigator.mediaDevices.getUserMedia({ audio: true }); } catch (e) {
      status(`no microphone: ${e.message || e}`, true); return;
    }
    const chunks = [];
    const rec = recorder = new MediaRecorder(stream);
    recorder.ondataavailable = (e) => chunks.push(e.data);
    recorder.onstop = async () => {
      stream.getTracks().forEach((t) => t.stop());
      $("record").classList.remove("recording"); $("record").textContent = "● Record";
      const blob = new Blob(chunks, { type: recorder.mimeType });
      try {
        const ctx = new (window.AudioContext || window.webkitAudioContext)();
        const audio = await ctx.decodeAudioData(await blob.arrayBuffer());
        recording = new File([wav(audio)], "recording.wav", { type: "audio/wav" });
        $("recinfo").textContent = `recording ready (${audio.duration.toFixed(1)} s): listen below, then press Search`;
      } catch (e) {
        recording = new File([blob], "recording.webm", { type: blob.type || "audio/webm" });
        $("recinfo").textContent = "recording ready (undecoded): listen below, then press Search";
      }
      $("file").value = ""; // the recording is what is searched now, not a file chosen before
      fileChosen();
    };
    recorder.start();
    $("record").classList.add("recording"); $("record").textContent = "■ Stop";
    $("recinfo").textContent = "recording… (stops after 10 s)";
    setTimeout(() => { if (rec.state === "recording") rec.stop(); }, 10000);
  });

  function wav(audio) {
    const n = audio.length, rate = audio.sampleRate, chans = audio.numberOfChannels;
    const mono = new Float32Array(n);
    for (let c = 0; c < chans; c++) { const d = audio.getChannelData(c); for (let i = 0; i < n; i++) mono[i] += d[i] / chans; }
    const buf = new ArrayBuffer(44 + 2 * n), v = new DataView(buf);
    const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
    str(0, "RIFF"); v.setUint32(4, 36 + 2 * n, true); str(8, "WAVE"); str(12, "fmt ");
    v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
    v.setUint32(24, rate, true); v.setUint32(28, 2 * rate, true); v.setUint16(32, 2, true);
    v.setUint16(34, 16, true); str(36, "data"); v.setUint32(40, 2 * n, true);
    for (let i = 0; i < n; i++) v.setInt16(44 + 2 * i, Math.max(-1, Math.min(1, mono[i])) * 32767, true);
    return buf;
  }
})();
