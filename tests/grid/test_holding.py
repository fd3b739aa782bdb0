"""What a holding client keeps: partitions taken in chunks (as owner or backup), operations
answered only for owned partitions, backup effects only for backed-up ones, promotion,
release and reset."""

from __future__ import annotations

import time

import msgspec

from packetstack.grid.holding import Holding
from packetstack.grid.messages import Backup, GridOps, GridOutcomes, Promote, Release, Take
from packetstack.grid.ops import Change, Kind, Op, Outcome

enc = msgspec.msgpack.encode


def owned_entries(holding: Holding) -> int:
    """Entries in the partitions ``holding`` owns, every map together."""
    return sum(len(e) for data in holding.owned.values() for e in data.values())


def take(
    part: int,
    entries: list[tuple[str, bytes, bytes, float]],
    *,
    owner: bool = True,
    first: bool = True,
    last: bool = True,
) -> Take:
    return Take(part, owner, first, last, entries)


def row(
    key: str, value: object, map: str = "m", expires: float = 0.0
) -> tuple[str, bytes, bytes, float]:
    return (map, key.encode(), enc(value), expires)


def get(part: int, key: str, map: str = "m") -> Op:
    return Op(map, part, Kind.GET, key.encode())


def put(part: int, key: str, value: object, map: str = "m", expires: float = 0.0) -> Op:
    return Op(map, part, Kind.PUT, key.encode(), enc(value), None, expires)


def ask(holding: Holding, *ops: Op) -> list[Outcome]:
    answer = holding.apply(GridOps(list(ops)))
    assert len(answer) == len(ops)
    return answer


def test_a_new_holding_holds_nothing() -> None:
    holding = Holding()
    assert holding.owned == {} and holding.backups == {}
    assert owned_entries(holding) == 0
    [out] = ask(holding, get(3, "k"))
    assert not out.ok
    assert "partition 3" in out.error and "not held" in out.error


def test_take_in_one_chunk_as_owner() -> None:
    holding = Holding()
    holding.take(take(5, [row("a", 1), row("b", 2, "n", expires=time.time() + 60)]))
    assert set(holding.owned) == {5} and holding.backups == {}
    assert holding.owned[5]["m"] == {b"a": (enc(1), 0.0)}
    assert holding.owned[5]["n"][b"b"][0] == enc(2)
    a, b = ask(holding, get(5, "a"), get(5, "b", "n"))
    assert a == Outcome(True, enc(1))
    assert b == Outcome(True, enc(2))
    assert owned_entries(holding) == 2


def test_an_empty_take_still_installs_the_partition() -> None:
    holding = Holding()
    holding.take(take(8, []))
    assert holding.owned == {8: {}}
    [out] = ask(holding, put(8, "k", "v"))
    assert out.ok and out.change == Change.ADDED
    assert holding.owned[8] == {"m": {b"k": (enc("v"), 0.0)}}


def test_take_in_chunks_installs_only_with_the_last() -> None:
    holding = Holding()
    holding.take(take(1, [row("a", 1)], last=False))
    assert 1 not in holding.owned
    [out] = ask(holding, get(1, "a"))
    assert out.error  # not served before the last chunk
    holding.take(take(1, [row("b", 2)], first=False, last=False))
    assert 1 not in holding.owned
    holding.take(take(1, [row("c", 3, "other")], first=False, last=True))
    assert holding.owned[1] == {
        "m": {b"a": (enc(1), 0.0), b"b": (enc(2), 0.0)},
        "other": {b"c": (enc(3), 0.0)},
    }
    assert [o.value for o in ask(holding, get(1, "a"), get(1, "b"), get(1, "c", "other"))] == [
        enc(1),
        enc(2),
        enc(3),
    ]


def test_a_first_chunk_starts_over() -> None:
    holding = Holding()
    holding.take(take(1, [row("stale", 0)], last=False))
    holding.take(take(1, [row("a", 1)], last=False))  # first again: a new take
    holding.take(take(1, [row("b", 2)], first=False))
    assert holding.owned[1] == {"m": {b"a": (enc(1), 0.0), b"b": (enc(2), 0.0)}}


