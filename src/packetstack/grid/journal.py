"""The grid's journal: the latest value of every entry, in the embedded store.

The service writes each acknowledged change here before it answers the writer, so a
partition whose owner and backups all die is rebuilt from the journal, and a restarted
service starts from it. Writes ride the store's group commits (never on the event loop);
a commit that fails is retried until it succeeds, and only then is the writer answered.

Two tables: ``grid`` holds the latest value per key, ``grid_log`` the changes not yet
folded into it, one row per batch (the effects of one loop iteration, msgpack-encoded). A
writer waits only for its batch's single row: on this kind of machine SQLite takes 5-10 us
per row, so a hundred upserts would make every put wait a millisecond. The log is folded
into ``grid`` later, in larger transactions (FOLD_AT effects, or FOLD_IDLE seconds after the
last write), and always before ``grid`` is read.

Maps with a database bridge are written to it only on flush (write-behind). The fold marks
what changed in them dirty in ``grid_dirty``: the key and the generation of the fold that
changed it last (a deleted entry has a dirty row and no ``grid`` row: a tombstone). A flush
writes what it read and then cleans each key only if its generation is still the one it
read, so a change made during the flush stays dirty for the next one. Dirty rows live in
the store like everything else: a service killed with the database down loses none.
Entries the database refused are set aside in ``grid_rejected`` (with the generation they
were refused at) and skipped until they change or a flush is asked to retry them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet

import msgspec

from ..errors import ConfigError
from ..storage import EmbeddedStore, Statement
from .ops import Kind, Op, Row

# (key, generation, value or None: deleted, whether a flush set it aside before)
Dirty = tuple[bytes, int, bytes | None, bool]

log = logging.getLogger("packetstack.grid")

SCHEMA = """
CREATE TABLE IF NOT EXISTS grid (
    part INTEGER NOT NULL,
    map TEXT NOT NULL,
    key BLOB NOT NULL,
    value BLOB NOT NULL,
    expires REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (part, map, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS grid_expiry ON grid (expires) WHERE expires > 0;
CREATE TABLE IF NOT EXISTS grid_log (id INTEGER PRIMARY KEY, effects BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS grid_meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grid_dirty (
    map TEXT NOT NULL,
    key BLOB NOT NULL,
    part INTEGER NOT NULL,
    gen INTEGER NOT NULL,
    value BLOB,
    expires REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (map, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grid_rejected (
    map TEXT NOT NULL,
    key BLOB NOT NULL,
    gen INTEGER NOT NULL,
    error TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (map, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS grid_listeners (
    map TEXT NOT NULL,
    name TEXT NOT NULL,
    PRIMARY KEY (map, name)
) WITHOUT ROWID;
"""

_PUT = (
    "INSERT INTO grid (part, map, key, value, expires) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (part, map, key) DO UPDATE SET value = excluded.value, "
    "expires = excluded.expires"
)
_DELETE = "DELETE FROM grid WHERE part = ? AND map = ? AND key = ?"
_CLEAR = "DELETE FROM grid WHERE part = ? AND map = ?"
# A dirty row carries the value it is to be written with (NULL: deleted), a copy of
# grid's: a flush reads one table, without a lookup in grid per entry.
_DIRTY = (
    "INSERT INTO grid_dirty (map, key, part, gen, value, expires) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (map, key) DO UPDATE SET gen = excluded.gen, value = excluded.value, "
    "expires = excluded.expires"
)
# Before a clear of a bridged map: everything it removes is dirty (deleted on flush).
_DIRTY_CLEARED = (
    "INSERT INTO grid_dirty (map, key, part, gen, value) SELECT map, key, part, ?, NULL "
    "FROM grid WHERE part = ? AND map = ? ON CONFLICT (map, key) DO UPDATE SET "
    "gen = excluded.gen, value = NULL, expires = 0"
)
# An entry past its expiry that the sweeper has not removed yet is gone: a delete.
_DIRTY_PAGE = (
    "SELECT d.key, d.gen, CASE WHEN d.expires > 0 AND d.expires <= ? THEN NULL "
    "ELSE d.value END, r.gen IS NOT NULL FROM grid_dirty d "
    "LEFT JOIN grid_rejected r ON r.map = d.map AND r.key = d.key "
    "WHERE d.map = ? AND d.key > ? "
)
_NOT_REJECTED = "AND (r.gen IS NULL OR r.gen != d.gen) "
_DIRTY_PAGE_END = "ORDER BY d.key LIMIT ?"
_DIRTY_PAGE_CLEAN = (  # _DIRTY_PAGE for a map with no entry set aside
    "SELECT d.key, d.gen, CASE WHEN d.expires > 0 AND d.expires <= ? THEN NULL "
    "ELSE d.value END, 0 FROM grid_dirty d WHERE d.map = ? AND d.key > ? " + _DIRTY_PAGE_END
)
# Journals written before dirty rows carried their values get them from grid.
_DIRTY_VALUES = (
    "ALTER TABLE grid_dirty ADD COLUMN value BLOB",
    "ALTER TABLE grid_dirty ADD COLUMN expires REAL NOT NULL DEFAULT 0",
    "UPDATE grid_dirty SET (value, expires) = (SELECT g.value, g.expires FROM grid g "
    "WHERE g.part = grid_dirty.part AND g.map = grid_dirty.map AND g.key = grid_dirty.key) "
    "WHERE EXISTS (SELECT 1 FROM grid g WHERE g.part = grid_dirty.part "
    "AND g.map = grid_dirty.map AND g.key = grid_dirty.key)",
)
_ANY_REJECTED = "SELECT 1 FROM grid_rejected WHERE map = ? LIMIT 1"
_CLEAN_RANGE = "DELETE FROM grid_dirty WHERE map = ? AND key >= ? AND key <= ? AND gen <= ? "
_NOT_SET_ASIDE = (
    "AND NOT EXISTS (SELECT 1 FROM grid_rejected r WHERE r.map = grid_dirty.map "
    "AND r.key = grid_dirty.key AND r.gen = grid_dirty.gen)"
)
_LATEST_GEN = "SELECT value FROM grid_meta WHERE key = 'dirty_gen'"
_UNREJECT = "DELETE FROM grid_rejected WHERE map = ? AND key = ?"
_REJECT = "INSERT OR REPLACE INTO grid_rejected (map, key, gen, error, at) VALUES (?, ?, ?, ?, ?)"
_IS_DIRTY = "SELECT 1 FROM grid_dirty WHERE map = ? AND key = ?"
_COUNT_DIRTY = "SELECT map, count(*) FROM grid_dirty GROUP BY map"
_COUNT_REJECTED = (
    "SELECT r.map, count(*) FROM grid_rejected r JOIN grid_dirty d "
    "ON d.map = r.map AND d.key = r.key AND d.gen = r.gen GROUP BY r.map"
)
_KNOWN = (
    "SELECT 1 FROM grid WHERE part = ? AND map = ? AND key = ? "
    "UNION ALL SELECT 1 FROM grid_dirty WHERE map = ? AND key = ?"
)
_NEXT_GEN = (
    "INSERT INTO grid_meta VALUES ('dirty_gen', 1) ON CONFLICT (key) "
    "DO UPDATE SET value = value + 1 RETURNING value"
)

RETRY_FIRST = 0.05
RETRY_MAX = 2.0
FOLD_AT = 20_000  # effects in the log that start a fold
FOLD_IDLE = 1.0  # seconds after the last write that fold what is left

_effects_encoder = msgspec.msgpack.Encoder()
_effects_decoder = msgspec.msgpack.Decoder(list[Op])


def statements(effects: list[Op]) -> list[Statement]:
    """SQL for effects in order; runs of one kind go in one executemany."""
    out: list[Statement] = []
    sql = ""
    rows: list[tuple[object, ...]] = []
    for op in effects:
        kind = op.kind
        row: tuple[object, ...]
        if kind == Kind.PUT or kind == Kind.LOAD:
            this, row = _PUT, (op.part, op.map, op.key, op.value, op.expires)
        elif kind == Kind.DELETE:
            this, row = _DELETE, (op.part, op.map, op.key)
        else:
            this, row = _CLEAR, (op.part, op.map)
        if this != sql and rows:
            out.append((sql, rows))
            rows = []
        sql = this
        rows.append(row)
    if rows:
        out.append((sql, rows))
    return out


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """A transaction on ``db`` (committed, or rolled back on an error), unless one is open
    already: then the statements go in the caller's."""
    if db.in_transaction:
        yield
        return
    db.execute("BEGIN")
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def fold(db: sqlite3.Connection, bridged: AbstractSet[str] = frozenset()) -> int:
    """Apply every logged batch to ``grid``, in order, and empty the log; how many effects.
    Changes to the ``bridged`` maps are marked dirty. Runs on the store's thread: inside
    the store's transaction when it is a write, in one of its own when a read calls it."""
    batches = db.execute("SELECT id, effects FROM grid_log ORDER BY id").fetchall()
    if not batches:
        return 0
    with transaction(db):
        count = 0
        clears: list[Op] = []
        cleared: list[Op] = []  # changes a later clear undid before they reached grid
        latest: dict[tuple[int, str, bytes], Op] = {}  # only a key's last change is written
        for _, blob in batches:
            effects = _effects_decoder.decode(blob)
            count += len(effects)
            for op in effects:
                if op.kind == Kind.CLEAR:
                    # Clears run first, so what they clear must not be written after them.
                    undone = [k for k in latest if k[0] == op.part and k[1] == op.map]
                    cleared.extend(latest.pop(key) for key in undone)
                    clears.append(op)
                else:
                    latest[(op.part, op.map, op.key)] = op
        changes = list(latest.values())
        if bridged:
            _mark_dirty(db, bridged, clears, changes, cleared)
        for sql, params in statements(clears + changes):  # type: ignore[misc]
            db.executemany(sql, params)
        db.execute("DELETE FROM grid_log WHERE id <= ?", (batches[-1][0],))
    return count


def _mark_dirty(
    db: sqlite3.Connection,
    bridged: AbstractSet[str],
    clears: list[Op],
    changes: list[Op],
    cleared: list[Op],
) -> None:
    """Mark dirty what a fold changes in bridged maps: the entries a clear removes from
    grid, those it removed before they reached grid (``cleared``: a put or a load in the
    same fold, whose database row, if any, must go too), and the latest changes (but loads:
    their value is the database's)."""
    clears = [op for op in clears if op.map in bridged]
    marked = [op for op in changes if op.map in bridged and op.kind != Kind.LOAD]
    gone = [op for op in cleared if op.map in bridged]
    if not (clears or marked or gone):
        return
    gen = db.execute(_NEXT_GEN).fetchone()[0]
    for op in clears:  # while grid still holds what they clear
        db.execute(_DIRTY_CLEARED, (gen, op.part, op.map))
    rows = [
        (op.map, op.key, op.part, gen, op.value, op.expires)
        if op.kind == Kind.PUT
        else (op.map, op.key, op.part, gen, None, 0.0)
        for op in marked
    ]
    rows.extend((op.map, op.key, op.part, gen, None, 0.0) for op in gone)
    db.executemany(_DIRTY, rows)


def read_dirty_page(
    db: sqlite3.Connection, map_name: str, after: bytes | None, limit: int, retry_rejected: bool
) -> tuple[list[Dirty], int]:
    """:meth:`Journal.dirty_page` on a connection to the journal: the store's, or a flush
    worker's own (which only reads, and so sees what the last fold committed). The rows
    come as SQLite gives them: no Python work per row."""
    # One read transaction: the rows and the latest generation from the same snapshot.
    with transaction(db):
        # The join with grid_rejected costs a lookup per row: only when the map has any.
        if db.execute(_ANY_REJECTED, (map_name,)).fetchone() is None:
            sql = _DIRTY_PAGE_CLEAN
        else:
            sql = _DIRTY_PAGE + ("" if retry_rejected else _NOT_REJECTED) + _DIRTY_PAGE_END
        start = after if after is not None else b""
        rows: list[Dirty] = db.execute(sql, (time.time(), map_name, start, limit)).fetchall()
        latest = db.execute(_LATEST_GEN).fetchone()
    return rows, latest[0] if latest else 0


class Journal:
    def __init__(self, store: EmbeddedStore) -> None:
        self.store = store
        self.bridged: frozenset[str] = frozenset()  # maps whose changes are marked dirty
        self.retries = 0
        self.unfolded = 0  # effects written to the log since the last fold was queued
        self.folds = 0
        self._idle_fold: asyncio.TimerHandle | None = None

    async def open(self, partitions: int) -> dict[str, set[str]]:
        """Create the tables; the listeners by map. Raises ConfigError when the journal
        holds entries partitioned with another partition count."""

        def read(db: sqlite3.Connection) -> tuple[int | None, bool, list[tuple[str, str]]]:
            db.executescript(SCHEMA)
            columns = {row[1] for row in db.execute("PRAGMA table_info(grid_dirty)")}
            if "value" not in columns:
                with transaction(db):
                    for sql in _DIRTY_VALUES:
                        db.execute(sql)
            fold(db, self.bridged)
            row = db.execute("SELECT value FROM grid_meta WHERE key = 'partitions'").fetchone()
            has_entries = db.execute("SELECT 1 FROM grid LIMIT 1").fetchone() is not None
            return (
                row[0] if row else None,
                has_entries,
                db.execute("SELECT map, name FROM grid_listeners").fetchall(),
            )

        written_with, has_entries, listeners = await self.store.read(read)
        if written_with != partitions:
            if written_with is not None and has_entries:
                raise ConfigError(
                    f"grid_partitions is {partitions}, but the grid journal in "
                    f"{self.store.path} was written with {written_with}: set grid_partitions "
                    f"= {written_with}, or start from an empty grid (docs/OPERATIONS.md)"
                )
            await self.commit(
                [("INSERT OR REPLACE INTO grid_meta VALUES ('partitions', ?)", (partitions,))]
            )
        by_map: dict[str, set[str]] = {}
        for map_name, name in listeners:
            by_map.setdefault(map_name, set()).add(name)
        return by_map

    async def listen(self, map_name: str, name: str, on: bool) -> None:
        """Remember (or forget) that ``name`` wants ``map_name``'s events; once committed."""
        if on:
            sql = "INSERT OR IGNORE INTO grid_listeners VALUES (?, ?)"
        else:
            sql = "DELETE FROM grid_listeners WHERE map = ? AND name = ?"
        await self.commit([(sql, (map_name, name))])

    async def commit(self, statements: list[Statement]) -> None:
        """Commit ``statements`` (retried until they go in)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done() -> None:
            if not future.done():
                future.set_result(None)

        self._write(statements, done, RETRY_FIRST)
        await future

    def write(self, effects: list[Op], done: Callable[[], None]) -> None:
        """Journal ``effects``; call ``done()`` once they are committed."""
        blob = _effects_encoder.encode(effects)
        self._write([("INSERT INTO grid_log (effects) VALUES (?)", (blob,))], done, RETRY_FIRST)
        self.unfolded += len(effects)
        if self.unfolded >= FOLD_AT:
            self._fold()
        elif self._idle_fold is None:
            self._idle_fold = asyncio.get_running_loop().call_later(FOLD_IDLE, self._fold)

    def _fold(self) -> None:
        """Queue a fold of the log (a write like any other: in order with them)."""
        if self._idle_fold is not None:
            self._idle_fold.cancel()
            self._idle_fold = None
        if self.unfolded and not self.store.closed:
            self.unfolded = 0
            self.folds += 1
            self._write([self._fold_statement], _nothing, RETRY_FIRST)

    def close(self) -> None:
        if self._idle_fold is not None:
            self._idle_fold.cancel()
            self._idle_fold = None

    def _write(self, sql: list[Statement], done: Callable[[], None], delay: float) -> None:
        if self.store.closed:
            log.error("grid journal: the store closed before a retried write went in")
            return

        def committed(error: BaseException | None) -> None:
            if error is None:
                done()
                return
            if self.store.closed:
                log.error("grid journal: store closed with writes failing: %s", error)
                return
            self.retries += 1
            log.warning("grid journal write failed (%s); retrying in %.2f s", error, delay)
            asyncio.get_running_loop().call_later(
                delay, self._write, sql, done, min(RETRY_MAX, delay * 2)
            )

        self.store.write(sql, committed)

    async def load(self, part: int, now: float) -> list[Row]:
        """Every live entry of one partition, after every write queued so far."""

        def read(db: sqlite3.Connection) -> list[Row]:
            fold(db, self.bridged)
            return db.execute(
                "SELECT map, key, value, expires FROM grid WHERE part = ? "
                "AND (expires = 0 OR expires > ?)",
                (part, now),
            ).fetchall()

        return await self.store.read(read)

    # ------------------------------------------------------------ write-behind

    async def dirty_page(
        self, map_name: str, after: bytes | None, limit: int, retry_rejected: bool
    ) -> tuple[list[Dirty], int]:
        """Up to ``limit`` dirty entries of a map with keys after ``after``, in key order:
        (key, generation, value or None for a delete, whether it was set aside before);
        and the latest generation so far (every later change has a greater one). Entries
        set aside at their current generation are left out unless ``retry_rejected``."""

        def read(db: sqlite3.Connection) -> tuple[list[Dirty], int]:
            fold(db, self.bridged)
            return read_dirty_page(db, map_name, after, limit, retry_rejected)

        return await self.store.read(read)

    async def dirty_keys(self, map_name: str, keys: list[bytes]) -> set[bytes]:
        """Which of ``keys`` are dirty (changed or deleted and not flushed yet)."""

        def read(db: sqlite3.Connection) -> set[bytes]:
            fold(db, self.bridged)
            return {
                key for key in keys if db.execute(_IS_DIRTY, (map_name, key)).fetchone() is not None
            }

        return await self.store.read(read)

    async def dirty_counts(self) -> dict[str, tuple[int, int]]:
        """Per map: (dirty entries, of which set aside at their current generation)."""

        def read(db: sqlite3.Connection) -> dict[str, tuple[int, int]]:
            fold(db, self.bridged)
            counts = {m: (n, 0) for m, n in db.execute(_COUNT_DIRTY)}
            for map_name, rejected in db.execute(_COUNT_REJECTED):
                counts[map_name] = (counts.get(map_name, (0, 0))[0], rejected)
            return counts

        return await self.store.read(read)

    async def rejected(self, limit: int = 1000) -> list[tuple[str, bytes, str, float]]:
        """Entries set aside: (map, key, error, when), the most recent first."""

        def read(db: sqlite3.Connection) -> list[tuple[str, bytes, str, float]]:
            return db.execute(
                "SELECT r.map, r.key, r.error, r.at FROM grid_rejected r JOIN grid_dirty d "
                "ON d.map = r.map AND d.key = r.key AND d.gen = r.gen ORDER BY r.at DESC LIMIT ?",
                (limit,),
            ).fetchall()

        return await self.store.read(read)

    async def cleaned(
        self, map_name: str, first: bytes, last: bytes, latest: int, unreject: list[bytes]
    ) -> None:
        """The dirty entries of a page from ``first`` to ``last`` (keys) reached the bridge:
        clean them, one range in SQLite instead of a statement per key. Within the range,
        an entry changed since the page was read has a generation past ``latest`` and
        stays dirty; one the page left out was set aside at its generation and stays too.
        The earlier refusals of the ``unreject`` keys are forgotten."""

        def clean(db: sqlite3.Connection) -> None:
            if unreject:  # first: the range leaves alone what is (still) set aside
                db.executemany(_UNREJECT, [(map_name, key) for key in unreject])
            # The guard against entries set aside costs a lookup per row: only when needed.
            rejected = db.execute(_ANY_REJECTED, (map_name,)).fetchone() is not None
            sql = _CLEAN_RANGE + _NOT_SET_ASIDE if rejected else _CLEAN_RANGE
            db.execute(sql, (map_name, first, last, latest))

        await self.commit([clean])

    async def set_aside(self, map_name: str, key: bytes, gen: int, error: str) -> None:
        await self.commit([(_REJECT, (map_name, key, gen, error, time.time()))])

    async def add_loaded(
        self, part_of: Callable[[bytes], int], map_name: str, entries: list[tuple[bytes, bytes]]
    ) -> list[tuple[int, bytes, bytes]]:
        """Entries loaded from a bridge, clean; a key the journal holds (or has deleted and
        not flushed yet) keeps the journal's version. What went in: (part, key, value)."""

        def write(db: sqlite3.Connection) -> list[tuple[int, bytes, bytes]]:
            fold(db, self.bridged)
            added = []
            with transaction(db):
                for key, value in entries:
                    part = part_of(key)
                    known = db.execute(_KNOWN, (part, map_name, key, map_name, key)).fetchone()
                    if known is None:
                        db.execute(_PUT, (part, map_name, key, value, 0.0))
                        added.append((part, key, value))
            return added

        return await self.store.read(write)

    async def load_all(self) -> dict[int, list[Row]]:
        def read(db: sqlite3.Connection) -> dict[int, list[Row]]:
            fold(db, self.bridged)
            parts: dict[int, list[Row]] = {}
            for part, *row in db.execute("SELECT part, map, key, value, expires FROM grid"):
                parts.setdefault(part, []).append(tuple(row))
            return parts

        return await self.store.read(read)

    def _fold_statement(self, db: sqlite3.Connection) -> None:
        fold(db, self.bridged)


def _nothing() -> None:
    pass
