"""Write-behind (grid/writebehind.py) over a real journal and a fake database: a flush
writes every dirty entry once, in batches; an unreachable database is retried with
exponential backoff up to the bridge's limit and leaves what it could not write dirty; a
refused batch is narrowed down to the entries at fault, which are set aside until they
change; a change made while a flush runs stays dirty for the next one; deletes, expiry and
clears reach the database as deletes; maps without a bridge are not tracked at all.

Nothing sleeps for real: the WriteBehind's ``sleep`` records the delays it is given."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import msgspec
import pytest

from packetstack.errors import BridgeRejected, BridgeUnavailable, ConfigError
from packetstack.grid.journal import Journal
from packetstack.grid.ops import Kind, Op
from packetstack.grid.writebehind import PAGES_AHEAD, Bridged, FlushReport, WriteBehind
from packetstack.storage import BridgeSettings, EmbeddedStore, Entry, MapBridge, MapSpec, resolve

pytestmark = pytest.mark.timeout(60)

enc = msgspec.msgpack.encode
WAIT = 10.0
PARTS = 271


def key(n: int) -> bytes:
    return enc(f"k{n:05d}")


def put(n: int, value: object, map: str = "m", part: int | None = None, expires: float = 0.0) -> Op:
    return Op(map, n % 7 if part is None else part, Kind.PUT, key(n), enc(value), None, expires)


def delete(n: int, map: str = "m", part: int | None = None) -> Op:
    return Op(map, n % 7 if part is None else part, Kind.DELETE, key(n))


def clear(part: int, map: str = "m") -> Op:
    return Op(map, part, Kind.CLEAR)


class FakeStore:
    """A database in a dict, with switches: ``unavailable`` makes the next N writes raise
    BridgeUnavailable, ``down`` every write, ``up_for`` lets N more writes through and then
    goes down; a write holding a value in ``refused`` raises BridgeRejected (all or
    nothing, like a transaction). ``before_write`` runs (once) before the next write."""

    def __init__(self, name: str = "fake") -> None:
        self.name = name
        self.data: dict[str, dict[bytes, bytes]] = {}
        self.unavailable = 0
        self.down = False
        self.up_for: int | None = None
        self.refused: set[bytes] = set()
        self.attempts = 0
        self.writes: list[tuple[str, list[Entry], list[bytes]]] = []  # those that went in
        self.before_write: Callable[[], Awaitable[None]] | None = None

    async def open(self, maps: Sequence[MapSpec]) -> None:
        pass

    async def load(self, map_name: str, key: bytes) -> bytes | None:
        return self.data.get(map_name, {}).get(key)

    async def load_many(self, map_name: str, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        table = self.data.get(map_name, {})
        return {k: table[k] for k in keys if k in table}

    async def iterate(self, map_name: str, batch: int = 1000) -> AsyncIterator[list[Entry]]:
        entries = sorted(self.data.get(map_name, {}).items())
        for start in range(0, len(entries), batch):
            yield entries[start : start + batch]

    async def write(
        self, map_name: str, upserts: Sequence[Entry], deletes: Sequence[bytes]
    ) -> None:
        self.attempts += 1
        if self.before_write is not None:
            hook, self.before_write = self.before_write, None
            await hook()
        if self.up_for is not None:
            if self.up_for == 0:
                self.down = True
                self.up_for = None
            else:
                self.up_for -= 1
        if self.down or self.unavailable:
            self.unavailable = max(0, self.unavailable - 1)
            raise BridgeUnavailable(f"fake {self.name}: connection refused")
        bad = [v for _, v in upserts if v in self.refused]
        if bad:
            raise BridgeRejected(
                f"fake {self.name}: value {msgspec.msgpack.decode(bad[0])!r} too long"
            )
        table = self.data.setdefault(map_name, {})
        for k, v in upserts:
            table[k] = v
        for k in deletes:
            table.pop(k, None)
        self.writes.append((map_name, list(upserts), list(deletes)))

    async def close(self) -> None:
        pass


class Sleeps:
    """A WriteBehind ``sleep`` that records the delays and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@pytest.fixture
