"""Reliable delivery to endings: sequence numbers, in-flight windows and durable mailboxes.

Every packet for an ending gets the next sequence number of that ending. While the ending
is connected and keeping up, packets go straight out (DELIVER frames) and wait in its
in-flight window, in memory, until the ending acknowledges them (after its handlers ran).
Otherwise they go into its mailbox in the embedded store: when it is offline, when its
link is over the high-water mark (a slow reader spills to disk instead of RAM), and while
a backlog is being replayed (so order holds). When it connects, the service replays the
mailbox in sequence order before anything newer. A lost link's in-flight window is written
to the mailbox, so unacknowledged packets are redelivered at once on resume.

Sequence numbers are reserved in blocks in the store, so a restarted service never reuses
one the ending may already have seen (the ending drops repeats by sequence number).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from functools import partial
from typing import Any

from ..errors import ConnectionClosed
from ..protocol import Flag, PacketHeader
from ..storage import Done, EmbeddedStore, Statement
from ..transport import Link
from .config import ServiceConfig

log = logging.getLogger("packetstack.mailbox")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS endings (
    name TEXT PRIMARY KEY,
    seq_limit INTEGER NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS members (
    grp TEXT NOT NULL,
    ending TEXT NOT NULL,
    PRIMARY KEY (grp, ending)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mailbox (
    ending TEXT NOT NULL,
    seq INTEGER NOT NULL,
    expires REAL NOT NULL,
    src TEXT NOT NULL,
    pid INTEGER NOT NULL,
    flags INTEGER NOT NULL,
    tag TEXT NOT NULL,
    frame BLOB NOT NULL,
    PRIMARY KEY (ending, seq)
);
-- A sender that resends after a reconnect must not store a packet twice.
CREATE UNIQUE INDEX IF NOT EXISTS mailbox_origin ON mailbox (ending, src, pid);
CREATE INDEX IF NOT EXISTS mailbox_expiry ON mailbox (expires);
"""

_INSERT = "INSERT OR IGNORE INTO mailbox VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
# Sequence numbers reserved per store write; a restart skips the rest of the block.
SEQ_BLOCK = 1_000_000
# Rows read per replay step; the next step waits until the link drains.
REPLAY_PAGE = 2048
# Expiry is checked at least this often while anything is stored (seconds).
SWEEP_MAX_WAIT = 60.0
# An ending disconnected this long with nothing stored and no groups is forgotten (seconds):
# names used once (scripts, `packetstack status`) do not pile up. If it comes back, its
# numbering starts again, and WELCOME's `next` tells a client that outlived the record.
FORGET_AFTER = 3600.0
# Rows handed to the store and not yet committed: past HIGH the service stops reading from
# senders whose packets it must store, below LOW it reads again. Bounds memory when packets
# arrive faster than the disk takes them.
STORE_HIGH = 100_000
STORE_LOW = 20_000
STORE_BEHIND = "store"  # the reason reading is held
# Seconds before rows the store failed to commit are tried again.
STORE_RETRY = 1.0
# Seconds a congested ending may hold its senders before its packets spill to its mailbox.
SPILL_AFTER = 0.1

_ACK = int(Flag.ACK)
_NOTIFY = int(Flag.NOTIFY)
_RESENT = int(Flag.RESENT)

# (seq, frame, header, expires) of a packet on its way to a connected ending.
InFlight = tuple[int, bytes, PacketHeader, float]
# What the service hears back: ACK a sender's packet; tell a sender its packet is gone.
SafeCallback = Callable[[str, int], None]
LostCallback = Callable[[str, int, str, str, str], None]  # src, pid, destination, tag, reason