def test_a_first_chunk_replaces_what_was_held() -> None:
    holding = Holding()
    holding.take(take(1, [row("old", 0)]))
    holding.take(take(1, [row("new", 1)]))
    assert holding.owned[1] == {"m": {b"new": (enc(1), 0.0)}}


def test_chunks_without_their_first_are_ignored() -> None:
    holding = Holding()
    holding.take(take(2, [row("a", 1)], first=False, last=False))
    holding.take(take(2, [row("b", 2)], first=False, last=True))
    assert holding.owned == {} and holding.backups == {}


def test_takes_of_different_partitions_interleave() -> None:
    holding = Holding()
    holding.take(take(1, [row("a", 1)], last=False))
    holding.take(take(2, [row("x", 9)], owner=False, last=False))
    holding.take(take(1, [row("b", 2)], first=False))
    holding.take(take(2, [row("y", 8)], owner=False, first=False))
    assert holding.owned == {1: {"m": {b"a": (enc(1), 0.0), b"b": (enc(2), 0.0)}}}
    assert holding.backups == {2: {"m": {b"x": (enc(9), 0.0), b"y": (enc(8), 0.0)}}}


def test_take_as_backup_is_not_served() -> None:
    holding = Holding()
    holding.take(take(4, [row("a", 1)], owner=False))
    assert holding.owned == {}
    assert holding.backups == {4: {"m": {b"a": (enc(1), 0.0)}}}
    [out] = ask(holding, get(4, "a"))
    assert not out.ok and out.error
    assert owned_entries(holding) == 0  # entries() counts what is owned


def test_taking_a_backed_up_partition_as_owner_drops_the_backup() -> None:
    holding = Holding()
    holding.take(take(4, [row("old", 1)], owner=False))
    holding.take(take(4, [row("a", 2)], owner=True))
    assert holding.backups == {}
    assert holding.owned == {4: {"m": {b"a": (enc(2), 0.0)}}}


def test_operations_apply_to_owned_partitions_in_order() -> None:
    holding = Holding()
    holding.take(take(1, []))
    holding.take(take(2, []))
    outcomes = ask(
        holding,
        put(1, "k", 1),
        Op("m", 1, Kind.INCREMENT, b"k", delta=5),
        get(1, "k"),
        put(9, "k", 1),  # not held: an error for this one, the others go on
        put(2, "k", "two"),
        Op("m", 1, Kind.DELETE, b"k"),
        get(1, "k"),
    )
    assert [o.ok for o in outcomes] == [True, True, True, False, True, True, False]
    assert outcomes[1].value == enc(6)
    assert outcomes[2].value == enc(6)
    assert "partition 9" in outcomes[3].error
    assert outcomes[5].change == Change.REMOVED
    assert 9 not in holding.owned  # an op does not create a partition
    assert holding.owned[2] == {"m": {b"k": (enc("two"), 0.0)}}


def test_expired_entries_are_absent_for_a_holder() -> None:
    holding = Holding()
    past = time.time() - 60
    holding.take(take(1, [row("gone", 1, expires=past), row("kept", 2)]))
    gone, kept, size = ask(holding, get(1, "gone"), get(1, "kept"), Op("m", 1, Kind.SIZE))
    assert not gone.ok and kept.ok and size.count == 1


def test_backup_effects_apply_only_to_backed_up_partitions() -> None:
    holding = Holding()
    holding.take(take(1, [row("a", 1)], owner=False))
    holding.take(take(2, [row("a", 1)], owner=True))
    holding.backup(
        Backup(
            [
                put(1, "b", 2),
                Op("m", 1, Kind.DELETE, b"a"),
                put(2, "b", 2),  # owned here, not backed up: not for backup()
                put(3, "c", 3),  # neither: ignored, not created
                Op("other", 1, Kind.CLEAR),
            ]
        )
    )
    assert holding.backups == {1: {"m": {b"b": (enc(2), 0.0)}}}
    assert holding.owned == {2: {"m": {b"a": (enc(1), 0.0)}}}
    holding.backup(Backup([Op("m", 1, Kind.CLEAR)]))
    assert holding.backups == {1: {}}


