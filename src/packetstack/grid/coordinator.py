"""The service's side of the grid: the partition table, routing, migration, the journal.

Every operation reaches the service (a holder's own writes too): the service orders the
operations of each partition, sends them to the partition's owner in that order (batched
per owner, once per loop iteration), journals what they changed, sends the changes to the
partition's backups, and answers the caller once the journal has committed them. While no
holder is connected the service is the owner itself.

A partition that changes hands is *paused*: new operations for it wait here, in order;
once the ones at its old owner are answered, the old owner releases it, the new owner gets
its data (from the journal, in chunks: everything acknowledged is there) and the waiting
operations go to the new owner. When an owner dies, the operations it had not answered go
back to the front of their partitions' queues, a backup is promoted at once, or, with no
backup left, the partition is rebuilt from the journal; none is lost and none fails.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from ..codec import Packet
from ..errors import ConnectionClosed, GridError, MailboxFull
from ..protocol import SERVICE_NAME, Flag, PacketHeader, Target
from ..storage import EmbeddedStore
from .journal import Journal
from .messages import Backup, GridEvent, GridOps, GridOutcomes, Promote, Release, Take
from .ops import (
    READS,
    Change,
    Kind,
    Op,
    Outcome,
    PartitionData,
    Row,
    apply,
    batches,
    effect,
    op_size,
    partition_data,
)
from .partitions import partition_of, plan

if TYPE_CHECKING:
    from ..transport import Link

log = logging.getLogger("packetstack.grid")

MAX_TTL = 10 * 365 * 86400.0  # seconds; keeps expiry times within what timers can hold
MOVES_AT_ONCE = 16  # partitions migrating concurrently
TAKE_CHUNK_BYTES = 256 * 1024  # entries per Take message, by size
CONTROL_TIMEOUT = 30.0
CLIENT_KINDS = frozenset(int(kind) for kind in Kind if kind not in (Kind.EXPIRE, Kind.LOAD))
# On a lazily loaded map these need to know whether the database has the key.
NEEDS_LOAD = frozenset(
    int(kind)
    for kind in (
        Kind.GET,
        Kind.CONTAINS,
        Kind.PUT_IF_ABSENT,
        Kind.REPLACE,
        Kind.COMPARE_AND_SET,
        Kind.DELETE,
        Kind.INCREMENT,
    )
)
MISSING_KEPT = 1_000_000  # keys known to be missing from a lazy map's database, at most
Loader = Callable[[str, list[bytes]], Awaitable[dict[bytes, bytes]]]
WHOLE_PARTITION = frozenset({int(Kind.SCAN), int(Kind.CLEAR), int(Kind.SIZE)})
_NO_CHANGE = int(Change.NONE)
_LOADED = int(Change.LOADED)
_PUT = int(Kind.PUT)
_REQUEST = int(Flag.REQUEST)
_ENDING = int(Target.ENDING)
_outcomes_decoder = msgspec.msgpack.Decoder(GridOutcomes)

Finish = Callable[[list[Outcome]], None]


class GridHost(Protocol):
    """What the coordinator needs from the service."""

    stats: Counter[str]

    def send_to(self, holder: Holder, packet: Packet, request: bool) -> int:
        """Send a packet on the holder's connection (not through its mailbox); its id."""

    async def request_from(self, holder: Holder, packet: Packet, timeout: float) -> object:
        """Send a request on the holder's connection and wait for its reply."""

    def fail_request(self, request_id: int, error: BaseException) -> None: ...

    def deliver(self, name: str, packet: Packet) -> None:
        """Into the ending's mailbox, like any packet the service sends."""

    def expel(self, holder: Holder, reason: str) -> None:
        """Close a holder's connection for breaking the protocol."""


class Holder:
    """A connected ending that holds partitions (``Client(holds_data=True)``)."""

    __slots__ = ("alive", "leaving", "link", "name", "requests", "sent")

    def __init__(self, name: str, link: Link) -> None:
        self.name = name
        self.link = link
        self.alive = True
        self.leaving = False
        self.sent: dict[int, list[Unit]] = {}  # GridOps request id -> its units, unanswered
        self.requests: set[int] = set()  # control requests (Release) unanswered

    def __repr__(self) -> str:
        return f"Holder({self.name!r})"


