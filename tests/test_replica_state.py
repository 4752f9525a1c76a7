"""The replica state machine: its whole table, golden scenarios, backoff, liveness, a model."""

from __future__ import annotations

import ast
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kevo_repl.errors import InvalidArgumentError
from kevo_repl.repl import replica_state
from kevo_repl.repl.replica_state import (
    CORE_EVENTS,
    DRIVER_EVENTS,
    HISTORY_LEN,
    TRANSITIONS,
    Action,
    Apply,
    Bootstrap,
    Connect,
    Disconnect,
    EventType,
    Fsync,
    ProtocolError,
    ReplicaCore,
    Rerequest,
    SendAck,
    Sleep,
    State,
    WriteUnits,
)

S = State
E = EventType
DEAD_AFTER_S = 5.0
ACK_INTERVAL_S = 1 / 64  # binary fractions keep the manual clock's sums exact
TINY_S = 1 / 1024


class ManualClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class MaxRng(random.Random):
    """Jitter always at its top: uniform(0, cap) == cap, so delays show the cap itself."""

    def random(self) -> float:
        return 1.0


def make(
    clock: ManualClock | None = None,
    *,
    applied: int = 0,
    received: int | None = None,
    rng: random.Random | None = None,
    backoff_max_s: float = 5.0,
) -> ReplicaCore:
    return ReplicaCore(
        applied_seq=applied,
        received_seq=received,
        clock=clock or ManualClock(),
        rng=rng or MaxRng(),
        backoff_base_s=0.1,
        backoff_max_s=backoff_max_s,
        dead_after_s=DEAD_AFTER_S,
        ack_interval_s=ACK_INTERVAL_S,
    )


def single(seq: int) -> tuple[int, int, list[tuple[int, int]]]:
    """A frame holding the one unit `seq`."""
    return seq, seq, [(seq, seq)]


def state_of(core: ReplicaCore) -> State:
    """The state, hidden from mypy's narrowing of `core.state` across calls that change it."""
    return core.state


def snapshot(core: ReplicaCore) -> tuple[object, ...]:
    return (
        core.state,
        core.received_seq,
        core.flushed_seq,
        core.applied_seq,
        core.primary_last_seq,
        core.last_error,
        core.consecutive_failures,
        core.history,
    )


def moves(core: ReplicaCore, since: int = 0) -> list[tuple[State, EventType, State]]:
    return [(t.source, t.event, t.target) for t in core.history[since:]]


def full_cycle(core: ReplicaCore, clock: ManualClock, first: int, last: int) -> None:
    """Frame first..last (one unit), fsync, apply, ack; the clock moves past the ack interval."""
    clock.advance(1.0)
    core.on_frame(first, last, [(first, last)])
    core.on_fsynced(last)
    core.on_applied(last)
    core.on_ack_sent()


# ------------------------------------------------------------------------------- the table


def core_in(state: State, clock: ManualClock | None = None) -> ReplicaCore:
    """A started core resting in `state`, reached through the public API only.

    STREAMING_ENTRIES is transient (on_frame enters and leaves it), so no call leaves a core
    there; for it the state is set directly, to show that no driver event is accepted in it.
    """
    clock = clock or ManualClock()
    core = make(clock)
    core.start()
    if state is S.CONNECTING:
        return core
    if state is S.ERROR:
        core.on_error("test")
        return core
    if state is S.BOOTSTRAPPING:
        core.on_bootstrap_needed("test")
        return core
    core.on_connected()
    if state is S.STREAMING_ENTRIES:
        core._state = S.STREAMING_ENTRIES
        return core
    if state is S.WAITING_FOR_DATA:
        return core
    core.on_frame(*single(1))
    if state is S.FSYNC_PENDING:
        return core
    core.on_fsynced(1)
    if state is S.APPLYING_ENTRIES:
        return core
    core.on_applied(1)
    assert state is S.ACKNOWLEDGING, state
    return core


