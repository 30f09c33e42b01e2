"""Helpers shared by embedding, indexing and mapping: atomic outputs and the FAISS gate."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

# ``kind="auto"`` builds an approximate (ivfpq) index at and above this many items when FAISS
# is installed: below it, exact search answers a query in well under a second on a laptop CPU.
APPROX_THRESHOLD = 1_000_000

FAISS_HINT = "pip install 'geobind[faiss]'"

# Files operating systems leave in folders (Finder, Explorer; ``._*`` too): never the user's work.
OS_CLUTTER = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})


def not_clutter(directory: Path) -> list[Path]:
    """The entries of ``directory``, operating systems' clutter left out."""
    return [p for p in Path(directory).iterdir() if p.name not in OS_CLUTTER and not p.name.startswith("._")]


class OutputExistsError(FileExistsError):
    """An output that already exists, refused without ``force``. The command line words it with
    its ``--force`` flag (:meth:`cli_message`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        super().__init__(f"{path} exists; pass force=True to overwrite it")

    def cli_message(self) -> str:
        """The error worded for the command line, naming ``--force`` instead of ``force=True``."""
        return f"{self.path} exists; pass --force to overwrite it"

    def __reduce__(self):  # pickles (e.g. from a worker process) with its path, not its message
        return (type(self), (self.path,))


def check_writable(*paths: str | Path | None, force: bool = False, own: Collection[str] | None = None,
                   probe: bool = True) -> None:
    """Refuse to start when an output already exists and ``force`` is off (and, with ``probe``,
    when its folder cannot take files: see :func:`check_folder_writable`).

    Called before any expensive work, so a run never computes for minutes only to refuse at the
    end (the final rename checks again). The outputs are files, or with ``own`` (the names such
    a folder holds) folders: even with ``force`` a file never replaces a folder, and a folder
    replaces only a folder that holds nothing but ``own`` names (and operating systems' clutter),
    so a user's folder is never deleted."""
    for p in paths:
        if p is None or not Path(p).exists():
            continue
        p = Path(p)
        if own is None and p.is_dir():
            raise IsADirectoryError(f"{p} is a folder; name the file to write (a new name, or an existing file with --force)")
        if own is not None and not p.is_dir():
            raise FileExistsError(f"{p} is a file; the output is a folder: name a new folder, or move the file")
        if own is not None:
            foreign = sorted(q.name for q in not_clutter(p) if q.name not in own)
            if foreign:
                raise FileExistsError(
                    f"{p} holds files it did not write ({', '.join(foreign[:5])}"
                    f"{', ...' if len(foreign) > 5 else ''}); it is never replaced: name a new folder, "
                    "or move them"
                )
        if not force:
            raise OutputExistsError(p)
    for p in paths if probe else ():
        if p is not None:
            check_folder_writable(Path(p))


def exclusive_lock(path: Path):
    """Take an exclusive lock on the file ``path`` (created if needed; released when the returned
    file is closed or the process ends, ``kill -9`` included) and write this process's pid in it.
    Returns ``(file, None)``, or ``(None, pid)`` naming the process that holds it already, or
    ``(None, None)`` where there are no advisory locks (Windows)."""
    try:
        import fcntl
    except ImportError:
        return None, None
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        return None, holder
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f, None


class OutputWriteError(OSError):
    """An output that could not be written: the message names it and says what to do (and,
    unlike ``OSError(errno, text)``, reads without an ``[Errno N]`` prefix)."""

    def __init__(self, code: int | None, message: str):
        super().__init__(message)
        self.errno = code


def _existing_ancestor(path: Path) -> Path:
    """The nearest of ``path``'s parents that exists (the folder an output would be made in)."""
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    return parent


def check_folder_writable(path: Path) -> None:
    """Refuse, before any work, an output whose folder is a file or cannot be written (a
    read-only filesystem, no permission, a special filesystem such as /proc), naming the path.
    Probes by creating and removing a temporary file, which also works for root, whom
    permission bits do not stop."""
    ancestor = _existing_ancestor(path)
    if not ancestor.is_dir():
        raise OutputWriteError(errno.ENOTDIR, f"cannot write {path}: {ancestor} is a file, not a folder; "
                                              "choose another path")
    try:
        fd, name = tempfile.mkstemp(prefix=".geobind-probe.", dir=ancestor)
    except OSError as e:
        raise OutputWriteError(e.errno, f"cannot write {path}: cannot create files in {ancestor} "
                                        f"({e.strerror}); choose another path") from None
    os.close(fd)
    os.unlink(name)


def _write_error(e: BaseException) -> bool:
    """Whether ``e`` is what writers raise when the system refuses a write: an operating system
    error, safetensors' error, or torch's zip writer's ``RuntimeError`` (which loses errno)."""
    return isinstance(e, (OSError, RuntimeError)) or type(e).__name__ == "SafetensorError"


def _disk_full(path: Path, e: BaseException) -> bool:
    if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
        return True
    try:  # a writer that lost errno: look at the disk (the partial temporary is still there)
        return shutil.disk_usage(_existing_ancestor(path)).free < (1 << 20)
    except OSError:
        return False


def write_failure(path: str | Path, e: BaseException, kept: str = "nothing was replaced") -> OSError | None:
    """An :class:`OSError` that names ``path`` and what to do, for an error the system raised
    while it was written (``None`` for any other error, which is raised as it is: geobind's own
    refusals, a Ctrl-C). ``kept`` says what the failure left in place."""
    path = Path(path)
    if not _write_error(e) or isinstance(e, (OutputExistsError, OutputWriteError)):  # the latter: said already
        return None
    if _disk_full(path, e):
        return OutputWriteError(errno.ENOSPC, f"cannot write {path}: the disk holding {_existing_ancestor(path)} "
                                              f"is full ({kept}); free some space, or write elsewhere, then run again")
    if isinstance(e, OSError) and e.errno is not None:
        return OutputWriteError(e.errno, f"cannot write {path}: {e.strerror or e} ({kept})")
    return None


@contextlib.contextmanager
def writes_named(path: str | Path, kept: str = "nothing was replaced") -> Iterator[None]:
    """Within the block, an error the system raises while ``path`` is written (a full disk, no
    permission) is raised as the :func:`write_failure` that names ``path``, ``kept`` and what to
    do; any other error passes as it is."""
    try:
        yield
    except BaseException as e:
        failure = write_failure(path, e, kept)
        if failure is None:
            raise
        raise failure from e


@contextlib.contextmanager
def atomic_paths(paths: dict[Any, Path], *, force: bool = False) -> Iterator[dict[Any, Path]]:
    """:func:`atomic_path` for several outputs at once, renamed into place together when the block
    ends: an error or a stop leaves none of them, never a set mixing two runs. Wrap each write
    in :func:`writes_named`, so a failure names its own file, not the last one entered."""
    with contextlib.ExitStack() as files:
        yield {k: files.enter_context(atomic_path(p, force=force)) for k, p in paths.items()}


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it, renamed into place: an
    error or a stop mid-write leaves the previous file (or none), never a half-written one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path, *, force: bool = False, own: Collection[str] | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    A crash or an exception leaves ``path`` as it was (absent or the old file) and removes the
    temporary. Works for files and, with ``own`` (the names the folder holds), folders; an
    existing target is replaced only with ``force``, and only as :func:`check_writable` allows.
    """
    path = Path(path)
    check_writable(path, force=force, own=own)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()  # the caller creates a file or a directory here
    try:
        yield tmp
        # Again for what appeared meanwhile; the folder took the temporary, so no probe.
        check_writable(path, force=force, own=own, probe=False)
        _replace(tmp, path)
    except BaseException as e:
        failure = write_failure(path, e)  # looked at before the temporary frees its space
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if failure is not None:
            raise failure from e
        raise


def _replace(tmp: Path, path: Path) -> None:
    if tmp.is_dir() and path.exists():
        # A directory cannot be renamed over a non-empty one: move the old one aside first.
        old = path.with_name(f".{path.name}.old{os.getpid()}")
        path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:  # a Ctrl-C or an error between the two renames: the old one goes back
            if not path.exists():
                old.rename(path)
            raise
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