class Batch:
    """The operations of one request; ``finish`` gets their outcomes once all are done."""

    __slots__ = ("finish", "outcomes", "remaining")

    def __init__(self, count: int, finish: Finish) -> None:
        self.outcomes: list[Outcome] = [_PENDING] * count
        self.remaining = count
        self.finish = finish


class Unit:
    __slots__ = ("batch", "index", "op", "order")

    def __init__(self, order: int, op: Op, batch: Batch, index: int) -> None:
        self.order = order
        self.op = op
        self.batch = batch
        self.index = index


class Partition:
    __slots__ = (
        "backups",
        "data",
        "index",
        "inflight",
        "lock",
        "owner",
        "paused",
        "settled",
        "waiting",
    )

    def __init__(self, index: int) -> None:
        self.index = index
        self.owner: Holder | None = None  # None: the service
        self.backups: list[Holder] = []
        self.data: PartitionData | None = {}  # the service's copy while it is the owner
        self.paused = False
        self.waiting: deque[Unit] = deque()
        self.inflight = 0  # units at the owner, unanswered
        self.settled: asyncio.Future[None] | None = None
        # Held by whatever changes the partition's owner or backups (a move, a rebuild):
        # one at a time, or a late one would undo an earlier one.
        self.lock = asyncio.Lock()


_PENDING = Outcome(error="pending")


class LazyMap:
    """What the service knows of a lazily loaded map's keys. ``known``: every key the grid
    holds or has written (its value, or its absence, is the grid's); ``missing``: keys the
    database did not have and nobody wrote since (forgotten when too many: asking again
    is always right). Any other key is read through from the database first."""

    def __init__(self) -> None:
        self.known: set[bytes] = set()
        self.missing: set[bytes] = set()

    def settled(self, op: Op) -> bool:
        """Whether ``op`` may run without a load; a write makes its key known."""
        key = op.key
        if op.kind in READS:
            return key in self.known or key in self.missing or op.kind not in NEEDS_LOAD
        if key in self.known:
            return True
        if op.kind in NEEDS_LOAD and key not in self.missing:
            return False
        self.missing.discard(key)
        self.known.add(key)
        return True

    def loaded(self, key: bytes, found: bool) -> None:
        if found:
            self.known.add(key)
            return
        if len(self.missing) >= MISSING_KEPT:
            self.missing.clear()
        self.missing.add(key)


