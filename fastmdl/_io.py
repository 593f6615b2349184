"""Crash-safe file writes: a reader sees either the old file or the complete new one."""

from __future__ import annotations

import contextlib
import os
import secrets
from typing import IO, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing (``mode`` "wb" or "w",
    text as UTF-8); when the ``with`` block ends normally, flush it to disk and
    rename it over ``path``. If the block (or the write) raises, the temporary
    file is removed and an existing file at ``path`` is left untouched."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode must be 'wb' or 'w', got {mode!r}")
    path = os.fsdecode(os.fspath(path))
    directory, base = os.path.split(os.path.abspath(path))
    # Same directory as the target: os.replace is only atomic within one file system.
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(6)}.tmp")
    # O_EXCL: never write through a file or link that is already there; mode 0o666
    # lets the umask decide permissions, as a plain open() would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
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
    _fsync_directory(directory)


def write_atomic_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_report(out_dir: PathLike, stem: str, text: str, result: dict) -> None:
    """Write ``text`` to ``out_dir/stem.md`` and ``result`` to ``out_dir/stem.json``
    (creating ``out_dir``), each atomically."""
    import json

    os.makedirs(out_dir, exist_ok=True)
    with atomic_write(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(text + "\n")
    with atomic_write(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump(result, f, indent=2)


def _fsync_directory(directory: str) -> None:
    # Makes the rename itself survive a power loss; not possible everywhere
    # (Windows cannot open a directory), and the data is already safe without it.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
