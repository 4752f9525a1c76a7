"""The `kevo-repl` command line. Errors become a message on stderr and a non-zero exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kevo_repl import __version__, walcli
from kevo_repl.errors import KevoReplError

EXIT_USAGE = 2


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a sequence number: {text!r}") from None
    if value < 0 or value >= 2**64:
        raise argparse.ArgumentTypeError(f"sequence number out of range: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kevo-repl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kevo-repl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    wal = sub.add_parser("wal", help="inspect and mend WAL files").add_subparsers(
        dest="wal_command", required=True
    )
    d = wal.add_parser("dump", help="print the entries of a WAL directory or file")
    d.add_argument("path")
    d.add_argument("--from", dest="from_seq", type=_seq, default=0, help="first sequence to print")
    d.add_argument("--json", action="store_true", help="one JSON object per entry per line")
    v = wal.add_parser("verify", help="check every record; exit 0 when clean")
    v.add_argument("path")
    r = wal.add_parser("repair", help="cut a torn tail, keeping the cut bytes beside the file")
    r.add_argument("path")

    demo = sub.add_parser("demo", help="show the WAL at work in a scratch directory")
    demo.add_argument("--dir", help="directory to use (default: a new temporary one)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except KevoReplError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `kevo-repl wal dump ... | head`
        return 0


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "wal":
        if args.wal_command == "dump":
            return walcli.dump(args.path, args.from_seq, args.json, sys.stdout)
        if args.wal_command == "verify":
            return walcli.verify(args.path, sys.stdout)
        return walcli.repair(args.path, sys.stdout)
    if args.command == "demo":
        from kevo_repl.demo import run_wal_demo

        return run_wal_demo(args.dir)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
