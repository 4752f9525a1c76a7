"""Replication slots: the primary's durable record of what each known replica still needs.

A slot is keyed by the replica's node id (its data directory's NODE_ID) and holds
``restart_seq``: the first sequence the replica does not yet have durably in its own WAL. The
primary keeps WAL from the oldest restart_seq of all slots that are not lost, across restarts of
either side, so a replica that was down comes back to a log that still reaches it.

What a slot may hold back is capped (``slot_keep_bytes``, like PostgreSQL's
max_slot_wal_keep_size): once the WAL from a slot's restart_seq to the end is larger than the
cap, the slot is marked lost and holds nothing; the replica must then be bootstrapped. A lost
slot whose replica comes back while the WAL still reaches it is simply found again.

Pure: no I/O and no clock. `encode_slots`/`decode_slots` are the table's JSON form; reading and
writing the file is `kevo_repl/repl/state_files.py`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

FORMAT_VERSION = 1


@dataclass(slots=True)
class Slot:
    node_id: str
    client_address: str
    restart_seq: int  # the first sequence the replica still needs
    updated_unix: float  # when the position last moved (or the replica last connected)
    lost: bool = False


class SlotTable:
    def __init__(self, slots: list[Slot] | None = None) -> None:
        self._slots = {s.node_id: s for s in slots or ()}
        self.dirty = False  # changed since the last save

    def __iter__(self) -> Iterator[Slot]:
        return iter(sorted(self._slots.values(), key=lambda s: s.node_id))

    def __len__(self) -> int:
        return len(self._slots)

    def get(self, node_id: str) -> Slot | None:
        return self._slots.get(node_id)

    def connect(
        self, node_id: str, client_address: str, start_seq: int, oldest_seq: int, now: float
    ) -> Slot:
        """A replica streams from `start_seq`: its slot, created or found (and found again if
        it was lost but the WAL, which starts at `oldest_seq`, still reaches it)."""
        slot = self._slots.get(node_id)
        if slot is None:
            slot = self._slots[node_id] = Slot(node_id, client_address, start_seq, now)
        slot.client_address = client_address or slot.client_address
        if slot.lost and start_seq >= oldest_seq:
            slot.lost = False
        slot.restart_seq = start_seq  # the replica knows best what it holds
        slot.updated_unix = now
        self.dirty = True
        return slot

    def advance(self, node_id: str, flushed_seq: int, now: float) -> None:
        """The replica has everything up to `flushed_seq` durably; positions never go back."""
        slot = self._slots.get(node_id)
        if slot is not None and flushed_seq + 1 > slot.restart_seq:
            slot.restart_seq = flushed_seq + 1
            slot.updated_unix = now
            self.dirty = True

    def drop(self, node_id: str) -> bool:
        if self._slots.pop(node_id, None) is None:
            return False
        self.dirty = True
        return True

    def enforce_cap(self, bytes_from: Callable[[int], int], cap_bytes: int) -> list[Slot]:
        """Mark lost every slot that would hold more than `cap_bytes` of WAL; returns them."""
        newly_lost = []
        for slot in self._slots.values():
            if not slot.lost and bytes_from(slot.restart_seq) > cap_bytes:
                slot.lost = True
                newly_lost.append(slot)
        if newly_lost:
            self.dirty = True
        return newly_lost

    def hold_seq(self) -> int | None:
        """The oldest sequence some slot still needs, None when no slot holds anything."""
        return min((s.restart_seq for s in self._slots.values() if not s.lost), default=None)


def decode_slots(data: bytes) -> SlotTable:
    """The table `encode_slots` wrote; ValueError/KeyError/TypeError for anything else."""
    obj = json.loads(data)
    if obj.get("version") != FORMAT_VERSION:
        raise ValueError(f"unknown format version {obj.get('version')!r}")
    return SlotTable([_slot(item) for item in obj["slots"]])


def encode_slots(table: SlotTable) -> bytes:
    body = {"version": FORMAT_VERSION, "slots": [asdict(s) for s in table]}
    return json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"


def _slot(item: Any) -> Slot:
    slot = Slot(
        node_id=item["node_id"],
        client_address=item["client_address"],
        restart_seq=item["restart_seq"],
        updated_unix=float(item["updated_unix"]),
        lost=item["lost"],
    )
    if not isinstance(slot.node_id, str) or not slot.node_id:
        raise ValueError("a slot without a node id")
    if not isinstance(slot.restart_seq, int) or slot.restart_seq < 1:
        raise ValueError(f"slot {slot.node_id}: bad restart_seq {slot.restart_seq!r}")
    if not isinstance(slot.lost, bool) or not isinstance(slot.client_address, str):
        raise ValueError(f"slot {slot.node_id}: bad field types")
    return slot
