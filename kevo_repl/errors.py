"""The one error hierarchy of kevo-repl.

Everything we raise on purpose derives from `KevoReplError`. The edges translate: gRPC servicers map
these to status codes, the CLI maps them to a message and an exit code. Nothing inside the package
catches a bare `Exception` to hide a bug.
"""

from __future__ import annotations


class KevoReplError(Exception):
    """Root of every error kevo-repl raises deliberately."""


class ListenError(KevoReplError):
    """A server could not bind its address (in use, or not available)."""


class InvalidArgumentError(KevoReplError):
    """A caller passed something malformed or out of bounds."""


class ConfigError(KevoReplError):
    """A flag or configuration file is wrong."""


class WalError(KevoReplError):
    """Something about the write-ahead log."""


class WalClosedError(WalError):
    """The log was used after close()."""


class WalLockedError(WalError):
    """Another process holds the WAL directory."""


class CorruptionError(WalError):
    """Bytes on disk that are not a valid log, in a place where a crash cannot explain them."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt WAL at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class StateFileError(KevoReplError):
    """A node's replication state file (slots, history) cannot be read back."""

    def __init__(self, path: str, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupt state file at offset {offset}: {reason}")
        self.path = path
        self.offset = offset


class SequenceCompactedError(WalError):
    """The requested sequence number is older than the oldest entry the log still holds."""

    def __init__(self, requested: int, oldest: int) -> None:
        super().__init__(
            f"sequence {requested} is no longer in the WAL: "
            f"the oldest retained sequence is {oldest}"
        )
        self.requested = requested
        self.oldest = oldest
