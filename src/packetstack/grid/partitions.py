"""Keys to partitions, and the rebalance planner. Pure logic: no I/O, no asyncio.

A key's partition is ``crc32(encoded key) % partitions``: stable across processes,
machines and Python versions (``hash()`` is salted per process and would scatter a key
over different partitions in different clients).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from zlib import crc32

DEFAULT_PARTITIONS = 271
DEFAULT_BACKUPS = 1


def partition_of(key: bytes, partitions: int = DEFAULT_PARTITIONS) -> int:
    """The partition of an encoded key."""
    return crc32(key) % partitions


class Plan:
    """Who should own and back up each partition (None: the service itself)."""

    __slots__ = ("backups", "owners")

    def __init__(self, owners: list[str | None], backups: list[list[str]]) -> None:
        self.owners = owners
        self.backups = backups

    def __repr__(self) -> str:
        return f"Plan(owners={Counter(self.owners)})"


def plan(
    owners: Sequence[str | None],
    backups: Sequence[Sequence[str]],
    holders: Sequence[str],
    backup_count: int = DEFAULT_BACKUPS,
) -> Plan:
    """The assignment to move to from the current one, given the holders now connected.

    Moves as few partitions as possible while owner counts differ by at most one between
    holders: a partition keeps its owner while that owner is under its share; the rest go
    to a current backup with room (a promotion, no copy), else to the holder with the most
    room. Each partition gets ``min(backup_count, holders - 1)`` backups other than its
    owner, kept where they are when possible, else given to the least-loaded holders.
    With no holder, the service owns everything.
    """
    count = len(owners)
    if not holders:
        return Plan([None] * count, [[] for _ in range(count)])
    live = set(holders)
    current = Counter(owner for owner in owners if owner in live)
    # The holders with the most partitions now keep the larger shares: fewer moves.
    base, extra = divmod(count, len(holders))
    by_load = sorted(holders, key=lambda h: (-current[h], holders.index(h)))
    share = {holder: base + (1 if rank < extra else 0) for rank, holder in enumerate(by_load)}

    new_owners: list[str | None] = [None] * count
    taken: Counter[str] = Counter()
    orphans = []
    for part, owner in enumerate(owners):
        if owner is not None and owner in live and taken[owner] < share[owner]:
            new_owners[part] = owner
            taken[owner] += 1
        else:
            orphans.append(part)
    for part in orphans:
        room = [h for h in holders if taken[h] < share[h]]
        promoted = [h for h in backups[part] if h in room]
        chosen = promoted[0] if promoted else max(room, key=lambda h: share[h] - taken[h])
        new_owners[part] = chosen
        taken[chosen] += 1

    wanted = min(backup_count, len(holders) - 1)
    load: Counter[str] = Counter()
    new_backups: list[list[str]] = []
    for part in range(count):
        owner = new_owners[part]
        kept = [h for h in backups[part] if h in live and h != owner][:wanted]
        new_backups.append(kept)
        load.update(kept)
    for part in range(count):
        picked = new_backups[part]
        while len(picked) < wanted:
            owner = new_owners[part]
            candidate = min(
                (h for h in holders if h != owner and h not in picked),
                key=lambda h: (load[h] + taken[h], holders.index(h)),
            )
            picked.append(candidate)
            load[candidate] += 1
    return Plan(new_owners, new_backups)
