"""Keys to partitions (crc32 % partitions, stable everywhere) and the rebalance planner:
balanced owners, valid backups, as few moves as possible, promotions preferred."""

from __future__ import annotations

import copy
import random
import zlib
from collections import Counter
from collections.abc import Sequence

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packetstack.grid.partitions import (
    DEFAULT_BACKUPS,
    DEFAULT_PARTITIONS,
    Plan,
    partition_of,
    plan,
)

N = DEFAULT_PARTITIONS
encode = msgspec.msgpack.encode


def empty(count: int = N) -> tuple[list[str | None], list[list[str]]]:
    return [None] * count, [[] for _ in range(count)]


def fresh(holders: Sequence[str], backup_count: int = 1, count: int = N) -> Plan:
    owners, backups = empty(count)
    return plan(owners, backups, holders, backup_count)


def moved(before: Sequence[str | None], after: Sequence[str | None]) -> int:
    return sum(1 for old, new in zip(before, after, strict=True) if old != new)


def check_valid(result: Plan, count: int, holders: Sequence[str], backup_count: int) -> None:
    """Every partition has a live owner, owner counts differ by at most one, and each has
    min(backup_count, holders - 1) distinct live backups other than its owner."""
    assert len(result.owners) == count
    assert len(result.backups) == count
    if not holders:
        assert result.owners == [None] * count
        assert result.backups == [[] for _ in range(count)]
        return
    live = set(holders)
    assert all(owner in live for owner in result.owners)
    counts = Counter(result.owners)
    per_holder = [counts[h] for h in live]
    assert max(per_holder) - min(per_holder) <= 1, counts
    assert sum(per_holder) == count
    wanted = min(backup_count, len(live) - 1)
    for part, backups in enumerate(result.backups):
        assert len(backups) == wanted, (part, backups)
        assert len(set(backups)) == len(backups), (part, backups)
        assert result.owners[part] not in backups, (part, result.owners[part], backups)
        assert set(backups) <= live


# ------------------------------------------------------------------ partition_of


def test_defaults() -> None:
    assert DEFAULT_PARTITIONS == 271
    assert DEFAULT_BACKUPS == 1


@pytest.mark.parametrize(
    ("key", "crc", "part"),
    [
        # Derived once from zlib.crc32 of the msgpack encoding; they must never change, or
        # clients of different versions would look for a key in different partitions.
        ("a", 3429944985, 152),
        ("hello", 136409189, 255),
        (1, 2768625435, 5),
        (0, 3523407757, 173),
        (-1, 4278190080, 71),
        ("user:42", 1017766660, 144),
        (b"raw", 770708655, 102),
        ((1, "x"), 3725453474, 214),
    ],
)
def test_partition_of_known_keys(key: object, crc: int, part: int) -> None:
    encoded = encode(key)
    assert zlib.crc32(encoded) == crc
    assert partition_of(encoded) == part == crc % 271
    assert partition_of(encoded, 16) == crc % 16


def test_partition_of_is_the_standard_crc32() -> None:
    # 0xCBF43926 is CRC-32's published check value for "123456789".
    assert partition_of(b"123456789") == 0xCBF43926 % 271 == 117
    assert partition_of(b"123456789", 7) == 0xCBF43926 % 7
    assert partition_of(b"") == 0


def test_partition_of_is_in_range_for_any_partition_count() -> None:
    for partitions in (1, 2, 7, 271, 1024):
        for i in range(2_000):
            assert 0 <= partition_of(encode(i), partitions) < partitions
    assert {partition_of(encode(i), 1) for i in range(100)} == {0}


def test_partition_of_spreads_keys_evenly() -> None:
    keys = 100_000
    counts = Counter(partition_of(encode(f"key-{i}")) for i in range(keys))
    assert set(counts) == set(range(N))
    mean = keys / N
    assert min(counts.values()) >= 0.7 * mean, min(counts.values())
    assert max(counts.values()) <= 1.3 * mean, max(counts.values())


def test_partition_of_spreads_integer_keys_evenly() -> None:
    keys = 100_000
    counts = Counter(partition_of(encode(i)) for i in range(keys))
    assert set(counts) == set(range(N))
    mean = keys / N
    assert 0.7 * mean <= min(counts.values())
    assert max(counts.values()) <= 1.3 * mean


# ------------------------------------------------------------------------- plan


def test_no_holders_the_service_owns_everything() -> None:
    owners: list[str | None] = ["a", "b", None] * 3
    backups = [["b"], ["a"], []] * 3
    result = plan(owners, backups, [], 2)
    assert result.owners == [None] * 9
    assert result.backups == [[] for _ in range(9)]
    assert "None" in repr(result)


def test_one_holder_owns_everything_without_backups() -> None:
    result = fresh(["solo"], backup_count=3)
    assert result.owners == ["solo"] * N
    assert result.backups == [[] for _ in range(N)]


