"""``geobind serve``: the web explorer over a model and an index."""

from __future__ import annotations

import argparse
import errno
import os
import socket

EPILOG_SERVE = """\
The page (open the printed URL) takes a text query, an audio or image upload, or a microphone
recording, and shows the top places as markers and a heat map of every place's score. Scores
are cosine similarities between the query and each place's embedding: compare them within one
query. The JSON API is documented at /docs. Nothing is loaded from the internet.

Places with a recording (the audio column of the dataset the index was embedded from, while
that file is unchanged) get a player in their popup; only files inside that dataset's folder
are served. --data names another manifest for them, --no-media serves none.

examples:
  geobind demo --out demo && geobind serve --model demo/model --index demo/places.index
  geobind serve --model M --index tiles.index --port 8080
  geobind serve --model M --index tiles.index --host 0.0.0.0     # reachable from other machines
  geobind serve --model M --index tiles.index --max-upload-mb 5
  geobind serve --model M --index tiles.index --data data/test.csv      # recordings from test.csv
"""


def add_serve_parser(sub) -> None:
    """Register ``geobind serve`` on the subcommand parsers ``sub``."""
    s = sub.add_parser(
        "serve",
        help="web explorer: search and map an index by text, audio or image",
        description="Serve the web explorer of an index: search it by text, audio or image and see "
        "the results on a map, in a browser.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_SERVE,
    )
    s.add_argument("--model", required=True, help="GeoBind model directory")
    s.add_argument(
        "--index", required=True, help="index folder built with this model (geobind index build)"
    )
    s.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 for all)",
    )
    s.add_argument(
        "--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)"
    )
    s.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default 20)"
    )
    s.add_argument("--device", default="cpu", help="auto | cpu | cuda | cuda:N (default cpu)")
    s.add_argument("--data", help="manifest (CSV or Parquet) whose audio column holds the places' recordings, "
                   "by id (default: the dataset the index was embedded from, if unchanged)")
    s.add_argument("--layout", default="manifest", choices=("manifest", "soundingearth"),
                   help="layout of --data (default: manifest)")
    s.add_argument("--no-media", action="store_true", help="serve no recordings")
    s.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    """``geobind serve``: serve the web explorer over a model and an index; returns the exit code."""
    if args.max_upload_mb <= 0:
        raise ValueError("--max-upload-mb must be positive")
    # Bound before anything heavy is imported or loaded: a taken port fails at once, and
    # --port 0 gets its real port.
    sock = bind_socket(args.host, args.port)
    try:
        from geobind.serve.app import SERVE_HINT, create_app, loopback_hosts

        try:
            import uvicorn
        except ImportError:
            raise ImportError(f"geobind serve needs uvicorn: {SERVE_HINT}") from None
        from geobind.distributed import parse_device
        from geobind.model import GeoBind
        from geobind.search.index import Index

        model = GeoBind.from_pretrained(args.model, device=parse_device(args.device))
        index = Index.load(args.index)
        # Bound to this machine only: requests must name it (a page elsewhere cannot reach the
        # server through a DNS name that resolves to 127.0.0.1).
        allowed = loopback_hosts(args.host)
        if args.data and args.no_media:
            raise ValueError("--data names where recordings come from and --no-media serves none: give one")
        if args.data and not os.path.exists(os.path.expanduser(args.data)):
            raise FileNotFoundError(f"--data {args.data} does not exist")
        app = create_app(model, index, max_upload_mb=args.max_upload_mb, allowed_hosts=allowed,
                         media=not args.no_media, data=args.data, layout=args.layout)
        sock.listen(2048)  # from here on connections wait in the queue until the server serves them
        port = sock.getsockname()[1]
        host = f"[{args.host}]" if ":" in args.host else args.host
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else host
        print(f"{len(index)} places ({index.modality} embeddings) from {args.index}")
        audio = app.state.explorer.audio
        print(f"recordings: {audio.note}")
        if allowed is None:
            print(f"note: bound to {args.host}: anyone who can reach this machine on port {port} can use "
                  "the explorer and its API (there is no login)"
                  + (", and play the recordings it serves" if len(audio) else ""))
        print(
            f"GeoBind explorer: http://{shown}:{port}/   (API docs: /docs; Ctrl-C stops)",
            flush=True,
        )
        # A stop waits at most this long for searches still running.
        config = uvicorn.Config(app, host=args.host, port=port, log_level="warning", timeout_graceful_shutdown=5)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0: a free port the system picks), or an
    ``OSError`` that names the port and the option to change."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port} is not a port number: use 1 to 65535 (or 0 for any free port)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (a
    # socket made with proto 0 keeps Nagle's algorithm, and every response after the first on
    # a kept-alive connection waits ~40 ms for the client's delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    if os.name != "nt":
        # As uvicorn does: a restart may reuse the port of connections still closing.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise OSError(
                f"port {port} on {host} is already in use (another server?): choose another with "
                f"--port, e.g. --port {port + 1 if port < 65535 else 8000}, or --port 0 for any free port"
            ) from None
        if e.errno == errno.EACCES:
            raise OSError(
                f"no permission to use port {port} on {host}: choose --port 1024 or above"
            ) from None
        raise OSError(f"cannot listen on {host} port {port} ({e.strerror or e}): check --host and --port") from None
    return sock