async def journal(tmp_path: Path) -> AsyncIterator[Journal]:
    store = EmbeddedStore(tmp_path / "grid.db")
    await store.open("")
    opened = Journal(store)
    opened.bridged = frozenset({"m", "n", "o"})  # "plain" is not bridged
    await opened.open(PARTS)
    yield opened
    opened.close()
    await store.close()


@pytest.fixture
def fake() -> FakeStore:
    return FakeStore()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


def settings(**options: object) -> BridgeSettings:
    values: dict[str, object] = {"url": "fake://", "retry_delay": 0.5, "retry_max_delay": 30.0}
    values.update(options)
    return msgspec.convert(values, BridgeSettings)


def write_behind(
    journal: Journal,
    stores: dict[str, FakeStore],
    sleeps: Sleeps,
    maps: dict[str, str] | None = None,
    **options: object,
) -> WriteBehind:
    """A WriteBehind of ``maps`` (map -> bridge; by default "m" on "fake"), every bridge
    with the same settings (``options``)."""
    bridged = {
        name: Bridged(resolve(name, MapBridge(bridge=bridge)), bridge, settings(**options))
        for name, bridge in (maps or {"m": "fake"}).items()
    }
    return WriteBehind(journal, dict(stores), bridged, sleep=sleeps)  # type: ignore[arg-type]


async def journaled(journal: Journal, effects: list[Op]) -> None:
    """Journal ``effects`` and wait until they are committed (as a put's writer does)."""
    done = asyncio.Event()
    journal.write(effects, done.set)
    await asyncio.wait_for(done.wait(), WAIT)


async def put_many(
    journal: Journal, count: int, value: Callable[[int], object], map: str = "m"
) -> None:
    """``count`` entries in journal batches of 500 (as the service journals a loop's work)."""
    for start in range(0, count, 500):
        await journaled(
            journal, [put(n, value(n), map) for n in range(start, min(count, start + 500))]
        )


def values(table: dict[bytes, bytes]) -> dict[str, object]:
    return {msgspec.msgpack.decode(k): msgspec.msgpack.decode(v) for k, v in table.items()}


def expected(count: int, value: Callable[[int], object]) -> dict[str, object]:
    return {f"k{n:05d}": value(n) for n in range(count)}


def only(report: FlushReport) -> tuple[int, int, int, int, str]:
    """The one map's (written, deleted, set_aside, failed, error)."""
    (flushed,) = report.maps
    return flushed.written, flushed.deleted, flushed.set_aside, flushed.failed, flushed.error


# ------------------------------------------------------------------ batches


async def test_a_flush_writes_each_dirty_entry_once_in_batches_and_cleans_it(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps, batch=1000)
    await put_many(journal, 2500, lambda n: n)
    await journaled(journal, [put(n, -n) for n in range(100)])  # overwritten before the flush
    assert await journal.dirty_counts() == {"m": (2500, 0)}
    assert fake.attempts == 0  # nothing reaches the database before a flush

    report = await writer.flush()

    assert only(report) == (2500, 0, 0, 0, "")
    assert report.ok
    assert values(fake.data["m"]) == expected(2500, lambda n: -n if n < 100 else n)
    assert [len(upserts) for _, upserts, _ in fake.writes] == [1000, 1000, 500]
    assert await journal.dirty_counts() == {}
    assert writer.flushes == 1 and writer.last is report and writer.running == {}
    again = await writer.flush()
    assert only(again) == (0, 0, 0, 0, "") and fake.attempts == 3