class Coordinator:
    def __init__(
        self,
        host: GridHost,
        store: EmbeddedStore,
        partitions: int,
        backups: int,
        max_payload: int,
    ) -> None:
        self.host = host
        # Ops per message to a holder: half the payload limit leaves room for the answer's
        # values and for encoding overhead.
        self.budget = max(1024, max_payload // 2)
        self.journal = Journal(store)
        self.partition_count = partitions
        self.backup_count = backups
        self.parts = [Partition(i) for i in range(partitions)]
        self.holders: dict[str, Holder] = {}
        self.version = 0  # of the partition table: counts its changes
        self.listeners: dict[str, set[str]] = {}
        self.stats = host.stats
        self._order = itertools.count()
        self._to_owners: dict[Holder, list[Unit]] = {}
        self._to_backups: dict[Holder, list[Op]] = {}
        self._effects: list[Op] = []
        self._written: list[Unit] = []
        self._flush_due = False
        self._pending_bytes = 0  # since the last flush: see submit()
        self._expiries: list[tuple[float, int, str, bytes]] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._rebalancer: asyncio.Task[None] | None = None
        self._rebalance_due = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.ops = 0
        # Lazily loaded maps (set by the service with a loader): ops waiting for their key.
        self.lazy: dict[str, LazyMap] = {}
        self.loader: Loader | None = None
        self._loading: dict[tuple[str, bytes], list[Unit]] = {}
        self._to_load: dict[str, list[bytes]] = {}
        self.loads = 0

    # ------------------------------------------------------------ lifecycle

    async def open(self, preload: Callable[[], Awaitable[None]] | None = None) -> None:
        """Create the journal's table, run ``preload`` (which may add entries to the
        journal), and take every journaled entry (the service owns every partition until
        holders connect)."""
        # Raises ConfigError for a journal written with another partition count.
        self.listeners = await self.journal.open(self.partition_count)
        if preload is not None:
            await preload()
        rows = await self.journal.load_all()
        for index, part_rows in rows.items():
            self.parts[index].data = partition_data(part_rows)
            self._watch_expiry(index, part_rows)
            for map_name, key, _, _ in part_rows:
                lazy = self.lazy.get(map_name)
                if lazy is not None:
                    lazy.known.add(key)
        self._arm_sweeper()

    async def close(self) -> None:
        self._flush()
        self.journal.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._rebalancer is not None:
            self._rebalancer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------ operations

    def submit(self, ops: list[Op], finish: Finish, size: int) -> None:
        """Run ``ops`` (already checked and with absolute expiries); ``finish(outcomes)``
        is called once every one is applied and, if it wrote, journaled. ``size``: at least
        the bytes the ops take encoded (a request's payload size)."""
        if not ops:
            finish([])
            return
        self._pending_bytes += size
        batch = Batch(len(ops), finish)
        order = self._order
        route = self._admit if self.lazy else self._route
        for index, op in enumerate(ops):
            route(Unit(next(order), op, batch, index))
        self.ops += len(ops)
        self._schedule_flush()

    def prepare(self, ops: list[Op], now: float) -> str | None:
        """Check a client's ops and fix their partitions and expiries; the problem or None."""
        count = self.partition_count
        for op in ops:
            kind = op.kind
            if kind not in CLIENT_KINDS:
                return f"unknown grid operation {kind}"
            if not op.map:
                return "a grid map needs a non-empty name"
            if kind in WHOLE_PARTITION:
                if not 0 <= op.part < count:
                    return f"partition {op.part} does not exist (the grid has {count})"
            else:
                op.part = partition_of(op.key, count)
            if op.expires:
                if not 0 < op.expires <= MAX_TTL:  # NaN fails too
                    return f"ttl must be positive and at most {MAX_TTL:.0f} s, not {op.expires}"
                op.expires += now
        return None

    def _admit(self, unit: Unit) -> None:
        """Route ``unit``, unless its key of a lazy map must be read through first: then it
        waits (with every later op on that key) for the load."""
        op = unit.op
        lazy = self.lazy.get(op.map)
        if lazy is None:
            self._route(unit)
            return
        waiting = self._loading.get((op.map, op.key))
        if waiting is not None:  # any op on a key being loaded, a put too, keeps its turn
            waiting.append(unit)
            return
        if lazy.settled(op):
            self._route(unit)
            return
        self._loading[(op.map, op.key)] = [unit]
        if not self._to_load:
            asyncio.get_running_loop().call_soon(self._start_loads)
        self._to_load.setdefault(op.map, []).append(op.key)

    def _start_loads(self) -> None:
        """Once per loop iteration: one read-through per lazy map for the keys asked."""
        to_load, self._to_load = self._to_load, {}
        for map_name, keys in to_load.items():
            self._spawn(self._load_through(map_name, keys))

    async def _load_through(self, map_name: str, keys: list[bytes]) -> None:
        assert self.loader is not None
        try:
            found = await self.loader(map_name, keys)
        except Exception as exc:  # the database is down: these ops fail, nothing changed
            log.warning("read-through of map %s failed: %s", map_name, exc)
            why = f"map {map_name!r} reads through from its database, which failed: {exc}"
            for key in keys:
                for unit in self._loading.pop((map_name, key)):
                    self._complete(unit, Outcome(error=why))
            return
        lazy = self.lazy[map_name]
        loads = []
        waiting = []
        for key in keys:
            value = found.get(key)
            lazy.loaded(key, value is not None)
            if value is not None:
                part = partition_of(key, self.partition_count)
                loads.append(Op(map_name, part, Kind.LOAD, key, value))
            waiting.extend(self._loading.pop((map_name, key)))  # the key is settled now
        self.loads += len(loads)
        self.submit(loads, _ignore, sum(len(op.value or b"") for op in loads))
        for unit in waiting:  # after the loads, in the order they came
            self._admit(unit)
        self._schedule_flush()

    def _route(self, unit: Unit) -> None:
        part = self.parts[unit.op.part]
        if part.paused:
            part.waiting.append(unit)
            return
        owner = part.owner
        if owner is None:
            assert part.data is not None
            self._applied(unit, apply(part.data, unit.op, time.time()))
            return
        part.inflight += 1
        queue = self._to_owners.get(owner)
        if queue is None:
            self._to_owners[owner] = [unit]
        else:
            queue.append(unit)

    def _applied(self, unit: Unit, outcome: Outcome) -> None:
        """An op's outcome: a read is done; a write goes to the backups and the journal
        (the caller schedules the flush)."""
        op = unit.op
        if outcome.change == _NO_CHANGE:  # reads too
            self._complete(unit, outcome)
            return
        # A put's change is the put itself (with the expiry it was given).
        change = op if op.kind == _PUT else effect(op, outcome)
        if change is None:
            self._complete(unit, outcome)
            return
        part = self.parts[op.part]
        for backup in part.backups:
            queue = self._to_backups.get(backup)
            if queue is None:
                self._to_backups[backup] = [change]
            else:
                queue.append(change)
        unit.batch.outcomes[unit.index] = outcome
        self._effects.append(change)
        self._written.append(unit)
        if change.expires:
            heapq.heappush(self._expiries, (change.expires, op.part, op.map, op.key))
            if self._expiries[0][0] == change.expires:
                self._arm_sweeper()
        listeners = self.listeners.get(op.map)
        if listeners and outcome.change != _LOADED:
            self._notify(listeners, op, outcome.change, change.value, outcome.count)

    def _complete(self, unit: Unit, outcome: Outcome) -> None:
        unit.batch.outcomes[unit.index] = outcome
        self._journaled([unit])

    @staticmethod
    def _journaled(units: list[Unit]) -> None:
        """These units are done (their outcomes are in their batches)."""
        for unit in units:
            batch = unit.batch
            batch.remaining -= 1
            if batch.remaining == 0:
                batch.finish(batch.outcomes)

    def _schedule_flush(self) -> None:
        if not self._flush_due:
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        """Once per loop iteration: one GridOps per owner, one Backup per backup holder,
        one journal write for everything that changed."""
        self._flush_due = False
        # Everything routed since the last flush fits one message: no need to measure ops.
        whole = self._pending_bytes <= self.budget
        self._pending_bytes = 0
        if self._to_owners:
            to_owners, self._to_owners = self._to_owners, {}
            for holder, units in to_owners.items():
                for run in [units] if whole else batches(units, _op_of, self.budget):
                    request_id = self.host.send_to(holder, GridOps([u.op for u in run]), True)
                    holder.sent[request_id] = run
        if self._to_backups:
            to_backups, self._to_backups = self._to_backups, {}
            for holder, effects in to_backups.items():
                for ops in [effects] if whole else batches(effects, _same, self.budget):
                    self.host.send_to(holder, Backup(ops), False)
        if self._effects:
            effects, self._effects = self._effects, []
            written, self._written = self._written, []
            self.journal.write(effects, lambda: self._journaled(written))

    def outcomes(self, holder: Holder, request_id: int, payload: bytes | memoryview) -> None:
        """A holder answered a GridOps request."""
        units = holder.sent.get(request_id)
        if units is None:
            return
        try:
            outcomes = _outcomes_decoder.decode(payload).outcomes
        except msgspec.DecodeError as exc:
            outcomes = []
            problem = f"undecodable grid outcomes: {exc}"
        else:
            problem = "grid outcomes do not match the operations sent"
        if len(outcomes) != len(units):
            # Its units stay in ``sent``: its loss puts them back in their queues.
            self.host.expel(holder, problem)
            return
        del holder.sent[request_id]
        parts = self.parts
        for unit, outcome in zip(units, outcomes, strict=True):
            part = parts[unit.op.part]
            part.inflight -= 1
            self._applied(unit, outcome)
            _settle_if_idle(part)
        self._schedule_flush()

    # --------------------------------------------------------------- events

    def _notify(
        self, names: set[str], op: Op, change: int, value: bytes | None, count: int
    ) -> None:
        # clear() is one event per partition that had entries (near caches empty themselves),
        # not one per entry; listeners are not called for it.
        if change == Change.CLEARED and not count:
            return
        event = GridEvent(op.map, change, op.key, value if change <= Change.UPDATED else None)
        for name in list(names):
            try:
                self.host.deliver(name, event)
            except MailboxFull as exc:
                self.stats["grid_events_dropped"] += 1
                log.warning("entry event for %r not delivered: %s", name, exc)

    async def listen(self, name: str, map_name: str, on: bool) -> None:
        """Deliver (or stop) the map's entry events to the ending ``name``. Kept in the
        journal: a restarted service goes on delivering them, into mailboxes meanwhile."""
        names = self.listeners.setdefault(map_name, set())
        if on:
            names.add(name)
        else:
            names.discard(name)
            if not names:
                del self.listeners[map_name]
        if name != SERVICE_NAME:  # the service's own maps subscribe again when made
            await self.journal.listen(map_name, name, on)

    # --------------------------------------------------------------- expiry

    def _watch_expiry(self, index: int, rows: list[Row]) -> None:
        for map_name, key, _, expires in rows:
            if expires:
                heapq.heappush(self._expiries, (expires, index, map_name, key))

    def _arm_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._expiries:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._expiries[0][0] - time.time())
            self._sweeper = loop.call_later(delay, self._sweep)

    def _sweep(self) -> None:
        """Expire what is due: an EXPIRE op per entry, ordered with the partition's others
        (an entry written again since is left alone by it)."""
        self._sweeper = None
        now = time.time()
        due = []
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            expires, part, map_name, key = heapq.heappop(expiries)
            due.append(Op(map_name, part, Kind.EXPIRE, key, None, None, expires))
        if due:
            self.stats["grid_expired_checks"] += len(due)
            self.submit(due, _ignore, sum(op_size(op) for op in due))
        self._arm_sweeper()

    # ------------------------------------------------------------- holders

    def holder_joined(self, name: str, link: Link) -> Holder:
        holder = Holder(name, link)
        self.holders[name] = holder
        log.info("holder %r joined the grid", name)
        self.rebalance()
        return holder

    def holder_lost(self, holder: Holder) -> None:
        """A holder's connection is gone (closed, crashed, timed out)."""
        if not holder.alive:
            return
        holder.alive = False
        if self.holders.get(holder.name) is holder:
            del self.holders[holder.name]
        lost = ConnectionClosed(f"holder {holder.name!r} is gone")
        for request_id in holder.requests:
            self.host.fail_request(request_id, lost)
        holder.requests.clear()
        units = [u for sent in holder.sent.values() for u in sent]
        units.extend(self._to_owners.pop(holder, ()))
        holder.sent.clear()
        self._to_backups.pop(holder, None)
        units.sort(key=lambda u: u.order, reverse=True)
        for unit in units:  # back to the front of their queues, in their order
            part = self.parts[unit.op.part]
            part.inflight -= 1
            part.waiting.appendleft(unit)
        promoted: dict[Holder, list[int]] = {}
        for part in self.parts:
            if holder in part.backups:
                part.backups.remove(holder)
            if part.owner is holder and not part.paused:
                if part.backups:
                    promoted.setdefault(self._heir(part), []).append(part.index)
                else:
                    self._start_rebuild(part)
            _settle_if_idle(part)
        self._promote(promoted)
        for part in self.parts:
            if part.waiting and not part.paused:
                self._drain(part)
        self._schedule_flush()
        promotions = sum(len(p) for p in promoted.values())
        (log.info if holder.leaving else log.warning)(
            "holder %r left the grid%s: %d partitions promoted to backups",
            holder.name,
            "" if holder.leaving else " without handing over",
            promotions,
        )
        self.rebalance()

    def _start_rebuild(self, part: Partition) -> None:
        """Owner and backups are gone: the service takes the partition from the journal."""
        part.paused = True
        self.stats["grid_rebuilds"] += 1
        self._spawn(self._rebuild(part))

    async def _rebuild(self, part: Partition) -> None:
        async with part.lock:
            part.paused = True
            try:
                if part.owner is not None and not part.owner.alive:  # nobody fixed it since
                    part.data = partition_data(await self._load(part.index))
                    part.owner = None
                    self.version += 1
            finally:
                self._resume(part)

    async def leave(self, holder: Holder) -> None:
        """A holder closing gracefully: move its partitions first."""
        holder.leaving = True
        self.rebalance()
        while self._rebalancer is not None:
            await asyncio.shield(self._rebalancer)

    # ------------------------------------------------------------ rebalance

    def rebalance(self) -> None:
        self._rebalance_due = True
        if self._rebalancer is None:
            self._rebalancer = asyncio.get_running_loop().create_task(self._rebalancing())

    async def _rebalancing(self) -> None:
        try:
            while self._rebalance_due:
                self._rebalance_due = False
                holders = [h for h in self.holders.values() if not h.leaving]
                names = [h.name for h in holders]
                by_name = {h.name: h for h in holders}
                target = plan(
                    [p.owner.name if p.owner else None for p in self.parts],
                    [[b.name for b in p.backups] for p in self.parts],
                    names,
                    self.backup_count,
                )
                moves = []
                for part in self.parts:
                    owner_name = target.owners[part.index]
                    owner = by_name[owner_name] if owner_name is not None else None
                    backups = [by_name[n] for n in target.backups[part.index]]
                    if part.owner is not owner or part.backups != backups:
                        moves.append((part, owner, backups))
                if not moves:
                    continue
                log.info("grid rebalance: %d partitions move", len(moves))
                limit = asyncio.Semaphore(MOVES_AT_ONCE)
                await asyncio.gather(*(self._move(limit, *move) for move in moves))
        finally:
            self._rebalancer = None

    async def _move(
        self,
        limit: asyncio.Semaphore,
        part: Partition,
        owner: Holder | None,
        backups: list[Holder],
    ) -> None:
        """Give ``part`` to ``owner`` with ``backups``, pausing its operations meanwhile
        (at most ``limit`` partitions at once, one change of a partition at a time)."""
        async with limit, part.lock:
            await self._move_locked(part, owner, backups)

    async def _move_locked(
        self, part: Partition, owner: Holder | None, backups: list[Holder]
    ) -> None:
        part.paused = True
        try:
            if part.inflight:
                part.settled = asyncio.get_running_loop().create_future()
                await part.settled
            old = part.owner
            rows: list[Row] | None = None
            if old is not owner:
                if old is not None and old.alive:
                    await self._release(old, part.index)
                if owner is not None and owner in part.backups:
                    part.backups.remove(owner)
                    if owner.alive:
                        self._promote({owner: [part.index]})
                else:
                    rows = await self._load(part.index)
                    if owner is not None and owner.alive:
                        self._send_take(owner, part.index, rows, True)
                if owner is not None and not owner.alive:
                    owner = None  # died meanwhile: the service keeps it
                    rows = rows if rows is not None else await self._load(part.index)
                if owner is None:
                    part.data = partition_data(rows if rows is not None else [])
                else:
                    part.data = None
                part.owner = owner
                self.stats["grid_migrations"] += 1
            for stale in [b for b in part.backups if b not in backups]:
                part.backups.remove(stale)
                if stale.alive and stale is not owner:
                    await self._release(stale, part.index)
            fresh = [b for b in backups if b not in part.backups and b is not part.owner]
            if fresh:
                if rows is None:
                    rows = await self._load(part.index)
                for backup in fresh:
                    if backup.alive:
                        self._send_take(backup, part.index, rows, False)
                        part.backups.append(backup)
            self.version += 1
        except Exception:
            log.exception("moving grid partition %d failed; it stays where it is", part.index)
            self.rebalance()
        finally:
            self._resume(part)

    def _resume(self, part: Partition) -> None:
        part.paused = False
        if part.owner is not None and not part.owner.alive:
            # Died while the partition was paused: its death skipped this partition.
            if not part.backups:
                self._start_rebuild(part)
                return
            self._promote({self._heir(part): [part.index]})
        self._drain(part)

    def _heir(self, part: Partition) -> Holder:
        """Make the partition's first backup its owner (its data is there already)."""
        heir = part.owner = part.backups.pop(0)
        self.version += 1
        return heir

    def _promote(self, parts: dict[Holder, list[int]]) -> None:
        """Tell new owners which of their backups are theirs now, after every backup change
        still owed to them (a Promote must not overtake them)."""
        self._flush()
        for heir, indexes in parts.items():
            self.host.send_to(heir, Promote(indexes), False)
            self.stats["grid_promotions"] += len(indexes)

    def _drain(self, part: Partition) -> None:
        waiting = part.waiting
        while waiting and not part.paused:
            unit = waiting.popleft()
            self._pending_bytes += op_size(unit.op)  # counted when it came, in an old flush
            self._route(unit)
        self._schedule_flush()

    async def _load(self, index: int) -> list[Row]:
        self._flush()  # the journal read comes after every change taken so far
        return await self.journal.load(index, time.time())

    async def _release(self, holder: Holder, index: int) -> None:
        try:
            await self.host.request_from(holder, Release([index]), CONTROL_TIMEOUT)
        except (ConnectionClosed, TimeoutError, GridError) as exc:
            log.info(
                "holder %r did not confirm releasing partition %d: %s", holder.name, index, exc
            )

    def _send_take(self, holder: Holder, index: int, rows: list[Row], owner: bool) -> None:
        """The partition's entries in chunks of about TAKE_CHUNK_BYTES."""
        chunk: list[tuple[str, bytes, bytes, float]] = []
        size = 0
        first = True
        for row in rows:
            chunk.append(row)
            size += len(row[1]) + len(row[2]) + len(row[0]) + 16
            if size >= TAKE_CHUNK_BYTES:
                self.host.send_to(holder, Take(index, owner, first, False, chunk), False)
                chunk, size, first = [], 0, False
        self.host.send_to(holder, Take(index, owner, first, True, chunk), False)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- status

    def snapshot(self) -> dict[str, object]:
        owners: dict[str, int] = {}
        backups: dict[str, int] = {}
        for part in self.parts:
            name = part.owner.name if part.owner is not None else SERVICE_NAME
            owners[name] = owners.get(name, 0) + 1
            for backup in part.backups:
                backups[backup.name] = backups.get(backup.name, 0) + 1
        return {
            "partitions": self.partition_count,
            "backups": self.backup_count,
            "version": self.version,
            "holders": [
                {
                    "name": name,
                    "owned": owners.get(name, 0),
                    "backups": backups.get(name, 0),
                    "leaving": holder.leaving,
                }
                for name, holder in self.holders.items()
            ],
            "service_owned": owners.get(SERVICE_NAME, 0),
            "paused": sum(1 for p in self.parts if p.paused),
            "waiting": sum(len(p.waiting) for p in self.parts),
            "ops": self.ops,
            "loads": self.loads,
            "journal_retries": self.journal.retries,
            "journal_folds": self.journal.folds,
            "listeners": {name: sorted(names) for name, names in self.listeners.items()},
        }


def _ignore(_: list[Outcome]) -> None:
    pass


def _settle_if_idle(part: Partition) -> None:
    """Wake a move waiting for the partition's ops at its owner, once none is left."""
    if part.inflight == 0 and part.settled is not None:
        part.settled.set_result(None)
        part.settled = None


def _op_of(unit: Unit) -> Op:
    return unit.op


def _same(op: Op) -> Op:
    return op


def request_header(packet_id: int, holder: str, packet: Packet, request: bool) -> PacketHeader:
    """The header of a packet the service sends a holder outside its mailbox."""
    return PacketHeader(
        packet_id, _ENDING, holder, SERVICE_NAME, packet.packet_tag, _REQUEST if request else 0
    )
