"""Recovery under damage: the corruption matrix, a SIGKILL crash test, and the `wal` CLI."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from nodeproc import node_env, run_cli

from kevo_repl import walcli
from kevo_repl.cli import main
from kevo_repl.errors import CorruptionError
from kevo_repl.wal import WAL, Op, SyncMode, WalOptions
from kevo_repl.wal.segment import list_segments


def _build(path: Path, n: int = 20) -> tuple[Path, int]:
    """A one-segment log of n singles then a 3-entry batch; returns (file, offset of batch)."""
    with WAL.open(str(path), WalOptions(sync_mode=SyncMode.NONE)) as wal:
        for i in range(n):
            wal.append(Op.PUT, b"key%d" % i, b"value%d" % i)
        wal.sync()
        file = Path(wal.segment_paths()[-1])
        batch_at = file.stat().st_size
        wal.append_batch([(Op.PUT, b"a", b"1"), (Op.DELETE, b"b", b""), (Op.MERGE, b"c", b"3")])
    return file, batch_at


def test_last_unit_cut_at_every_byte_offset(tmp_path: Path) -> None:
    file, batch_at = _build(tmp_path / "src")
    full = file.read_bytes()
    for cut in range(batch_at, len(full)):
        work = tmp_path / f"cut{cut}"
        work.mkdir()
        (work / file.name).write_bytes(full[:cut])
        with WAL.open(str(work)) as wal:
            # The batch is dropped whole: no entry of it survives, and its sequence is reused.
            assert wal.last_seq == 20, cut
            assert wal.next_seq == 21
            assert [e.seq for e in wal.entries_from(1)] == list(range(1, 21))
            torn = wal.recovery.torn
        assert (work / file.name).stat().st_size == batch_at
        if cut == batch_at:
            assert torn is None
        else:
            assert torn is not None and torn.offset == batch_at and torn.bytes_cut == cut - batch_at
            assert Path(torn.kept_at).read_bytes() == full[batch_at:cut]


def test_fragmented_last_entry_cut_anywhere(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with WAL.open(str(src), WalOptions(sync_mode=SyncMode.NONE)) as wal:
        wal.append(Op.PUT, b"small", b"x")
        wal.sync()
        file = Path(wal.segment_paths()[-1])
        start = file.stat().st_size
        wal.append(Op.PUT, b"big", bytes(range(256)) * 400)  # ~100 KiB: FIRST, MIDDLEs, LAST
    full = file.read_bytes()
    for cut in range(start + 1, len(full), 997):
        work = tmp_path / f"cut{cut}"
        work.mkdir()
        (work / file.name).write_bytes(full[:cut])
        with WAL.open(str(work)) as wal:
            assert [e.key for e in wal.entries_from(1)] == [b"small"]
            assert wal.recovery.torn is not None and wal.recovery.torn.offset == start


def test_byte_flipped_mid_segment_is_corruption_naming_file_and_offset(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with WAL.open(str(src), WalOptions(sync_mode=SyncMode.NONE)) as wal:
        for i in range(10):
            wal.append(Op.PUT, b"k%d" % i, b"v" * 20)
        wal.sync()
        file = Path(wal.segment_paths()[-1])
        victim = file.stat().st_size
        wal.append(Op.PUT, b"victim", b"v" * 20)
        wal.sync()
        victim_end = file.stat().st_size
        for i in range(3000):  # > 64 KiB after the victim: a bad length cannot reach EOF
            wal.append(Op.PUT, b"after%d" % i, b"w" * 20)
    full = file.read_bytes()
    for pos in range(victim, victim_end):
        damaged = bytearray(full)
        damaged[pos] ^= 0x5A
        work = tmp_path / f"flip{pos}"
        work.mkdir()
        (work / file.name).write_bytes(bytes(damaged))
        with pytest.raises(CorruptionError) as info:
            WAL.open(str(work))
        assert info.value.path == str(work / file.name)
        assert info.value.offset == victim, (pos, str(info.value))
        assert f"offset {victim}" in str(info.value)


def test_invalid_record_type_mid_log(tmp_path: Path) -> None:
    file, _ = _build(tmp_path / "src")
    data = bytearray(file.read_bytes())
    data[6] = 9  # type byte of the very first record
    file.write_bytes(bytes(data))
    with pytest.raises(CorruptionError, match="invalid record type 9") as info:
        WAL.open(str(file.parent))
    assert info.value.offset == 0


CHILD = textwrap.dedent(
    """
    import sys
    from kevo_repl.wal import WAL, Op, SyncMode, WalOptions
    wal = WAL.open(sys.argv[1], WalOptions(sync_mode=SyncMode.IMMEDIATE, segment_bytes_max=65536))
    i = 0
    while True:
        if i % 7 == 3:
            ops = [(Op.PUT, b"b%d-%d" % (i, j), b"x" * (i % 50)) for j in range(3)]
            seq = wal.append_batch(ops)
            print("B", seq, i, flush=True)
        else:
            value = b"y" * (40000 if i % 31 == 0 else i % 100)
            seq = wal.append(Op.PUT, b"k%d" % i, value)
            print("S", seq, i, flush=True)
        i += 1
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_s", [0.3, 0.8, 1.5])
def test_sigkill_while_appending_loses_no_returned_append(
    tmp_path: Path, kill_after_s: float
) -> None:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    wal_dir = tmp_path / "wal"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(wal_dir)],
        stdout=subprocess.PIPE,
        env=node_env(),
        text=True,
    )
    time.sleep(kill_after_s)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    # Only newline-terminated lines: the kill may cut the last one.
    returned = [line.split() for line in out.split("\n")[:-1]]
    assert all(len(r) == 3 for r in returned)
    assert len(returned) > 10, "the child made too little progress to test anything"
    with WAL.open(str(wal_dir)) as wal:
        entries = {e.seq: e for e in wal.entries_from(1)}
        last = wal.last_seq
    for kind, seq_text, i_text in returned:
        seq, i = int(seq_text), int(i_text)
        if kind == "B":
            for j in range(3):
                assert entries[seq + j].key == b"b%d-%d" % (i, j)
        else:
            assert entries[seq].key == b"k%d" % i
    # Nothing is invented: the log is exactly 1..last, each entry what the child wrote.
    assert sorted(entries) == list(range(1, last + 1))
    for seq, entry in entries.items():
        assert entry.key.startswith((b"k", b"b")), seq