class Ending:
    """An ending as the service remembers it, connected or not."""

    __slots__ = (
        "acked",
        "congested",
        "cursor",
        "groups",
        "held",
        "idle_since",
        "inflight",
        "inflight_acks",
        "last_id",
        "last_stored",
        "link",
        "live",
        "name",
        "next_seq",
        "replay",
        "seq_limit",
        "stored",
        "stored_bytes",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.link: Link | None = None  # set while connected
        self.live = False  # connected, caught up and keeping up: deliver directly
        self.next_seq = 1
        self.seq_limit = 0
        self.acked = 0  # highest sequence number the ending handled
        self.inflight: deque[InFlight] = deque()
        self.inflight_acks = 0  # in-flight packets whose senders wait for an ACK
        self.stored = 0  # rows in its mailbox (including replayed, unacknowledged ones)
        self.stored_bytes = 0
        self.last_stored = 0  # highest sequence number written to the mailbox
        self.cursor = 0  # highest stored sequence number sent on the current link
        self.replay: asyncio.Task[None] | None = None
        self.last_id = 0  # highest packet id accepted from this ending as a sender
        # While its link is over high water: the timer that turns a hold into a spill.
        self.congested: asyncio.TimerHandle | None = None
        self.held: set[Link] = set()  # senders not read until it drains (or spills)
        self.groups: set[str] = set()
        self.idle_since = time.time()  # when it was last connected (while not connected)

    def __repr__(self) -> str:
        state = "live" if self.live else ("connected" if self.link else "offline")
        return f"Ending({self.name!r}, {state}, stored={self.stored})"


class Mailboxes:
    """Per-ending delivery state and the durable mailboxes behind it."""

    def __init__(
        self,
        store: EmbeddedStore,
        config: ServiceConfig,
        stats: Counter[str],
        safe: SafeCallback,
        lost: LostCallback,
    ) -> None:
        self.store = store
        self.config = config
        self.stats = stats
        self._safe = safe
        self._lost = lost
        self.endings: dict[str, Ending] = {}
        self.groups: dict[str, set[str]] = {}
        self.epoch = ""
        self._rows: list[tuple[Any, ...]] = []
        self._row_acks: list[tuple[str, int]] = []
        self._writes: list[Statement] = []
        self._acked_rows: dict[str, int] = {}
        self._flush_scheduled = False
        self.unsaved = 0  # rows handed to the store, not yet committed
        self._held_links: set[Link] = set()
        # (src, pid) of ACK-flagged packets -> destinations still to deliver or store.
        self._outstanding: dict[tuple[str, int], int] = {}
        self._next_expiry = float("inf")
        self._sweep_wakeup = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.store.open(SCHEMA)
        state = await self.store.read(_load)
        self.epoch = state["epoch"]
        for name, seq_limit, acked in state["endings"]:
            ending = self._remember(name)
            ending.acked = acked
            ending.next_seq = max(seq_limit, acked + 1)  # the rest of the block may be used
            ending.cursor = acked
        for name, count, size, last in state["mailboxes"]:
            ending = self._remember(name)
            ending.stored, ending.stored_bytes, ending.last_stored = count, size, last
            ending.next_seq = max(ending.next_seq, last + 1)
        for group, name in state["members"]:
            self._remember(name).groups.add(group)
            self.groups.setdefault(group, set()).add(name)
        for ending in self.endings.values():
            self._reserve(ending)
        self._next_expiry = state["next_expiry"] or float("inf")
        self._sweeper = self._loop.create_task(self._sweep_forever())
        waiting = sum(e.stored for e in self.endings.values())
        if waiting:
            log.info("%d packets wait in %d mailboxes", waiting, len(state["mailboxes"]))

    async def save(self) -> None:
        """Stop the sweeper and replays and queue every in-flight packet for the store
        (close() commits them; the grid's last flush may run in between)."""
        if self.store.closed:
            return
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for ending in self.endings.values():
            if ending.replay is not None:
                ending.replay.cancel()
            self.detach(ending)
        self._flush()

    async def close(self) -> None:
        if self.store.closed:
            return
        await self.save()
        await self.store.close()

    # -------------------------------------------------------------- endings

    def ending(self, name: str) -> Ending:
        ending = self.endings.get(name)
        if ending is None:
            ending = self._remember(name)
            self._reserve(ending)
        return ending

    def _remember(self, name: str) -> Ending:
        ending = self.endings.get(name)
        if ending is None:
            ending = self.endings[name] = Ending(name)
        return ending

    def _reserve(self, ending: Ending) -> None:
        """Make the store remember sequence numbers past the ones about to be used (rows
        stored later are committed after it). Should a service die before its first
        reservation for an ending is committed, the ending's client learns from WELCOME's
        ``next`` that numbering started again (see Client._adopt)."""
        ending.seq_limit = ending.next_seq + SEQ_BLOCK
        self._writes.append(
            (
                "INSERT INTO endings (name, seq_limit) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET seq_limit = excluded.seq_limit",
                (ending.name, ending.seq_limit),
            )
        )
        self._schedule_flush()

    def attach(self, ending: Ending, link: Link) -> None:
        """The ending connected on ``link``: replay its mailbox, then deliver directly."""
        if ending.link is not None:
            self.detach(ending)
        ending.link = link
        ending.cursor = ending.acked
        ending.live = False
        self._start_replay(ending)

    def detach(self, ending: Ending) -> None:
        """The ending's link is gone: what it had not acknowledged waits in its mailbox."""
        ending.link = None
        ending.live = False
        ending.idle_since = time.time()
        if ending.congested is not None:
            ending.congested.cancel()
            ending.congested = None
        self._release(ending)
        if ending.replay is not None:
            ending.replay.cancel()
            ending.replay = None
        inflight = ending.inflight
        if inflight:
            self.stats["mailbox_redelivery_kept"] += len(inflight)
            for seq, frame, header, expires in inflight:
                self._add_row(ending, seq, frame, header, expires)
            inflight.clear()
            ending.inflight_acks = 0  # the rows' commit answers those senders now
        self._acked_rows[ending.name] = ending.acked  # what a restart tells it in WELCOME
        self._schedule_flush()

    # ------------------------------------------------------------- delivery

    def deliver(self, ending: Ending, frame: bytes, header: PacketHeader, expires: float) -> str:
        """Send or store one packet for ``ending``. Return "" when it was taken, else why
        it was refused (its mailbox is full and the policy rejects)."""
        live = ending.live
        if not live:
            refusal = self._make_room(ending, len(frame))
            if refusal:
                return refusal
        seq = ending.next_seq
        ending.next_seq = seq + 1
        if seq >= ending.seq_limit - SEQ_BLOCK // 2:
            self._reserve(ending)
        if header.flags & _ACK:
            self._expect(header)
        if not live:
            self._add_row(ending, seq, frame, header, expires)
            return ""
        ending.inflight.append((seq, frame, header, expires))
        if header.flags & _ACK:
            ending.inflight_acks += 1
        link = ending.link
        assert link is not None
        if not link.write_delivery(seq, frame) and ending.congested is None:
            self._congested(ending, link)
        return ""

    def _expect(self, header: PacketHeader) -> None:
        key = (header.src, header.id)
        self._outstanding[key] = self._outstanding.get(key, 0) + 1

    def _done(self, src: str, pid: int) -> None:
        key = (src, pid)
        left = self._outstanding.get(key, 0) - 1
        if left > 0:
            self._outstanding[key] = left
            return
        self._outstanding.pop(key, None)
        self._safe(src, pid)

    def is_outstanding(self, src: str, pid: int) -> bool:
        return (src, pid) in self._outstanding

    def _add_row(
        self, ending: Ending, seq: int, frame: bytes, header: PacketHeader, expires: float
    ) -> None:
        self._rows.append(
            (ending.name, seq, expires, header.src, header.id, header.flags, header.tag, frame)
        )
        if header.flags & _ACK:
            self._row_acks.append((header.src, header.id))
        ending.stored += 1
        ending.stored_bytes += len(frame)
        if seq > ending.last_stored:
            ending.last_stored = seq
        self.stats["mailbox_stored"] += 1
        if expires < self._next_expiry:
            self._next_expiry = expires
            self._sweep_wakeup.set()
        self._schedule_flush()

    def _make_room(self, ending: Ending, size: int) -> str:
        cfg = self.config
        over_count = ending.stored + 1 - cfg.mailbox_max_packets
        over_bytes = ending.stored_bytes + size - cfg.mailbox_max_bytes
        if over_count <= 0 and over_bytes <= 0:
            return ""
        limit = (
            f"{cfg.mailbox_max_packets} packets"
            if over_count > 0
            else f"{cfg.mailbox_max_bytes} bytes"
        )
        if cfg.mailbox_overflow == "reject" or size > cfg.mailbox_max_bytes:
            self.stats["mailbox_full"] += 1
            return f"the mailbox of {ending.name!r} is full ({limit}); the packet was not stored"
        # drop-oldest: the oldest packets not yet sent make room. Counted now, corrected
        # when the store says what it really dropped.
        need_count, need_bytes = max(over_count, 0), max(over_bytes, 0)
        ending.stored -= need_count
        ending.stored_bytes -= need_bytes
        self._flush_rows()  # the drop must see every row queued before it
        dropped: list[tuple[Any, ...]] = []
        self.store.write(
            [partial(_drop_oldest, ending.name, ending.cursor, need_count, need_bytes, dropped)],
            partial(self._dropped, ending, need_count, need_bytes, dropped),
        )
        return ""

    def _dropped(
        self,
        ending: Ending,
        need_count: int,
        need_bytes: int,
        dropped: list[tuple[Any, ...]],
        error: BaseException | None,
    ) -> None:
        if error is not None:
            return
        ending.stored += need_count - len(dropped)
        ending.stored_bytes += need_bytes - sum(row[1] for row in dropped)
        self.stats["mailbox_dropped"] += len(dropped)
        for _, _, src, pid, flags, tag in dropped:
            if flags & _NOTIFY:
                self._lost(src, pid, ending.name, tag, "dropped")

    # ------------------------------------------------------ acknowledgements

    def acked(self, ending: Ending, seq: int) -> None:
        """The ending handled every delivery up to ``seq``."""
        if seq <= ending.acked:
            return
        if seq >= ending.next_seq:
            log.warning(
                "%r acknowledged %d, past its last delivery %d",
                ending.name,
                seq,
                ending.next_seq - 1,
            )
            seq = ending.next_seq - 1
        ending.acked = seq
        inflight = ending.inflight
        if inflight and inflight[-1][0] <= seq and not ending.inflight_acks:
            inflight.clear()  # the usual case: all handled, no sender waits for any
        while inflight and inflight[0][0] <= seq:
            header = inflight.popleft()[2]
            if header.flags & _ACK:
                ending.inflight_acks -= 1
                self._done(header.src, header.id)
        if ending.stored:
            # The store learns what was handled only where it holds rows to delete: the
            # packets delivered live were never written, so there is nothing to undo.
            self._writes.append(partial(_delete_acked, ending.name, seq, self._on_deleted))
            self._acked_rows[ending.name] = seq
            self._schedule_flush()

    def _on_deleted(self, name: str, count: int, size: int) -> None:
        # Called on the writer thread: hand the numbers to the loop.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._forget_rows, name, count, size)

    def _forget_rows(self, name: str, count: int, size: int) -> None:
        ending = self.endings.get(name)
        if ending is not None:
            ending.stored -= count
            ending.stored_bytes -= size

    # ---------------------------------------------------------------- replay

    # ------------------------------------------------------------ congestion

    def _congested(self, ending: Ending, link: Link) -> None:
        """``ending`` reads slower than packets arrive. First its senders are held (the
        service stops reading them: a reader that is merely slower sets the pace, and
        nothing touches the disk); if it has not drained after SPILL_AFTER, it is stalled:
        the senders go on and what follows spills into its mailbox."""
        assert self._loop is not None
        ending.congested = self._loop.call_later(SPILL_AFTER, self._spill, ending, link)
        link.on_writable(partial(self._drained, ending, link))

    def hold_sender(self, ending: Ending, sender: Link) -> None:
        if sender not in ending.held:
            ending.held.add(sender)
            sender.pause_reading(ending)

    def _release(self, ending: Ending) -> None:
        for sender in ending.held:
            sender.resume_reading(ending)
        ending.held.clear()

    def _spill(self, ending: Ending, link: Link) -> None:
        ending.congested = None
        if ending.link is link and ending.live:
            ending.live = False  # everything stored so far was sent: cursor = last_stored
            ending.cursor = ending.last_stored
            self.stats["mailbox_spills"] += 1
        self._release(ending)

    def _drained(self, ending: Ending, link: Link) -> None:
        if ending.congested is not None:
            ending.congested.cancel()
            ending.congested = None
        self._release(ending)
        if ending.link is link and not link.closed and not ending.live and ending.replay is None:
            self._start_replay(ending)

    def _start_replay(self, ending: Ending) -> None:
        assert self._loop is not None
        link = ending.link
        assert link is not None
        ending.replay = self._loop.create_task(self._replay(ending, link))

    async def _replay(self, ending: Ending, link: Link) -> None:
        try:
            while ending.link is link and not link.closed:
                if ending.cursor >= ending.last_stored:
                    ending.live = True  # caught up: deliver directly from now on
                    return
                self._flush()  # rows queued for the store must be readable now
                readable = ending.last_stored  # rows queued after this read are not seen
                rows = await self.store.read(
                    partial(_page, ending.name, ending.cursor, time.time(), REPLAY_PAGE)
                )
                if ending.link is not link or link.closed:
                    return
                if not rows:  # up to `readable`, what is left expired or was dropped
                    ending.cursor = max(ending.cursor, readable)
                    continue
                writable = True
                for seq, frame in rows:
                    writable = link.write_delivery(seq, frame)
                    ending.cursor = seq
                self.stats["mailbox_replayed"] += len(rows)
                if not writable:
                    await link.drain()
        except asyncio.CancelledError:
            raise
        except ConnectionClosed:
            pass  # the link went while it drained: detach() keeps what was not acknowledged
        except Exception:
            log.exception(
                "replaying the mailbox of %r failed; it is retried on reconnect", ending.name
            )
        finally:
            if ending.link is link:
                ending.replay = None

    # ----------------------------------------------------------------- groups

    def join(self, ending: Ending, group: str, done: Done) -> None:
        """Make ``ending`` a member of ``group``; ``done`` once that is committed (the
        member is told only then, so a service killed right after cannot forget it)."""
        ending.groups.add(group)
        self.groups.setdefault(group, set()).add(ending.name)
        self._commit(("INSERT OR IGNORE INTO members VALUES (?, ?)", (group, ending.name)), done)

    def leave(self, ending: Ending, group: str, done: Done) -> None:
        ending.groups.discard(group)
        members = self.groups.get(group)
        if members is not None:
            members.discard(ending.name)
            if not members:
                del self.groups[group]
        self._commit(
            ("DELETE FROM members WHERE grp = ? AND ending = ?", (group, ending.name)), done
        )

    def _commit(self, statement: Statement, done: Done) -> None:
        self._flush()  # after everything queued before it
        self.store.write([statement], done)

    # ----------------------------------------------------------------- writes

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush_rows(self) -> None:
        if self._rows:
            batch = rows = self._rows
            self._rows = []
            acks, self._row_acks = self._row_acks, []
            count = len(rows)
            self.unsaved += count
            statements: list[Statement] = []
            resent = [row for row in rows if row[5] & _RESENT]
            ignored: list[tuple[str, int]] = []
            if resent:
                # A resent packet may be stored already: insert those one by one to learn
                # which were, and take them off the counts.
                rows = [row for row in rows if not row[5] & _RESENT]
                statements.append(partial(_insert_each, resent, ignored))
            if rows:
                statements.append((_INSERT, rows))
            self.store.write(statements, partial(self._stored, batch, acks, ignored))

    def hold_if_behind(self, link: Link) -> None:
        """Stop reading ``link`` while the store is far behind (see STORE_HIGH)."""
        if self.unsaved + len(self._rows) > STORE_HIGH and link not in self._held_links:
            self._held_links.add(link)
            link.pause_reading(STORE_BEHIND)
            self.stats["store_backpressure"] += 1

    def _flush(self) -> None:
        """Hand this loop iteration's writes to the store: one group of statements."""
        self._flush_scheduled = False
        if self._writes:
            writes, self._writes = self._writes, []
            self.store.write(writes)
        self._flush_rows()
        if self._acked_rows:
            acked, self._acked_rows = self._acked_rows, {}
            self.store.write(
                [
                    (
                        "UPDATE endings SET acked = ? WHERE name = ?",
                        [(s, n) for n, s in acked.items()],
                    )
                ]
            )

    def _stored(
        self,
        rows: list[tuple[Any, ...]],
        acks: list[tuple[str, int]],
        ignored: list[tuple[str, int]],
        error: BaseException | None,
    ) -> None:
        self.unsaved -= len(rows)
        if error is not None:
            # Kept in memory and tried again: a full or failing disk delays packets (and
            # their senders' acks), it does not lose them.
            log.error("%d mailbox rows not stored yet (%s); retrying", len(rows), error)
            self.stats["store_retries"] += 1
            assert self._loop is not None
            self._loop.call_later(STORE_RETRY, self._retry, rows, acks)
            return
        for name, size in ignored:
            self._forget_rows(name, 1, size)
        if self._held_links and self.unsaved < STORE_LOW:
            held, self._held_links = self._held_links, set()
            for link in held:
                link.resume_reading(STORE_BEHIND)
        for src, pid in acks:
            self._done(src, pid)

    def _retry(self, rows: list[tuple[Any, ...]], acks: list[tuple[str, int]]) -> None:
        self._rows[:0] = rows
        self._row_acks[:0] = acks
        self._schedule_flush()

    # ----------------------------------------------------------------- expiry

    async def _sweep_forever(self) -> None:
        while True:
            delay = min(max(self._next_expiry - time.time(), 0.0), SWEEP_MAX_WAIT)
            self._sweep_wakeup.clear()
            try:
                # Not wait_for: on 3.11 it can swallow a cancel that races the wakeup.
                async with asyncio.timeout(delay):
                    await self._sweep_wakeup.wait()
                continue  # an earlier expiry arrived: recompute the wait
            except TimeoutError:
                pass
            self._flush()
            # Rows queued while the sweep runs lower this again; the store's minimum
            # covers the ones flushed above.
            self._next_expiry = float("inf")
            try:
                expired, next_expiry = await self.store.read(partial(_sweep, time.time()))
            except Exception:
                log.exception("mailbox expiry sweep failed; retrying")
                self._next_expiry = time.time() + 1.0
                continue
            self._next_expiry = min(self._next_expiry, next_expiry or float("inf"))
            for name, size, src, pid, flags, tag in expired:
                ending = self.endings.get(name)
                if ending is not None:
                    ending.stored -= 1
                    ending.stored_bytes -= size
                if flags & _NOTIFY:
                    self._lost(src, pid, name, tag, "expired")
            self.stats["mailbox_expired"] += len(expired)
            self._forget_idle(time.time())

    def _forget_idle(self, now: float) -> None:
        idle = [
            name
            for name, ending in self.endings.items()
            if ending.link is None
            and not ending.stored
            and not ending.inflight
            and not ending.groups
            and now - ending.idle_since >= FORGET_AFTER
        ]
        for name in idle:
            del self.endings[name]
        if idle:
            self._writes.append(("DELETE FROM endings WHERE name = ?", [(n,) for n in idle]))
            self._schedule_flush()
            self.stats["endings_forgotten"] += len(idle)

    # ------------------------------------------------------------------ views

    def depth(self, name: str) -> int:
        """Packets waiting for ``name``: in its mailbox or sent and not yet acknowledged."""
        ending = self.endings.get(name)
        return 0 if ending is None else ending.stored + len(ending.inflight)


# ------------------------------------------------ run on the store's thread


def _load(db: sqlite3.Connection) -> dict[str, Any]:
    row = db.execute("SELECT value FROM meta WHERE key = 'epoch'").fetchone()
    if row is None:
        epoch = uuid.uuid4().hex
        db.execute("INSERT INTO meta VALUES ('epoch', ?)", (epoch,))
    else:
        epoch = row[0]
    return {
        "epoch": epoch,
        "endings": db.execute("SELECT name, seq_limit, acked FROM endings").fetchall(),
        "mailboxes": db.execute(
            "SELECT ending, COUNT(*), SUM(LENGTH(frame)), MAX(seq) FROM mailbox GROUP BY ending"
        ).fetchall(),
        "members": db.execute("SELECT grp, ending FROM members").fetchall(),
        "next_expiry": db.execute("SELECT MIN(expires) FROM mailbox").fetchone()[0],
    }


def _page(name: str, after: int, now: float, limit: int, db: sqlite3.Connection) -> list[Any]:
    return db.execute(
        "SELECT seq, frame FROM mailbox WHERE ending = ? AND seq > ? AND expires > ? "
        "ORDER BY seq LIMIT ?",
        (name, after, now, limit),
    ).fetchall()


def _insert_each(
    rows: list[tuple[Any, ...]], ignored: list[tuple[str, int]], db: sqlite3.Connection
) -> None:
    for row in rows:
        if db.execute(_INSERT, row).rowcount == 0:
            ignored.append((row[0], len(row[7])))


def _delete_acked(
    name: str, seq: int, report: Callable[[str, int, int], None], db: sqlite3.Connection
) -> None:
    sizes = db.execute(
        "DELETE FROM mailbox WHERE ending = ? AND seq <= ? RETURNING LENGTH(frame)", (name, seq)
    ).fetchall()
    if sizes:
        report(name, len(sizes), sum(size for (size,) in sizes))


def _drop_oldest(
    name: str,
    sent: int,
    need_count: int,
    need_bytes: int,
    dropped: list[tuple[Any, ...]],
    db: sqlite3.Connection,
) -> None:
    freed = 0
    rows = db.execute(
        "SELECT seq, LENGTH(frame), src, pid, flags, tag FROM mailbox "
        "WHERE ending = ? AND seq > ? ORDER BY seq",
        (name, sent),
    )
    for row in rows:
        if len(dropped) >= need_count and freed >= need_bytes:
            break
        dropped.append(row)
        freed += row[1]
    rows.close()
    db.executemany(
        "DELETE FROM mailbox WHERE ending = ? AND seq = ?", [(name, row[0]) for row in dropped]
    )


def _sweep(now: float, db: sqlite3.Connection) -> tuple[list[Any], float | None]:
    expired = db.execute(
        "DELETE FROM mailbox WHERE expires <= ? "
        "RETURNING ending, LENGTH(frame), src, pid, flags, tag",
        (now,),
    ).fetchall()
    next_expiry = db.execute("SELECT MIN(expires) FROM mailbox").fetchone()[0]
    return expired, next_expiry