async def test_many_pages_are_read_ahead_and_all_written(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    batch = 10
    count = batch * PAGES_AHEAD * 6 + 7  # six full journal pages and a short one
    writer = write_behind(journal, {"fake": fake}, sleeps, batch=batch)
    await put_many(journal, count, lambda n: f"v{n}")
    report = await writer.flush()
    assert only(report) == (count, 0, 0, 0, "")
    assert values(fake.data["m"]) == expected(count, lambda n: f"v{n}")
    assert len(fake.writes) == count // batch + 1
    written = [k for _, upserts, _ in fake.writes for k, _ in upserts]
    assert written == sorted(written) and len(set(written)) == count  # in key order, once


async def test_a_key_written_a_hundred_times_is_written_once_with_its_last_value(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps)
    for round_ in range(100):  # a hundred journal batches: folds in between or not
        await journaled(journal, [put(n, round_, part=n) for n in range(5)])
        if round_ == 50:
            assert await journal.dirty_counts() == {"m": (5, 0)}  # folds the log so far
    report = await writer.flush()
    assert only(report) == (5, 0, 0, 0, "")
    assert len(fake.writes) == 1
    assert values(fake.data["m"]) == {f"k{n:05d}": 99 for n in range(5)}


async def test_concurrent_flushes_run_one_at_a_time(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps, batch=100)
    await put_many(journal, 1000, lambda n: n)
    first, second = await asyncio.gather(writer.flush(), writer.flush())
    assert sorted([first.written, second.written]) == [0, 1000]
    assert sum(len(upserts) for _, upserts, _ in fake.writes) == 1000
    assert writer.flushes == 2


# ------------------------------------------------------------------ retries


async def test_an_unreachable_database_is_retried_with_exponential_backoff_capped(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(
        journal, {"fake": fake}, sleeps, retries=7, retry_delay=0.5, retry_max_delay=3.0
    )
    await put_many(journal, 300, lambda n: n)
    fake.unavailable = 6  # the seventh attempt, the last allowed, goes in

    report = await writer.flush()

    assert sleeps.delays == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert fake.attempts == 7
    assert writer.retries == 6
    assert only(report) == (300, 0, 0, 0, "")
    assert values(fake.data["m"]) == expected(300, lambda n: n)
    assert await journal.dirty_counts() == {}


async def test_after_its_retries_a_flush_gives_up_and_everything_stays_dirty(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps, retries=3, retry_delay=0.1)
    await put_many(journal, 250, lambda n: n)
    fake.down = True

    report = await writer.flush()

    assert fake.attempts == 3
    assert sleeps.delays == [0.1, 0.2]
    written, deleted, set_aside, failed, error = only(report)
    assert (written, deleted, set_aside, failed) == (0, 0, 0, 250)
    assert "fake fake: connection refused" in error and "gave up after 3 attempts" in error
    assert not report.ok
    assert "m" not in fake.data
    assert await journal.dirty_counts() == {"m": (250, 0)}

    fake.down = False
    report = await writer.flush()
    assert only(report) == (250, 0, 0, 0, "")
    assert values(fake.data["m"]) == expected(250, lambda n: n)
    assert await journal.dirty_counts() == {}


async def test_a_database_lost_mid_flush_stops_its_maps_and_not_the_others(
    journal: Journal, sleeps: Sleeps
) -> None:
    """Maps m and n share the bridge "fake", o has its own. "fake" takes one batch of m and
    goes away: m's other entries and all of n's stay dirty (n is not even tried), o's are
    written; once "fake" is back, the next flush writes what was left."""
    fake, other = FakeStore("fake"), FakeStore("other")
    writer = write_behind(
        journal,
        {"fake": fake, "other": other},
        sleeps,
        {"m": "fake", "n": "fake", "o": "other"},
        batch=100,
        retries=2,
        retry_delay=0.01,
    )
    for name in ("m", "n", "o"):
        await put_many(journal, 250, lambda n: n, map=name)
    fake.up_for = 1

    report = await writer.flush()

    by_map = {m.map: (m.written, m.failed, bool(m.error)) for m in report.maps}
    assert by_map == {"m": (100, 150, True), "n": (0, 250, True), "o": (250, 0, False)}
    assert report.maps[1].error == report.maps[0].error  # n: why its bridge is down
    assert fake.attempts == 1 + 2  # n's entries were not tried against a bridge just given up
    assert await journal.dirty_counts() == {"m": (150, 0), "n": (250, 0)}
    assert report.failed == 400 and report.written == 350

    fake.down = False
    report = await writer.flush()
    assert [(m.map, m.written, m.failed) for m in report.maps] == [
        ("m", 150, 0),
        ("n", 250, 0),
        ("o", 0, 0),
    ]
    assert values(fake.data["m"]) == values(fake.data["n"]) == expected(250, lambda n: n)
    assert await journal.dirty_counts() == {}


# ------------------------------------------------------------------ refusals


async def test_two_refused_entries_among_a_thousand_are_set_aside_and_the_rest_written(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps, batch=1000)
    bad = {137: "x" * 50, 862: "y" * 60}
    await put_many(journal, 1000, lambda n: bad.get(n, f"v{n}"))
    fake.refused = {enc(v) for v in bad.values()}

    report = await writer.flush()

    assert only(report) == (998, 0, 2, 0, "")
    assert not report.ok
    assert values(fake.data["m"]) == {
        k: v for k, v in expected(1000, lambda n: f"v{n}").items() if k not in ("k00137", "k00862")
    }
    assert sleeps.delays == []  # a refusal is not retried: the same data fails again
    assert fake.attempts <= 2 + 4 * 10  # narrowed down by halves, not entry by entry
    rejected = await journal.rejected()
    assert sorted((m, k) for m, k, _, _ in rejected) == [("m", key(137)), ("m", key(862))]
    errors = {k: error for _, k, error, _ in rejected}
    assert errors[key(137)] == f"fake fake: value {'x' * 50!r} too long"
    assert errors[key(862)] == f"fake fake: value {'y' * 60!r} too long"
    assert await journal.dirty_counts() == {"m": (2, 2)}  # dirty still, and set aside


async def test_set_aside_entries_are_skipped_until_they_change_or_are_retried(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps, batch=100)
    await put_many(journal, 300, lambda n: "long" * 10 if n in (5, 205) else n)
    fake.refused = {enc("long" * 10), enc("longer" * 10)}
    assert only(await writer.flush()) == (298, 0, 2, 0, "")
    attempts = fake.attempts

    # Not tried again: neither written nor set aside a second time.
    assert only(await writer.flush()) == (0, 0, 0, 0, "")
    assert fake.attempts == attempts
    assert await journal.dirty_counts() == {"m": (2, 2)}

    # Changed: tried again. 5 is fixed and goes in; 205 is still refused, set aside again.
    await journaled(journal, [put(5, "short"), put(205, "longer" * 10)])
    assert only(await writer.flush()) == (1, 0, 1, 0, "")
    assert values(fake.data["m"])["k00005"] == "short"
    assert [k for _, k, _, _ in await journal.rejected()] == [key(205)]

    # retry_rejected: tried though unchanged; still refused, then (refusal lifted) written.
    assert only(await writer.flush(retry_rejected=True)) == (0, 0, 1, 0, "")
    fake.refused = set()
    assert only(await writer.flush()) == (0, 0, 0, 0, "")  # still skipped without asking
    assert only(await writer.flush(retry_rejected=True)) == (1, 0, 0, 0, "")
    assert values(fake.data["m"])["k00205"] == "longer" * 10
    assert await journal.rejected() == []
    assert await journal.dirty_counts() == {}


async def test_a_set_aside_entry_deleted_later_is_deleted(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps)
    await journaled(journal, [put(1, "bad"), put(2, "good")])
    fake.refused = {enc("bad")}
    assert only(await writer.flush()) == (1, 0, 1, 0, "")
    await journaled(journal, [delete(1)])
    assert only(await writer.flush()) == (0, 1, 0, 0, "")
    assert values(fake.data["m"]) == {"k00002": "good"}
    assert await journal.rejected() == [] and await journal.dirty_counts() == {}


# ------------------------------------------------------------------ generations


async def test_a_key_changed_after_the_flush_read_it_stays_dirty(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    """The flush read k1 = "old" (and k2): before its write reaches the database, k1 is
    written again and k2 deleted. The flush writes what it read, but cleans neither: the
    next flush writes k1's new value and deletes k2."""
    writer = write_behind(journal, {"fake": fake}, sleeps)
    await journaled(journal, [put(1, "old"), put(2, "old"), put(3, "old")])

    async def change() -> None:
        await journaled(journal, [put(1, "new"), delete(2)])

    fake.before_write = change
    report = await writer.flush()
    assert only(report) == (3, 0, 0, 0, "")
    assert values(fake.data["m"]) == {"k00001": "old", "k00002": "old", "k00003": "old"}
    assert await journal.dirty_counts() == {"m": (2, 0)}

    report = await writer.flush()
    assert only(report) == (1, 1, 0, 0, "")
    assert values(fake.data["m"]) == {"k00001": "new", "k00003": "old"}
    assert await journal.dirty_counts() == {}


async def test_a_key_changed_after_a_refusal_is_not_skipped(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    """k1 is refused while the flush runs, and changed meanwhile to a value the database
    takes: it is set aside at the generation the flush read, so the new one is written."""
    writer = write_behind(journal, {"fake": fake}, sleeps)
    await journaled(journal, [put(1, "bad")])
    fake.refused = {enc("bad")}

    async def change() -> None:
        await journaled(journal, [put(1, "fixed")])

    fake.before_write = change
    assert only(await writer.flush()) == (0, 0, 1, 0, "")
    assert await journal.dirty_counts() == {"m": (1, 0)}  # dirty, not set aside: it changed
    assert only(await writer.flush()) == (1, 0, 0, 0, "")
    assert values(fake.data["m"]) == {"k00001": "fixed"}


# ------------------------------------------------------------------ deletes


async def test_deletes_expiry_and_never_flushed_deletes(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps)
    await journaled(journal, [put(n, n) for n in range(4)])
    assert only(await writer.flush()) == (4, 0, 0, 0, "")

    await journaled(journal, [delete(0), put(9, 9)])
    await journaled(journal, [delete(9)])  # put and deleted between two flushes
    await journaled(journal, [put(8, 8, expires=time.time() - 1)])  # past its expiry
    await journaled(journal, [put(3, 33, expires=time.time() + 3600)])

    report = await writer.flush()
    # A tombstone is a delete, whether or not the database ever had the key (harmless).
    assert only(report) == (1, 3, 0, 0, "")
    assert fake.writes[-1] == ("m", [(key(3), enc(33))], [key(0), key(8), key(9)])
    assert values(fake.data["m"]) == {"k00001": 1, "k00002": 2, "k00003": 33}
    assert await journal.dirty_counts() == {}


async def test_clear_makes_every_cleared_key_a_delete(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps, maps={"m": "fake", "n": "fake"})
    await journaled(journal, [put(n, n, part=n % 4) for n in range(40)])
    await journaled(journal, [put(n, n, "n", part=n % 4) for n in range(10)])
    assert (await writer.flush()).written == 50

    # Changed before the clear (in an earlier fold): deleted with the rest.
    await journaled(journal, [put(100, "unflushed", part=0), put(1, "changed", part=1)])
    assert await journal.dirty_counts() == {"m": (2, 0)}
    # In the clear's own fold: a put before it is deleted too (the fold cannot tell whether
    # the database has that key: a put of a key it had, or a load, look the same), one after
    # it reaches the database.
    await journaled(
        journal,
        [put(101, "gone", part=0), clear(0), clear(1), put(102, "after", part=1)],
    )

    cleared = sorted([key(n) for n in range(40) if n % 4 in (0, 1)] + [key(100), key(101)])
    assert await journal.dirty_counts() == {"m": (len(cleared) + 1, 0)}
    report = await writer.flush()
    m, n = report.maps
    assert (m.written, m.deleted, n.written, n.deleted) == (1, len(cleared), 0, 0)
    assert values(fake.data["m"]) == {
        **{f"k{i:05d}": i for i in range(40) if i % 4 in (2, 3)},
        "k00102": "after",
    }
    assert values(fake.data["n"]) == {f"k{i:05d}": i for i in range(10)}  # another map
    deleted = sorted(k for _, _, deletes in fake.writes[2:] for k in deletes)
    assert deleted == cleared


# ------------------------------------------------------------------ maps


async def test_an_unbridged_maps_changes_are_not_tracked(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps)
    await journaled(journal, [put(n, n, "plain") for n in range(20)] + [put(1, 1)])
    await journaled(journal, [delete(3, "plain"), clear(0, "plain")])
    assert await journal.dirty_counts() == {"m": (1, 0)}
    with pytest.raises(ConfigError, match="'plain' has no bridge"):
        await writer.flush("plain")
    report = await writer.flush()
    assert [m.map for m in report.maps] == ["m"] and report.written == 1
    assert list(fake.data) == ["m"]


async def test_a_flush_of_one_map_leaves_the_others_dirty(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps, maps={"m": "fake", "n": "fake"})
    await journaled(journal, [put(n, n) for n in range(5)] + [put(n, n, "n") for n in range(7)])
    report = await writer.flush("n")
    assert [(m.map, m.written) for m in report.maps] == [("n", 7)]
    assert list(fake.data) == ["n"]
    assert await journal.dirty_counts() == {"m": (5, 0)}


# ------------------------------------------------------------------ progress


async def test_progress_is_reported_per_batch_up_to_the_total(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps, batch=1000)
    await put_many(journal, 2500, lambda n: n)
    calls: list[tuple[str, int, int]] = []
    running: list[dict[str, tuple[int, int]]] = []

    def progress(name: str, done: int, total: int) -> None:
        calls.append((name, done, total))
        running.append(dict(writer.running))

    await writer.flush(progress=progress)
    assert calls == [("m", 1000, 2500), ("m", 2000, 2500), ("m", 2500, 2500)]
    assert running == [{"m": (1000, 2500)}, {"m": (2000, 2500)}, {"m": (2500, 2500)}]
    assert writer.running == {}


async def test_progress_reaches_the_total_with_entries_set_aside(
    journal: Journal, fake: FakeStore, sleeps: Sleeps
) -> None:
    writer = write_behind(journal, {"fake": fake}, sleeps)
    await journaled(journal, [put(0, "bad")])
    fake.refused = {enc("bad")}
    assert (await writer.flush()).set_aside == 1
    await journaled(journal, [put(n, n) for n in range(1, 11)])
    calls: list[tuple[str, int, int]] = []
    await writer.flush(progress=lambda *call: calls.append(call))
    assert calls[-1] == ("m", 10, 10)


async def test_a_journal_from_before_dirty_rows_carried_values_is_flushed_right(
    tmp_path: Path, fake: FakeStore, sleeps: Sleeps
) -> None:
    """Dirty rows without a value column (an older journal) get theirs from grid when the
    journal opens: the entries still there are written, the others deleted."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "grid.db")
    db.executescript(
        "CREATE TABLE grid (part INTEGER NOT NULL, map TEXT NOT NULL, key BLOB NOT NULL, "
        "value BLOB NOT NULL, expires REAL NOT NULL DEFAULT 0, PRIMARY KEY (part, map, key)) "
        "WITHOUT ROWID; CREATE TABLE grid_dirty (map TEXT NOT NULL, key BLOB NOT NULL, "
        "part INTEGER NOT NULL, gen INTEGER NOT NULL, PRIMARY KEY (map, key)) WITHOUT ROWID; "
        "CREATE TABLE grid_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID; "
        f"INSERT INTO grid_meta VALUES ('dirty_gen', 5), ('partitions', {PARTS});"
    )
    db.executemany(
        "INSERT INTO grid VALUES (?, 'm', ?, ?, ?)",
        [(1, key(1), enc("one"), 0.0), (2, key(2), enc("two"), time.time() - 1)],
    )
    db.executemany(
        "INSERT INTO grid_dirty VALUES ('m', ?, ?, 5)", [(key(1), 1), (key(2), 2), (key(3), 3)]
    )
    db.commit()
    db.close()
    store = EmbeddedStore(tmp_path / "grid.db")
    await store.open("")
    journal = Journal(store)
    journal.bridged = frozenset({"m"})
    try:
        await journal.open(PARTS)
        report = await write_behind(journal, {"fake": fake}, sleeps).flush()
        # 2 expired before the flush, 3 deleted before the upgrade: both deletes.
        assert only(report) == (1, 2, 0, 0, "")
        assert fake.writes == [("m", [(key(1), enc("one"))], [key(2), key(3)])]
        assert await journal.dirty_counts() == {}
    finally:
        journal.close()
        await store.close()
