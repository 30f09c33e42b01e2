"""The web explorer: a FastAPI app over one model and one index of places.

Endpoints (OpenAPI at ``/docs``):

* ``POST /api/search``: a text query or an uploaded audio / image file -> the top ``k`` places
  (id, lat, lon, score, caption, thumbnail URL); with ``map=true`` also the heat-map overlay.
* ``POST /api/map``: the same query -> a heat-map overlay of every indexed place (PNG data URL
  plus its lat/lon bounds and score range).
* ``GET /api/thumbnail/{id}``: the JPEG thumbnail of an indexed place, looked up by id in the
  index (no request path ever reaches the filesystem).
* ``GET /api/audio/{id}``: the recording of an indexed place, from the ``audio`` column of the
  dataset the index was embedded from, looked up by id (see :class:`PlaceAudio`: only files
  inside that dataset's folder are served).
* ``GET /api/coverage``: where the indexed places are (a grey overlay of grid cells).
* ``GET /api/health``: model identity, index size.
* ``GET /``: the page (Leaflet, vendored under ``static/``; nothing is loaded from the internet).

Every GET endpoint also answers ``HEAD`` (the same status and headers, no body).

Safety: uploads are capped (``max_upload_mb``, checked on the raw request body before it is
parsed, and again on the file) and decoded as image or audio before use, at most
``MAX_DECODING`` at a time from decoding to embedding; audio only for the clip the encoder hears. A query form takes
each field once (one ``file``) and its fields as UTF-8 (unless its Content-Type names another
charset): a repeated field or text that is not UTF-8 is a 400 naming the field, not a guess.
Anything else is a 4xx with a message, and an unexpected failure a JSON 500. Bound to this
machine only, the app answers only requests addressed to it by a loopback name
(``allowed_hosts``): a web page elsewhere cannot reach it through a DNS name that resolves to
127.0.0.1. Model and index are shared read-only; model calls run in the thread pool under one
lock (``GeoBind.embed`` toggles the encoder's train/eval flag, so concurrent calls on one
encoder are not safe without it).
"""

# No ``from __future__ import annotations``: FastAPI resolves the endpoint annotations
# (UploadFile, imported inside create_app) at runtime.
import base64
import io
import os
import threading
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from geobind.search.maps import MapResult, default_resolution

if TYPE_CHECKING:
    from fastapi import FastAPI

    from geobind.model import GeoBind
    from geobind.search.index import Index

STATIC = Path(__file__).parent / "static"
SERVE_HINT = "pip install 'geobind[serve]'"
MODALITY_HINTS = ("auto", "audio", "image", "satellite")
MAX_TEXT_CHARS = 1000
MAX_K = 100
# A query photo larger than this is refused before decoding: the encoder sees a few hundred
# pixels a side, and a 20 MB upload can hold hundreds of megapixels (gigabytes once decoded).
MAX_UPLOAD_PIXELS = 40_000_000
# Uploads decoded at once (held until embedded); more wait. A 40-megapixel photo takes about
# 300 MB while decoded.
MAX_DECODING = 4
# Searches and heat maps run at once (more wait, without a thread): they take the CPU for tens
# of ms to seconds, and must never hold every worker thread of the app (40) that the cheap
# endpoints (health, thumbnails, recordings, the page) need.
MAX_HEAVY = 8
# Land in the page's background layer (sea is the map's own colour).
LAND_RGBA = (236, 231, 218, 255)
# Multipart framing and small form fields on top of the file itself.
FORM_OVERHEAD = 64 * 1024
SCORE_HELP = (
    "Scores are cosine similarities between the query and each place's {modality} embedding, "
    "in [-1, 1]; higher means closer. Compare them within one query only: their absolute level "
    "depends on the model and the kind of query."
)


def import_fastapi():
    """Import FastAPI or raise an error naming the extra that installs it."""
    try:
        import fastapi  # noqa: F401
        import multipart  # noqa: F401  (python-multipart: form and file uploads)
    except ImportError:
        raise ImportError(
            f"geobind serve needs fastapi and python-multipart: {SERVE_HINT}"
        ) from None
    import fastapi

    return fastapi


class _Refused(Exception):
    """Raised into the app from ``receive`` once a :class:`BodyGuard` refuses a request body."""

    def __init__(self, guard: "BodyGuard"):
        super().__init__()
        self.guard = guard


async def _reply(send, status: int, message: str) -> None:
    from starlette.responses import JSONResponse

    await JSONResponse({"detail": message}, status_code=status)({"type": "http"}, None, send)