def fire(core: ReplicaCore, event: EventType) -> list[Action]:
    """Feed a driver event with arguments that are valid whenever the event is."""
    after = core.received_seq + 1
    calls: dict[EventType, Callable[[], list[Action]]] = {
        E.CONNECTED: core.on_connected,
        E.FRAME: lambda: core.on_frame(*single(after)),
        E.HEARTBEAT: lambda: core.on_heartbeat(after),
        E.FSYNCED: lambda: core.on_fsynced(core.received_seq),
        E.APPLIED: lambda: core.on_applied(core.flushed_seq),
        E.ACK_SENT: core.on_ack_sent,
        E.ERROR: lambda: core.on_error("test"),
        E.RETRY: core.on_retry,
        E.TICK: core.on_tick,
        E.BOOTSTRAP: lambda: core.on_bootstrap_needed("test"),
        E.BOOTSTRAPPED: lambda: core.on_bootstrapped(5),
    }
    return calls[event]()


def drive_core_event(state: State, event: EventType) -> ReplicaCore:
    """Make the core take its own decision `event` from `state`, through public calls."""
    clock = ManualClock()
    core = core_in(S.WAITING_FOR_DATA, clock)
    if (state, event) == (S.STREAMING_ENTRIES, E.NEW_UNITS):
        core.on_frame(*single(1))
        return core
    if (state, event) == (S.STREAMING_ENTRIES, E.NOTHING_NEW):
        full_cycle(core, clock, 1, 1)
        core.on_frame(*single(1))
        return core
    full_cycle(core, clock, 1, 1)
    core.on_frame(*single(2))  # no time passes: the next ack is not due yet
    core.on_fsynced(2)
    core.on_applied(2)
    if (state, event) == (S.ACKNOWLEDGING, E.ACK_DEFERRED):
        return core
    clock.advance(ACK_INTERVAL_S)
    core.on_tick()
    if (state, event) == (S.WAITING_FOR_DATA, E.ACK_DUE):
        return core
    raise AssertionError(f"no scenario for the core's decision {event.value} in {state.name}")


ALL_PAIRS = [(state, event) for state in State for event in EventType]


@pytest.mark.parametrize(("state", "event"), ALL_PAIRS, ids=lambda x: x.name)
def test_every_pair_lands_on_its_target_or_raises(state: State, event: EventType) -> None:
    target = TRANSITIONS.get((state, event))
    if event in CORE_EVENTS:
        if target is None:
            core = core_in(state)
            before = snapshot(core)
            with pytest.raises(ProtocolError) as info:
                core._move(event)
            assert (info.value.state, info.value.event) == (state, event)
            assert snapshot(core) == before
        else:
            assert (state, event, target) in moves(drive_core_event(state, event))
        return
    core = core_in(state)
    before = snapshot(core)
    if target is None:
        with pytest.raises(ProtocolError) as info:
            fire(core, event)
        assert (info.value.state, info.value.event) == (state, event)
        assert state.name in str(info.value)
        assert event.value in str(info.value)
        assert snapshot(core) == before
        return
    recorded = len(core.history)
    fire(core, event)
    if target is state:  # a self-loop changes nothing and is not recorded
        assert core.state is state
        assert len(core.history) == recorded
    else:
        assert moves(core, recorded)[0] == (state, event, target)


def test_events_are_split_into_driver_and_core_events() -> None:
    assert set(DRIVER_EVENTS) | set(CORE_EVENTS) == set(EventType)
    assert not DRIVER_EVENTS & CORE_EVENTS


def test_every_state_is_reachable_and_can_be_left() -> None:
    reached, frontier = {S.CONNECTING}, [S.CONNECTING]
    while frontier:
        source = frontier.pop()
        for (state, _), target in TRANSITIONS.items():
            if state is source and target not in reached:
                reached.add(target)
                frontier.append(target)
    assert reached == set(State)
    for state in State:
        assert any(s is state and t is not state for (s, _), t in TRANSITIONS.items()), state


