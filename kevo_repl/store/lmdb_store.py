"""LmdbStore: the default on-disk Store, an LMDB environment in one directory.

Layout of the directory::

    LOCK       flock'd exclusively while open: LMDB's own lock file admits many processes
    data.mdb   LMDB: sub-db "data" (the keys) and sub-db "meta" (b"applied_seq" -> u64 LE)
    lock.mdb   LMDB's reader table

`apply` writes the entries and the applied sequence in one write transaction, so the state on disk
always matches the sequence stored beside it.

Durability: with the default `sync_each_txn=False` a commit is not fsynced. It survives a process
crash (the pages are in the OS page cache) but not an OS crash or power loss: LMDB's documentation
of MDB_NOSYNC says that with MDB_WRITEMAP such a crash can corrupt the database, not just lose the
last transactions. `checkpoint()`, open and close sync; `durable_seq()` is the sequence of the last
sync, and WAL retention keeps everything after it. `sync_each_txn=True` syncs every commit.

Writemap makes data.mdb's apparent size the map size (a sparse file; `du` shows the real use).
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Iterator, Sequence

import lmdb

from kevo_repl import fsutil
from kevo_repl.store.base import (
    MAX_KEY_BYTES,
    StoreClosedError,
    StoreError,
    StoreLockedError,
    StoreStats,
    check_key,
    check_limit,
    content_digest,
    pending_entries,
)
from kevo_repl.wal.codec import Entry, Op

# Address space, not disk: data.mdb is a sparse file whose used pages alone take disk space.
DEFAULT_MAP_SIZE_BYTES = 64 * 1024**3
RESERVE_BYTES = 32 * 1024**2  # disk blocks allocated ahead of the store's last page
_APPLIED_KEY = b"applied_seq"
_U64 = struct.Struct("<Q")


class LmdbStore:
    def __init__(self, path: str, env: lmdb.Environment, lock_fd: int, sync_each_txn: bool) -> None:
        self._path = path
        self._env = env
        self._lock_fd = lock_fd
        self._sync_each_txn = sync_each_txn
        self._data = env.open_db(b"data")
        self._meta = env.open_db(b"meta")
        # One writer at a time; _applied only changes while it is held.
        self._write_lock = threading.Lock()
        # One checkpoint at a time, apart from the writer: an msync of a large map takes long
        # and must not stall applies (mdb_env_sync is safe beside a write transaction).
        self._checkpoint_lock = threading.Lock()
        # Counts calls inside LMDB so close() can wait for them: closing the environment under a
        # running call would unmap memory that call is reading.
        self._users = threading.Condition()
        self._active = 0
        self._closed = False
        self._applied = self._read_applied()
        self._durable = 0
        self._page_bytes = int(env.stat()["psize"])
        self._reserved = 0  # bytes of the data file known to have disk blocks
        self._data_file_fd: int | None = None  # opened at the first reservation

    @classmethod
    def open(
        cls,
        path: str,
        *,
        sync_each_txn: bool = False,
        map_size_bytes: int = DEFAULT_MAP_SIZE_BYTES,
    ) -> LmdbStore:
        """Open (creating if needed) the store in directory `path`.

        Raises StoreLockedError if another open store holds the directory, StoreError if it
        cannot be created or opened.
        """
        _make_directory(path)
        lock_fd = _lock_directory(path)
        try:
            env = _open_env(path, sync_each_txn, map_size_bytes)
        except BaseException:
            os.close(lock_fd)
            raise
        try:
            store = cls(path, env, lock_fd, sync_each_txn)
            store.checkpoint()  # what is on disk at open may only be in the page cache
        except BaseException as e:
            env.close()
            os.close(lock_fd)
            if isinstance(e, lmdb.Error):
                raise StoreError(f"{path}: cannot open the LMDB store: {e}") from e
            raise
        return store

    @property
    def path(self) -> str:
        return self._path

    def applied_seq(self) -> int:
        self._check_open()
        return self._applied

    def durable_seq(self) -> int:
        self._check_open()
        return self._durable

    def apply(self, entries: Sequence[Entry], applied_seq: int) -> None:
        with self._write_lock, self._using():
            todo = pending_entries(entries, self._applied, applied_seq)
            if not todo and applied_seq == self._applied:
                return  # a pure replay: nothing to write
            self._reserve(todo)
            with self._env.begin(write=True, db=self._data) as txn:
                _write_entries(txn, todo)
                txn.put(_APPLIED_KEY, _U64.pack(applied_seq), db=self._meta)
            self._applied = applied_seq
            if self._sync_each_txn:
                self._durable = applied_seq

    def _reserve(self, entries: Sequence[Entry]) -> None:
        """Make sure the file has disk blocks for the pages a write may add at its end.

        With writemap, LMDB writes new pages through the map into a sparse file; on a full
        disk the kernel can only answer that with SIGBUS, which kills the node with no word
        said. So the file's blocks are allocated (fallocate) `RESERVE_BYTES` ahead of its last
        page, and a full disk is an ENOSPC here, a StoreError naming the file, before any page
        is touched.
        """
        info = self._env.info()
        used = (info["last_pgno"] + 1) * self._page_bytes
        need = used + RESERVE_BYTES + 4 * sum(len(e[2]) + len(e[3]) for e in entries)
        if need <= self._reserved:
            return
        # then again only after RESERVE_BYTES more growth; never past the map (LMDB's own
        # map-full error covers that)
        target = min(need + RESERVE_BYTES, info["map_size"])
        if target <= self._reserved:
            return
        try:
            if self._data_file_fd is None:
                self._data_file_fd = os.open(os.path.join(self._path, IMAGE_FILE), os.O_RDWR)
            fsutil.reserve(self._data_file_fd, target)
        except OSError as err:
            raise StoreError(
                f"{self._path}/{IMAGE_FILE}: cannot reserve disk space for writes: {err.strerror}"
            ) from err
        self._reserved = target

    def get(self, key: bytes) -> bytes | None:
        check_key(key)
        with self._using(), self._env.begin(db=self._data) as txn:
            return txn.get(key)

    def scan(self, start: bytes, end: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        check_limit(limit)
        with self._using(), self._env.begin(db=self._data) as txn:
            cursor = txn.cursor()
            # LMDB rejects an over-long lookup key; no stored key can be longer than the limit,
            # so seeking to the truncated start and skipping keys below `start` is equivalent.
            if not cursor.set_range(start[:MAX_KEY_BYTES]):
                return []
            out: list[tuple[bytes, bytes]] = []
            for key, value in cursor:
                if end is not None and key >= end:
                    break
                if key >= start:
                    out.append((key, value))
                    if len(out) == limit:
                        break
            return out

    def stats(self) -> StoreStats:
        with self._using(), self._env.begin() as txn:
            count = txn.stat(self._data)["entries"]
            info = self._env.info()
            pages = info["last_pgno"] + 1  # pages 0..last_pgno are in use (incl. free list)
            return StoreStats(key_count=count, size_bytes=pages * txn.stat()["psize"])

    def checkpoint(self) -> int:
        with self._checkpoint_lock, self._using():
            # Every transaction up to `seq` has committed into the map before the sync starts,
            # so the sync covers it; later ones may be flushed too, which is harmless.
            seq = self._applied
            self._env.sync(True)
            self._durable = seq
            return seq

    def digest(self) -> tuple[int, str]:
        with self._using(), self._env.begin(db=self._data) as txn:
            applied = _decode_applied(txn.get(_APPLIED_KEY, db=self._meta), self._path)
            return applied, content_digest(txn.cursor())

    def begin_export(self) -> _LmdbExport:
        self._enter()
        try:
            txn = self._env.begin()
            try:
                applied = _decode_applied(txn.get(_APPLIED_KEY, db=self._meta), self._path)
                info = self._env.info()
                estimate = (info["last_pgno"] + 1) * txn.stat()["psize"]
            except BaseException:
                txn.abort()
                raise
        except lmdb.Error as e:
            self._exit()
            raise StoreError(f"{self._path}: cannot begin an export: {e}") from e
        except BaseException:
            self._exit()
            raise
        return _LmdbExport(self, txn, applied, estimate)

    def close(self) -> None:
        with self._users:
            if self._closed:
                return
            self._closed = True
            self._users.wait_for(lambda: self._active == 0)
        try:
            self._env.sync(True)  # a clean shutdown leaves nothing only in the page cache
        except lmdb.Error as e:
            raise StoreError(f"{self._path}: sync at close failed: {e}") from e
        finally:
            self._env.close()
            if self._data_file_fd is not None:
                os.close(self._data_file_fd)
            os.close(self._lock_fd)  # closing the descriptor drops the flock

    def __enter__(self) -> LmdbStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError(f"{self._path}: store is closed")

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """Mark a call as inside LMDB and translate LMDB's errors into StoreError."""
        self._enter()
        try:
            yield
        except lmdb.MapFullError as e:
            raise StoreError(f"{self._path}: store is full (its LMDB map is used up): {e}") from e
        except lmdb.Error as e:
            raise StoreError(f"{self._path}: LMDB error: {e}") from e
        finally:
            self._exit()

    def _enter(self) -> None:
        with self._users:
            self._check_open()
            self._active += 1

    def _exit(self) -> None:
        with self._users:
            self._active -= 1
            self._users.notify_all()

    def _read_applied(self) -> int:
        with self._env.begin() as txn:
            return _decode_applied(txn.get(_APPLIED_KEY, db=self._meta), self._path)


