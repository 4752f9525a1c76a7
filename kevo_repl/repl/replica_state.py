"""The replica's state machine: a pure core decides, a driver (elsewhere) does the I/O.

Events go in through the ``on_*`` methods, work comes out as a list of `Action`s (etcd raft's
``Ready``). The core never touches the network, the disk or the clock: time is read from the
injected ``clock`` and randomness (backoff jitter) from the injected ``rng``, so a test with a
manual clock replays a run exactly.

States and their numbers are Kevo's (KEVO_COMPAT.md §2.7); every move between them is one entry of
`TRANSITIONS` (h11 style). A pair that is not in the table raises `ProtocolError` naming the state
and the event, so an impossible transition can never happen silently. Unlike Kevo's table, the
happy path is reachable::

    CONNECTING --connected--> WAITING_FOR_DATA --frame--> STREAMING_ENTRIES (validate)
      --new_units--> FSYNC_PENDING --fsynced--> APPLYING_ENTRIES --applied--> ACKNOWLEDGING
      --ack_sent (or ack_deferred)--> WAITING_FOR_DATA
    any state but ERROR --error--> ERROR --retry (after the Sleep)--> CONNECTING
    CONNECTING --bootstrap--> BOOTSTRAPPING --bootstrapped--> CONNECTING (from the snapshot)

STREAMING_ENTRIES is transient: `on_frame` enters it and leaves it in the same call, by one of the
core's own decisions (`CORE_EVENTS`): new_units, nothing_new (every unit was a duplicate) or error
(a gap). The history records it like any other state.

Positions, each monotonic, with ``applied_seq <= flushed_seq <= received_seq`` at all times:

* ``received_seq``: the last sequence handed to the replica's own WAL. It moves when the core
  emits `WriteUnits`: the driver executes the actions of one call in order before it feeds the
  next event, and a failed write or fsync of its own WAL is fatal for the driver (after a failed
  fsync nobody knows what the file holds; restart recovery does), never an `on_error`;
* ``flushed_seq``: fsynced there (`on_fsynced`);
* ``applied_seq``: visible in the store (`on_applied`).

Exactly once, in order: a frame's units are whole and consecutive. Units that end at or before
``received_seq`` are duplicates (a reconnect or a restart can resend them) and are dropped; the
first unit kept must start at ``received_seq + 1``, otherwise nothing of the frame is written and
the core goes to ERROR with `Rerequest` (Kevo's Nack) and reconnects from ``received_seq + 1``. A
unit that starts at or before ``received_seq`` but ends after it cannot come from a primary whose
log has the same unit boundaries as ours: that is a `ProtocolError`.

Restart: construct the core with ``received_seq`` = the last sequence the replica's WAL holds (M)
and ``applied_seq`` = the store's (N <= M). `start` asks the primary for M + 1 onwards: nothing the
WAL already holds is fetched again. The units N+1..M reach the store from the replica's own WAL:
the first `Apply` after the restart starts at N + 1, so the driver's apply reads that range back
from its WAL (as it would after any interrupted pipeline). A driver that wants the store current
before the primary answers replays N+1..M itself before constructing the core and passes
``applied_seq=M``.

Backoff: every entry into ERROR sleeps a capped exponential delay with full jitter,
``uniform(0, min(backoff_max_s, backoff_base_s * 2**(failures - 1)))``. ``failures`` counts
consecutive failures and goes back to 0 only when a frame was applied since the last connect,
so a primary that accepts connections and then fails every stream still backs off.

Liveness, checked on `on_tick`: a wait on the primary (CONNECTING, WAITING_FOR_DATA with no frame
or heartbeat, ACKNOWLEDGING with no answer) that lasts ``dead_after_s`` is an error. Time spent
on our own fsync and apply does not count as the primary's silence.

Acks are coalesced: after an apply the ack goes out at once if the previous one is at least
``ack_interval_s`` old, otherwise it is owed and the first tick after the interval sends it with
the positions of that moment.

Every call either returns its actions or raises `ProtocolError` and leaves the core unchanged.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import TypeAlias

from kevo_repl.errors import InvalidArgumentError, KevoReplError

# Same value as kevo_repl.wal.codec.MAX_SEQ (u64 on the wire), kept here so that this module
# imports nothing but the standard library and the error types (test_module_is_pure).
MAX_SEQ = 2**64 - 1
HISTORY_LEN = 64  # transitions kept for debugging; Kevo's history grows forever
_BACKOFF_EXPONENT_MAX = 64  # 2.0**64 is finite; the cap applies long before


# Acks are unary RPCs (Kevo's Acknowledge): one costs the primary ~350 us of CPU (measured:
# 2,222 acks/s took 0.77 of its core). At 10 ms a replica that applies continuously sent ~56 a
# second, 2% of a primary's core per replica. At 100 ms a primary with 16 replicas spends under
# 6% on them; positions on the primary (slots, status) are at most 100 ms (plus a tick) old.
ACK_INTERVAL_S = 0.1


class State(IntEnum):
    """Kevo's replica states, with Kevo's numbers (``pkg/replication/state.go``)."""

    CONNECTING = 0
    STREAMING_ENTRIES = 1
    APPLYING_ENTRIES = 2
    FSYNC_PENDING = 3
    ACKNOWLEDGING = 4
    WAITING_FOR_DATA = 5
    ERROR = 6
    BOOTSTRAPPING = 7  # ours: fetching a snapshot of the primary's store


class EventType(Enum):
    # Fed by the driver, one `on_*` method each.
    CONNECTED = "connected"
    FRAME = "frame"
    HEARTBEAT = "heartbeat"
    FSYNCED = "fsynced"
    APPLIED = "applied"
    ACK_SENT = "ack_sent"
    ERROR = "error"
    RETRY = "retry"
    TICK = "tick"
    BOOTSTRAP = "bootstrap"  # the primary cannot stream from our position: take a snapshot
    BOOTSTRAPPED = "bootstrapped"  # the snapshot is our store now
    # The core's own decisions, made inside the call that handles a driver event.
    NEW_UNITS = "new_units"  # a frame continues at received_seq + 1
    NOTHING_NEW = "nothing_new"  # every unit of a frame was already received
    ACK_DEFERRED = "ack_deferred"  # applied, but the previous ack is younger than ack_interval_s
    ACK_DUE = "ack_due"  # a tick found an owed ack whose interval has passed


CORE_EVENTS = frozenset(
    {EventType.NEW_UNITS, EventType.NOTHING_NEW, EventType.ACK_DEFERRED, EventType.ACK_DUE}
)
DRIVER_EVENTS = frozenset(EventType) - CORE_EVENTS

_S = State
_E = EventType

# The whole state machine. A pair that is missing is a ProtocolError. Self-loops are allowed
# moves that change no state (and are not recorded in the history).
TRANSITIONS: dict[tuple[State, EventType], State] = {
    (_S.CONNECTING, _E.CONNECTED): _S.WAITING_FOR_DATA,
    (_S.CONNECTING, _E.TICK): _S.CONNECTING,
    (_S.CONNECTING, _E.ERROR): _S.ERROR,
    (_S.WAITING_FOR_DATA, _E.FRAME): _S.STREAMING_ENTRIES,
    (_S.WAITING_FOR_DATA, _E.HEARTBEAT): _S.WAITING_FOR_DATA,
    (_S.WAITING_FOR_DATA, _E.ACK_DUE): _S.ACKNOWLEDGING,
    (_S.WAITING_FOR_DATA, _E.TICK): _S.WAITING_FOR_DATA,
    (_S.WAITING_FOR_DATA, _E.ERROR): _S.ERROR,
    (_S.STREAMING_ENTRIES, _E.NEW_UNITS): _S.FSYNC_PENDING,
    (_S.STREAMING_ENTRIES, _E.NOTHING_NEW): _S.WAITING_FOR_DATA,
    (_S.STREAMING_ENTRIES, _E.ERROR): _S.ERROR,  # a gap
    (_S.FSYNC_PENDING, _E.FSYNCED): _S.APPLYING_ENTRIES,
    (_S.FSYNC_PENDING, _E.TICK): _S.FSYNC_PENDING,
    (_S.FSYNC_PENDING, _E.ERROR): _S.ERROR,
    (_S.APPLYING_ENTRIES, _E.APPLIED): _S.ACKNOWLEDGING,
    (_S.APPLYING_ENTRIES, _E.TICK): _S.APPLYING_ENTRIES,
    (_S.APPLYING_ENTRIES, _E.ERROR): _S.ERROR,
    (_S.ACKNOWLEDGING, _E.ACK_SENT): _S.WAITING_FOR_DATA,
    (_S.ACKNOWLEDGING, _E.ACK_DEFERRED): _S.WAITING_FOR_DATA,
    (_S.ACKNOWLEDGING, _E.TICK): _S.ACKNOWLEDGING,
    (_S.ACKNOWLEDGING, _E.ERROR): _S.ERROR,
    (_S.ERROR, _E.RETRY): _S.CONNECTING,
    (_S.ERROR, _E.TICK): _S.ERROR,
    (_S.CONNECTING, _E.BOOTSTRAP): _S.BOOTSTRAPPING,
    (_S.BOOTSTRAPPING, _E.BOOTSTRAPPED): _S.CONNECTING,
    (_S.BOOTSTRAPPING, _E.TICK): _S.BOOTSTRAPPING,
    (_S.BOOTSTRAPPING, _E.ERROR): _S.ERROR,
}

# States in which the core waits on the primary, and what a too-long wait means.
_PRIMARY_WAITS = {
    State.CONNECTING: "no connection to the primary",
    State.WAITING_FOR_DATA: "primary silent",
    State.ACKNOWLEDGING: "no answer to the ack",
}


class ProtocolError(KevoReplError):
    """An event that is impossible in the current state, or a position that breaks an invariant.

    Raised before anything changes: the core is exactly as it was before the call.
    """

    def __init__(self, state: State, event: EventType | None, detail: str) -> None:
        where = (
            f"{event.value} in state {state.name}" if event is not None else f"state {state.name}"
        )
        super().__init__(f"replica protocol error: {where}: {detail}")
        self.state = state
        self.event = event
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Actions: the work the driver does, in the order given.


@dataclass(frozen=True, slots=True)
class Connect:
    """Open StreamWAL asking for entries from `start_seq` (inclusive); report `on_connected`."""

    start_seq: int


@dataclass(frozen=True, slots=True)
class WriteUnits:
    """Append the frame's units `units_first`..`units_last` to the replica's own WAL.

    Units of the frame that end at or before `drop_before` are duplicates and are not written.
    """

    units_first: int
    units_last: int
    drop_before: int


@dataclass(frozen=True, slots=True)
class Fsync:
    """Make the replica's WAL durable through `seq`; report `on_fsynced(seq)`."""

    seq: int


