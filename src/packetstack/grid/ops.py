"""Grid operations and the one function that applies them to a partition's data.

Pure logic: the owner of a partition (a holding client, or the service while no client
holds it) and its backups all apply operations through :func:`apply`, so a backup that
replays the owner's effects ends up with exactly the owner's data.

Keys and values travel and are stored encoded (msgpack bytes): the owner never needs the
user's types, except for ``increment``, whose values are integers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import IntEnum
from typing import TypeVar

import msgspec


class Kind(IntEnum):
    GET = 0
    PUT = 1
    PUT_IF_ABSENT = 2
    REPLACE = 3
    COMPARE_AND_SET = 4
    DELETE = 5
    INCREMENT = 6
    CONTAINS = 7
    SCAN = 8  # every live entry of the map in this partition
    CLEAR = 9
    EXPIRE = 10  # delete the entry if it still has these expires and they are past
    SIZE = 11
    # The service's own: a value read through from a bridge, set only if the key is absent;
    # journaled like a put but not dirty (the database has it already).
    LOAD = 12


class Change(IntEnum):
    """What an operation did to the entry: the kinds of entry events."""

    NONE = 0
    ADDED = 1
    UPDATED = 2
    REMOVED = 3
    EXPIRED = 4
    CLEARED = 5
    LOADED = 6  # a LOAD set the entry: no entry event (nothing changed)


# Reads: served by any owner without touching the journal.
READS = frozenset({Kind.GET, Kind.CONTAINS, Kind.SCAN, Kind.SIZE})
# Operations that leave the same data when applied twice: a request made of these alone
# may simply be sent again when its answer was lost.
REPEATABLE = READS | {Kind.PUT, Kind.DELETE, Kind.REPLACE, Kind.CLEAR}


def repeatable(ops: list[Op]) -> bool:
    """Whether a request of these ops may simply run again when its answer was lost."""
    return all(op.kind in REPEATABLE for op in ops)


class Op(msgspec.Struct, array_like=True, gc=False):
    """One operation on one key (or, for SCAN, CLEAR and SIZE, on the map's entries in
    ``part``). ``expires``: seconds to live in a client's request, the absolute wall-clock
    time once the service has taken it (0: never)."""

    map: str
    part: int
    kind: int
    key: bytes = b""
    value: bytes | None = None
    expect: bytes | None = None  # compare_and_set's expected value
    expires: float = 0.0
    delta: int = 0  # increment's amount


class Outcome(msgspec.Struct, array_like=True, gc=False):
    """The answer to one Op, and what it changed (its effect, for journal and backups)."""

    ok: bool = False
    value: bytes | None = None  # get's value; increment's new value
    change: int = Change.NONE
    expires: float = 0.0  # the entry's expiry after an ADDED or UPDATED change
    count: int = 0  # SIZE, CLEAR
    entries: list[tuple[bytes, bytes]] | None = None  # SCAN
    error: str = ""


Entry = tuple[bytes, float]  # (encoded value, expires or 0)
MapData = dict[bytes, Entry]
PartitionData = dict[str, MapData]  # map name -> its entries in one partition
Row = tuple[str, bytes, bytes, float]  # one entry as the journal and Take carry it


def partition_data(rows: Iterable[Row], into: PartitionData | None = None) -> PartitionData:
    """A partition's data from entry rows (map, key, value, expires), added to ``into``."""
    data: PartitionData = {} if into is None else into
    for map_name, key, value, expires in rows:
        entries = data.get(map_name)
        if entries is None:
            entries = data[map_name] = {}
        entries[key] = (value, expires)
    return data


T = TypeVar("T")

_int_decoder = msgspec.msgpack.Decoder(int)
_encode = msgspec.msgpack.Encoder().encode


TOO_LARGE = "the answer is too large"  # how the error of a read that would not fit starts
OP_OVERHEAD = 48  # bytes of an encoded Op beyond its name, key and values, at most


def op_size(op: Op) -> int:
    """About how many bytes ``op`` takes encoded (at least that many)."""
    value, expect = op.value, op.expect
    return (
        OP_OVERHEAD
        + len(op.map)
        + len(op.key)
        + (len(value) if value is not None else 0)
        + (len(expect) if expect is not None else 0)
    )


def batches(items: list[T], op_of: Callable[[T], Op], budget: int) -> list[list[T]]:
    """``items`` (ops, or what carries them) cut into runs whose ops take at most ``budget``
    encoded bytes (an op larger than that alone), so that no message built of them goes
    over the payload limit."""
    out: list[list[T]] = []
    run: list[T] = []
    size = 0
    for item in items:
        cost = op_size(op_of(item))
        if run and size + cost > budget:
            out.append(run)
            run, size = [], 0
        run.append(item)
        size += cost
    if run:
        out.append(run)
    return out


