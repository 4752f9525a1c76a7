"""The file a replica writes a snapshot image into: direct I/O where the file system takes it.

A snapshot image is hundreds of MB that nothing reads until the replica switches to it. Written
through the page cache, each of its pages is first allocated, zeroed and filled, then written
out by the fsync; on a VM whose host backs guest memory lazily the allocation alone varies
from cheap to most of the cost (a 235 MB image: 0.13 to 0.51 s of the replica's system time,
run to run; `dd` of 240 MiB with an fsync: 0.15 to 0.64 s buffered, 0.15 to 0.16 s with
O_DIRECT). With O_DIRECT the bytes go from one reused, page-aligned buffer straight to the
device, and the replica's page cache keeps what it held.

O_DIRECT wants the buffer, the length and the file offset aligned to the device's block: whole
blocks go out from the staging buffer, and the last part of the image shorter than a block goes
through the page cache when the image is finished. Where the file system refuses O_DIRECT
(tmpfs on older kernels, some FUSE and network file systems) every byte goes through the page
cache, as a plain write.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os

from kevo_repl import fsutil

BLOCK = 4096  # a multiple of every logical block size O_DIRECT asks for on Linux
STAGE_BYTES = 4 * 1024 * 1024  # one snapshot chunk; a multiple of BLOCK


class ImageFile:
    """Appends to a new file; `finish` writes what is staged and fsyncs. One thread at a time
    (the caller's pipeline writes chunks in order, one after the other)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._direct = -1
        self._stage: mmap.mmap | None = None
        try:
            self._direct = _open_direct(path)
            if self._direct >= 0:
                self._stage = mmap.mmap(-1, STAGE_BYTES)  # anonymous: page-aligned
        except BaseException:
            self.close()
            raise
        self._staged = 0  # bytes in the stage, which starts at file offset `_offset`
        self._offset = 0

    def __enter__(self) -> ImageFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def direct(self) -> bool:
        return self._stage is not None

    @property
    def size(self) -> int:
        """Bytes appended so far: written, or staged to be."""
        return self._offset + self._staged

    def write(self, data: bytes | memoryview) -> None:
        """Append `data` (OSError from the file system as is)."""
        with memoryview(data) as view:
            done = 0
            while done < len(view) and self._stage is not None:
                n = min(len(view) - done, STAGE_BYTES - self._staged)
                self._stage[self._staged : self._staged + n] = view[done : done + n]
                self._staged += n
                done += n
                if self._staged == STAGE_BYTES:
                    self._write_stage(STAGE_BYTES)  # may fall back to buffered writes
            if done < len(view):  # buffered: no O_DIRECT here, or no longer
                with view[done:] as rest:
                    fsutil.pwrite_all(self.fd, rest, self._offset)
                self._offset += len(view) - done

    def finish(self) -> None:
        """Write out what is staged (the whole blocks direct, the rest buffered) and fsync."""
        if self._stage is not None and self._staged:
            self._write_stage(self._staged - self._staged % BLOCK)
        if self._stage is not None and self._staged:  # the last bytes, shorter than a block
            with memoryview(self._stage) as view, view[: self._staged] as tail:
                fsutil.pwrite_all(self.fd, tail, self._offset)
            self._offset += self._staged
            self._staged = 0
        fsutil.fsync_fd(self.fd)

    def close(self) -> None:
        for fd in (self._direct, self.fd):
            if fd >= 0:
                os.close(fd)
        self._direct = self.fd = -1
        self._drop_stage()

    def _write_stage(self, length: int) -> None:
        """The first `length` staged bytes (whole blocks) to the file; the rest moves to the
        front of the stage. A file system that takes O_DIRECT at open but refuses the writes
        (EINVAL: it wants a larger alignment) gets this and every later byte buffered."""
        assert self._stage is not None and length % BLOCK == 0
        if length:
            with memoryview(self._stage) as view, view[:length] as part:
                try:
                    self._pwrite_direct(part, self._offset)
                except OSError as err:
                    if err.errno != errno.EINVAL:
                        raise
                    self._to_buffered()
                    return
        self._offset += length
        rest = self._staged - length
        if rest:
            self._stage.move(0, length, rest)
        self._staged = rest

    def _pwrite_direct(self, data: memoryview, offset: int) -> None:
        """A direct write that stops part way (a full disk) leaves the offset unaligned: the
        rest goes through the buffered descriptor, which then reports the real error (ENOSPC)
        rather than EINVAL."""
        n = os.pwrite(self._direct, data, offset)
        if n < len(data):
            with data[n:] as rest:
                fsutil.pwrite_all(self.fd, rest, offset + n)

    def _to_buffered(self) -> None:
        """Everything staged through the page cache, and from now on every write."""
        assert self._stage is not None
        with memoryview(self._stage) as view, view[: self._staged] as staged:
            fsutil.pwrite_all(self.fd, staged, self._offset)
        self._offset += self._staged
        self._staged = 0
        os.close(self._direct)
        self._direct = -1
        self._drop_stage()

    def _drop_stage(self) -> None:
        if self._stage is not None:
            stage, self._stage = self._stage, None
            # Every view of it is released by the `with` blocks, even on an error; if one
            # still lived, the mapping would go with it rather than fail the caller here.
            with contextlib.suppress(BufferError):
                stage.close()


def _open_direct(path: str) -> int:
    """A second descriptor of `path` with O_DIRECT; -1 where the file system refuses it."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as err:
        if err.errno in (errno.EINVAL, errno.EOPNOTSUPP):
            return -1
        raise