class BodyGuard:
    """ASGI middleware base: each chunk of a request body passes the check that ``checker`` makes
    for the request (None lets the request through unchecked), which returns a refusal
    ``(status, message)`` or None. Once it refuses, the app reads no more of the body, and
    whatever it answers is replaced by the refusal: its form parser turns the exception it gets
    from ``receive`` into a vaguer 400 of its own."""

    def __init__(self, app):
        self.app = app

    def checker(self, scope) -> "Any | None":
        return None

    async def __call__(self, scope, receive, send):
        check = self.checker(scope) if scope["type"] == "http" else None
        if check is None:
            return await self.app(scope, receive, send)
        refusal: tuple[int, str] | None = None
        replied = False

        async def checked_receive():
            nonlocal refusal
            msg = await receive()
            if msg["type"] == "http.request" and refusal is None:
                refusal = check(msg.get("body", b""), not msg.get("more_body", False))
                if refusal is not None:
                    raise _Refused(self)
            return msg

        async def guarded_send(msg):
            nonlocal replied
            if refusal is None:
                return await send(msg)
            if not replied:
                replied = True
                await _reply(send, *refusal)

        try:
            await self.app(scope, checked_receive, guarded_send)
        except _Refused as e:
            if e.guard is not self:
                raise
        if refusal is not None and not replied:
            await _reply(send, *refusal)


class BodyLimit(BodyGuard):
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 before it is parsed
    (by its Content-Length, or by counting chunks when it has none)."""

    def __init__(self, app, limit: int, message: str):
        super().__init__(app)
        self.limit, self.message = limit, message

    def checker(self, scope):
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return None
        seen = 0

        def check(chunk: bytes, last: bool):
            nonlocal seen
            seen += len(chunk)
            return (413, self.message) if seen > self.limit else None

        return check

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.limit:
                return await _reply(send, 413, self.message)
        return await super().__call__(scope, receive, send)


def _multipart():
    """python-multipart's parser module (named ``python_multipart`` from 0.0.13, ``multipart`` before)."""
    try:
        from python_multipart import multipart
    except ImportError:
        from multipart import multipart
    return multipart


class FormFields:
    """Reads a form body as it streams in, beside the app's own parser, for what that parser lets
    through without a word: a text field that is not UTF-8 (it reads it as Latin-1 instead) and a
    field given more than once (it uses the last). :meth:`feed` takes the body chunk by chunk and
    returns the first problem as a message. A body that does not parse is left to the app's
    parser, which says so."""

    def __init__(self, content_type: str):
        import codecs

        mp = _multipart()
        kind, params = mp.parse_options_header(content_type)
        charset = params.get(b"charset", b"utf-8").decode("latin-1")
        try:
            # Another charset named in the header is honoured by the app's parser.
            self.utf8 = codecs.lookup(charset).name == "utf-8"
        except LookupError:
            self.utf8 = False
        self.problem: str | None = None
        self.seen: dict[str, int] = {}
        self._parser = None
        self._urlencoded: bytearray | None = None
        if kind == b"multipart/form-data" and params.get(b"boundary"):
            self._parser = mp.MultipartParser(params[b"boundary"], {
                "on_part_begin": self._part_begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_end,
            })
        elif kind == b"application/x-www-form-urlencoded":
            self._urlencoded = bytearray()
        self._part_begin()

    @classmethod
    def for_request(cls, content_type: str) -> "FormFields | None":
        """A reader for a multipart or URL-encoded form body; None for any other body."""
        fields = cls(content_type)
        return fields if fields._parser is not None or fields._urlencoded is not None else None

    def feed(self, chunk: bytes, last: bool) -> str | None:
        if self._parser is not None:
            try:
                self._parser.write(chunk)
                if last:
                    self._parser.finalize()
            except ValueError:  # python-multipart's parse errors: the app's parser reports them
                self._parser = None
        elif self._urlencoded is not None:
            self._urlencoded += chunk
            if last:
                self._check_urlencoded(bytes(self._urlencoded))
        return self.problem

    def _field(self, name: str) -> None:
        self.seen[name] = self.seen.get(name, 0) + 1
        if self.seen[name] == 2 and self.problem is None:
            self.problem = (
                "the form has more than one 'file' part: a query takes one file (send each file as a "
                "query of its own)" if name == "file" else
                f"the form gives the field {name!r} more than once: give each field once"
            )

    def _not_utf8(self, name: str) -> None:
        if self.problem is None:
            self.problem = (f"the form field {name!r} is not UTF-8 text: send form fields encoded as UTF-8 "
                            "(as browsers and curl do), or name their charset in the Content-Type header")

    # -- multipart callbacks ---------------------------------------------------------------
    def _part_begin(self) -> None:
        self._name, self._disposition, self._decoder = "", b"", None
        self._header, self._value = b"", b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._header.strip().lower() == b"content-disposition":
            self._disposition = self._value
        self._header, self._value = b"", b""

    def _headers_finished(self) -> None:
        import codecs

        _, options = _multipart().parse_options_header(self._disposition)
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        self._field(self._name)
        # A file's bytes are its own business, and so is a ``file`` sent as a plain field: the
        # app refuses that as not a file, which says more than "not UTF-8" would.
        if self.utf8 and b"filename" not in options and self._name != "file":
            self._decoder = codecs.getincrementaldecoder("utf-8")()

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._decoder is not None:
            try:
                self._decoder.decode(data[start:end])
            except UnicodeDecodeError:
                self._decoder = None
                self._not_utf8(self._name)

    def _part_end(self) -> None:
        if self._decoder is not None:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                self._not_utf8(self._name)

    def _check_urlencoded(self, body: bytes) -> None:
        from urllib.parse import unquote_to_bytes

        for pair in body.split(b"&"):
            if not pair:
                continue
            raw_name, _, raw_value = pair.partition(b"=")
            name = unquote_to_bytes(raw_name.replace(b"+", b" ")).decode("utf-8", "replace")
            self._field(name)
            if self.utf8 and name != "file":
                try:
                    unquote_to_bytes(raw_value.replace(b"+", b" ")).decode("utf-8")
                except UnicodeDecodeError:
                    self._not_utf8(name)