@pytest.mark.parametrize("holders", range(1, 8))
def test_owner_counts_differ_by_at_most_one(holders: int) -> None:
    names = [f"h{i}" for i in range(holders)]
    result = fresh(names)
    check_valid(result, N, names, 1)
    counts = Counter(result.owners)
    assert set(counts) == set(names)
    assert max(counts.values()) - min(counts.values()) <= 1


@pytest.mark.parametrize(("holders", "backup_count"), [(2, 1), (3, 1), (3, 2), (4, 3), (2, 5)])
def test_each_partition_gets_distinct_backups_other_than_its_owner(
    holders: int, backup_count: int
) -> None:
    names = [f"h{i}" for i in range(holders)]
    result = fresh(names, backup_count)
    wanted = min(backup_count, holders - 1)
    for part in range(N):
        backups = result.backups[part]
        assert len(backups) == wanted
        assert len(set(backups)) == wanted
        assert result.owners[part] not in backups


def test_zero_backups() -> None:
    result = fresh(["a", "b", "c"], backup_count=0)
    assert result.backups == [[] for _ in range(N)]


def test_backup_load_is_spread_on_a_fresh_plan() -> None:
    names = ["a", "b", "c"]
    result = fresh(names, 1)
    load = Counter(b for backups in result.backups for b in backups)
    assert set(load) == set(names)
    assert max(load.values()) - min(load.values()) <= 2


def test_a_stable_plan_moves_nothing() -> None:
    names = ["a", "b", "c", "d"]
    first = fresh(names, 2)
    again = plan(first.owners, first.backups, names, 2)
    assert again.owners == first.owners
    assert again.backups == first.backups


def test_plan_does_not_mutate_its_inputs() -> None:
    first = fresh(["a", "b", "c"], 1)
    owners, backups = list(first.owners), copy.deepcopy(first.backups)
    plan(first.owners, first.backups, ["b", "c", "d"], 2)
    assert first.owners == owners
    assert first.backups == backups


def test_adding_a_holder_moves_only_its_share() -> None:
    three = fresh(["a", "b", "c"])
    four = plan(three.owners, three.backups, ["a", "b", "c", "d"], 1)
    check_valid(four, N, ["a", "b", "c", "d"], 1)
    changed = moved(three.owners, four.owners)
    assert changed <= N // 4 + 1 + 2, changed
    # Every move goes to the newcomer: nobody else gains a partition.
    for part in range(N):
        if three.owners[part] != four.owners[part]:
            assert four.owners[part] == "d"
    assert Counter(four.owners)["d"] == changed


def test_removing_a_holder_only_reassigns_its_partitions() -> None:
    names = ["a", "b", "c", "d"]
    four = fresh(names)
    lost = [part for part, owner in enumerate(four.owners) if owner == "b"]
    three = plan(four.owners, four.backups, ["a", "c", "d"], 1)
    check_valid(three, N, ["a", "c", "d"], 1)
    changed = moved(four.owners, three.owners)
    assert changed <= len(lost) + len(names)
    assert changed == len(lost)  # 271 = 68+68+68+67: the survivors are never over share
    for part in range(N):
        if four.owners[part] != "b":
            assert three.owners[part] == four.owners[part]


def test_a_lost_owner_s_partition_goes_to_its_backup_with_room() -> None:
    # a is gone; b backs up part 0 and is under its share; d (new, empty) has more room but
    # taking the partition there would mean a copy instead of a promotion.
    owners: list[str | None] = ["a", "a", "a", "b", "c", "c"]
    backups = [["b"], ["c"], ["c"], ["c"], ["b"], ["b"]]
    result = plan(owners, backups, ["b", "c", "d"], 1)
    # Shares are 2 each: b has room for 1, d for 2, c (its backup) none for parts 1 and 2.
    assert result.owners == ["b", "d", "d", "b", "c", "c"]
    check_valid(result, 6, ["b", "c", "d"], 1)


def test_a_lost_owner_s_partition_goes_elsewhere_when_its_backup_is_full() -> None:
    owners: list[str | None] = ["a", "b", "b"]
    backups = [["b"], ["c"], ["c"]]
    result = plan(owners, backups, ["b", "c"], 1)
    # b keeps its two (it has the most: the larger share), so part 0 must go to c.
    assert result.owners == ["c", "b", "b"]
    assert result.backups[0] == ["b"]


def test_promotions_after_losing_a_holder_of_a_replicated_plan() -> None:
    before = fresh(["a", "b", "c"], 1)
    after = plan(before.owners, before.backups, ["b", "c"], 1)
    check_valid(after, N, ["b", "c"], 1)
    final = Counter(after.owners)
    promoted: dict[str, list[bool]] = {"b": [], "c": []}
    for part, owner in enumerate(before.owners):
        if owner != "a":
            assert after.owners[part] == owner  # survivors keep theirs
            continue
        backup = before.backups[part][0]
        promoted[backup].append(after.owners[part] == backup)
    for backup, flags in promoted.items():
        # Promoted while the backup had room; once it is full, never again.
        first_refused = flags.index(False) if False in flags else len(flags)
        assert all(flags[:first_refused]) and not any(flags[first_refused:]), backup
        if first_refused < len(flags):
            assert final[backup] >= N // 2, (backup, final)
    assert sum(sum(flags) for flags in promoted.values()) > 0


