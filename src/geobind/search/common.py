"""Helpers shared by embedding, indexing and mapping: atomic outputs and the FAISS gate."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# ``kind="auto"`` builds an approximate (ivfpq) index at and above this many items when FAISS
# is installed: below it, exact search answers a query in well under a second on a laptop CPU.
APPROX_THRESHOLD = 1_000_000

FAISS_HINT = "pip install 'geobind[faiss]'"


class OutputExistsError(FileExistsError):
    """An output that already exists, refused without ``force``. The command line words it with
    its ``--force`` flag (:meth:`cli_message`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(f"{path} exists; pass force=True to overwrite it")

    def cli_message(self) -> str:
        return f"{self.path} exists; pass --force to overwrite it"

    def __reduce__(self):  # pickles (e.g. from a worker process) with its path, not its message
        return (type(self), (self.path,))


def check_writable(*paths: str | Path | None, force: bool = False) -> None:
    """Refuse to start when an output already exists and ``force`` is off.

    Called before any expensive work, so a run never computes for minutes only to refuse at the
    end (the final rename checks again)."""
    for p in paths:
        if p is not None and Path(p).exists() and not force:
            raise OutputExistsError(p)


@contextlib.contextmanager
def atomic_path(path: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    A crash or an exception leaves ``path`` as it was (absent or the old file) and removes the
    temporary. Works for files and directories; an existing target is replaced only with
    ``force``.
    """
    path = Path(path)
    check_writable(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()  # the caller creates a file or a directory here
    try:
        yield tmp
        check_writable(path, force=force)
        _replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def _replace(tmp: Path, path: Path) -> None:
    if tmp.is_dir() and path.exists():
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)
        tmp.replace(path)
    else:
        tmp.replace(path)


def import_faiss():
    """Import FAISS or raise an error naming the extra that installs it."""
    try:
        import faiss
    except ImportError:
        raise ImportError(
            f"approximate indexes need FAISS, which is not installed: {FAISS_HINT} "
            "(or use the exact index: --kind exact)"
        ) from None
    return faiss


# Below these sizes FAISS runs on one thread: on a small job OpenMP's start-up and busy-waiting
# cost more than a second thread gains, and on a loaded machine they cost 10-30x.
FAISS_SERIAL_BUILD = 50_000
FAISS_SERIAL_QUERIES = 64


@contextlib.contextmanager
def faiss_threads(faiss, serial: bool) -> Iterator[None]:
    """Run FAISS on one OpenMP thread inside the block when ``serial``."""
    if not serial:
        yield
        return
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)
