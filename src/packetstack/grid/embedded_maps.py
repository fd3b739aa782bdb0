"""The embedded store seen as a :class:`~packetstack.storage.Store`: the maps kept in the
grid's journal, the default home of every map that has no bridge.

The running service writes the journal through its coordinator; this view is for what
works beside it or without it: the conformance suite, tools reading a data directory, a
copy from the embedded store to a bridge. Writing through it while a service runs on the
same data directory would bypass the service's memory: the service's own maps are the way.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator, Sequence

from ..storage import Entry, MapSpec, Statement
from .journal import _DELETE, _PUT, Journal, fold
from .partitions import partition_of


class EmbeddedMaps:
    """``EmbeddedMaps(journal, partitions)`` over an opened :class:`Journal`."""

    name = "embedded"

    def __init__(self, journal: Journal, partitions: int) -> None:
        self.journal = journal
        self.partitions = partitions

    async def open(self, maps: Sequence[MapSpec]) -> None:
        """Nothing to create: every map lives in the journal's one table."""

    async def close(self) -> None:
        """The journal belongs to whoever opened it."""

    async def load(self, map_name: str, key: bytes) -> bytes | None:
        return (await self.load_many(map_name, [key])).get(key)

    async def load_many(self, map_name: str, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        parts = self.partitions
        bridged = self.journal.bridged

        def read(db: sqlite3.Connection) -> dict[bytes, bytes]:
            fold(db, bridged)
            now = time.time()
            found = {}
            for key in keys:
                row = db.execute(_GET, (partition_of(key, parts), map_name, key, now)).fetchone()
                if row is not None:
                    found[key] = row[0]
            return found

        return await self.journal.store.read(read)

    async def iterate(self, map_name: str, batch: int = 1000) -> AsyncIterator[list[Entry]]:
        """Partition by partition (the table's key order), ``batch`` entries at a time."""
        bridged = self.journal.bridged
        for part in range(self.partitions):

            def read(db: sqlite3.Connection, part: int = part) -> list[Entry]:
                fold(db, bridged)
                return db.execute(_SCAN, (part, map_name, time.time())).fetchall()

            rows = await self.journal.store.read(read)
            for start in range(0, len(rows), batch):
                yield rows[start : start + batch]

    async def write(
        self, map_name: str, upserts: Sequence[Entry], deletes: Sequence[bytes]
    ) -> None:
        parts = self.partitions
        statements: list[Statement] = []
        if upserts:
            rows = [(partition_of(k, parts), map_name, k, v, 0.0) for k, v in upserts]
            statements.append((_PUT, rows))
        if deletes:
            statements.append((_DELETE, [(partition_of(k, parts), map_name, k) for k in deletes]))
        if statements:
            await self.journal.commit(statements)


_LIVE = "(expires = 0 OR expires > ?)"
_GET = f"SELECT value FROM grid WHERE part = ? AND map = ? AND key = ? AND {_LIVE}"
_SCAN = f"SELECT key, value FROM grid WHERE part = ? AND map = ? AND {_LIVE} ORDER BY key"