def test_cli_dump_json_and_from(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file, _ = _build(tmp_path / "w", n=3)
    with WAL.open(str(file.parent), WalOptions(sync_mode=SyncMode.NONE)) as wal:
        wal.append(Op.PUT, b"bin\xff", b"caf\xc3\xa9 \xfe")
    assert main(["wal", "dump", str(file.parent), "--from", "3", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["seq"] for r in rows] == [3, 4, 5, 6, 7]
    assert rows[0] == {"seq": 3, "op": "put", "key": "key2", "value": "value2", "batch": None}
    assert rows[1] == {"seq": 4, "op": "put", "key": "a", "value": "1", "batch": 4}
    assert rows[2] == {"seq": 5, "op": "delete", "key": "b", "batch": 4}
    assert rows[3]["op"] == "merge" and rows[3]["batch"] == 4
    assert rows[4] == {
        "seq": 7,
        "op": "put",
        "key": "bin\\xff",
        "value": "café \\xfe",
        "batch": None,
    }
    assert main(["wal", "dump", str(file)]) == 0  # a single file works too
    assert "4 put 'a' '1' [batch 4]" in capsys.readouterr().out


def test_cli_dump_stops_at_a_missing_segment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The files up to the one after the gap, then the gap named at that file, exit corrupt;
    nothing from the files after it."""
    wal_dir = tmp_path / "w"
    options = WalOptions(sync_mode=SyncMode.NONE, segment_bytes_max=4096)
    with WAL.open(str(wal_dir), options) as wal:
        for i in range(200):
            wal.append(Op.PUT, b"k%03d" % i, b"v" * 100)
    segments = [wal_dir / name for name in list_segments(str(wal_dir))]
    assert len(segments) >= 5
    segments[2].unlink()  # the third of several: files before and after it remain
    capsys.readouterr()
    assert main(["wal", "dump", str(wal_dir)]) == walcli.EXIT_CORRUPT
    captured = capsys.readouterr()
    dumped = [int(line.split()[0]) for line in captured.out.splitlines()]
    jumps = [(a, b) for a, b in itertools.pairwise(dumped) if b != a + 1]
    assert dumped[0] == 1 and len(jumps) == 1 and dumped[-1] < 200
    assert f"{segments[3]}: corruption: " in captured.err and "are missing" in captured.err


def test_cli_verify_and_repair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file, _ = _build(tmp_path / "w")
    assert main(["wal", "verify", str(file.parent)]) == 0
    capsys.readouterr()
    size = file.stat().st_size
    with open(file, "ab") as f:
        f.write(b"\x01\x02\x03")
    assert main(["wal", "verify", str(file.parent)]) == 1
    err = capsys.readouterr().err
    assert f"{file}: torn tail at offset {size}" in err
    assert main(["wal", "repair", str(file.parent)]) == 0
    out = capsys.readouterr().out
    assert f"cut a torn tail of 3 bytes at offset {size}" in out
    assert Path(f"{file}.torn-{size}").read_bytes() == b"\x01\x02\x03"
    assert main(["wal", "verify", str(file.parent)]) == 0
    data = bytearray(file.read_bytes())
    data[10] ^= 0xFF
    file.write_bytes(bytes(data))
    assert main(["wal", "verify", str(file.parent)]) == 3
    assert f"{file}: corruption at offset 0" in capsys.readouterr().err
    assert main(["wal", "repair", str(file.parent)]) == 3
    assert file.read_bytes() == bytes(data), "repair must not touch a corrupt log"


def test_cli_repair_refuses_directory_in_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with WAL.open(str(tmp_path)) as wal:
        wal.append(Op.PUT, b"k", b"v")
        assert main(["wal", "repair", str(tmp_path)]) == 4
    assert "in use" in capsys.readouterr().err


def test_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["wal", "dump", str(tmp_path / "missing")]) == 1
    assert "no such WAL directory or file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["wal", "dump", str(tmp_path), "--from", "-4"])
    assert info.value.code == 2
    assert "sequence number out of range" in capsys.readouterr().err
    assert list_segments(str(tmp_path)) == []


def test_cli_console_script_runs() -> None:
    out = run_cli("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("kevo-repl ")
