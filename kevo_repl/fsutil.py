"""The one place kevo-repl makes bytes durable.

Every fsync in the package goes through `fsync_fd` or `fsync_dir`, so durability has one
implementation to review and one set of counters to read (`SYNC_STATS`). os.fsync releases the GIL,
so other threads keep running while the disk works.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from dataclasses import dataclass

from kevo_repl.errors import KevoReplError


@dataclass(slots=True)
class SyncStats:
    count: int = 0
    seconds: float = 0.0


SYNC_STATS = SyncStats()


def fsync_fd(fd: int) -> None:
    started = time.perf_counter()
    os.fsync(fd)
    SYNC_STATS.count += 1
    SYNC_STATS.seconds += time.perf_counter() - started


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a created, renamed or deleted file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync_fd(fd)
    finally:
        os.close(fd)


def reserve(fd: int, size: int) -> None:
    """Allocate disk blocks for the file's first `size` bytes (its length grows to at least
    `size`); OSError ENOSPC on a full disk. A file system without fallocate is left sparse."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """os.write until every byte is written (a short write is legal for regular files too)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """os.pwrite of all of `data` at `offset`, however short each write. Each slice is released
    before the next call, so an error leaves no view of the caller's buffer alive (an mmap with
    a view cannot be closed)."""
    done = 0
    while done < len(data):
        with data[done:] as rest:
            n = os.pwrite(fd, rest, offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"pwrite wrote nothing at offset {offset + done}")
        done += n


def atomic_write(path: str, data: bytes) -> None:
    """Replace `path` with `data` durably: write a temp file, fsync, rename, fsync the directory."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_all(fd, data)
        fsync_fd(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def lock_directory(directory: str, locked: type[KevoReplError], failed: type[KevoReplError]) -> int:
    """Take `directory`'s LOCK file (flock, held until the returned descriptor is closed).

    Raises `locked` when another process holds it, `failed` when it cannot be opened at all.
    """
    lock_path = os.path.join(directory, "LOCK")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise failed(f"{lock_path}: cannot open the lock file: {err.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise locked(f"{directory} is in use by another process (LOCK is held)") from None
    return fd
