"""Client transactions: buffered writes over read-committed data, committed as one WAL batch.

Pure bookkeeping (no I/O, time comes from an injected clock). No locks are taken: a transaction
only buffers, so an abandoned one costs memory until it expires, never a blocked writer (Kevo's
global lock leaks on two error paths).

Ids say whether a transaction is read-only (``tx-ro-…`` / ``tx-rw-…``). The python-kevo SDK sends a
read-only transaction's commit to a node that may never have seen it; committing or rolling back
an unknown *read-only* id therefore succeeds, since there is nothing to write.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from kevo_repl.errors import KevoReplError


class TransactionError(KevoReplError):
    """A transaction request that cannot be honoured (maps to FAILED_PRECONDITION)."""


class TransactionLimitError(KevoReplError):
    """Too many open transactions, or one grew too large (maps to RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True, slots=True)
class TxLimits:
    open_max: int = 1024
    writes_max: int = 10_000
    write_bytes_max: int = 64 * 1024 * 1024
    # All open transactions together: without it, open_max x write_bytes_max is 64 GiB.
    total_write_bytes_max: int = 256 * 1024 * 1024
    idle_s: float = 30.0
    age_read_write_s: float = 60.0
    age_read_only_s: float = 180.0


@dataclass(slots=True)
class _Budget:
    """Buffered bytes of all open transactions, shared by them and their registry."""

    used: int = 0


@dataclass(slots=True)
class Transaction:
    id: str
    read_only: bool
    created: float
    last_used: float
    writes: dict[bytes, bytes | None] = field(default_factory=dict)  # None marks a delete
    write_bytes: int = 0
    budget: _Budget = field(default_factory=_Budget)

    def buffer(self, key: bytes, value: bytes | None, limits: TxLimits) -> None:
        if self.read_only:
            verb = "write to" if value is not None else "delete in"
            raise TransactionError(f"cannot {verb} read-only transaction {self.id}")
        size = len(key) + (len(value) if value is not None else 0)
        # A rewrite of a buffered key replaces its bytes; it does not add to them.
        freed = len(key) + len(self.writes[key] or b"") if key in self.writes else 0
        if key not in self.writes and len(self.writes) >= limits.writes_max:
            raise TransactionLimitError(
                f"transaction {self.id} exceeds {limits.writes_max} buffered writes"
            )
        if self.write_bytes - freed + size > limits.write_bytes_max:
            raise TransactionLimitError(
                f"transaction {self.id} exceeds {limits.write_bytes_max} buffered bytes"
            )
        if self.budget.used - freed + size > limits.total_write_bytes_max:
            raise TransactionLimitError(
                f"open transactions already buffer {self.budget.used} bytes, the limit for all "
                f"of them is {limits.total_write_bytes_max}; commit or roll back some"
            )
        self.writes[key] = value
        self.write_bytes += size - freed
        self.budget.used += size - freed


class TxRegistry:
    def __init__(self, clock: Callable[[], float], limits: TxLimits | None = None) -> None:
        self._clock = clock
        self.limits = limits or TxLimits()
        self._open: dict[str, Transaction] = {}
        self._counter = itertools.count(1)
        self._nonce = secrets.token_hex(4)  # ids from an earlier run never match this run's
        self._budget = _Budget()

    @property
    def buffered_bytes(self) -> int:
        return self._budget.used

    def begin(self, read_only: bool) -> Transaction:
        if len(self._open) >= self.limits.open_max:
            self.sweep()  # only when full: the server sweeps every few seconds anyway
        if len(self._open) >= self.limits.open_max:
            raise TransactionLimitError(
                f"too many open transactions ({self.limits.open_max}); commit or roll back some"
            )
        kind = "ro" if read_only else "rw"
        now = self._clock()
        tx_id = f"tx-{kind}-{self._nonce}-{next(self._counter)}"
        tx = Transaction(tx_id, read_only, now, now, budget=self._budget)
        self._open[tx.id] = tx
        return tx

    def use(self, tx_id: str) -> Transaction:
        """The open transaction `tx_id`, its idle timer reset."""
        tx = self._open.get(tx_id)
        if tx is None or self._expired(tx, self._clock()):
            self._drop(tx_id)
            raise TransactionError(f"transaction not found: {tx_id}")
        tx.last_used = self._clock()
        return tx

    def finish(self, tx_id: str) -> Transaction | None:
        """Remove `tx_id`; None for an unknown read-only id (nothing to do), error otherwise."""
        tx = self._drop(tx_id)
        if tx is not None and not self._expired(tx, self._clock()):
            return tx
        if tx_id.startswith("tx-ro-"):
            return None
        raise TransactionError(f"transaction not found or already finished: {tx_id}")

    def sweep(self) -> list[str]:
        """Drop expired transactions; returns their ids."""
        now = self._clock()
        dead = [t.id for t in self._open.values() if self._expired(t, now)]
        for tx_id in dead:
            self._drop(tx_id)
        return dead

    def _drop(self, tx_id: str) -> Transaction | None:
        """Forget `tx_id` and give its buffered bytes back to the budget."""
        tx = self._open.pop(tx_id, None)
        if tx is not None:
            self._budget.used -= tx.write_bytes
        return tx

    def _expired(self, tx: Transaction, now: float) -> bool:
        age_max = self.limits.age_read_only_s if tx.read_only else self.limits.age_read_write_s
        return now - tx.last_used > self.limits.idle_s or now - tx.created > age_max