IMAGE_FILE = "data.mdb"  # what an export writes: the store directory's data file


class _LmdbExport:
    """A compacted copy of the environment from one read transaction (mdb_env_copyfd2)."""

    format = "lmdb"

    def __init__(
        self, store: LmdbStore, txn: lmdb.Transaction[bytes], applied: int, estimate: int
    ) -> None:
        self._store = store
        self._txn: lmdb.Transaction[bytes] | None = txn
        self.applied_seq = applied
        self.size_estimate = estimate
        self._lock = threading.Lock()  # close() may come from another thread than write_to

    def write_to(self, fd: int) -> None:
        with self._lock:
            txn = self._txn
            if txn is None:
                raise StoreError(f"{self._store.path}: the export was closed")
            try:
                # compact: free pages are left out, so the image is what the data takes
                self._store._env.copyfd(fd, compact=True, txn=txn)
            except lmdb.Error as e:
                raise StoreError(f"{self._store.path}: export failed: {e}") from e

    def close(self) -> None:
        with self._lock:
            txn, self._txn = self._txn, None
            if txn is not None:
                txn.abort()
                self._store._exit()


def _write_entries(txn: lmdb.Transaction[bytes], entries: Sequence[Entry]) -> None:
    # Per-entry put/delete in order: a benchmark showed cursor.putmulti only ~5% faster on random
    # keys, and it would have to split batches at every delete to keep their order.
    put = txn.put
    delete = txn.delete
    for _seq, op, key, value in entries:
        if op == Op.DELETE:
            delete(key)
        else:
            put(key, value)  # Merge is applied like Put, as Kevo does


def _decode_applied(raw: bytes | None, path: str) -> int:
    if raw is None:
        return 0
    if len(raw) != _U64.size:
        raise StoreError(f"{path}: corrupt store: applied_seq is {len(raw)} bytes, expected 8")
    seq: int = _U64.unpack(raw)[0]
    return seq


def _make_directory(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{path}: cannot create the store directory: {e.strerror}") from e


def _lock_directory(path: str) -> int:
    return fsutil.lock_directory(path, StoreLockedError, StoreError)


def _open_env(path: str, sync_each_txn: bool, map_size_bytes: int) -> lmdb.Environment:
    try:
        env = lmdb.open(
            path,
            subdir=True,
            map_size=map_size_bytes,
            writemap=True,  # commits write pages in place instead of copying them
            sync=sync_each_txn,
            metasync=sync_each_txn,
            max_dbs=2,
            readahead=False,  # random reads: readahead would only evict useful pages
            lock=True,
        )
    except lmdb.Error as e:
        raise StoreError(f"{path}: cannot open the LMDB store: {e}") from e
    max_key = env.max_key_size()
    if max_key < MAX_KEY_BYTES:
        env.close()
        raise StoreError(f"{path}: this LMDB build allows only {max_key}-byte keys")
    return env