def test_dead_names_and_the_service_are_replaced() -> None:
    owners: list[str | None] = [None, "ghost", "a", None, "ghost", "a"]
    backups = [["ghost"], ["a"], ["ghost", "b"], [], ["b"], ["a"]]
    result = plan(owners, backups, ["a", "b"], 1)
    check_valid(result, 6, ["a", "b"], 1)
    assert Counter(result.owners) == {"a": 3, "b": 3}
    assert result.owners[2] == result.owners[5] == "a"  # a keeps what it had
    assert result.owners[1] == "a"  # ghost's part 1 promoted to its backup a
    assert result.owners[4] == "b"  # ghost's part 4 promoted to its backup b
    assert result.owners == ["b", "a", "a", "b", "b", "a"]
    assert result.backups[2] == ["b"]  # kept, minus the dead one
    assert result.backups[4] == ["a"]  # its backup became its owner: a fresh one


def test_backups_are_kept_where_they_are() -> None:
    names = ["a", "b", "c", "d"]
    first = fresh(names, 2)
    # Shuffle nothing, drop d: every backup still live and not the new owner stays put.
    second = plan(first.owners, first.backups, ["a", "b", "c"], 2)
    for part in range(N):
        kept = [b for b in first.backups[part] if b != "d" and b != second.owners[part]]
        assert second.backups[part][: len(kept)] == kept


def test_the_new_owner_is_not_its_own_backup() -> None:
    # Part 0's owner a is gone, its backup b is promoted: b cannot stay its backup.
    result = plan(["a", "c"], [["b"], ["b"]], ["b", "c"], 1)
    assert result.owners == ["b", "c"]
    assert result.backups == [["c"], ["b"]]


# --------------------------------------------------------------------- property

NAMES = ["a", "b", "c", "d", "e", "f", "g"]


@st.composite
def situations(draw: st.DrawFn) -> tuple[list[str | None], list[list[str]], list[str], int]:
    """A previous assignment (owners and backups among live, dead and no holders) and the
    holders now connected. Small ones are drawn entry by entry (they shrink well); the
    full-size ones from a seeded generator (drawing 271 lists one by one is slow)."""
    count = draw(st.sampled_from([1, 2, 3, 5, 13, 64, 271]))
    known = [*NAMES, "ghost1", "ghost2"]
    if count <= 13:
        name = st.sampled_from(known)
        owners = draw(st.lists(st.none() | name, min_size=count, max_size=count))
        backups = draw(
            st.lists(st.lists(name, max_size=3, unique=True), min_size=count, max_size=count)
        )
    else:
        rng = random.Random(draw(st.integers(0, 2**32)))
        choices: list[str | None] = [None, *known]
        owners = [rng.choice(choices) for _ in range(count)]
        backups = [rng.sample(known, rng.randint(0, 3)) for _ in range(count)]
    holders = draw(st.lists(st.sampled_from(NAMES), unique=True, max_size=len(NAMES)))
    backup_count = draw(st.integers(0, 3))
    return owners, backups, holders, backup_count


def fewest_moves(owners: Sequence[str | None], holders: Sequence[str]) -> int:
    """Independently: the partitions that must move for owner counts to differ by at
    most one, when the holders owning most keep the larger shares."""
    count = len(owners)
    base, extra = divmod(count, len(holders))
    current = Counter(o for o in owners if o in set(holders))
    loads = sorted((current[h] for h in holders), reverse=True)
    shares = [base + 1] * extra + [base] * (len(holders) - extra)
    return count - sum(min(load, s) for load, s in zip(loads, shares, strict=True))


@settings(max_examples=200, deadline=None)
@given(situations())
def test_plan_invariants(
    situation: tuple[list[str | None], list[list[str]], list[str], int],
) -> None:
    owners, backups, holders, backup_count = situation
    before = (list(owners), copy.deepcopy(backups))
    result = plan(owners, backups, holders, backup_count)
    assert (owners, backups) == before  # inputs untouched
    check_valid(result, len(owners), holders, backup_count)
    if not holders:
        return
    live = set(holders)
    # As few moves as balance allows.
    assert moved(owners, result.owners) == fewest_moves(owners, holders)
    # Backups still live and not the owner stay where they were (first ones first).
    wanted = min(backup_count, len(holders) - 1)
    for part, old in enumerate(backups):
        kept = [b for b in old if b in live and b != result.owners[part]][:wanted]
        assert result.backups[part][: len(kept)] == kept
    # Planning again from the result changes nothing.
    again = plan(result.owners, result.backups, holders, backup_count)
    assert again.owners == result.owners
    assert again.backups == result.backups
