"""TxRegistry: limits on what open transactions may buffer, alone and together."""

from __future__ import annotations

import pytest

from kevo_repl.node.transactions import TransactionLimitError, TxLimits, TxRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_all_open_transactions_share_one_byte_budget() -> None:
    clock = Clock()
    limits = TxLimits(write_bytes_max=1000, total_write_bytes_max=1500)
    registry = TxRegistry(clock, limits)
    a, b = registry.begin(False), registry.begin(False)
    a.buffer(b"k", b"v" * 899, limits)  # 900 bytes: within a's own limit
    with pytest.raises(TransactionLimitError, match="limit for all of them is 1500"):
        b.buffer(b"k", b"v" * 699, limits)  # 700 more would make 1600 in all
    b.buffer(b"k", b"v" * 599, limits)  # 600: exactly 1500
    a.buffer(b"k", b"v" * 99, limits)  # a rewrite frees what it replaces: 100 + 600
    assert registry.buffered_bytes == 700
    registry.finish(a.id)  # a committed: its bytes come back
    assert registry.buffered_bytes == 600
    clock.now = limits.idle_s + 1
    assert registry.sweep() == [b.id]  # expired: its bytes come back too
    assert registry.buffered_bytes == 0
    c = registry.begin(False)
    c.buffer(b"k", b"v" * 999, limits)
    assert registry.buffered_bytes == 1000
