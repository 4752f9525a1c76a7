"""The `kevo-repl` command line. Errors become a message on stderr and a non-zero exit code."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence

from kevo_repl import __version__, walcli
from kevo_repl.config import NodeConfig
from kevo_repl.errors import ConfigError, KevoReplError, ListenError, WalLockedError
from kevo_repl.store import StoreLockedError

EXIT_USAGE = 2
EXIT_LISTEN = 3
EXIT_IN_USE = 4


def _serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from kevo_repl.config import build, load_toml
    from kevo_repl.node.server import serve

    values = load_toml(args.config) if args.config else {}
    source = f"config file {args.config}" if args.config else "command line"
    for f in dataclasses.fields(NodeConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = given
    config = build(values, source)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(config))
    return 0


def _seq(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a sequence number: {text!r}") from None
    if value < 0 or value >= 2**64:
        raise argparse.ArgumentTypeError(f"sequence number out of range: {text}")
    return value


def _limit(text: str) -> int:
    """A scan limit: what the int32 field of ScanRequest holds (0: no limit)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"limit out of range 0..{2**31 - 1}: {text}")
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

    _add_serve(sub)
    _add_client_commands(sub)

    demo = sub.add_parser("demo", help="a primary and two replicas replicating, on loopback")
    demo.add_argument("--dir", help="directory to use (default: a new temporary one)")
    demo.add_argument(
        "--wal", action="store_true", help="show the WAL alone: group commit, recovery"
    )
    return parser


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = sub.add_parser("serve", help="run a node in the foreground until SIGTERM/SIGINT")
    serve.add_argument("--config", help="TOML file; flags given here override it")
    for f in dataclasses.fields(NodeConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            serve.add_argument(
                flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None
            )
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            serve.add_argument(flag, dest=f.name, type=kind, default=None, metavar=f.name.upper())


CLIENT_COMMANDS = ("put", "get", "delete", "scan", "status", "digest", "slots", "promote")


def _add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, helptext in (
        ("put", "write KEY=VALUE"),
        ("get", "read KEY"),
        ("delete", "delete KEY"),
        ("scan", "list keys"),
        ("status", "replication role, positions and lag of a node"),
        ("digest", "sha256 of a node's store at its applied sequence, to compare nodes"),
        ("slots", "a primary's replication slots: list them, or --drop one"),
        ("promote", "make a replica a primary: it stops following and takes writes"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--addr", required=True, help="HOST:PORT of a node")
        if name in ("put", "get", "delete"):
            p.add_argument("key")
        if name == "put":
            p.add_argument("value")
            p.add_argument("--sync", action="store_true", help="wait until the write is on disk")
        if name == "slots":
            p.add_argument("--drop", metavar="NODE_ID", help="forget this replica's slot")
        if name in ("status", "digest", "slots", "promote"):
            p.add_argument("--json", action="store_true", help="one JSON object")
        if name == "status":
            p.add_argument("--watch", action="store_true", help="repeat every second until ^C")
        if name == "scan":
            p.add_argument("--prefix", default="")
            p.add_argument("--start", default="")
            p.add_argument("--end", default="")
            p.add_argument("--limit", type=_limit, default=0)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (WalLockedError, StoreLockedError) as err:
        print(f"error: data directory in use: {err}", file=sys.stderr)
        return EXIT_IN_USE
    except KevoReplError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_LISTEN if isinstance(err, ListenError) else 1
    except BrokenPipeError:  # `kevo-repl wal dump ... | head`
        return 0
    except OSError as err:  # a directory or file the process cannot use: say which, no traceback
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # ^C in `status --watch` or before a node's loop is running
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "wal":
        if args.wal_command == "dump":
            return walcli.dump(args.path, args.from_seq, args.json, sys.stdout)
        if args.wal_command == "verify":
            return walcli.verify(args.path, sys.stdout)
        return walcli.repair(args.path, sys.stdout)
    if args.command == "serve":
        return _serve(args)
    if args.command in CLIENT_COMMANDS:
        from kevo_repl.client_cli import run_client

        return run_client(args)
    if args.command == "demo":
        from kevo_repl.demo import run_cluster_demo, run_wal_demo

        return run_wal_demo(args.dir) if args.wal else run_cluster_demo(args.dir)
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