def test_state_numbers_are_kevos() -> None:
    assert [(s.name, s.value) for s in State] == [
        ("CONNECTING", 0),
        ("STREAMING_ENTRIES", 1),
        ("APPLYING_ENTRIES", 2),
        ("FSYNC_PENDING", 3),
        ("ACKNOWLEDGING", 4),
        ("WAITING_FOR_DATA", 5),
        ("ERROR", 6),
        ("BOOTSTRAPPING", 7),  # ours, after Kevo's
    ]


def test_every_state_but_error_can_fail_and_error_only_retries() -> None:
    for state in State:
        if state is not S.ERROR:
            assert TRANSITIONS[(state, E.ERROR)] is S.ERROR
    assert {e for (s, e) in TRANSITIONS if s is S.ERROR} == {E.RETRY, E.TICK}


def test_events_before_start_and_a_second_start_raise() -> None:
    core = make()
    with pytest.raises(ProtocolError, match="start"):
        core.on_connected()
    assert core.start() == [Connect(1)]
    with pytest.raises(ProtocolError, match="already"):
        core.start()


def test_module_is_pure() -> None:
    tree = ast.parse(Path(replica_state.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    assert imported <= {
        "__future__",
        "math",
        "random",
        "collections",
        "collections.abc",
        "dataclasses",
        "enum",
        "typing",
        "kevo_repl.errors",
    }, imported


# ------------------------------------------------------------------------------- scenarios


def test_happy_path_golden() -> None:
    clock = ManualClock(100.0)
    core = make(clock)
    log: list[tuple[str, list[Action]]] = []
    log.append(("start", core.start()))
    log.append(("connected", core.on_connected()))
    log.append(("frame 1..3", core.on_frame(1, 3, [(1, 1), (2, 3)])))
    log.append(("fsynced 3", core.on_fsynced(3)))
    log.append(("applied 3", core.on_applied(3)))
    log.append(("ack sent", core.on_ack_sent()))
    clock.advance(0.5)
    log.append(("heartbeat 9", core.on_heartbeat(9)))
    log.append(("frame 4..7", core.on_frame(4, 7, [(4, 4), (5, 6), (7, 7)])))
    log.append(("fsynced 7", core.on_fsynced(7)))
    log.append(("applied 7", core.on_applied(7)))
    log.append(("ack sent", core.on_ack_sent()))
    assert log == [
        ("start", [Connect(1)]),
        ("connected", []),
        ("frame 1..3", [WriteUnits(1, 3, drop_before=0), Fsync(3)]),
        ("fsynced 3", [Apply(1, 3)]),
        ("applied 3", [SendAck(received=3, flushed=3, applied=3)]),
        ("ack sent", []),
        ("heartbeat 9", []),
        ("frame 4..7", [WriteUnits(4, 7, drop_before=3), Fsync(7)]),
        ("fsynced 7", [Apply(4, 7)]),
        ("applied 7", [SendAck(received=7, flushed=7, applied=7)]),
        ("ack sent", []),
    ]
    cycle = [
        (S.WAITING_FOR_DATA, E.FRAME, S.STREAMING_ENTRIES),
        (S.STREAMING_ENTRIES, E.NEW_UNITS, S.FSYNC_PENDING),
        (S.FSYNC_PENDING, E.FSYNCED, S.APPLYING_ENTRIES),
        (S.APPLYING_ENTRIES, E.APPLIED, S.ACKNOWLEDGING),
        (S.ACKNOWLEDGING, E.ACK_SENT, S.WAITING_FOR_DATA),
    ]
    assert moves(core) == [(S.CONNECTING, E.CONNECTED, S.WAITING_FOR_DATA), *cycle, *cycle]
    assert [t.at for t in core.history] == [100.0] * 6 + [100.5] * 5
    assert (core.received_seq, core.flushed_seq, core.applied_seq) == (7, 7, 7)
    assert (core.primary_last_seq, core.lag_entries, core.last_error) == (9, 2, None)


def test_acks_are_coalesced_within_the_interval() -> None:
    clock = ManualClock()
    core = core_in(S.WAITING_FOR_DATA, clock)
    full_cycle(core, clock, 1, 1)
    core.on_frame(*single(2))
    core.on_fsynced(2)
    assert core.on_applied(2) == []  # the ack for 1 went out less than ack_interval_s ago
    assert core.state is S.WAITING_FOR_DATA
    clock.advance(ACK_INTERVAL_S / 2)
    assert core.on_tick() == []
    clock.advance(ACK_INTERVAL_S / 2)
    assert core.on_tick() == [SendAck(2, 2, 2)]
    assert state_of(core) is S.ACKNOWLEDGING
    core.on_ack_sent()
    clock.advance(1.0)
    assert core.on_tick() == []  # nothing owed any more


def test_duplicate_frame_after_reconnect_is_skipped() -> None:
    clock = ManualClock()
    core = core_in(S.WAITING_FOR_DATA, clock)
    full_cycle(core, clock, 1, 3)
    core.on_error("stream broken")
    assert core.on_retry() == [Connect(4)]
    core.on_connected()
    since = len(core.history)
    assert core.on_frame(1, 3, [(1, 1), (2, 3)]) == []  # everything already received
    assert moves(core, since) == [
        (S.WAITING_FOR_DATA, E.FRAME, S.STREAMING_ENTRIES),
        (S.STREAMING_ENTRIES, E.NOTHING_NEW, S.WAITING_FOR_DATA),
    ]
    assert (core.received_seq, core.applied_seq) == (3, 3)
    # a frame that repeats a prefix writes only what is new
    assert core.on_frame(2, 5, [(2, 3), (4, 5)]) == [WriteUnits(4, 5, drop_before=3), Fsync(5)]


def test_gap_rerequests_and_writes_nothing_past_it() -> None:
    clock = ManualClock()
    core = core_in(S.WAITING_FOR_DATA, clock)
    full_cycle(core, clock, 1, 3)
    actions = core.on_frame(6, 8, [(6, 8)])
    assert actions[:2] == [
        Rerequest(4),
        Disconnect("gap: expected sequence 4, the frame continues at 6"),
    ]
    assert isinstance(actions[2], Sleep)
    assert len(actions) == 3
    assert core.state is S.ERROR
    assert (core.received_seq, core.flushed_seq, core.applied_seq) == (3, 3, 3)
    assert core.last_error is not None and "gap" in core.last_error
    clock.advance(10.0)
    assert core.on_retry() == [Connect(4)]


def test_partial_overlap_is_a_protocol_error_and_changes_nothing() -> None:
    clock = ManualClock()
    core = core_in(S.WAITING_FOR_DATA, clock)
    full_cycle(core, clock, 1, 3)
    before = snapshot(core)
    with pytest.raises(ProtocolError, match="partially"):
        core.on_frame(2, 5, [(2, 5)])
    assert snapshot(core) == before


@pytest.mark.parametrize(
    ("first", "last", "units", "message"),
    [
        (4, 4, [], "at least one unit"),
        (4, 6, [(4, 5)], "does not match"),
        (4, 8, [(4, 5), (7, 8)], "does not follow"),
        (4, 8, [(4, 6), (5, 8)], "does not follow"),
        (5, 4, [(5, 4)], "not a range"),
        (0, 0, [(0, 0)], "not a range"),
        (4, 2**64, [(4, 2**64)], "not a range"),
    ],
)
def test_malformed_frames_are_protocol_errors(
    first: int, last: int, units: list[tuple[int, int]], message: str
) -> None:
    clock = ManualClock()
    core = core_in(S.WAITING_FOR_DATA, clock)
    full_cycle(core, clock, 1, 3)
    before = snapshot(core)
    with pytest.raises(ProtocolError, match=message):
        core.on_frame(first, last, units)
    assert snapshot(core) == before


def test_out_of_order_completions_are_protocol_errors() -> None:
    core = core_in(S.FSYNC_PENDING)  # Fsync(1) pending
    before = snapshot(core)
    for wrong in (0, 2):
        with pytest.raises(ProtocolError, match=r"Fsync\(1\) is pending"):
            core.on_fsynced(wrong)
        assert snapshot(core) == before
    core.on_fsynced(1)  # Apply(1, 1) pending
    before = snapshot(core)
    with pytest.raises(ProtocolError, match="past flushed_seq 1"):
        core.on_applied(2)
    with pytest.raises(ProtocolError, match="up to 1 is pending"):
        core.on_applied(0)
    assert snapshot(core) == before


def test_an_interrupted_pipeline_reconnects_after_the_wal_and_applies_the_rest_later() -> None:
    clock = ManualClock()
    core = core_in(S.FSYNC_PENDING, clock)  # unit 1 written, its fsync pending
    core.on_error("stream broken")
    assert (core.received_seq, core.flushed_seq, core.applied_seq) == (1, 0, 0)
    assert core.on_retry() == [Connect(2)]
    core.on_connected()
    assert core.on_frame(*single(2)) == [WriteUnits(2, 2, drop_before=1), Fsync(2)]
    assert core.on_fsynced(2) == [Apply(1, 2)]


def test_history_is_bounded() -> None:
    clock = ManualClock()
    core = core_in(S.WAITING_FOR_DATA, clock)
    for seq in range(1, 31):  # 5 state changes each
        full_cycle(core, clock, seq, seq)
    assert len(core.history) == HISTORY_LEN
    assert moves(core)[-1] == (S.ACKNOWLEDGING, E.ACK_SENT, S.WAITING_FOR_DATA)
    assert core.history[-1].at == clock.now


# ------------------------------------------------------------------------------- backoff


def sleep_after_error(core: ReplicaCore, clock: ManualClock, reason: str = "down") -> float:
    actions = core.on_error(reason)
    assert actions[0] == Disconnect(reason)
    sleep = actions[-1]
    assert isinstance(sleep, Sleep)
    return sleep.until - clock.now


def test_backoff_doubles_up_to_the_cap() -> None:
    clock = ManualClock()
    core = make(clock, backoff_max_s=1.0)
    core.start()
    delays = []
    for _ in range(7):  # connects that keep failing
        delay = sleep_after_error(core, clock)
        delays.append(delay)
        clock.advance(delay)
        core.on_retry()
    assert delays == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])
    assert core.consecutive_failures == 7


