"""The grid's one state machine: what each operation answers and changes, expiry, and the
effects that let a backup (and the journal) end up with the owner's data."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packetstack.grid.ops import (
    READS,
    Change,
    Kind,
    Op,
    Outcome,
    PartitionData,
    apply,
    effect,
    live,
)

enc = msgspec.msgpack.encode
NOW = 1_000.0
PAST = NOW - 10.0
FUTURE = NOW + 10.0


def op(kind: Kind, key: bytes = b"k", value: Any = None, **fields: Any) -> Op:
    """An Op on map "m", partition 0; ``value`` is encoded unless it is None or bytes."""
    if value is not None and not isinstance(value, bytes):
        value = enc(value)
    expect = fields.pop("expect", None)
    if expect is not None and not isinstance(expect, bytes):
        expect = enc(expect)
    return Op(fields.pop("map", "m"), 0, kind, key, value, expect, **fields)


def run(data: PartitionData, kind: Kind, key: bytes = b"k", value: Any = None, **f: Any) -> Outcome:
    return apply(data, op(kind, key, value, **f), NOW)


def holding(*entries: tuple[bytes, Any, float], map: str = "m") -> PartitionData:
    """Partition data with ``(key, value, expires)`` entries in one map."""
    return {map: {key: (enc(value), expires) for key, value, expires in entries}}


def visible(data: PartitionData, now: float = NOW) -> dict[str, dict[bytes, tuple[bytes, float]]]:
    """The live entries, by map (maps without any left out)."""
    out = {}
    for name, entries in data.items():
        alive = {k: e for k, e in entries.items() if live(e, now)}
        if alive:
            out[name] = alive
    return out


# --------------------------------------------------------------------- reads


def test_kinds_and_reads() -> None:
    assert frozenset({Kind.GET, Kind.CONTAINS, Kind.SCAN, Kind.SIZE}) == READS
    assert Kind.EXPIRE not in READS


def test_get() -> None:
    data = holding((b"k", "v", 0.0), (b"old", 1, PAST), (b"later", 2, FUTURE))
    got = run(data, Kind.GET)
    assert got.ok and got.value == enc("v") and got.change == Change.NONE and not got.error
    assert run(data, Kind.GET, b"missing") == Outcome(False, None)
    assert run(data, Kind.GET, b"old") == Outcome(False, None)  # expired: absent
    assert run(data, Kind.GET, b"later").value == enc(2)
    assert run(data, Kind.GET, map="other") == Outcome(False, None)  # maps are separate
    assert run({}, Kind.GET) == Outcome(False, None)


def test_contains() -> None:
    data = holding((b"k", "v", 0.0), (b"old", 1, PAST), (b"later", 2, FUTURE))
    assert run(data, Kind.CONTAINS).ok
    assert run(data, Kind.CONTAINS, b"later").ok
    assert not run(data, Kind.CONTAINS, b"old").ok
    assert not run(data, Kind.CONTAINS, b"missing").ok
    assert not run(data, Kind.CONTAINS, map="other").ok


def test_scan_returns_only_live_entries_of_the_map() -> None:
    data = holding((b"a", 1, 0.0), (b"b", 2, PAST), (b"c", 3, FUTURE))
    data["other"] = {b"x": (enc(9), 0.0)}
    scanned = run(data, Kind.SCAN, b"")
    assert scanned.ok and scanned.change == Change.NONE
    assert sorted(scanned.entries or []) == [(b"a", enc(1)), (b"c", enc(3))]
    assert run(data, Kind.SCAN, b"", map="empty") == Outcome(True, entries=[])
    assert run({"m": {}}, Kind.SCAN, b"").entries == []


def test_size_counts_only_live_entries() -> None:
    data = holding((b"a", 1, 0.0), (b"b", 2, PAST), (b"c", 3, FUTURE), (b"d", 4, NOW))
    assert run(data, Kind.SIZE, b"") == Outcome(True, count=2)
    assert run(data, Kind.SIZE, b"", map="nothing") == Outcome(True, count=0)
    assert run({}, Kind.SIZE, b"").count == 0


def test_reads_change_nothing() -> None:
    data = holding((b"a", 1, 0.0), (b"b", 2, PAST))
    before = {m: dict(e) for m, e in data.items()}
    for kind in (Kind.GET, Kind.CONTAINS, Kind.SCAN, Kind.SIZE):
        outcome = run(data, kind, b"b")
        assert outcome.change == Change.NONE
        assert effect(op(kind, b"b"), outcome) is None
    assert data == before


# -------------------------------------------------------------------- expiry


def test_live() -> None:
    assert not live(None, NOW)
    assert live((b"v", 0.0), NOW)  # 0: never expires
    assert live((b"v", FUTURE), NOW)
    assert not live((b"v", NOW), NOW)  # due exactly now: gone
    assert not live((b"v", PAST), NOW)


def test_an_entry_due_exactly_now_is_absent() -> None:
    data = holding((b"k", "v", NOW))
    assert not run(data, Kind.GET).ok
    assert run(data, Kind.PUT_IF_ABSENT, value="new").change == Change.ADDED


def test_expires_is_stored_and_reported() -> None:
    data: PartitionData = {}
    out = run(data, Kind.PUT, value="v", expires=FUTURE)
    assert out == Outcome(True, None, Change.ADDED, FUTURE)
    assert data == {"m": {b"k": (enc("v"), FUTURE)}}
    assert not apply(data, op(Kind.GET), FUTURE).ok  # absent once due
    assert apply(data, op(Kind.GET), FUTURE - 0.001).ok


# -------------------------------------------------------------------- writes


def test_put_adds_then_updates() -> None:
    data: PartitionData = {}
    assert run(data, Kind.PUT, value=1) == Outcome(True, None, Change.ADDED, 0.0)
    assert data == {"m": {b"k": (enc(1), 0.0)}}
    assert run(data, Kind.PUT, value=2, expires=FUTURE) == Outcome(
        True, None, Change.UPDATED, FUTURE
    )
    assert data["m"][b"k"] == (enc(2), FUTURE)
    # Writing again without expires makes it permanent again.
    run(data, Kind.PUT, value=3)
    assert data["m"][b"k"] == (enc(3), 0.0)


def test_put_over_an_expired_entry_adds() -> None:
    data = holding((b"k", "old", PAST))
    out = run(data, Kind.PUT, value="new")
    assert out.change == Change.ADDED
    assert data["m"][b"k"] == (enc("new"), 0.0)


def test_put_without_a_value_is_an_error_and_changes_nothing() -> None:
    data = holding((b"k", "v", 0.0))
    out = run(data, Kind.PUT, value=None)
    assert not out.ok and out.error and out.change == Change.NONE
    assert data == holding((b"k", "v", 0.0))
    empty: PartitionData = {}
    assert run(empty, Kind.PUT).error
    assert empty == {}


def test_put_if_absent() -> None:
    data: PartitionData = {}
    assert run(data, Kind.PUT_IF_ABSENT, value=1) == Outcome(True, None, Change.ADDED, 0.0)
    refused = run(data, Kind.PUT_IF_ABSENT, value=2)
    assert refused == Outcome()
    assert data["m"][b"k"] == (enc(1), 0.0)
    # An expired entry is absent.
    stale = holding((b"k", 1, PAST))
    out = run(stale, Kind.PUT_IF_ABSENT, value=2, expires=FUTURE)
    assert out == Outcome(True, None, Change.ADDED, FUTURE)
    assert stale["m"][b"k"] == (enc(2), FUTURE)


def test_replace() -> None:
    data: PartitionData = {}
    assert run(data, Kind.REPLACE, value=1) == Outcome()
    assert data.get("m", {}) == {}  # nothing created
    run(data, Kind.PUT, value=1)
    out = run(data, Kind.REPLACE, value=2, expires=FUTURE)
    assert out == Outcome(True, None, Change.UPDATED, FUTURE)
    assert data["m"][b"k"] == (enc(2), FUTURE)
    stale = holding((b"k", 1, PAST))
    assert run(stale, Kind.REPLACE, value=2) == Outcome()
    assert stale["m"][b"k"] == (enc(1), PAST)


def test_compare_and_set_swaps_on_match_only() -> None:
    data = holding((b"k", "a", 0.0))
    assert run(data, Kind.COMPARE_AND_SET, value="b", expect="x") == Outcome()
    assert data["m"][b"k"] == (enc("a"), 0.0)
    out = run(data, Kind.COMPARE_AND_SET, value="b", expect="a", expires=FUTURE)
    assert out == Outcome(True, None, Change.UPDATED, FUTURE)
    assert data["m"][b"k"] == (enc("b"), FUTURE)


def test_compare_and_set_expecting_none_means_absent() -> None:
    data: PartitionData = {}
    out = run(data, Kind.COMPARE_AND_SET, value="v", expect=None)
    assert out == Outcome(True, None, Change.ADDED, 0.0)
    assert data["m"][b"k"] == (enc("v"), 0.0)
    # Now present: expecting absence fails.
    assert run(data, Kind.COMPARE_AND_SET, value="w", expect=None) == Outcome()
    assert data["m"][b"k"] == (enc("v"), 0.0)
    # An expired entry counts as absent.
    stale = holding((b"k", "old", PAST))
    assert run(stale, Kind.COMPARE_AND_SET, value="new", expect=None).change == Change.ADDED
    # ... and cannot be matched by its old value.
    stale = holding((b"k", "old", PAST))
    assert run(stale, Kind.COMPARE_AND_SET, value="new", expect="old") == Outcome()


def test_compare_and_set_to_none_deletes() -> None:
    data = holding((b"k", "v", 0.0), (b"other", 1, 0.0))
    assert run(data, Kind.COMPARE_AND_SET, value=None, expect="x") == Outcome()
    assert b"k" in data["m"]
    out = run(data, Kind.COMPARE_AND_SET, value=None, expect="v")
    assert out == Outcome(True, change=Change.REMOVED)
    assert data == holding((b"other", 1, 0.0))
    # Absent expected absent, delete: true, and nothing changed (no effect).
    out = run(data, Kind.COMPARE_AND_SET, value=None, expect=None)
    assert out == Outcome(True)
    assert effect(op(Kind.COMPARE_AND_SET), out) is None
    # Something expected but absent: false.
    assert run(data, Kind.COMPARE_AND_SET, value=None, expect="v") == Outcome()


def test_delete() -> None:
    data = holding((b"k", "v", 0.0), (b"old", 1, PAST))
    assert run(data, Kind.DELETE) == Outcome(True, change=Change.REMOVED)
    assert b"k" not in data["m"]
    assert run(data, Kind.DELETE) == Outcome()  # already gone
    assert run(data, Kind.DELETE, b"missing", map="none") == Outcome()
    assert run(data, Kind.DELETE, b"old") == Outcome()  # expired: nothing to remove


def test_increment_from_absent_and_existing() -> None:
    data: PartitionData = {}
    assert run(data, Kind.INCREMENT, delta=5) == Outcome(True, enc(5), Change.ADDED, 0.0)
    assert data["m"][b"k"] == (enc(5), 0.0)
    assert run(data, Kind.INCREMENT, delta=-7) == Outcome(True, enc(-2), Change.UPDATED, 0.0)
    assert data["m"][b"k"] == (enc(-2), 0.0)


def test_increment_keeps_the_entry_s_expiry() -> None:
    data = holding((b"k", 10, FUTURE))
    assert run(data, Kind.INCREMENT, delta=1) == Outcome(True, enc(11), Change.UPDATED, FUTURE)
    assert data["m"][b"k"] == (enc(11), FUTURE)


def test_increment_of_an_expired_entry_starts_from_zero_without_expiry() -> None:
    data = holding((b"k", 10, PAST))
    assert run(data, Kind.INCREMENT, delta=3) == Outcome(True, enc(3), Change.ADDED, 0.0)
    assert data["m"][b"k"] == (enc(3), 0.0)


@pytest.mark.parametrize("value", ["text", 1.5, True, None, [1], {"a": 1}])
def test_increment_of_a_non_integer_is_an_error(value: Any) -> None:
    data = holding((b"k", value, 0.0))
    out = run(data, Kind.INCREMENT, delta=1)
    assert not out.ok
    assert "integer" in out.error
    assert out.change == Change.NONE
    assert data == holding((b"k", value, 0.0))


def test_increment_handles_the_64_bit_range() -> None:
    data = holding((b"k", 2**63 - 1, 0.0))
    assert run(data, Kind.INCREMENT, delta=1).value == enc(2**63)
    data = holding((b"k", -(2**63) + 1, 0.0))
    assert run(data, Kind.INCREMENT, delta=-1).value == enc(-(2**63))


@pytest.mark.parametrize(("start", "delta"), [(2**64 - 1, 1), (-(2**63), -1)])
def test_increment_overflow_is_an_error_outcome(start: int, delta: int) -> None:
    data = holding((b"k", start, 0.0))
    out = run(data, Kind.INCREMENT, delta=delta)
    assert not out.ok and out.error
    assert data == holding((b"k", start, 0.0))


def test_clear_removes_the_whole_map_and_only_it() -> None:
    data = holding((b"a", 1, 0.0), (b"b", 2, FUTURE))
    data["other"] = {b"x": (enc(9), 0.0)}
    out = run(data, Kind.CLEAR, b"")
    assert out.ok and out.change == Change.CLEARED and out.count == 2
    assert data == {"other": {b"x": (enc(9), 0.0)}}
    again = run(data, Kind.CLEAR, b"")
    assert again == Outcome(True, change=Change.CLEARED, count=0)
    assert data == {"other": {b"x": (enc(9), 0.0)}}


def test_expire_removes_only_a_due_entry_with_those_expires() -> None:
    data = holding((b"due", 1, PAST), (b"later", 2, FUTURE), (b"now", 3, NOW))
    # Rewritten since the sweep was planned: its expires differ, it stays.
    assert run(data, Kind.EXPIRE, b"due", expires=PAST - 1) == Outcome()
    assert b"due" in data["m"]
    # Matching but not yet due by this owner's clock: the service's clock decides, so an
    # owner whose clock lags still removes it.
    assert run(data, Kind.EXPIRE, b"later", expires=FUTURE).change == Change.EXPIRED
    assert b"later" not in data["m"]
    # Due and matching: expired.
    assert run(data, Kind.EXPIRE, b"due", expires=PAST) == Outcome(True, change=Change.EXPIRED)
    assert b"due" not in data["m"]
    assert run(data, Kind.EXPIRE, b"now", expires=NOW).change == Change.EXPIRED
    # Gone already, or never there.
    assert run(data, Kind.EXPIRE, b"due", expires=PAST) == Outcome()
    assert run(data, Kind.EXPIRE, b"x", expires=PAST, map="none") == Outcome()


def test_expire_leaves_a_permanent_entry_alone() -> None:
    data = holding((b"k", 1, 0.0))
    assert run(data, Kind.EXPIRE, expires=PAST) == Outcome()
    assert data == holding((b"k", 1, 0.0))


def test_an_unknown_kind_is_an_error() -> None:
    data = holding((b"k", 1, 0.0))
    out = apply(data, Op("m", 0, 99, b"k", enc(2)), NOW)
    assert not out.ok and "99" in out.error
    assert data == holding((b"k", 1, 0.0))


# ------------------------------------------------------------------- effects


def test_effect_of_put_like_writes_is_a_put_with_the_outcome_s_expiry() -> None:
    for kind in (Kind.PUT, Kind.PUT_IF_ABSENT, Kind.COMPARE_AND_SET):
        the_op = Op("m", 7, kind, b"k", enc("v"), None, FUTURE)
        out = apply({}, the_op, NOW)
        assert out.change == Change.ADDED, kind
        assert effect(the_op, out) == Op("m", 7, Kind.PUT, b"k", enc("v"), None, FUTURE)
    data = holding((b"k", 1, 0.0))
    replace = Op("m", 7, Kind.REPLACE, b"k", enc(2), None, FUTURE)
    assert effect(replace, apply(data, replace, NOW)) == Op(
        "m", 7, Kind.PUT, b"k", enc(2), None, FUTURE
    )


def test_effect_of_a_compare_and_set_drops_the_expected_value() -> None:
    data = holding((b"k", "a", 0.0))
    cas = Op("m", 3, Kind.COMPARE_AND_SET, b"k", enc("b"), enc("a"))
    change = effect(cas, apply(data, cas, NOW))
    assert change == Op("m", 3, Kind.PUT, b"k", enc("b"), None, 0.0)


def test_effect_of_increment_carries_the_new_value_and_kept_expiry() -> None:
    data = holding((b"k", 41, FUTURE))
    inc = Op("m", 2, Kind.INCREMENT, b"k", delta=1)
    change = effect(inc, apply(data, inc, NOW))
    assert change == Op("m", 2, Kind.PUT, b"k", enc(42), None, FUTURE)


def test_effect_of_removals_is_a_delete() -> None:
    for the_op, data in [
        (Op("m", 4, Kind.DELETE, b"k"), holding((b"k", 1, 0.0))),
        (Op("m", 4, Kind.COMPARE_AND_SET, b"k", None, enc(1)), holding((b"k", 1, 0.0))),
        (Op("m", 4, Kind.EXPIRE, b"k", expires=PAST), holding((b"k", 1, PAST))),
    ]:
        out = apply(data, the_op, NOW)
        assert out.change in (Change.REMOVED, Change.EXPIRED)
        assert effect(the_op, out) == Op("m", 4, Kind.DELETE, b"k")


def test_effect_of_clear_is_a_clear_of_the_map() -> None:
    the_op = Op("m", 5, Kind.CLEAR)
    out = apply(holding((b"k", 1, 0.0)), the_op, NOW)
    assert effect(the_op, out) == Op("m", 5, Kind.CLEAR)


def test_no_effect_when_nothing_changed() -> None:
    data = holding((b"k", 1, 0.0))
    for the_op in [
        op(Kind.PUT_IF_ABSENT, value=2),
        op(Kind.REPLACE, b"missing", value=2),
        op(Kind.DELETE, b"missing"),
        op(Kind.COMPARE_AND_SET, value=3, expect=9),
        op(Kind.EXPIRE, expires=PAST),
        op(Kind.PUT),  # an error
    ]:
        assert effect(the_op, apply(data, the_op, NOW)) is None, the_op


def test_ops_and_outcomes_survive_the_wire() -> None:
    the_op = Op("m", 3, Kind.COMPARE_AND_SET, b"k", enc("b"), enc("a"), FUTURE, 0)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(the_op), type=Op) == the_op
    out = Outcome(True, enc(1), Change.ADDED, FUTURE, 3, [(b"a", b"b")], "")
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(out), type=Outcome) == out


# ------------------------------------------------------- replaying on a backup


def test_replaying_effects_reproduces_the_owner_s_data() -> None:
    owner: PartitionData = {}
    backup: PartitionData = {}
    script = [
        op(Kind.PUT, b"a", 1),
        op(Kind.PUT, b"b", 2, expires=FUTURE),
        op(Kind.INCREMENT, b"a", delta=10),
        op(Kind.INCREMENT, b"n", delta=1),
        op(Kind.COMPARE_AND_SET, b"b", 3, expect=2),
        op(Kind.PUT, b"x", "y", map="other"),
        op(Kind.DELETE, b"n"),
        op(Kind.CLEAR, map="other"),
        op(Kind.PUT_IF_ABSENT, b"c", "z"),
        op(Kind.REPLACE, b"c", "zz"),
        op(Kind.COMPARE_AND_SET, b"c", None, expect="zz"),
    ]
    for the_op in script:
        change = effect(the_op, apply(owner, the_op, NOW))
        if change is not None:
            apply(backup, change, NOW)
        assert backup == owner
    # compare_and_set's write sets expires like a put (none here).
    assert owner == {"m": {b"a": (enc(11), 0.0), b"b": (enc(3), 0.0)}}


def test_replaying_an_expire_removes_the_entry_from_the_backup() -> None:
    owner = holding((b"k", 1, PAST))
    backup = holding((b"k", 1, PAST))
    expire = op(Kind.EXPIRE, expires=PAST)
    change = effect(expire, apply(owner, expire, NOW))
    assert change is not None
    apply(backup, change, NOW)
    assert owner == {"m": {}}
    assert backup == owner


KEYS = [b"a", b"b", b"c"]
MAPS = ["m", "n"]
EXPIRIES = [0.0, 5.0, 20.0, 60.0]  # absolute; time runs from 0 to about 100


VALUES = [None, enc(0), enc(1), enc(-1), enc(2), enc("s")]
ops = st.builds(
    Op,
    st.sampled_from(MAPS),
    st.just(0),
    st.sampled_from(list(Kind)),
    st.sampled_from(KEYS),
    st.sampled_from(VALUES),
    st.sampled_from(VALUES),  # compare_and_set's expectation
    st.sampled_from(EXPIRIES),
    st.integers(-2, 2),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(ops, st.sampled_from([0.0, 0.5, 3.0, 10.0])), max_size=30))
def test_replaying_random_effects_gives_the_same_live_data(steps: list[tuple[Op, float]]) -> None:
    owner: PartitionData = {}
    backup: PartitionData = {}
    now = 0.0
    for the_op, elapsed in steps:
        now += elapsed
        outcome = apply(owner, the_op, now)
        if the_op.kind in READS:
            assert outcome.change == Change.NONE
        change = effect(the_op, outcome)
        if outcome.change == Change.NONE:
            assert change is None
        if change is None:
            continue
        assert change.kind in (Kind.PUT, Kind.DELETE, Kind.CLEAR, Kind.LOAD)
        assert change.expect is None and change.delta == 0
        if change.kind in (Kind.PUT, Kind.LOAD):
            assert change.value is not None
        replayed = apply(backup, change, now)
        if outcome.change != Change.EXPIRED:  # the backup's copy is past its expiry too
            assert replayed.ok
        if outcome.change in (Change.ADDED, Change.UPDATED):
            assert replayed.change == outcome.change  # listeners hear the same thing
        assert visible(backup, now) == visible(owner, now)
    # And the backup answers every read like the owner.
    for name in MAPS:
        for kind in (Kind.SIZE, Kind.SCAN):
            read = Op(name, 0, kind)
            assert apply(backup, read, now) == apply(owner, read, now)
        for key in KEYS:
            get = Op(name, 0, Kind.GET, key)
            assert apply(backup, get, now) == apply(owner, get, now)