@dataclass(frozen=True, slots=True)
class Apply:
    """Apply the units `from_seq`..`up_to_seq` (from the replica's WAL) to the store.

    Usually exactly the frame just written; after a restart or an interrupted pipeline it starts
    earlier. Report `on_applied(up_to_seq)`.
    """

    from_seq: int
    up_to_seq: int


@dataclass(frozen=True, slots=True)
class SendAck:
    """Acknowledge these positions to the primary; report `on_ack_sent` (or `on_error`)."""

    received: int
    flushed: int
    applied: int


@dataclass(frozen=True, slots=True)
class Rerequest:
    """A gap: tell the primary (Nack) that `from_seq` is missing, best effort, before Disconnect."""

    from_seq: int


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Close the stream, or abandon the connection attempt."""

    reason: str


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """Fetch a snapshot of the primary's store and make it ours; report `on_bootstrapped(seq)`
    with the snapshot's sequence, or `on_error` (the old store stays as it was)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Sleep:
    """Back off until `until` on the core's clock, then call `on_retry`."""

    until: float


Action: TypeAlias = (
    Connect | WriteUnits | Fsync | Apply | SendAck | Rerequest | Disconnect | Sleep | Bootstrap
)


@dataclass(frozen=True, slots=True)
class Transition:
    """One recorded state change."""

    at: float
    source: State
    event: EventType
    target: State