def test_backoff_exponent_cannot_overflow() -> None:
    clock = ManualClock()
    core = make(clock)
    core.start()
    for _ in range(2000):
        delay = sleep_after_error(core, clock)
        core.on_retry()
    assert delay == pytest.approx(5.0)


def test_backoff_jitter_is_full_and_within_the_cap() -> None:
    clock = ManualClock()
    core = make(clock, rng=random.Random(7), backoff_max_s=1.0)
    core.start()
    ratios = []
    for failure in range(1, 301):
        cap = min(1.0, 0.1 * 2 ** (failure - 1))
        delay = sleep_after_error(core, clock)
        assert 0.0 <= delay <= cap
        ratios.append(delay / cap)
        core.on_retry()
    assert min(ratios) < 0.1
    assert max(ratios) > 0.9


def test_backoff_resets_only_after_a_frame_was_applied() -> None:
    clock = ManualClock()
    core = make(clock)
    core.start()
    assert sleep_after_error(core, clock) == pytest.approx(0.1)
    core.on_retry()
    core.on_connected()  # connecting alone proves nothing
    assert sleep_after_error(core, clock) == pytest.approx(0.2)
    core.on_retry()
    core.on_connected()
    core.on_heartbeat(0)  # neither does a heartbeat
    assert sleep_after_error(core, clock) == pytest.approx(0.4)
    core.on_retry()
    core.on_connected()
    core.on_frame(*single(1))
    core.on_fsynced(1)  # written and durable, but not yet applied
    assert sleep_after_error(core, clock) == pytest.approx(0.8)
    core.on_retry()
    core.on_connected()
    core.on_frame(*single(1))  # only a duplicate now: no data flowed
    assert sleep_after_error(core, clock) == pytest.approx(1.6)
    core.on_retry()
    core.on_connected()
    full_cycle(core, clock, 2, 2)
    assert core.consecutive_failures == 0
    assert sleep_after_error(core, clock) == pytest.approx(0.1)