def test_backup_keeps_the_effect_s_expiry() -> None:
    holding = Holding()
    holding.take(take(1, [], owner=False))
    later = time.time() + 600
    holding.backup(Backup([put(1, "k", "v", expires=later)]))
    assert holding.backups[1] == {"m": {b"k": (enc("v"), later)}}


def test_promote_makes_a_backup_owned_with_its_data() -> None:
    holding = Holding()
    holding.take(take(1, [row("a", 1)], owner=False))
    holding.take(take(2, [row("z", 0)], owner=False))
    holding.backup(Backup([put(1, "b", 2)]))
    holding.promote(Promote([1]))
    assert holding.owned == {1: {"m": {b"a": (enc(1), 0.0), b"b": (enc(2), 0.0)}}}
    assert set(holding.backups) == {2}
    a, b = ask(holding, get(1, "a"), get(1, "b"))
    assert a.value == enc(1) and b.value == enc(2)
    # Effects for it are no longer backup effects.
    holding.backup(Backup([put(1, "c", 3)]))
    assert b"c" not in holding.owned[1]["m"]


def test_promoting_a_partition_without_a_backup_serves_it_empty() -> None:
    holding = Holding()
    holding.promote(Promote([6, 7]))
    assert holding.owned == {6: {}, 7: {}}
    [out] = ask(holding, get(6, "k"))
    assert out == Outcome(False, None)  # served (no error), just absent


def test_release_drops_owned_and_backed_up_partitions() -> None:
    holding = Holding()
    holding.take(take(1, [row("a", 1)]))
    holding.take(take(2, [row("b", 2)]))
    holding.take(take(3, [row("c", 3)], owner=False))
    holding.take(take(4, [row("d", 4)], owner=False))
    holding.release(Release([1, 3, 99]))  # 99: never held, fine
    assert set(holding.owned) == {2}
    assert set(holding.backups) == {4}
    [out] = ask(holding, get(1, "a"))
    assert out.error
    holding.backup(Backup([put(3, "x", 0)]))
    assert 3 not in holding.backups


def test_reset_clears_everything_including_half_taken_partitions() -> None:
    holding = Holding()
    holding.take(take(1, [row("a", 1)]))
    holding.take(take(2, [row("b", 2)], owner=False))
    holding.take(take(3, [row("c", 3)], last=False))
    holding.reset()
    assert holding.owned == {} and holding.backups == {}
    assert owned_entries(holding) == 0
    # The rest of the interrupted take (sent on the old connection) installs nothing.
    holding.take(take(3, [row("d", 4)], first=False, last=True))
    assert holding.owned == {} and holding.backups == {}
    # A new take after the reset works.
    holding.take(take(3, [row("e", 5)]))
    assert holding.owned == {3: {"m": {b"e": (enc(5), 0.0)}}}


def test_entries_counts_owned_entries_over_maps_and_partitions() -> None:
    holding = Holding()
    holding.take(take(1, [row("a", 1), row("b", 2), row("a", 1, "n")]))
    holding.take(take(2, [row("c", 3)]))
    holding.take(take(3, [row("d", 4), row("e", 5)], owner=False))
    assert owned_entries(holding) == 4


def test_grid_packets_survive_the_wire() -> None:
    """What the holder gets is what the service sent: tuples stay tuples, bytes stay bytes."""
    expires = time.time() + 60
    sent = take(7, [row("a", 1), row("b", 2, "n", expires)], owner=False, first=True, last=True)
    got = msgspec.msgpack.decode(msgspec.msgpack.encode(sent), type=Take)
    assert got == sent
    holding = Holding()
    holding.take(got)
    assert holding.backups[7]["n"][b"b"] == (enc(2), expires)
    for packet in (
        GridOps([put(1, "k", 1)]),
        GridOutcomes([Outcome(True, enc(1), Change.UPDATED, 5.0)]),
        Backup([Op("m", 1, Kind.CLEAR)]),
        Promote([1, 2]),
        Release([3]),
    ):
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(packet), type=type(packet)) == packet