class ReplicaCore:
    """The replica's decisions; see the module docstring for the contract with the driver."""

    def __init__(
        self,
        *,
        applied_seq: int,
        received_seq: int | None = None,
        clock: Callable[[], float],
        rng: random.Random,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 5.0,
        dead_after_s: float = 5.0,
        ack_interval_s: float = ACK_INTERVAL_S,
    ) -> None:
        received = applied_seq if received_seq is None else received_seq
        _check_args(applied_seq, received, backoff_base_s, backoff_max_s, dead_after_s)
        if not ack_interval_s >= 0:
            raise InvalidArgumentError(f"ack_interval_s must be >= 0, got {ack_interval_s}")
        self._clock = clock
        self._rng = rng
        self._backoff_base_s = backoff_base_s
        self._backoff_max_s = backoff_max_s
        self._dead_after_s = dead_after_s
        self._ack_interval_s = ack_interval_s

        self._state = State.CONNECTING
        self._started = False
        # Invariant: applied <= flushed <= received; each only grows. What the WAL holds at
        # construction is taken as durable: recovery read it back from disk.
        self._received = received
        self._flushed = received
        self._applied = applied_seq
        self._fsync_target: int | None = None  # set exactly while FSYNC_PENDING
        self._apply_target: int | None = None  # set exactly while APPLYING_ENTRIES
        self._primary_last: int | None = None
        self._last_error: str | None = None
        self._failures = 0  # consecutive; reset when a frame is applied
        self._primary_wait_since = 0.0  # start of the current wait on the primary
        self._last_ack_at = -math.inf
        self._ack_owed = False
        self._history: deque[Transition] = deque(maxlen=HISTORY_LEN)

    # ---------------------------------------------------------------- read-only view

    @property
    def state(self) -> State:
        return self._state

    @property
    def received_seq(self) -> int:
        return self._received

    @property
    def flushed_seq(self) -> int:
        return self._flushed

    @property
    def applied_seq(self) -> int:
        return self._applied

    @property
    def primary_last_seq(self) -> int | None:
        """The primary's last sequence as last reported, or None before any report."""
        return self._primary_last

    @property
    def lag_entries(self) -> int | None:
        """How many sequence numbers the store is behind the primary, or None if unknown."""
        if self._primary_last is None:
            return None
        return max(0, self._primary_last - self._applied)

    @property
    def last_error(self) -> str | None:
        return self._last_error

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def history(self) -> tuple[Transition, ...]:
        """The last `HISTORY_LEN` state changes, oldest first."""
        return tuple(self._history)

    # ---------------------------------------------------------------- driver events

    def start(self) -> list[Action]:
        if self._started:
            raise ProtocolError(self._state, None, "start() was already called")
        self._started = True
        self._primary_wait_since = self._clock()
        return [Connect(self._received + 1)]

    def on_connected(self) -> list[Action]:
        self._move(EventType.CONNECTED)
        self._primary_wait_since = self._clock()
        return []

    def on_frame(
        self,
        first_seq: int,
        last_seq: int,
        unit_bounds: Sequence[tuple[int, int]],
        *,
        primary_last_seq: int | None = None,
    ) -> list[Action]:
        """A frame of whole, consecutive units, each given as its (first_seq, last_seq)."""
        self._check(EventType.FRAME)
        kept = self._first_new_unit(first_seq, last_seq, unit_bounds)
        if primary_last_seq is not None:
            self._check_seq(EventType.FRAME, "primary_last_seq", primary_last_seq)
        now = self._clock()
        self._move(EventType.FRAME)
        self._primary_wait_since = now
        self._note_primary(max(last_seq, primary_last_seq or 0))
        if kept is None:
            self._move(EventType.NOTHING_NEW)
            return []
        first_new = unit_bounds[kept][0]
        expected = self._received + 1
        if first_new != expected:
            gap = f"gap: expected sequence {expected}, the frame continues at {first_new}"
            return self._fail(gap, rerequest=expected)
        self._move(EventType.NEW_UNITS)
        self._received = last_seq
        self._fsync_target = last_seq
        return [WriteUnits(first_new, last_seq, drop_before=expected - 1), Fsync(last_seq)]

    def on_heartbeat(self, primary_last_seq: int) -> list[Action]:
        self._check(EventType.HEARTBEAT)
        self._check_seq(EventType.HEARTBEAT, "primary_last_seq", primary_last_seq)
        self._move(EventType.HEARTBEAT)
        self._primary_wait_since = self._clock()
        self._primary_last = primary_last_seq
        return []

    def on_fsynced(self, seq: int) -> list[Action]:
        self._check(EventType.FSYNCED)
        if seq != self._fsync_target:
            raise ProtocolError(
                self._state,
                EventType.FSYNCED,
                f"fsynced({seq}) but Fsync({self._fsync_target}) is pending "
                f"(received_seq={self._received}, flushed_seq={self._flushed})",
            )
        self._move(EventType.FSYNCED)
        self._fsync_target = None
        self._flushed = seq
        self._apply_target = seq
        return [Apply(self._applied + 1, seq)]

    def on_applied(self, seq: int) -> list[Action]:
        self._check(EventType.APPLIED)
        if seq > self._flushed:
            raise ProtocolError(
                self._state,
                EventType.APPLIED,
                f"applied({seq}) is past flushed_seq {self._flushed}: "
                "a unit reaches the store only after the replica's WAL made it durable",
            )
        if seq != self._apply_target:
            raise ProtocolError(
                self._state,
                EventType.APPLIED,
                f"applied({seq}) but Apply up to {self._apply_target} is pending "
                f"(applied_seq={self._applied})",
            )
        now = self._clock()
        self._move(EventType.APPLIED)
        self._apply_target = None
        self._applied = seq
        self._failures = 0  # data flowed on this connection
        if now - self._last_ack_at >= self._ack_interval_s:
            return [self._send_ack(now)]
        self._move(EventType.ACK_DEFERRED)
        self._ack_owed = True
        self._primary_wait_since = now
        return []

    def on_ack_sent(self) -> list[Action]:
        self._move(EventType.ACK_SENT)
        self._primary_wait_since = self._clock()
        return []

    def on_error(self, reason: str) -> list[Action]:
        """The stream broke, the connect failed, the primary refused: back off, then retry."""
        return self._fail(reason)

    def on_bootstrap_needed(self, reason: str) -> list[Action]:
        """The primary refused to stream from our position and a snapshot can fix that (its WAL
        no longer reaches back to us, or our history diverged from its and the policy says
        rebuild)."""
        self._move(EventType.BOOTSTRAP)
        self._last_error = reason
        return [Disconnect(reason), Bootstrap(reason)]

    def on_bootstrapped(self, seq: int) -> list[Action]:
        """The store is now a snapshot at `seq` and the WAL is empty after it: every position
        starts again there (the one place they may go back: the old store is gone)."""
        self._check(EventType.BOOTSTRAPPED)
        self._check_seq(EventType.BOOTSTRAPPED, "seq", seq)
        self._move(EventType.BOOTSTRAPPED)
        self._received = self._flushed = self._applied = seq
        self._failures = 0
        self._last_error = None
        self._primary_wait_since = self._clock()
        return [Connect(seq + 1)]

    def on_retry(self) -> list[Action]:
        self._move(EventType.RETRY)
        self._primary_wait_since = self._clock()
        return [Connect(self._received + 1)]

    def on_tick(self) -> list[Action]:
        """Call periodically (at least every ack_interval_s, and well within dead_after_s)."""
        self._move(EventType.TICK)
        now = self._clock()
        waited_s = now - self._primary_wait_since
        what = _PRIMARY_WAITS.get(self._state)
        if what is not None and waited_s >= self._dead_after_s:
            return self._fail(f"{what} for {waited_s:.3f} s (dead_after_s={self._dead_after_s})")
        if (
            self._state is State.WAITING_FOR_DATA
            and self._ack_owed
            and now - self._last_ack_at >= self._ack_interval_s
        ):
            self._move(EventType.ACK_DUE)
            return [self._send_ack(now)]
        return []

    # ---------------------------------------------------------------- internals

    def _check(self, event: EventType) -> State:
        """The target of `event` in the current state; ProtocolError if there is none."""
        if not self._started:
            raise ProtocolError(self._state, event, "start() was not called")
        target = TRANSITIONS.get((self._state, event))
        if target is None:
            raise ProtocolError(self._state, event, "no such transition")
        return target

    def _move(self, event: EventType) -> None:
        target = self._check(event)
        if target is not self._state:
            self._history.append(Transition(self._clock(), self._state, event, target))
            self._state = target

    def _fail(self, reason: str, *, rerequest: int | None = None) -> list[Action]:
        now = self._clock()
        self._move(EventType.ERROR)
        self._last_error = reason
        self._fsync_target = None
        self._apply_target = None
        self._failures += 1
        exponent = min(self._failures - 1, _BACKOFF_EXPONENT_MAX)
        cap_s = min(self._backoff_max_s, self._backoff_base_s * 2.0**exponent)
        until = now + self._rng.uniform(0.0, cap_s)
        actions: list[Action] = [] if rerequest is None else [Rerequest(rerequest)]
        actions += [Disconnect(reason), Sleep(until)]
        return actions

    def _send_ack(self, now: float) -> SendAck:
        self._last_ack_at = now
        self._ack_owed = False
        self._primary_wait_since = now
        return SendAck(self._received, self._flushed, self._applied)

    def _note_primary(self, seq: int) -> None:
        if self._primary_last is None or seq > self._primary_last:
            self._primary_last = seq

    def _check_seq(self, event: EventType, name: str, value: int) -> None:
        if not 0 <= value <= MAX_SEQ:
            raise ProtocolError(self._state, event, f"{name} {value} is not a u64")

    def _first_new_unit(
        self, first_seq: int, last_seq: int, unit_bounds: Sequence[tuple[int, int]]
    ) -> int | None:
        """Index of the first unit past received_seq (None: all duplicates); checks the frame."""

        def bad(detail: str) -> ProtocolError:
            return ProtocolError(self._state, EventType.FRAME, detail)

        if not unit_bounds:
            raise bad("a frame holds at least one unit")
        if unit_bounds[0][0] != first_seq or unit_bounds[-1][1] != last_seq:
            raise bad(
                f"frame {first_seq}..{last_seq} does not match its units "
                f"{unit_bounds[0][0]}..{unit_bounds[-1][1]}"
            )
        previous_last = first_seq - 1
        for first, last in unit_bounds:
            if not 1 <= first <= last <= MAX_SEQ:
                raise bad(f"unit {first}..{last} is not a range of u64 sequences from 1")
            if first != previous_last + 1:
                raise bad(
                    f"unit {first}..{last} does not follow the unit ending at {previous_last}"
                )
            previous_last = last
        for index, (first, last) in enumerate(unit_bounds):
            if last <= self._received:
                continue  # a duplicate: dropped
            if first <= self._received:
                raise bad(
                    f"unit {first}..{last} overlaps received_seq {self._received} partially: "
                    "the primary's unit boundaries differ from ours"
                )
            return index
        return None


def _check_args(
    applied_seq: int,
    received_seq: int,
    backoff_base_s: float,
    backoff_max_s: float,
    dead_after_s: float,
) -> None:
    if not 0 <= applied_seq <= received_seq <= MAX_SEQ:
        raise InvalidArgumentError(
            f"need 0 <= applied_seq <= received_seq <= 2**64-1, "
            f"got applied_seq={applied_seq}, received_seq={received_seq}"
        )
    if not 0 < backoff_base_s <= backoff_max_s:
        raise InvalidArgumentError(
            f"need 0 < backoff_base_s <= backoff_max_s, got {backoff_base_s}, {backoff_max_s}"
        )
    if not dead_after_s > 0:
        raise InvalidArgumentError(f"dead_after_s must be > 0, got {dead_after_s}")