class FormCheck(BodyGuard):
    """ASGI middleware: a 400 naming the field for a POSTed form that gives a field twice (two
    files, say) or a text field that is not UTF-8 (see :class:`FormFields`)."""

    def checker(self, scope):
        if scope["method"] != "POST":
            return None
        ctype = dict(scope.get("headers") or []).get(b"content-type", b"").decode("latin-1")
        fields = FormFields.for_request(ctype)
        if fields is None:
            return None

        def check(chunk: bytes, last: bool):
            problem = fields.feed(chunk, last)
            return (400, problem) if problem else None

        return check


class HeadAsGet:
    """ASGI middleware: a HEAD request is answered as its GET would be, without the body
    (FastAPI's GET routes alone would answer a 405 to the HEAD that link checkers and uptime
    monitors send). The headers, Content-Length included, are the GET's."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(msg):
            if msg["type"] == "http.response.body":
                if msg.get("more_body", False):
                    return
                msg = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(msg)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


# What the page can play, by suffix: the formats browsers decode (and the encoders read).
AUDIO_TYPES = {
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".ogg": "audio/ogg",
    ".oga": "audio/ogg",
    ".opus": "audio/ogg",
    ".mp3": "audio/mpeg",
    ".m4a": "audio/mp4",
    ".webm": "audio/webm",
}
# Layouts whose datasets are read in full at start-up to find the recordings: tables read from a
# CSV or Parquet file. Shards stream (no file per recording), GeoTIFF folders open every tile.
AUDIO_LAYOUTS = ("manifest", "soundingearth")


class PlaceAudio:
    """The recordings of the indexed places that the app may serve: the ``audio`` cells of the
    index's dataset, by place id. A cell is served only while it is an audio file inside the
    dataset's folder (the folder of its manifest): a cell that climbs out with ``..``, an absolute
    path elsewhere, or a link that leads out is never read. Request paths never name a file;
    ids are looked up here."""

    def __init__(self, files: "dict[str, str] | None" = None, root: str | None = None, note: str = ""):
        self.files = files or {}
        self.root = root
        self.real_root = os.path.realpath(root) if root else None
        self.note = note

    def __len__(self) -> int:
        return len(self.files)

    @classmethod
    def none(cls, note: str) -> "PlaceAudio":
        return cls(note=note)

    @classmethod
    def of(cls, index: "Index", data: "str | Path | None" = None, layout: str = "manifest") -> "PlaceAudio":
        """The recordings of ``index``'s places in ``data`` (read in ``layout``), or by default in
        the dataset the index was embedded from, when that is still the same file (same content
        hash). Never raises: a dataset that cannot be used gives no recordings, and ``note``
        says why (naming files, never the server's folders: it is shown in ``/api/health``)."""
        from geobind.data.manifest import Table, read_dataset

        source = index.header.get("source") or {}
        recorded = data is None
        options: dict = {}
        if recorded:
            if not source.get("source"):
                return cls.none("the index does not record the dataset it was embedded from")
            data, layout = source["source"], source.get("layout", "manifest")
            options = source.get("layout_options") or {}
        name = Path(str(data)).name or str(data)
        if layout not in AUDIO_LAYOUTS:
            return cls.none(f"recordings are served from {' or '.join(AUDIO_LAYOUTS)} datasets; "
                            f"{name} is read as {layout}")
        if not Path(data).expanduser().exists():
            relative = "" if Path(data).is_absolute() else " (its path is relative to the working folder)"
            return cls.none(f"the dataset {name} is not found here{relative}")
        try:
            table = read_dataset(data, layout, **options)
        except Exception as e:  # any reader's failure: the explorer works without recordings
            return cls.none(f"the dataset {name} does not read ({type(e).__name__})")
        if not isinstance(table, Table):
            return cls.none(f"recordings are not served from streamed datasets ({name})")
        if recorded and source.get("identity") and table.identity != source["identity"]:
            # Same path, other content: its rows may no longer be these places.
            return cls.none(f"the dataset {name} has changed since the index was embedded from it")
        cells = table.columns.get("audio")
        if cells is None:
            return cls.none(f"the dataset {name} has no audio column")
        root = os.path.abspath(Path(table.source).expanduser().parent)
        wanted = set(index.ids)
        files = {}
        outside = 0
        for item_id, cell in zip(table.ids, cells):
            if cell is None or item_id not in wanted:
                continue
            path = os.path.normpath(os.path.abspath(os.path.expanduser(cell)))
            # Checked on the path as written here (cheap for a million rows), and again on the
            # real path when it is served.
            if not path.startswith(root + os.sep):
                outside += 1
            elif Path(path).suffix.lower() in AUDIO_TYPES:
                files[item_id] = path
        note = f"recordings of {len(files)} places from {name}"
        if not files:
            note = f"no recordings: no audio cell of {name} names an audio file inside its folder"
        if outside:  # a split written with --out names its files with ../: say what serves them
            note += (f" ({outside} lead outside it, which are never served: pass --data with a manifest in "
                     "the folder that holds the recordings, such as the one this was split from)")
        return cls(files, root, note)

    def path(self, item_id: str) -> str | None:
        """The real path of ``item_id``'s recording when it is a file inside the dataset's folder
        now (links resolved); None otherwise."""
        path = self.files.get(item_id)
        if path is None or self.real_root is None:
            return None
        real = os.path.realpath(path)
        if not real.startswith(self.real_root + os.sep) or not os.path.isfile(real):
            return None
        return real


class Explorer:
    """The model and index behind the app, with the query and map logic (no HTTP)."""

    def __init__(self, model, index, *, max_upload_mb: float, audio: PlaceAudio | None = None):
        if max_upload_mb <= 0:
            raise ValueError("max_upload_mb must be positive")
        index.verify(model)
        self.model = model
        self.index = index
        self.max_upload_mb = max_upload_mb
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        self.lock = threading.Lock()
        self.decoding = threading.BoundedSemaphore(MAX_DECODING)
        # Warm every lazy cache now so that request threads only ever read shared state.
        self.vectors = index.vectors_f32()
        if index.kind != "exact":
            # Now: else the first concurrent searches each read faiss.index, and a missing FAISS
            # would be a 500 on every search instead of a refusal to start.
            try:
                index._load_faiss()
            except ImportError:  # the index's own hint names `geobind search --exact`, which serve lacks
                from geobind.search.common import FAISS_HINT

                raise ImportError(f"index {index.name} is {index.kind}: serving it needs FAISS, which is not "
                                  f"installed: {FAISS_HINT} (or serve an exact index: geobind index build "
                                  "<embeddings> --out <folder> --kind exact)") from None
        if len(index):
            index.position(index.ids[0])
            index.thumbnail(index.ids[0])
        self.has_thumbnails = index.has_thumbnails
        self.audio = audio if audio is not None else PlaceAudio.none("no dataset given for recordings")
        self.identity = {m: model.identity(m) for m in model.modalities}
        self.resolution = map_resolution(index.lat, index.lon)
        # The heat map's grid depends on the places alone: each place's cell, once (as
        # map_points lays it out), so that a request only scores the places and averages per cell.
        from geobind.search.maps import points_grid, unwrap_longitudes

        lat, lon = np.asarray(index.lat, dtype=np.float64), np.asarray(index.lon, dtype=np.float64)
        self._grid = None  # no places, or places without coordinates: map_points says what is wrong
        if len(index) and np.isfinite(lat).all() and np.isfinite(lon).all():
            cell, rows, cols, transform = points_grid(lat, unwrap_longitudes(lon), float(self.resolution))
            self._grid = (cell, rows, cols, transform, np.bincount(cell, minlength=rows * cols))
        self._coverage: dict[str, Any] | None = None
        self._land: bytes | None = None
        self._land_lock = threading.Lock()

    # -- queries ---------------------------------------------------------------------------
    def decode_upload(self, data: bytes, filename: str, hint: str) -> tuple[str, Any]:
        """``(query keyword, decoded item)`` for an uploaded file; ``QueryError`` otherwise.
        Callers hold ``decoding`` until the item is embedded (a decoded photo is large)."""
        name = filename or "upload"
        if not data:
            raise QueryError(400, f"the uploaded file {name!r} is empty")
        if len(data) > self.max_upload_bytes:
            raise QueryError(413, self.too_large_message())
        if hint not in MODALITY_HINTS:
            raise QueryError(
                422, f"modality must be one of {', '.join(MODALITY_HINTS)}, not {hint!r}"
            )
        kind = sniff_bytes(data)
        if kind is None:
            raise QueryError(
                415,
                f"{name!r} is neither an image nor an audio file that can be decoded "
                "(images: png, jpeg, webp, ...; audio: wav, flac, ogg, mp3)",
            )
        want = {"audio": "audio", "image": "image", "satellite": "image"}.get(hint)
        if want is not None and kind != want:
            raise QueryError(415, f"{name!r} is {kind}, but the query asked for {hint}")
        keyword = hint if hint != "auto" else ("audio" if kind == "audio" else "image")
        modality = {"audio": "audio", "image": "ground", "satellite": "satellite"}[keyword]
        if modality not in self.model.modalities:
            raise QueryError(
                422,
                f"this model has no {modality} encoder; it embeds {', '.join(self.model.modalities)}",
            )
        return keyword, self._decode(data, name, kind, modality)

    def _decode(self, data: bytes, name: str, kind: str, modality: str) -> Any:
        from geobind.data.errors import BadSampleError

        try:
            if kind == "image":
                from PIL import Image

                from geobind.data.media import load_image

                limit = f"queries take images up to {MAX_UPLOAD_PIXELS // 1_000_000} megapixels: downscale it"
                try:
                    with Image.open(io.BytesIO(data)) as header:  # the size, without decoding
                        w, h = header.size
                except Image.DecompressionBombError:
                    raise QueryError(413, f"{name!r} has more pixels than PIL decodes; {limit}") from None
                if w * h > MAX_UPLOAD_PIXELS:
                    raise QueryError(413, f"{name!r} is {w} x {h} pixels; {limit}")
                return load_image(data)
            # The encoder's own reading (outside the model lock): only the clip it hears is
            # decoded, whatever the recording's length; a clip it takes back as it is.
            return self.model.encoder(modality).load(data, train=False)
        except BadSampleError as e:
            raise QueryError(
                422, f"{name!r} could not be decoded as {kind}: {e.reason} ({e.detail})"
            ) from None

    def too_large_message(self) -> str:
        """The message of a 413 response: the upload limit in MB."""
        return f"upload too large: the limit is {self.max_upload_mb:g} MB"

    def query_vector(
        self, *, text: str | None, upload: tuple[str, Any] | None
    ) -> tuple[np.ndarray, str]:
        """The unit query vector and a label for it."""
        text = (text or "").strip()
        if not text and upload is None:
            raise QueryError(400, "give a text query or upload an audio or image file")
        if len(text) > MAX_TEXT_CHARS:
            raise QueryError(422, f"the text query is longer than {MAX_TEXT_CHARS} characters")
        items: dict[str, Any] = {}
        labels = []
        if text:
            items["text"] = text
            labels.append(f'"{text}"')
        if upload is not None:
            items[upload[0]] = upload[1]
            # Which encoder read it: a detected image is searched as a ground photo.
            what = {"image": "ground-photo", "satellite": "satellite-tile"}.get(upload[0], upload[0])
            labels.append(f"{what} upload")
        with self.lock:
            try:
                q = self.model.embed_query(**items)
            except ValueError as e:
                raise QueryError(422, str(e)) from None
        return q.numpy().astype(np.float32), " + ".join(labels)

    def text_notes(self, text: str | None) -> list[str]:
        """What the user should know about how the text was read: the text encoder reads at
        most ``max_length`` tokens, the rest of a longer text is dropped without a word."""
        text = (text or "").strip()
        if not text or "text" not in self.model.modalities:
            return []
        enc = self.model.encoder("text")
        tok, limit = getattr(enc, "tokenizer", None), getattr(enc, "max_length", None)
        if tok is None or not limit:
            return []
        n = len(tok(text, verbose=False)["input_ids"])  # no truncation, no warning
        if n <= limit:
            return []
        return [f"the text is {n} tokens long; this model reads only its first {limit}, the rest was ignored"]

    def search(self, q: np.ndarray, k: int) -> list[dict[str, Any]]:
        """The top ``k`` places for the unit query vector ``q`` [D], best first, as
        :meth:`geobind.search.Hit.to_dict` dicts plus a ``thumbnail_url`` and an ``audio_url`` (None
        where there is no thumbnail, or no recording the server can serve)."""
        out = []
        for hit in self.index.hits(q, k):
            d = hit.to_dict()
            d["thumbnail_url"] = (
                f"/api/thumbnail/{quote(hit.id, safe='')}"
                if self.has_thumbnails and self.index.has_thumbnail(hit.id)  # an id lookup, no read
                else None
            )
            d["audio_url"] = f"/api/audio/{quote(hit.id, safe='')}" if self.audio.path(hit.id) else None
            out.append(d)
        return out

    def heat_map(self, q: np.ndarray, label: str) -> dict[str, Any]:
        """The cosine-score heat map of every indexed place for the query vector ``q`` [D]: a
        PNG data URL, its Leaflet lat/lon bounds, grid step in degrees and the score range."""
        from geobind.search.maps import cell_means, map_points, score_matrix

        if self._grid is None:
            result = map_points(self.vectors, self.index.lat, self.index.lon, self.index.ids, q,
                                resolution=self.resolution, label=label)
        else:
            # What map_points computes (the mean cosine per cell, on the grid laid out once in
            # __init__), without its per-place table, which the overlay does not use.
            cell, rows, cols, transform, count = self._grid
            sc = score_matrix(self.vectors, np.asarray(q, dtype=np.float32).reshape(1, -1))[:, 0]
            values = cell_means(cell, count, sc, rows, cols)
            result = MapResult(values, transform, "EPSG:4326", label, "cosine", None, "points")
        v = result.values[np.isfinite(result.values)]
        lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
        png = result.overlay_png(vmin=lo, vmax=hi)
        west, south, east, north = result.bounds_latlon()
        return {
            "overlay": "data:image/png;base64," + base64.b64encode(png).decode("ascii"),
            # Leaflet's order: [[south, west], [north, east]].
            "bounds": [[south, west], [north, east]],
            "resolution_deg": self.resolution,
            "score": result.score,
            "score_label": result.score_label,
            "min": lo,
            "max": hi,
            "colormap": "viridis",
            "query": label,
        }

    def coverage(self) -> dict[str, Any]:
        """Where the indexed places are: the heat map's grid (same cells, same bounds), cells
        holding at least one place in grey (shown before the first query). Made once."""
        if self._coverage is None:
            from PIL import Image

            from geobind.search.maps import MapResult, points_grid

            lat, lon = np.asarray(self.index.lat, np.float64), np.asarray(self.index.lon, np.float64)
            cell, rows, cols, transform = points_grid(lat, lon, self.resolution)
            filled = np.bincount(cell, minlength=rows * cols).reshape(rows, cols) > 0
            rgba = np.zeros((rows, cols, 4), dtype=np.uint8)
            rgba[filled] = (96, 110, 122, 170)
            buf = io.BytesIO()
            Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
            grid = MapResult(np.where(filled, 1.0, np.nan).astype(np.float32), transform, "EPSG:4326", "", "",
                             None, "points")
            west, south, east, north = grid.bounds_latlon()
            self._coverage = {
                "overlay": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"),
                "bounds": [[south, west], [north, east]],
                "resolution_deg": self.resolution,
                "places": len(self.index),
                "cells": int(filled.sum()),
            }
        return self._coverage

    def land(self) -> bytes:
        """A PNG of the world's land on 0.2-degree cells (whole world, north up, plate carree),
        drawn under the overlays so that places have coastlines around them; from the land mask
        of the ``world`` extra, and empty without it. Made once, on first request."""
        with self._land_lock:
            if self._land is None:
                from geobind.maps_world import land_fraction_grid

                fraction = land_fraction_grid()
                if fraction is None:
                    self._land = b""
                else:
                    from PIL import Image

                    rgba = np.zeros((*fraction.shape, 4), dtype=np.uint8)
                    rgba[fraction >= 0.5] = LAND_RGBA
                    buf = io.BytesIO()
                    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", optimize=True)
                    self._land = buf.getvalue()
        return self._land

    def health(self) -> dict[str, Any]:
        """The ``/api/health`` payload: model modalities, dim and identities, index summary (with
        how many places have a recording to play, and where those come from), upload limit and
        what the scores mean."""
        return {
            "status": "ok",
            "model": {
                "modalities": self.model.modalities,
                "dim": self.model.dim,
                "identity": self.identity,
            },
            "index": {
                "name": Path(self.index.name).name,
                "count": len(self.index),
                "modality": self.index.modality,
                "kind": self.index.kind,
                "thumbnails": self.has_thumbnails,
                "captions": self.index.captions is not None,
                "audio": len(self.audio),  # places with a recording listed
            },
            "audio": self.audio.note,
            "max_upload_mb": self.max_upload_mb,
            "scores": SCORE_HELP.format(modality=self.index.modality),
        }


class QueryError(Exception):
    """A bad request: HTTP status and a message for the user."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def sniff_bytes(data: bytes) -> str | None:
    """``"image"``, ``"audio"`` or None, from the file's header (not a full decode)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)):
            return "image"
    except Image.DecompressionBombError:
        return "image"  # too large to decode: its decoding says so
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        pass
    import soundfile as sf

    try:
        sf.info(io.BytesIO(data))
        return "audio"
    except Exception:  # libsndfile raises several types for foreign data
        return None


def create_app(
    model: "GeoBind | str | Path",
    index: "Index | str | Path",
    *,
    max_upload_mb: float = 20,
    default_k: int = 10,
    title: str = "GeoBind explorer",
    allowed_hosts: "list[str] | None" = None,
    media: bool = True,
    data: "str | Path | None" = None,
    layout: str = "manifest",
) -> "FastAPI":
    """The FastAPI app over ``model`` (a :class:`geobind.GeoBind` or a model directory) and
    ``index`` (a :class:`geobind.search.Index` or an index folder built with this model).
    ``max_upload_mb`` caps uploads (413 above it). ``allowed_hosts``: the host names requests
    must be addressed to (the ``Host`` header, port aside; a 400 otherwise), e.g.
    :func:`loopback_hosts`; ``None`` accepts any. ``media``: serve the places' recordings
    (``/api/audio/{id}``) from the ``audio`` column of ``data`` (a dataset in ``layout``; by
    default the one the index was embedded from, while it is unchanged), only files inside that
    dataset's folder (see :class:`PlaceAudio`)."""
    fastapi = import_fastapi()
    from fastapi import File, Form, HTTPException, Request, UploadFile
    from fastapi.responses import FileResponse, Response
    from fastapi.staticfiles import StaticFiles

    from geobind.model import GeoBind
    from geobind.search.index import Index

    if not isinstance(model, GeoBind):
        model = GeoBind.from_pretrained(model)
    if not isinstance(index, Index):
        index = Index.load(index)
    model.eval()
    if media:
        audio = PlaceAudio.of(index, data, layout)
    else:
        audio = PlaceAudio.none("recordings are not served (media=False)")
    ex = Explorer(model, index, max_upload_mb=max_upload_mb, audio=audio)

    docs_assets = _swagger_assets()
    app = fastapi.FastAPI(
        title=title,
        description="Search and map the places of a GeoBind index by text, audio or image.",
        docs_url=None if docs_assets else "/docs",
        redoc_url=None,
    )
    app.state.explorer = ex

    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def invalid_field(request, exc):
        # FastAPI's own 422 echoes each bad field's value back: a 1 MB field, or a file sent
        # as a plain field, would come back whole. Where, what and why is enough.
        detail = [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(Exception)
    async def failed(request, exc):
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); the server's log has "
                                       "the details"}, status_code=500)

    def run(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except QueryError as e:
            raise HTTPException(e.status, e.message) from None

    limiters: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    async def heavy(fn):
        """``fn()`` in a worker thread, at most :data:`MAX_HEAVY` at once (per event loop: one
        under uvicorn)."""
        import asyncio

        import anyio.to_thread

        loop = asyncio.get_running_loop()
        limiter = limiters.get(loop)
        if limiter is None:
            limiter = limiters[loop] = anyio.CapacityLimiter(MAX_HEAVY)
        return await anyio.to_thread.run_sync(fn, limiter=limiter)

    def query(request: Request, text: str | None, file: UploadFile | None, modality: str) -> tuple[np.ndarray, str]:
        if request.headers.get("content-type", "").startswith("application/json"):
            raise HTTPException(415, "send form fields (text, file, modality, k), not JSON: e.g. "
                                     "curl -F text='a quiet forest' http://HOST:PORT/api/search")
        upload = None
        if file is not None and (file.filename or file.size):
            # Read one byte past the limit: enough to tell "too large" without reading it all.
            data = file.file.read(ex.max_upload_bytes + 1)
            # Held from decoding to embedding: a decoded photo waiting for the model lock is as
            # large as one being decoded, so MAX_DECODING bounds both.
            with ex.decoding:
                upload = run(ex.decode_upload, data, file.filename or "", modality)
                return run(ex.query_vector, text=text, upload=upload)
        elif modality not in MODALITY_HINTS:
            raise HTTPException(422, f"modality must be one of {', '.join(MODALITY_HINTS)}")
        return run(ex.query_vector, text=text, upload=upload)

    # Plain ``def`` endpoints run in the thread pool, searches and maps in worker threads of
    # their own (see ``heavy``): embedding never blocks the event loop.
    # The errors a query can get, each a JSON {"detail": message} (FastAPI's own 422 for a
    # malformed field has a list of {loc, msg, type} there instead).
    errors = {
        400: {"description": "no text and no file, an empty file, a form that does not parse, a field "
                             "given twice (two files), or a text field that is not UTF-8"},
        413: {"description": "the upload is over the limit, or an image over 40 megapixels"},
        415: {"description": "not an image or audio file, the wrong kind for `modality`, or a JSON body"},
        422: {"description": "a file that does not decode, text too long, a bad field value"},
    }

    @app.post("/api/search", summary="Top places for a text, audio or image query", responses=errors)
    async def api_search(
        request: Request,
        text: str | None = Form(None, description="text query"),
        file: UploadFile | None = File(None, description="audio or image file"),
        modality: str = Form("auto", description="auto | audio | image (ground photo) | satellite"),
        k: int = Form(default_k, ge=1, le=MAX_K, description="number of places"),
        map: bool = Form(False, description="also return the heat-map overlay"),
    ) -> dict[str, Any]:
        def work():
            q, label = query(request, text, file, modality)
            out: dict[str, Any] = {
                "query": label,
                "notes": ex.text_notes(text),
                "score": "cosine",
                "score_help": SCORE_HELP.format(modality=index.modality),
                "results": ex.search(q, k),
            }
            if map:
                out["map"] = ex.heat_map(q, label)
            return out

        return await heavy(work)

    @app.post("/api/map", summary="Heat-map overlay of a query over every indexed place", responses=errors)
    async def api_map(
        request: Request,
        text: str | None = Form(None, description="text query"),
        file: UploadFile | None = File(None, description="audio or image file"),
        modality: str = Form("auto", description="auto | audio | image (ground photo) | satellite"),
    ) -> dict[str, Any]:
        def work():
            q, label = query(request, text, file, modality)
            return ex.heat_map(q, label)

        return await heavy(work)

    def indexed(item_id: str) -> None:
        """A 404 for an id the index does not hold (media are looked up by id, never by path)."""
        try:
            index.position(item_id)
        except KeyError:
            raise HTTPException(404, f"no place with id {item_id!r} in the index") from None

    @app.get("/api/thumbnail/{item_id:path}", summary="JPEG thumbnail of an indexed place",
             response_class=Response, responses={200: {"content": {"image/jpeg": {}}},
                                                 404: {"description": "no such place, or no thumbnail"}})
    def api_thumbnail(item_id: str):
        indexed(item_id)
        data = index.thumbnail(item_id)
        if not data:
            raise HTTPException(404, f"place {item_id!r} has no thumbnail")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    audio_types = {t: {} for t in sorted(set(AUDIO_TYPES.values()))}

    @app.get("/api/audio/{item_id:path}", summary="Recording of an indexed place (from the index's dataset)",
             response_class=Response, responses={200: {"content": audio_types},
                                                 206: {"description": "the byte range asked for (Range header)"},
                                                 404: {"description": "no such place, or no recording served"}})
    def api_audio(item_id: str):
        indexed(item_id)
        path = ex.audio.path(item_id)
        if path is None:
            raise HTTPException(404, f"place {item_id!r} has no recording this server serves")
        # FileResponse answers Range requests: the player seeks without fetching the whole file.
        return FileResponse(path, media_type=AUDIO_TYPES[Path(path).suffix.lower()],
                            headers={"Cache-Control": "max-age=3600"})

    @app.get("/api/coverage", summary="Overlay of where the indexed places are (grey cells)")
    def api_coverage() -> dict[str, Any]:
        return ex.coverage()

    @app.get("/api/land", summary="PNG of the world's land (0.2 degree cells), drawn under the overlays",
             response_class=Response, responses={200: {"content": {"image/png": {}}},
                                                 404: {"description": "no land mask here (pip install 'geobind[world]')"}})
    def api_land():
        data = ex.land()
        if not data:
            raise HTTPException(404, "no land mask on this server: pip install 'geobind[world]' for coastlines")
        return Response(data, media_type="image/png", headers={"Cache-Control": "max-age=86400"})

    @app.get("/api/health", summary="Model identity and index size")
    async def api_health() -> dict[str, Any]:
        # In-memory state only: answered on the event loop, never queued behind busy workers.
        return ex.health()

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if docs_assets:
        from fastapi.openapi.docs import get_swagger_ui_html

        app.mount("/docs-assets", StaticFiles(directory=docs_assets), name="docs-assets")

        @app.get("/docs/openapi.json", include_in_schema=False)
        def docs_schema():
            # The packaged Swagger UI (4.x) refuses "openapi: 3.1.x", which FastAPI writes; the
            # schema it renders is labelled 3.0.3 (it displays fine). /openapi.json is unchanged.
            return {**_openapi_30(app.openapi()), "openapi": "3.0.3"}

        @app.get("/docs", include_in_schema=False)
        def docs():
            return get_swagger_ui_html(
                openapi_url="/docs/openapi.json",
                title=f"{title}: API",
                swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                swagger_css_url="/docs-assets/swagger-ui.css",
                swagger_favicon_url="/docs-assets/favicon-32x32.png",
            )

    # The last added runs first: the host is checked, then the body's size, then its fields.
    app.add_middleware(FormCheck)
    app.add_middleware(
        BodyLimit, limit=ex.max_upload_bytes + FORM_OVERHEAD, message=ex.too_large_message()
    )
    app.add_middleware(HeadAsGet)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, hosts=allowed_hosts)
    return app


