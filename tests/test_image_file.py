"""ImageFile: the snapshot image written direct (whole blocks) and buffered (the tail)."""

from __future__ import annotations

import errno
import os
import random
from pathlib import Path

import pytest

from kevo_repl import fsutil
from kevo_repl.repl import image_file
from kevo_repl.repl.image_file import BLOCK, ImageFile


def _write_in_pieces(path: Path, data: bytes, seed: int) -> ImageFile:
    rng = random.Random(seed)
    image = ImageFile(str(path))
    at = 0
    while at < len(data):
        n = rng.choice([1, 100, BLOCK - 1, BLOCK, 70_000, image_file.STAGE_BYTES + 5])
        image.write(data[at : at + n])
        at += n
    image.finish()
    return image


@pytest.mark.parametrize(
    "size",
    [0, 1, BLOCK - 1, BLOCK, 3 * BLOCK + 17, 10 * 1024 * 1024 + 4096, 10 * 1024 * 1024 + 5],
)
def test_any_size_in_any_pieces_is_written_exactly(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    path = tmp_path / "data.mdb"
    with _write_in_pieces(path, data, size) as image:
        assert image.size == size
        assert image.direct  # O_DIRECT works on this machine's /tmp; the fallback is below
    assert path.read_bytes() == data


def test_without_o_direct_every_byte_goes_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(image_file, "_open_direct", lambda path: -1)
    data = os.urandom(5 * 1024 * 1024 + 123)
    with _write_in_pieces(tmp_path / "data.mdb", data, 1) as image:
        assert not image.direct
    assert (tmp_path / "data.mdb").read_bytes() == data


def test_a_direct_write_stopping_part_way_goes_on_buffered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A short direct write (a full disk) leaves the offset unaligned: the rest of that write
    goes through the buffered descriptor, which reports the real error if there is one."""
    real = os.pwrite
    calls: list[tuple[int, int]] = []

    def short_once(fd: int, data: memoryview, offset: int) -> int:
        calls.append((fd, len(data)))
        if len(calls) == 1:  # the kernel took less than asked: report 100 bytes short
            real(fd, data[:BLOCK], offset)
            return BLOCK - 100
        return real(fd, data, offset)

    data = os.urandom(image_file.STAGE_BYTES + 10)
    with ImageFile(str(tmp_path / "data.mdb")) as image:
        monkeypatch.setattr(os, "pwrite", short_once)
        image.write(data)
        image.finish()
        direct_fd = calls[0][0]
        assert calls[1][0] == image.fd != direct_fd  # the rest of the stage: buffered
    assert (tmp_path / "data.mdb").read_bytes() == data


def test_the_file_must_be_new(tmp_path: Path) -> None:
    (tmp_path / "data.mdb").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        ImageFile(str(tmp_path / "data.mdb"))


def test_a_full_disk_is_an_oserror_and_the_file_still_closes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The error must reach the caller as the OSError it is; close() must not fail with
    BufferError because a view of the staging buffer outlived the failed write."""

    def full(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with ImageFile(str(tmp_path / "data.mdb")) as image:  # closing: no BufferError
        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(OSError) as caught:
            image.write(os.urandom(image_file.STAGE_BYTES + 1))
        assert caught.value.errno == errno.ENOSPC
        error = caught.value  # kept alive, with its traceback, as the bootstrap's error keeps it
    assert error.__traceback__ is not None


def test_direct_writes_refused_with_einval_go_on_through_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite
    data = os.urandom(2 * image_file.STAGE_BYTES + 999)
    with ImageFile(str(tmp_path / "data.mdb")) as image:
        direct_fd = image._direct

        def picky(fd: int, data: memoryview, offset: int) -> int:
            if fd == direct_fd:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", picky)
        assert image.direct
        image.write(data[:100])
        image.write(data[100:])
        assert not image.direct  # the first full stage met EINVAL
        image.finish()
    assert (tmp_path / "data.mdb").read_bytes() == data


def test_pwrite_all_goes_on_after_short_writes_and_refuses_a_write_of_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.pwrite
    sizes: list[int] = []

    def short(fd: int, data: memoryview, offset: int) -> int:
        sizes.append(len(data))
        return real(fd, data[:1000], offset)

    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        data = os.urandom(3500)
        monkeypatch.setattr(os, "pwrite", short)
        fsutil.pwrite_all(fd, memoryview(data), 10)
        assert sizes == [3500, 2500, 1500, 500]
        monkeypatch.setattr(os, "pwrite", lambda fd, data, offset: 0)
        with pytest.raises(OSError, match="wrote nothing at offset 10"):
            fsutil.pwrite_all(fd, memoryview(data), 10)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(10) + data