# ------------------------------------------------------------------------------- liveness


def test_silent_primary_is_dead_and_heartbeats_keep_it_alive() -> None:
    clock = ManualClock()
    core = core_in(S.WAITING_FOR_DATA, clock)
    clock.advance(DEAD_AFTER_S - TINY_S)
    assert core.on_tick() == []
    core.on_heartbeat(0)
    clock.advance(DEAD_AFTER_S - TINY_S)
    assert core.on_tick() == []
    assert core.state is S.WAITING_FOR_DATA
    clock.advance(TINY_S)
    actions = core.on_tick()
    assert state_of(core) is S.ERROR
    assert [type(a) for a in actions] == [Disconnect, Sleep]
    assert core.last_error == "primary silent for 5.000 s (dead_after_s=5.0)"


def test_our_own_fsync_and_apply_time_is_not_silence() -> None:
    clock = ManualClock()
    core = core_in(S.WAITING_FOR_DATA, clock)
    core.on_frame(*single(1))
    clock.advance(100.0)
    assert core.on_tick() == []
    core.on_fsynced(1)
    clock.advance(100.0)
    assert core.on_tick() == []
    core.on_applied(1)
    core.on_ack_sent()
    clock.advance(DEAD_AFTER_S - TINY_S)
    assert core.on_tick() == []
    assert core.state is S.WAITING_FOR_DATA