def loopback_hosts(host: str) -> list[str] | None:
    """The names a server bound to ``host`` may be addressed by when ``host`` is this machine
    only (127.0.0.1, ::1, localhost): the loopback names; ``None`` (any) for other addresses."""
    import ipaddress

    host = host.lower()
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    return sorted({"127.0.0.1", "localhost", "::1", host}) if loopback else None


def _host_name(header: str) -> str:
    """The name of a ``Host`` header without its port: ``[::1]:8000`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostCheck:
    """ASGI middleware: a 400 for HTTP requests whose ``Host`` is not one of ``hosts`` (a
    request without one, which only HTTP/1.0 may send, included)."""

    def __init__(self, app, hosts: list[str]):
        self.app, self.hosts = app, {h.lower() for h in hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if _host_name(host) not in self.hosts:
                from starlette.responses import JSONResponse

                resp = JSONResponse({"detail": f"this server answers requests for {', '.join(sorted(self.hosts))} "
                                               f"only, not {host!r}"}, status_code=400)
                return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def _openapi_30(node: Any) -> Any:
    """FastAPI's OpenAPI 3.1 schema with the constructs Swagger UI 4 (OpenAPI 3.0) misreads
    rewritten: an upload (``contentMediaType``) becomes ``format: binary`` (a file picker, not a
    text box) and ``anyOf: [X, {type: null}]`` becomes ``X`` with ``nullable: true``."""
    if isinstance(node, list):
        return [_openapi_30(v) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: _openapi_30(v) for k, v in node.items()}
    if node.get("type") == "string" and "contentMediaType" in node:
        node.pop("contentMediaType")
        node["format"] = "binary"
    any_of = node.get("anyOf")
    if isinstance(any_of, list) and {"type": "null"} in any_of:
        rest = [s for s in any_of if s != {"type": "null"}]
        if len(rest) == 1:
            node.pop("anyOf")
            node = {**rest[0], **node, "nullable": True}
    return node


def _swagger_assets() -> Path | None:
    """Swagger UI files from the ``swagger-ui-bundle`` package, so ``/docs`` works offline;
    None (FastAPI's default page, which loads them from a CDN) when it is not installed."""
    try:
        import swagger_ui_bundle
    except ImportError:
        return None
    path = Path(swagger_ui_bundle.swagger_ui_path)
    return path if (path / "swagger-ui-bundle.js").is_file() else None


# The overlay's grid: the point maps' own default.
map_resolution = default_resolution

__all__ = ["Explorer", "PlaceAudio", "create_app", "loopback_hosts", "map_resolution", "sniff_bytes"]
