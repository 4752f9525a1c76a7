"""The Store contract, run against every implementation; then what only LmdbStore has (files, lock).

Each contract test gets a fresh store from the `store` fixture; `kind.persistent` says whether
closing and reopening the same directory must bring the state back.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lmdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kevo_repl import fsutil
from kevo_repl.errors import InvalidArgumentError
from kevo_repl.store import (
    MAX_KEY_BYTES,
    LmdbStore,
    MemoryStore,
    Store,
    StoreClosedError,
    StoreError,
    StoreLockedError,
)
from kevo_repl.store.base import StoreExport
from kevo_repl.store.lmdb_store import IMAGE_FILE, RESERVE_BYTES
from kevo_repl.store.memory import load_image
from kevo_repl.wal.codec import MAX_SEQ, Entry, Op

TEST_MAP_SIZE_BYTES = 256 * 1024**2


@dataclass(frozen=True)
class Kind:
    name: str
    open: Callable[[Path], Store]
    persistent: bool


def _open_lmdb(path: Path) -> Store:
    return LmdbStore.open(str(path), map_size_bytes=TEST_MAP_SIZE_BYTES)


KINDS = [Kind("memory", lambda _path: MemoryStore(), False), Kind("lmdb", _open_lmdb, True)]


@pytest.fixture(params=KINDS, ids=[k.name for k in KINDS])
def kind(request: pytest.FixtureRequest) -> Kind:
    k: Kind = request.param
    return k


@pytest.fixture
def store(kind: Kind, tmp_path: Path) -> Iterator[Store]:
    s = kind.open(tmp_path / "store")
    yield s
    s.close()


def put(seq: int, key: bytes, value: bytes) -> Entry:
    return Entry(seq, Op.PUT, key, value)


def delete(seq: int, key: bytes) -> Entry:
    return Entry(seq, Op.DELETE, key)


def everything(store: Store) -> list[tuple[bytes, bytes]]:
    return store.scan(b"", None, 1_000_000)


def reference_digest(items: list[tuple[bytes, bytes]]) -> str:
    h = hashlib.sha256()
    for key, value in sorted(items):
        h.update(struct.pack("<I", len(key)) + key + struct.pack("<I", len(value)) + value)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The contract


def test_new_store_is_empty(store: Store) -> None:
    assert (store.applied_seq(), store.durable_seq()) == (0, 0)
    assert store.get(b"k") is None
    assert everything(store) == []
    assert store.stats().key_count == 0
    assert store.digest() == (0, hashlib.sha256(b"").hexdigest())


def test_put_get_and_overwrite(store: Store) -> None:
    store.apply([put(1, b"a", b"1"), put(2, b"b", b"2")], 2)
    store.apply([put(3, b"a", b"3")], 3)
    assert (store.get(b"a"), store.get(b"b"), store.get(b"c")) == (b"3", b"2", None)
    assert store.applied_seq() == 3


def test_empty_value_is_a_value(store: Store) -> None:
    store.apply([put(1, b"e", b"")], 1)
    assert store.get(b"e") == b""
    assert store.get(b"e") is not None
    assert everything(store) == [(b"e", b"")]
    assert store.stats().key_count == 1


def test_delete_and_delete_of_missing_key(store: Store) -> None:
    store.apply([put(1, b"a", b"1"), put(2, b"b", b"2")], 2)
    store.apply([delete(3, b"a"), delete(4, b"never")], 4)
    assert store.get(b"a") is None
    assert everything(store) == [(b"b", b"2")]
    assert store.applied_seq() == 4


def test_merge_is_applied_like_put(store: Store) -> None:
    store.apply([put(1, b"m", b"old"), Entry(2, Op.MERGE, b"m", b"new")], 2)
    store.apply([Entry(3, Op.MERGE, b"n", b"fresh")], 3)
    assert everything(store) == [(b"m", b"new"), (b"n", b"fresh")]


def test_entries_apply_in_batch_order(store: Store) -> None:
    store.apply([put(1, b"k", b"1"), delete(2, b"k"), put(3, b"k", b"3")], 3)
    store.apply([put(4, b"j", b"4"), delete(5, b"j")], 5)
    assert everything(store) == [(b"k", b"3")]


def test_applied_seq_can_advance_without_entries(store: Store) -> None:
    store.apply([], 9)
    assert store.applied_seq() == 9
    assert store.digest()[0] == 9


def test_replay_is_idempotent(store: Store) -> None:
    batch = [put(1, b"a", b"1"), put(2, b"b", b"2"), delete(3, b"a"), put(4, b"c", b"4")]
    store.apply(batch, 4)
    before = store.digest()
    store.apply(batch, 4)
    # Same old sequence numbers with different content: still skipped, they were applied.
    store.apply([put(2, b"b", b"changed"), put(3, b"a", b"revived")], 4)
    assert store.digest() == before
    # A batch straddling the applied point applies only its new part.
    store.apply([put(4, b"c", b"stale"), put(5, b"d", b"5")], 5)
    assert everything(store) == [(b"b", b"2"), (b"c", b"4"), (b"d", b"5")]


def test_entries_sharing_one_seq_apply_together(store: Store) -> None:
    # Kevo HEAD writes a batch as entries that all carry the same seq.
    store.apply([put(7, b"x", b"1"), put(7, b"y", b"2")], 7)
    assert everything(store) == [(b"x", b"1"), (b"y", b"2")]


def test_applied_seq_survives_reopen(kind: Kind, tmp_path: Path) -> None:
    path = tmp_path / "store"
    store = kind.open(path)
    store.apply([put(41, b"k", b"v")], 42)
    assert store.applied_seq() == 42
    store.close()
    if not kind.persistent:
        pytest.skip(f"{kind.name} does not persist; the reopen part does not apply")
    again = kind.open(path)
    try:
        assert again.applied_seq() == 42
        assert again.get(b"k") == b"v"
        assert again.digest() == (42, reference_digest([(b"k", b"v")]))
    finally:
        again.close()


def test_applied_seq_going_backwards_is_rejected(store: Store) -> None:
    store.apply([put(10, b"k", b"v")], 10)
    with pytest.raises(InvalidArgumentError, match="applied_seq 9"):
        store.apply([], 9)
    with pytest.raises(InvalidArgumentError):
        store.apply([], MAX_SEQ + 1)
    assert store.applied_seq() == 10


def test_invalid_batch_is_rejected_whole(store: Store) -> None:
    store.apply([put(1, b"k", b"v")], 1)
    before = store.digest()
    bad_batches = [
        [put(2, b"a", b"1"), put(3, b"x" * (MAX_KEY_BYTES + 1), b"1")],
        [put(2, b"a", b"1"), put(3, b"", b"1")],
        [put(2, b"a", b"1"), put(9, b"b", b"1")],  # beyond applied_seq
        [put(2, b"a", b"1"), Entry(3, 4, b"b", b"1")],  # type: ignore[arg-type]
    ]
    for batch in bad_batches:
        with pytest.raises(InvalidArgumentError):
            store.apply(batch, 3)
    assert store.digest() == before
    assert store.stats().key_count == 1


def test_key_size_limit(store: Store) -> None:
    longest = b"k" * MAX_KEY_BYTES
    store.apply([put(1, longest, b"v")], 1)
    assert store.get(longest) == b"v"
    for bad in (b"", b"k" * (MAX_KEY_BYTES + 1)):
        with pytest.raises(InvalidArgumentError):
            store.get(bad)
    assert MAX_KEY_BYTES == 511


def test_scan_bounds_and_byte_order(store: Store) -> None:
    keys = [b"\xff\xff", b"a", b"\x00", b"ab", b"\x7f", b"b", b"\x80", b"\xff", b"aa"]
    store.apply([put(i + 1, k, b"v" + k) for i, k in enumerate(keys)], len(keys))
    ordered = sorted(keys)

    def scanned(start: bytes, end: bytes | None, limit: int = 100) -> list[bytes]:
        return [k for k, _ in store.scan(start, end, limit)]

    assert scanned(b"", None) == ordered
    assert scanned(b"a", b"b") == [b"a", b"aa", b"ab"]  # start inclusive, end exclusive
    assert scanned(b"a\x00", b"ab") == [b"aa"]
    assert scanned(b"\x80", None) == [b"\x80", b"\xff", b"\xff\xff"]
    assert scanned(b"\xff\xff\x00", None) == []
    assert scanned(b"b", b"b") == []
    assert scanned(b"", None, 3) == ordered[:3]
    assert scanned(b"\x7f", None, 1) == [b"\x7f"]
    assert store.scan(b"a", b"aa", 10) == [(b"a", b"va")]
    with pytest.raises(InvalidArgumentError):
        store.scan(b"", None, 0)


def test_scan_start_longer_than_any_key(store: Store) -> None:
    longest = b"k" * MAX_KEY_BYTES
    after = b"k" * (MAX_KEY_BYTES - 1) + b"l"
    store.apply([put(1, longest, b"1"), put(2, after, b"2")], 2)
    # longest is a proper prefix of start, so it sorts before it.
    assert store.scan(longest + b"k", None, 10) == [(after, b"2")]


def test_scan_sees_one_snapshot_while_another_thread_applies(store: Store) -> None:
    keys = [b"key%03d" % i for i in range(50)]
    rounds = 150
    failures: list[str] = []

    def writer() -> None:
        for r in range(1, rounds + 1):
            value = b"round%04d" % r
            store.apply([put(r, k, value) for k in keys], r)

    thread = threading.Thread(target=writer)
    thread.start()
    scans = 0
    while thread.is_alive() or scans == 0:
        items = everything(store)
        scans += 1
        values = {v for _, v in items}
        if items and (len(values) != 1 or len(items) != len(keys)):
            failures.append(f"mixed snapshot: {len(items)} keys, values {sorted(values)}")
    thread.join()
    assert failures == []
    assert {v for _, v in everything(store)} == {b"round%04d" % rounds}


def test_stats_key_count_is_exact(store: Store) -> None:
    store.apply([put(i + 1, b"k%d" % i, b"v") for i in range(100)], 100)
    assert store.stats().key_count == 100
    store.apply([put(101, b"k5", b"overwritten"), put(102, b"k7", b"")], 102)
    assert store.stats().key_count == 100
    store.apply([delete(103, b"k1"), delete(104, b"k1"), delete(105, b"missing")], 105)
    assert store.stats().key_count == 99


def test_stats_size_covers_the_data(store: Store) -> None:
    empty = store.stats().size_bytes
    entries = [put(i + 1, b"key%06d" % i, b"x" * 100) for i in range(2000)]
    store.apply(entries, len(entries))
    raw = sum(len(e.key) + len(e.value) for e in entries)
    assert store.stats().size_bytes >= raw
    assert store.stats().size_bytes > empty


def test_digest_depends_on_content_not_batching(kind: Kind, tmp_path: Path) -> None:
    entries = [put(i + 1, b"k%03d" % (i % 37), b"v%d" % i) for i in range(120)]
    entries += [delete(121, b"k005"), put(122, b"z", b"")]
    stores = [kind.open(tmp_path / name) for name in ("one", "many", "other")]
    try:
        one, many, other = stores
        one.apply(entries, 122)
        for i in range(0, len(entries), 7):
            many.apply(entries[i : i + 7], entries[min(i + 7, len(entries)) - 1].seq)
        other.apply([*entries[:-1], put(122, b"z", b"!")], 122)
        assert one.digest() == many.digest()
        assert one.digest()[0] == 122
        assert one.digest()[1] == reference_digest(everything(one))
        assert other.digest()[1] != one.digest()[1]
    finally:
        for s in stores:
            s.close()


def _image(export: StoreExport) -> bytes:
    """Everything `export.write_to` writes, read from a pipe by a second thread."""
    r, w = os.pipe()
    chunks: list[bytes] = []

    def drain() -> None:
        while data := os.read(r, 65536):
            chunks.append(data)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        export.write_to(w)
    finally:
        os.close(w)
        reader.join()
        os.close(r)
    return b"".join(chunks)


def _open_image(kind: Kind, image: bytes, directory: Path) -> Store:
    if kind.name == "memory":
        return load_image(image)
    directory.mkdir()
    (directory / IMAGE_FILE).write_bytes(image)
    return _open_lmdb(directory)


def test_export_is_the_store_at_one_point_while_writes_go_on(kind: Kind, tmp_path: Path) -> None:
    source = kind.open(tmp_path / "source")
    try:
        source.apply([put(i, b"k%04d" % i, b"v" * 50) for i in range(1, 2001)], 2000)
        expected = source.digest()
        export = source.begin_export()
        source.apply([put(2001, b"k0001", b"changed"), delete(2002, b"k0002")], 2002)
        assert (export.applied_seq, export.format) == (2000, kind.name)
        assert export.size_estimate > 2000 * 50
        image = _image(export)
        export.close()
        export.close()  # idempotent
        copy = _open_image(kind, image, tmp_path / "copy")
        try:
            assert copy.digest() == expected
            assert copy.applied_seq() == 2000
            assert copy.get(b"k0002") == b"v" * 50
        finally:
            copy.close()
    finally:
        source.close()


def test_export_after_close_is_refused(store: Store) -> None:
    export = store.begin_export()
    export.close()
    if isinstance(store, LmdbStore):
        with pytest.raises(StoreError, match="export was closed"):
            export.write_to(1)
    store.close()
    with pytest.raises(StoreClosedError):
        store.begin_export()


def test_lmdb_close_waits_for_an_open_export(tmp_path: Path) -> None:
    store = LmdbStore.open(str(tmp_path / "s"), map_size_bytes=TEST_MAP_SIZE_BYTES)
    export = store.begin_export()
    closer = threading.Thread(target=store.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # the export's read transaction still uses the map
    export.close()
    closer.join(5)
    assert not closer.is_alive()


def test_memory_image_that_is_not_one_is_refused() -> None:
    with pytest.raises(ValueError, match="8-byte"):
        load_image(b"abc")
    with pytest.raises(ValueError, match="runs past the end"):
        load_image(struct.pack("<QI", 5, 100) + b"k")


def test_checkpoint_makes_applied_durable(store: Store) -> None:
    store.apply([put(7, b"k", b"v")], 7)
    assert store.durable_seq() <= store.applied_seq() == 7
    assert store.checkpoint() == 7
    assert store.durable_seq() == 7
    store.apply([put(8, b"k", b"w")], 8)
    assert store.durable_seq() <= 8
    assert store.checkpoint() == 8


def test_closed_store_refuses_calls(store: Store) -> None:
    store.close()
    store.close()  # idempotent
    calls: list[Callable[[], object]] = [
        store.applied_seq,
        store.stats,
        store.digest,
        store.checkpoint,
        lambda: store.get(b"k"),
        lambda: store.scan(b"", None, 1),
        lambda: store.apply([], 1),
    ]
    for call in calls:
        with pytest.raises(StoreClosedError):
            call()


_keys = st.sampled_from([b"a", b"b", b"ab", b"\x00", b"\xff", b"\xff\x00", b"m" * MAX_KEY_BYTES])
_ops = st.tuples(st.sampled_from([Op.PUT, Op.DELETE, Op.MERGE]), _keys, st.binary(max_size=8))


@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
@settings(max_examples=40, deadline=None)
@given(batches=st.lists(st.lists(_ops, max_size=12), max_size=8), bounds=st.tuples(_keys, _keys))
def test_random_batches_match_a_dict(
    kind: Kind, batches: list[list[tuple[Op, bytes, bytes]]], bounds: tuple[bytes, bytes]
) -> None:
    model: dict[bytes, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = kind.open(Path(tmp) / "store")
        try:
            seq = 0
            for batch in batches:
                entries = []
                for op, key, value in batch:
                    seq += 1
                    entries.append(Entry(seq, op, key, b"" if op == Op.DELETE else value))
                    if op == Op.DELETE:
                        model.pop(key, None)
                    else:
                        model[key] = value
                store.apply(entries, seq)
            assert everything(store) == sorted(model.items())
            for key in {b"a", b"b", b"ab", b"\x00", b"\xff", b"\xff\x00"}:
                assert store.get(key) == model.get(key)
            lo, hi = sorted(bounds)
            expected = [(k, v) for k, v in sorted(model.items()) if lo <= k < hi][:3]
            assert store.scan(lo, hi, 3) == expected
            assert store.stats().key_count == len(model)
            assert store.digest() == (seq, reference_digest(list(model.items())))
        finally:
            store.close()


# ---------------------------------------------------------------------------------------------
# LmdbStore only: the directory, its lock, open errors, fsync modes


def test_lmdb_second_open_is_refused_until_close(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    first = LmdbStore.open(path, map_size_bytes=TEST_MAP_SIZE_BYTES)
    with pytest.raises(StoreLockedError, match=path):
        LmdbStore.open(path, map_size_bytes=TEST_MAP_SIZE_BYTES)
    first.apply([put(1, b"k", b"v")], 1)  # the failed open disturbed nothing
    first.close()
    second = LmdbStore.open(path, map_size_bytes=TEST_MAP_SIZE_BYTES)
    try:
        assert second.get(b"k") == b"v"
    finally:
        second.close()


def test_lmdb_open_on_a_file_names_the_path(tmp_path: Path) -> None:
    file = tmp_path / "not-a-dir"
    file.write_bytes(b"x")
    for path in (file, file / "store"):
        with pytest.raises(StoreError, match=str(path)):
            LmdbStore.open(str(path), map_size_bytes=TEST_MAP_SIZE_BYTES)


def test_lmdb_corrupt_applied_seq_is_reported(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    LmdbStore.open(path, map_size_bytes=TEST_MAP_SIZE_BYTES).close()
    env = lmdb.open(path, max_dbs=2, map_size=TEST_MAP_SIZE_BYTES)
    with env.begin(write=True) as txn:
        txn.put(b"applied_seq", b"\x01\x02", db=env.open_db(b"meta", txn=txn))
    env.close()
    with pytest.raises(StoreError, match="applied_seq is 2 bytes"):
        LmdbStore.open(path, map_size_bytes=TEST_MAP_SIZE_BYTES)
    LmdbStore.open(path + "-other", map_size_bytes=TEST_MAP_SIZE_BYTES).close()


def test_lmdb_durable_seq_follows_sync_mode(tmp_path: Path) -> None:
    lazy = LmdbStore.open(str(tmp_path / "lazy"), map_size_bytes=TEST_MAP_SIZE_BYTES)
    eager = LmdbStore.open(
        str(tmp_path / "eager"), sync_each_txn=True, map_size_bytes=TEST_MAP_SIZE_BYTES
    )
    for s in (lazy, eager):
        s.apply([put(5, b"k", b"v")], 5)
    assert (lazy.durable_seq(), eager.durable_seq()) == (0, 5)
    lazy.close()
    eager.close()
    reopened = LmdbStore.open(str(tmp_path / "lazy"), map_size_bytes=TEST_MAP_SIZE_BYTES)
    try:
        assert reopened.durable_seq() == 5  # open syncs whatever it found
    finally:
        reopened.close()


def test_lmdb_full_map_is_a_store_error(tmp_path: Path) -> None:
    small = LmdbStore.open(str(tmp_path / "small"), map_size_bytes=256 * 1024)
    try:
        big = [put(i + 1, b"k%05d" % i, b"x" * 1000) for i in range(1000)]
        with pytest.raises(StoreError, match="full"):
            small.apply(big, len(big))
        assert (small.applied_seq(), small.stats().key_count) == (0, 0)
    finally:
        small.close()


def test_lmdb_close_waits_for_running_reads(tmp_path: Path) -> None:
    store = LmdbStore.open(str(tmp_path / "store"), map_size_bytes=TEST_MAP_SIZE_BYTES)
    rows = 20_000  # a scan takes milliseconds, so close() lands inside one
    store.apply([put(i + 1, b"k%05d" % i, b"v" * 100) for i in range(rows)], rows)
    errors: list[Exception] = []
    scanning = [threading.Event() for _ in range(2)]

    def reader(event: threading.Event) -> None:
        try:
            while True:
                assert len(store.scan(b"", None, rows)) == rows
                event.set()
        except StoreClosedError:
            pass  # the only way a read may end once close() begins
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(e,)) for e in scanning]
    for t in threads:
        t.start()
    for e in scanning:
        assert e.wait(5)
    store.close()
    for t in threads:
        t.join(5)
    assert errors == []
    assert not any(t.is_alive() for t in threads)


def test_lmdb_checkpoint_does_not_stall_applies(tmp_path: Path) -> None:
    """An msync of a large map takes long; applies must go on meanwhile (replication lag)."""
    store = LmdbStore.open(str(tmp_path), map_size_bytes=TEST_MAP_SIZE_BYTES)
    store.apply([Entry(1, Op.PUT, b"a", b"1")], 1)
    release = threading.Event()
    real_env = store._env

    class SlowSyncEnv:
        def __getattr__(self, name: str) -> object:
            return getattr(real_env, name)

        def sync(self, force: bool = False) -> None:
            assert release.wait(10), "the apply never ran while the checkpoint was syncing"
            real_env.sync(force)

    store._env = SlowSyncEnv()  # type: ignore[assignment]
    result: list[int] = []
    checkpoint = threading.Thread(target=lambda: result.append(store.checkpoint()))
    checkpoint.start()
    store.apply([Entry(2, Op.PUT, b"b", b"2")], 2)  # blocks here if the checkpoint held a lock
    release.set()
    checkpoint.join(10)
    assert result == [1]  # durable as of the start of the sync, never ahead of it
    assert store.durable_seq() == 1 and store.applied_seq() == 2
    store._env = real_env
    store.close()


# ------------------------------------------------------------------------------ LMDB on a full disk


def test_lmdb_reserves_disk_blocks_ahead_of_its_pages(tmp_path: Path) -> None:
    """Writes through the map into a sparse file would meet a full disk as SIGBUS; the store
    allocates the blocks ahead of its last page first."""
    store = LmdbStore.open(str(tmp_path), map_size_bytes=TEST_MAP_SIZE_BYTES)
    try:
        store.apply([Entry(1, Op.PUT, b"k", b"v" * 1000)], 1)
        allocated = os.stat(tmp_path / IMAGE_FILE).st_blocks * 512
        assert allocated >= RESERVE_BYTES
    finally:
        store.close()


def test_lmdb_on_a_full_disk_refuses_the_write_and_keeps_its_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LmdbStore.open(str(tmp_path), map_size_bytes=TEST_MAP_SIZE_BYTES)
    try:
        store.apply([Entry(1, Op.PUT, b"a", b"1")], 1)

        def full(fd: int, size: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(fsutil, "reserve", full)
        big = [Entry(2, Op.PUT, b"b", b"x" * (RESERVE_BYTES // 2))]
        with pytest.raises(StoreError, match=r"data\.mdb: cannot reserve .*No space left"):
            store.apply(big, 2)
        assert store.applied_seq() == 1 and store.get(b"b") is None
    finally:
        store.close()