@pytest.mark.parametrize(
    ("state", "what"),
    [(S.CONNECTING, "no connection to the primary"), (S.ACKNOWLEDGING, "no answer to the ack")],
)
def test_waits_on_the_primary_time_out(state: State, what: str) -> None:
    clock = ManualClock()
    core = core_in(state, clock)
    clock.advance(DEAD_AFTER_S - TINY_S)
    assert core.on_tick() == []
    clock.advance(TINY_S)
    core.on_tick()
    assert core.state is S.ERROR
    assert core.last_error is not None and core.last_error.startswith(what)


def test_ticks_in_error_do_nothing_and_retry_connects() -> None:
    clock = ManualClock()
    core = core_in(S.ERROR, clock)
    clock.advance(1000.0)
    assert core.on_tick() == []
    assert core.state is S.ERROR
    assert core.on_retry() == [Connect(1)]


# ------------------------------------------------------------------------------- restart


def test_restart_asks_for_what_the_wal_lacks_and_applies_from_the_store() -> None:
    clock = ManualClock()
    core = make(clock, applied=5, received=9)
    assert (core.applied_seq, core.flushed_seq, core.received_seq) == (5, 9, 9)
    assert core.start() == [Connect(10)]
    core.on_connected()
    assert core.on_frame(8, 11, [(8, 9), (10, 11)]) == [
        WriteUnits(10, 11, drop_before=9),
        Fsync(11),
    ]
    assert core.on_fsynced(11) == [Apply(6, 11)]  # 6..9 come from the replica's own WAL
    assert core.on_applied(11) == [SendAck(11, 11, 11)]