def without_values(outcomes: list[Outcome], why: str) -> list[Outcome]:
    """An answer that would not fit in one packet: the reads that carry values become
    errors (they changed nothing, the reader may ask for fewer keys at once); the outcomes
    of writes stay, as they happened."""
    return [
        Outcome(error=why)
        if (outcome.change == Change.NONE and outcome.value is not None) or outcome.entries
        else outcome
        for outcome in outcomes
    ]


def live(entry: Entry | None, now: float) -> bool:
    return entry is not None and (entry[1] == 0.0 or entry[1] > now)


def apply(data: PartitionData, op: Op, now: float) -> Outcome:
    """Apply ``op`` to one partition's data at wall-clock time ``now``."""
    kind = op.kind
    entries = data.get(op.map)
    entry = entries.get(op.key) if entries is not None else None
    present = live(entry, now)
    if kind == Kind.GET:
        return Outcome(present, entry[0] if present and entry is not None else None)
    if kind == Kind.CONTAINS:
        return Outcome(present)
    if kind == Kind.SCAN:
        found = [(k, e[0]) for k, e in entries.items() if live(e, now)] if entries else []
        return Outcome(True, entries=found)
    if kind == Kind.SIZE:
        alive = sum(1 for e in entries.values() if live(e, now)) if entries else 0
        return Outcome(True, count=alive)
    if kind == Kind.PUT:
        return _store(data, op, present)
    if kind == Kind.PUT_IF_ABSENT:
        return Outcome() if present else _store(data, op, False)
    if kind == Kind.REPLACE:
        return _store(data, op, True) if present else Outcome()
    if kind == Kind.COMPARE_AND_SET:
        current = entry[0] if present and entry is not None else None
        if current != op.expect:
            return Outcome()
        if op.value is None:  # compare_and_set(key, expected, None): delete
            return _remove(entries, op.key, Change.REMOVED) if present else Outcome(True)
        return _store(data, op, present)
    if kind == Kind.DELETE:
        # An expired entry goes too (a backup replaying its owner's EXPIRE), unreported.
        return _remove(entries, op.key, Change.REMOVED if present else Change.NONE)
    if kind == Kind.INCREMENT:
        return _increment(data, op, entry if present else None)
    if kind == Kind.EXPIRE:
        # The service's clock decides expiry: an owner whose clock lags still removes it.
        if entry is not None and entry[1] == op.expires:
            return _remove(entries, op.key, Change.EXPIRED)
        return Outcome()
    if kind == Kind.LOAD:
        if present or op.value is None:
            return Outcome()
        _set(data, op, op.value, 0.0, False, None)
        return Outcome(True, change=Change.LOADED)
    if kind == Kind.CLEAR:
        removed = data.pop(op.map, None)
        return Outcome(True, change=Change.CLEARED, count=len(removed) if removed else 0)
    return Outcome(error=f"unknown grid operation {kind}")


def _store(data: PartitionData, op: Op, present: bool) -> Outcome:
    """Set the op's value and expiry (it replaces a ``present`` entry)."""
    if op.value is None:
        return Outcome(error="a value is required")
    return _set(data, op, op.value, op.expires, present, None)


def _set(
    data: PartitionData,
    op: Op,
    value: bytes,
    expires: float,
    present: bool,
    answer: bytes | None,
) -> Outcome:
    entries = data.get(op.map)
    if entries is None:
        entries = data[op.map] = {}
    entries[op.key] = (value, expires)
    return Outcome(True, answer, Change.UPDATED if present else Change.ADDED, expires)


def _remove(entries: MapData | None, key: bytes, change: Change) -> Outcome:
    if entries is not None:
        entries.pop(key, None)
    return Outcome(change != Change.NONE, change=change)


def _increment(data: PartitionData, op: Op, entry: Entry | None) -> Outcome:
    if entry is None:
        current, expires = 0, 0.0
    else:
        try:
            current = _int_decoder.decode(entry[0])
        except msgspec.DecodeError:
            return Outcome(error="increment needs an integer value; this entry holds another type")
        expires = entry[1]  # an increment keeps the entry's expiry
    try:
        value = _encode(current + op.delta)
    except OverflowError:
        return Outcome(error="increment would leave the 64-bit integer range")
    return _set(data, op, value, expires, entry is not None, value)


def effect(op: Op, outcome: Outcome) -> Op | None:
    """The write ``op`` made, as the Op (PUT, DELETE or CLEAR) that redoes it on a backup
    and in the journal; None when it changed nothing."""
    change = outcome.change
    if change == Change.ADDED or change == Change.UPDATED:
        value = outcome.value if op.kind == Kind.INCREMENT else op.value
        return Op(op.map, op.part, Kind.PUT, op.key, value, None, outcome.expires)
    if change == Change.REMOVED or change == Change.EXPIRED:
        return Op(op.map, op.part, Kind.DELETE, op.key)
    if change == Change.CLEARED:
        return Op(op.map, op.part, Kind.CLEAR)
    if change == Change.LOADED:
        return Op(op.map, op.part, Kind.LOAD, op.key, op.value)
    return None
