"""The embedded store: SQLite in the service's data directory, written off the event loop.

One writer thread owns the connection. Writes queue up while the previous transaction
commits and then go in together as one transaction (group commit): a burst of ten thousand
small writes costs a handful of commits, and the event loop never waits for the disk. The
loop hears back once per commit, not once per write.

Generic on purpose: mailboxes use it now, the data grid's journal will later. Callers give
SQL statements; the store knows nothing of what they mean.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..errors import StoreError

log = logging.getLogger("packetstack.store")

T = TypeVar("T")
Synchronous = Literal["OFF", "NORMAL", "FULL"]
Done = Callable[[BaseException | None], None]
# One step of a transaction: (sql, parameters), (sql, [parameters, ...]) for executemany,
# or a function of the connection for steps that read what they change (RETURNING ...).
Statement = tuple[str, Sequence[Any] | list[Sequence[Any]]] | Callable[[sqlite3.Connection], None]

# Writes taken into one transaction at most: bounds the time one commit holds the lock.
MAX_BATCH = 20_000

_STOP = object()


class _Write:
    __slots__ = ("done", "statements")

    def __init__(self, statements: list[Statement], done: Done | None) -> None:
        self.statements = statements
        self.done = done


class _Read:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], future: asyncio.Future[Any]):
        self.fn = fn
        self.future = future


class EmbeddedStore:
    """``store = EmbeddedStore(path); await store.open(schema)`` ... ``await store.close()``.

    ``write(statements, done)`` queues statements for the next group commit and calls
    ``done(None)`` (or ``done(error)``) on the event loop once they are committed.
    ``await read(fn)`` runs ``fn(connection)`` on the writer thread after every write queued
    before it, so a read always sees what was written before it was asked for.
    """

    def __init__(self, path: str | Path, synchronous: Synchronous = "NORMAL") -> None:
        if synchronous not in ("OFF", "NORMAL", "FULL"):
            raise ValueError(f"synchronous must be OFF, NORMAL or FULL, not {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.commits = 0
        self.writes = 0

    async def open(self, schema: str = "") -> None:
        """Open (creating if needed) the database and run ``schema`` (a SQL script)."""
        self._loop = asyncio.get_running_loop()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ready: asyncio.Future[None] = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(schema, ready), name=f"store:{self.path.name}", daemon=True
        )
        self._thread.start()
        await ready

    @property
    def closed(self) -> bool:
        return self._closed

    def write(self, statements: list[Statement], done: Done | None = None) -> None:
        if self._closed:
            raise StoreError(f"the store {self.path} is closed")
        self._queue.put(_Write(statements, done))

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreError(f"the store {self.path} is closed")
        assert self._loop is not None
        future: asyncio.Future[T] = self._loop.create_future()
        self._queue.put(_Read(fn, future))
        return await future

    async def close(self) -> None:
        """Commit everything queued, then close the database."""
        if self._closed or self._thread is None:
            self._closed = True
            return
        self._closed = True
        self._queue.put(_STOP)
        thread = self._thread
        await asyncio.get_running_loop().run_in_executor(None, thread.join)

    # --------------------------------------------------------- writer thread

    def _connect(self, schema: str) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={self.synchronous}")
        db.execute("PRAGMA temp_store=MEMORY")
        if schema:
            db.executescript(schema)
        return db

    def _run(self, schema: str, ready: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        try:
            db = self._connect(schema)
        except Exception as exc:
            error = StoreError(f"cannot open the embedded store at {self.path}: {exc}")
            loop.call_soon_threadsafe(_settle, ready, None, error)
            return
        loop.call_soon_threadsafe(_settle, ready, None, None)
        try:
            self._serve(db, loop)
        finally:
            db.close()

    def _serve(self, db: sqlite3.Connection, loop: asyncio.AbstractEventLoop) -> None:
        get = self._queue.get
        get_nowait = self._queue.get_nowait
        while True:
            item = get()
            batch: list[_Write] = []
            stop = False
            while True:
                if item is _STOP:
                    stop = True
                    break
                if type(item) is _Read:
                    self._commit(db, batch, loop)  # the read must see earlier writes
                    batch = []
                    self._read(db, item, loop)
                else:
                    batch.append(item)
                    if len(batch) >= MAX_BATCH:
                        break
                try:
                    item = get_nowait()
                except queue.Empty:
                    break
            self._commit(db, batch, loop)
            if stop:
                return

    def _commit(
        self, db: sqlite3.Connection, batch: list[_Write], loop: asyncio.AbstractEventLoop
    ) -> None:
        if not batch:
            return
        error: BaseException | None = None
        try:
            db.execute("BEGIN")
            for write in batch:
                for statement in write.statements:
                    if callable(statement):
                        statement(db)
                        continue
                    sql, params = statement
                    if params and isinstance(params, list):
                        db.executemany(sql, params)
                    else:
                        db.execute(sql, params)
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            error = StoreError(f"embedded store write failed ({self.path}): {exc}")
            log.error("%s", error)
        self.commits += 1
        self.writes += len(batch)
        callbacks = [write.done for write in batch if write.done is not None]
        if callbacks:
            loop.call_soon_threadsafe(_run_callbacks, callbacks, error)

    def _read(self, db: sqlite3.Connection, item: _Read, loop: asyncio.AbstractEventLoop) -> None:
        try:
            result = item.fn(db)
        except sqlite3.Error as exc:
            loop.call_soon_threadsafe(
                _settle, item.future, None, StoreError(f"embedded store read failed: {exc}")
            )
            return
        except Exception as exc:
            loop.call_soon_threadsafe(_settle, item.future, None, exc)
            return
        loop.call_soon_threadsafe(_settle, item.future, result, None)


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)


def _run_callbacks(callbacks: list[Done], error: BaseException | None) -> None:
    for done in callbacks:
        try:
            done(error)
        except Exception:  # one failing callback must not starve the others
            log.exception("store completion callback failed")