@pytest.mark.parametrize(
    ("kwargs"),
    [
        {"applied_seq": 5, "received_seq": 4},
        {"applied_seq": -1},
        {"applied_seq": 0, "received_seq": 2**64},
        {"applied_seq": 0, "backoff_base_s": 0.0},
        {"applied_seq": 0, "backoff_base_s": 6.0},
        {"applied_seq": 0, "dead_after_s": 0.0},
        {"applied_seq": 0, "ack_interval_s": -1.0},
    ],
)
def test_bad_construction_is_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidArgumentError):
        ReplicaCore(clock=ManualClock(), rng=MaxRng(), **kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- stateful model

DATA_ACTIONS = (Connect, WriteUnits, Fsync, Apply, Rerequest)


class ReplicaAgainstModel(RuleBasedStateMachine):
    """The core against a dumb model, under random frames, errors, retries, ticks and completions.

    The primary's log is a list of consecutive units; the network delivers any slice of it
    (in order, repeated, ahead, behind).
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = ManualClock()
        self.core = ReplicaCore(
            applied_seq=0,
            clock=self.clock,
            rng=random.Random(1),
            dead_after_s=DEAD_AFTER_S,
            ack_interval_s=ACK_INTERVAL_S,
        )
        self.units: list[tuple[int, int]] = []
        self.written: list[WriteUnits] = []
        self.want_received = self.want_flushed = self.want_applied = 0
        self.fsync_pending: int | None = None
        self.apply_pending: int | None = None
        self.last_positions = (0, 0, 0)
        assert self.core.start() == [Connect(1)]

    def record(self, actions: list[Action]) -> list[Action]:
        self.written += [a for a in actions if isinstance(a, WriteUnits)]
        if any(isinstance(a, Disconnect) for a in actions):  # this call went to ERROR
            assert self.core.state is S.ERROR
            assert [type(a) for a in actions][-2:] == [Disconnect, Sleep]
            self.fsync_pending = self.apply_pending = None
        return actions

    @rule(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4))
    def primary_appends(self, sizes: list[int]) -> None:
        for size in sizes:
            first = self.units[-1][1] + 1 if self.units else 1
            self.units.append((first, first + size - 1))

    @precondition(lambda self: self.core.state is S.CONNECTING)
    @rule()
    def connected(self) -> None:
        assert self.core.on_connected() == []

    @precondition(lambda self: self.core.state is S.WAITING_FOR_DATA and self.units)
    @rule(in_order=st.booleans(), start=st.integers(0, 10**6), count=st.integers(1, 5))
    def frame(self, in_order: bool, start: int, count: int) -> None:
        starts = [u[0] for u in self.units]
        if in_order and self.want_received + 1 in starts:
            start = starts.index(self.want_received + 1)
        start %= len(self.units)
        units = self.units[start : start + count]
        kept = [u for u in units if u[1] > self.want_received]
        expected: list[Action]
        if not kept:
            expected, state = [], S.WAITING_FOR_DATA
        elif kept[0][0] == self.want_received + 1:
            expected = [
                WriteUnits(kept[0][0], units[-1][1], self.want_received),
                Fsync(units[-1][1]),
            ]
            state = S.FSYNC_PENDING
            self.want_received = self.fsync_pending = units[-1][1]
        else:
            expected, state = [Rerequest(self.want_received + 1)], S.ERROR
        actions = self.record(self.core.on_frame(units[0][0], units[-1][1], units))
        assert [a for a in actions if isinstance(a, DATA_ACTIONS)] == expected
        assert self.core.state is state

    @precondition(lambda self: self.core.state is S.WAITING_FOR_DATA and self.want_received > 0)
    @rule(data=st.data())
    def overlapping_frame(self, data: st.DataObject) -> None:
        first = data.draw(st.integers(1, self.want_received))
        last = data.draw(st.integers(self.want_received + 1, self.want_received + 3))
        before = snapshot(self.core)
        with pytest.raises(ProtocolError):
            self.core.on_frame(first, last, [(first, last)])
        assert snapshot(self.core) == before

    @precondition(lambda self: self.core.state is S.FSYNC_PENDING)
    @rule()
    def fsynced(self) -> None:
        assert self.fsync_pending is not None
        actions = self.record(self.core.on_fsynced(self.fsync_pending))
        assert actions == [Apply(self.want_applied + 1, self.fsync_pending)]
        self.want_flushed = self.apply_pending = self.fsync_pending
        self.fsync_pending = None

    @precondition(lambda self: self.core.state is S.APPLYING_ENTRIES)
    @rule()
    def applied(self) -> None:
        assert self.apply_pending is not None
        actions = self.record(self.core.on_applied(self.apply_pending))
        self.want_applied = self.apply_pending
        self.apply_pending = None
        assert actions in ([], [SendAck(self.want_received, self.want_flushed, self.want_applied)])

    @precondition(lambda self: self.core.state is S.ACKNOWLEDGING)
    @rule()
    def ack_sent(self) -> None:
        assert self.core.on_ack_sent() == []

    @precondition(lambda self: self.core.state is S.WAITING_FOR_DATA)
    @rule()
    def heartbeat(self) -> None:
        assert self.core.on_heartbeat(self.units[-1][1] if self.units else 0) == []

    @rule(seconds=st.sampled_from([0.0, TINY_S, ACK_INTERVAL_S, 1.0, DEAD_AFTER_S]))
    def tick(self, seconds: float) -> None:
        self.clock.advance(seconds)
        actions = self.record(self.core.on_tick())
        assert actions in (
            [],
            [SendAck(self.want_received, self.want_flushed, self.want_applied)],
        ) or (self.core.state is S.ERROR)

    @precondition(lambda self: self.core.state is not S.ERROR)
    @rule()
    def error(self) -> None:
        actions = self.record(self.core.on_error("boom"))
        assert actions[0] == Disconnect("boom")
        assert isinstance(actions[1], Sleep)
        assert self.clock.now <= actions[1].until <= self.clock.now + 5.0

    @precondition(lambda self: self.core.state is S.ERROR)
    @rule()
    def retry(self) -> None:
        assert self.core.on_retry() == [Connect(self.want_received + 1)]

    @rule(event=st.sampled_from(sorted(DRIVER_EVENTS, key=lambda e: e.value)))
    def any_event_is_accepted_or_raises_without_change(self, event: EventType) -> None:
        if (self.core.state, event) in TRANSITIONS:
            return
        before = snapshot(self.core)
        with pytest.raises(ProtocolError):
            fire(self.core, event)
        assert snapshot(self.core) == before

    @invariant()
    def positions_match_the_model_and_never_go_back(self) -> None:
        core = self.core
        positions = (core.received_seq, core.flushed_seq, core.applied_seq)
        assert positions == (self.want_received, self.want_flushed, self.want_applied)
        assert core.applied_seq <= core.flushed_seq <= core.received_seq
        assert all(now >= then for now, then in zip(positions, self.last_positions, strict=True))
        self.last_positions = positions

    @invariant()
    def every_sequence_is_written_once_in_order(self) -> None:
        expected_next = 1
        for write in self.written:
            assert write.units_first == expected_next == write.drop_before + 1
            assert write.units_first <= write.units_last
            expected_next = write.units_last + 1
        assert expected_next - 1 == self.core.received_seq
        unit_starts = {u[0] for u in self.units}
        unit_ends = {u[1] for u in self.units}
        assert all(w.units_first in unit_starts and w.units_last in unit_ends for w in self.written)


ReplicaAgainstModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=60, deadline=None
)
test_replica_against_model = ReplicaAgainstModel.TestCase


def test_bootstrap_replaces_every_position_with_the_snapshots() -> None:
    clock = ManualClock()
    core = make(clock, applied=40, received=50)
    assert core.start() == [Connect(51)]
    reason = "sequence 51 is no longer in the primary's WAL"
    assert core.on_bootstrap_needed(reason) == [Disconnect(reason), Bootstrap(reason)]
    assert core.state is S.BOOTSTRAPPING
    clock.advance(3600)  # a long bootstrap is not a silent primary
    assert core.on_tick() == []
    assert core.on_bootstrapped(30) == [Connect(31)]  # a snapshot may be behind what we had
    assert (core.received_seq, core.flushed_seq, core.applied_seq) == (30, 30, 30)
    assert state_of(core) is S.CONNECTING
    assert core.last_error is None


def test_a_failed_bootstrap_backs_off_and_connects_from_the_old_position() -> None:
    clock = ManualClock()
    core = make(clock, applied=7, received=7)
    core.start()
    core.on_bootstrap_needed("compacted")
    actions = core.on_error("snapshot stream broke")
    assert isinstance(actions[-1], Sleep)
    assert core.consecutive_failures == 1
    assert core.on_retry() == [Connect(8)]  # asks again; the primary says again what it lacks
    with pytest.raises(ProtocolError):
        core.on_bootstrapped(9)  # only from BOOTSTRAPPING
