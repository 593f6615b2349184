"""Crash-safe file writes: a reader sees either the old file or the complete new one."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from typing import IO, Iterator, Optional, Union

try:
    import fcntl
except ImportError:  # Windows: no flock, so no clean-up of killed writes' files
    fcntl = None  # type: ignore[assignment]

PathLike = Union[str, "os.PathLike[str]"]

_TOKEN_BYTES = 6  # of randomness in a temporary file's name


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing (``mode`` "wb" or "w",
    text as UTF-8); when the ``with`` block ends normally, flush it to disk and
    rename it over ``path``. If the block (or the write) raises, the temporary
    file is removed and an existing file at ``path`` is left untouched.

    A process killed mid-write cannot remove its temporary file: the next write of
    the same ``path`` does, when no other write is in progress in that directory
    (where file locks work; not on Windows)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = os.fsdecode(os.fspath(path))
    directory, base = os.path.split(os.path.abspath(path))
    lock = _join_writers(directory, base)
    try:
        # Same directory as the target: os.replace is only atomic within one file system.
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(_TOKEN_BYTES)}.tmp")
        # O_EXCL: never write through a file or link that is already there; mode
        # 0o666 lets the umask decide permissions, as a plain open() would.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0),
                     0o666)
        try:
            with os.fdopen(fd, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    finally:
        if lock is not None:
            os.close(lock)  # releases the lock
    _fsync_directory(directory)


def _join_writers(directory: str, base: str) -> Optional[int]:
    """Open ``directory`` and hold a shared flock on it for this write: every writer
    holds one while its temporary file exists. Whoever gets the lock exclusively
    (without waiting) therefore knows that no write is in progress there, so any
    temporary file of ``base`` is a killed write's: it removes them first. Returns
    the descriptor to close when the write is done, or None where directories
    cannot be locked (the write goes ahead without the clean-up)."""
    if fcntl is None:
        return None
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pass  # another write is in progress: its temporary file is live
        else:
            _remove_temporaries(directory, base)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits at most for another writer's clean-up
    except OSError:  # a file system without locks
        os.close(fd)
        return None
    return fd


def _remove_temporaries(directory: str, base: str) -> None:
    """Remove the temporary files :func:`atomic_write` names for ``base`` (and only
    those) from ``directory``."""
    name = re.compile(re.escape(f".{base}.") + f"[0-9a-f]{{{2 * _TOKEN_BYTES}}}" + r"\.tmp\Z")
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if name.match(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def write_atomic_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_report(out_dir: PathLike, stem: str, text: str, result: dict, *,
                 json_default=None) -> None:
    """Write ``text`` to ``out_dir/stem.md`` and ``result`` to ``out_dir/stem.json``
    (creating ``out_dir``), each atomically; ``json_default`` is ``json.dump``'s
    ``default`` (how to write values JSON has no form for)."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(text + "\n")
    with atomic_write(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(result, f, indent=2, default=json_default)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself survive a power loss; not possible everywhere
    # (Windows cannot open a directory), and the data is already safe without it.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
