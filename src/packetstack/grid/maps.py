"""Typed maps: the grid's user API, the same on a Client and on the Service.

``players = client.grid.map("players", Player)`` gives a :class:`Map` whose keys are
``str``, ``int``, ``bytes``, ``UUID`` or tuples of them, and whose values are any type the
codec handles. Reads of a key whose partition this process owns are served in-process;
every other operation goes through the service to the partition's owner.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Generic, TypeVar, overload

import msgspec

from ..codec import DECODE_ERRORS, _hooks, encode
from ..errors import GridError
from .ops import READS, TOO_LARGE, Change, Kind, Op, Outcome, PartitionData, apply, live
from .partitions import partition_of

K = TypeVar("K")
V = TypeVar("V")

# Operations per request for put_all/get_all and partitions per scan request: bounds a
# request's size; the requests of one call run concurrently.
OPS_PER_REQUEST = 4096
PARTS_PER_SCAN = 16
NEAR_CACHE_SIZE = 10_000

_KEY_TYPES = (str, int, bytes, uuid.UUID)
EVENT_KINDS = {
    Change.ADDED: "added",
    Change.UPDATED: "updated",
    Change.REMOVED: "removed",
    Change.EXPIRED: "expired",
}


class Watchers:
    """The maps of one process that want their entry events, by map name."""

    def __init__(self) -> None:
        self._maps: dict[str, list[Map[Any, Any]]] = {}

    def watch(self, grid_map: Map[Any, Any], on: bool) -> None:
        maps = self._maps.setdefault(grid_map.name, [])
        if on and grid_map not in maps:
            maps.append(grid_map)
        elif not on and grid_map in maps:
            maps.remove(grid_map)

    def all(self) -> list[Map[Any, Any]]:
        return [grid_map for maps in self._maps.values() for grid_map in maps]

    def watching(self, map_name: str) -> bool:
        return bool(self._maps.get(map_name))

    async def event(self, map_name: str, change: int, key: bytes, value: bytes | None) -> None:
        for grid_map in list(self._maps.get(map_name, ())):
            await grid_map.event(change, key, value)


class GridFront:
    """``client.grid`` and ``service.grid``: where maps come from, and how they reach the
    grid (the client's connection, or the service itself)."""

    partitions: int
    lazy: frozenset[str] = frozenset()  # maps read through from a database on a miss

    def __init__(self) -> None:
        self._watchers = Watchers()
        self._subscribed: set[str] = set()  # map names whose events come to this process

    def local(self, part: int) -> PartitionData | None:
        """This process's data of ``part`` if it owns it now, else None."""
        raise NotImplementedError

    async def run(self, ops: list[Op]) -> list[Outcome]:
        """Run ops through the service, in order per partition."""
        raise NotImplementedError

    async def listen(self, map_name: str, on: bool) -> None:
        """Subscribe this ending to the map's entry events (or stop)."""
        raise NotImplementedError

    @overload
    def map(self, name: str, value_type: type[V], *, near_cache: bool = False) -> Map[Any, V]: ...

    @overload
    def map(
        self, name: str, value_type: type[V], key_type: type[K], *, near_cache: bool = False
    ) -> Map[K, V]: ...

    def map(
        self,
        name: str,
        value_type: type[V] | Any,
        key_type: type[K] | Any = Any,
        *,
        near_cache: bool = False,
    ) -> Map[Any, Any]:
        """A typed view of the grid map ``name``: values of ``value_type``, keys decoded as
        ``key_type`` by keys() and items() (default: as msgpack gives them back)."""
        return Map(self, name, value_type, key_type, near_cache=near_cache)

    def watch(self, grid_map: Map[Any, Any], on: bool) -> None:
        self._watchers.watch(grid_map, on)

    async def subscribe(self, grid_map: Map[Any, Any]) -> None:
        """Route the map's entry events to ``grid_map``, asking the service for them
        first if no other map object of that name has."""
        name = grid_map.name
        if name not in self._subscribed:
            await self.listen(name, True)
            self._subscribed.add(name)
        self._watchers.watch(grid_map, True)

    async def unsubscribe(self, grid_map: Map[Any, Any]) -> None:
        """Stop routing events to ``grid_map``; the last one of its name stops them."""
        self._watchers.watch(grid_map, False)
        name = grid_map.name
        if name in self._subscribed and not self._watchers.watching(name):
            self._subscribed.discard(name)
            await self.listen(name, False)


class EntryEvent(msgspec.Struct, Generic[K, V], frozen=True):
    """A change to an entry: ``kind`` is "added", "updated", "removed" or "expired";
    ``value`` is the new value for added and updated, else None."""

    map: str
    kind: str
    key: K
    value: V | None


Listener = Callable[[EntryEvent[Any, Any]], Awaitable[None] | None]


def check_key(key: object) -> None:
    if isinstance(key, tuple):
        for part in key:
            check_key(part)
    elif not isinstance(key, _KEY_TYPES) or isinstance(key, bool):
        raise TypeError(
            f"a grid key is a str, int, bytes, UUID or a tuple of them, not {type(key).__name__}"
        )


class Map(Generic[K, V]):
    """A distributed map of ``key_type`` to ``value_type``. Every method is a coroutine
    except :meth:`keys` and :meth:`items`, which are async iterators."""

    def __init__(
        self,
        backend: GridFront,
        name: str,
        value_type: type[V] | Any,
        key_type: type[K] | Any = Any,
        *,
        near_cache: bool = False,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise GridError("a grid map needs a non-empty name")
        self.name = name
        self.value_type = value_type
        self._backend = backend
        self._decode_value = msgspec.msgpack.Decoder(value_type, dec_hook=_hooks.dec_hook).decode
        self._decode_key = msgspec.msgpack.Decoder(key_type, dec_hook=_hooks.dec_hook).decode
        # Python 3.11's Any is a class too: it, like object, takes anything.
        anything = value_type is object or value_type is Any
        self._checked_type = value_type if isinstance(value_type, type) and not anything else None
        self._listeners: list[Listener] = []
        self.near_cache: dict[bytes, bytes | None] | None = {} if near_cache else None
        self.near_hits = 0
        self._subscribed = False  # its backend routes this map's entry events to it

    def __repr__(self) -> str:
        return f"Map({self.name!r})"

    # ------------------------------------------------------------- encoding

    def _key(self, key: K) -> tuple[bytes, int]:
        if type(key) is not str:
            check_key(key)
        encoded = encode(key)
        return encoded, partition_of(encoded, self._backend.partitions)

    def _value(self, value: V) -> bytes:
        kind = self._checked_type
        if kind is not None and not isinstance(value, kind):
            raise TypeError(
                f"map {self.name!r} holds {kind.__name__} values, not {type(value).__name__}"
            )
        return encode(value)

    def _decoded(self, raw: bytes | None) -> V | None:
        if raw is None:
            return None
        try:
            return self._decode_value(raw)  # type: ignore[no-any-return]
        except DECODE_ERRORS as exc:
            raise GridError(
                f"an entry of map {self.name!r} does not decode as {self.value_type!r}: {exc}"
            ) from exc

    @staticmethod
    def _ttl(ttl: float | None) -> float:
        if ttl is None:
            return 0.0
        if not ttl > 0:
            raise ValueError(f"ttl must be a positive number of seconds, not {ttl!r}")
        return float(ttl)

    async def _one(self, op: Op) -> Outcome:
        outcome = (await self._many([op]))[0]
        if self.near_cache is not None and op.kind not in READS:
            self.near_cache.pop(op.key, None)
        return outcome

    def _check(self, outcome: Outcome) -> Outcome:
        if outcome.error:
            raise GridError(f"map {self.name!r}: {outcome.error}")
        return outcome

    async def _many(self, ops: list[Op]) -> list[Outcome]:
        if len(ops) <= OPS_PER_REQUEST:
            outcomes = await self._backend.run(ops)
        else:
            parts = await asyncio.gather(
                *(
                    self._backend.run(ops[i : i + OPS_PER_REQUEST])
                    for i in range(0, len(ops), OPS_PER_REQUEST)
                )
            )
            outcomes = [outcome for part in parts for outcome in part]
        for outcome in outcomes:
            self._check(outcome)
        return outcomes

    def _local(self, key: bytes, part: int) -> tuple[bool, bytes | None]:
        """(found here, value): an owned partition's entry, or the near cache's."""
        data = self._backend.local(part)
        if data is not None:
            entries = data.get(self.name)
            entry = entries.get(key) if entries is not None else None
            if entry is not None and live(entry, time.time()):
                return True, entry[0]
            # A lazy map's miss here may be in its database: the service reads it through.
            return self.name not in self._backend.lazy, None
        cache = self.near_cache
        if cache is not None and key in cache:
            self.near_hits += 1
            return True, cache[key]
        return False, None

    async def _subscribe(self) -> None:
        """A near cache stays true through the owners' changes: subscribe before the first
        remote read fills it."""
        if not self._subscribed:
            await self._backend.subscribe(self)
            self._subscribed = True

    def _remember(self, key: bytes, value: bytes | None) -> None:
        cache = self.near_cache
        if cache is not None:
            if len(cache) >= NEAR_CACHE_SIZE:
                del cache[next(iter(cache))]
            cache[key] = value

    # ---------------------------------------------------------------- reads

    async def get(self, key: K) -> V | None:
        """The value of ``key``, or None."""
        encoded, part = self._key(key)
        found, raw = self._local(encoded, part)
        if not found:
            if self.near_cache is not None:
                await self._subscribe()
            outcome = await self._one(Op(self.name, part, Kind.GET, encoded))
            raw = outcome.value
            self._remember(encoded, raw)
        return self._decoded(raw)

    async def contains(self, key: K) -> bool:
        encoded, part = self._key(key)
        found, raw = self._local(encoded, part)
        if found:
            return raw is not None
        return (await self._one(Op(self.name, part, Kind.CONTAINS, encoded))).ok

    async def get_all(self, keys: Iterable[K]) -> dict[K, V]:
        """The entries of those ``keys`` that exist; keys held elsewhere are asked of their
        owners together (split by owner at the service, sent concurrently)."""
        result: dict[K, V] = {}
        remote: list[tuple[K, Op]] = []
        for key in keys:
            encoded, part = self._key(key)
            found, raw = self._local(encoded, part)
            if found:
                if raw is not None:
                    result[key] = self._decoded(raw)  # type: ignore[assignment]
            else:
                remote.append((key, Op(self.name, part, Kind.GET, encoded)))
        if remote:
            if self.near_cache is not None:
                await self._subscribe()
            outcomes = await self._many([op for _, op in remote])
            for (key, op), outcome in zip(remote, outcomes, strict=True):
                self._remember(op.key, outcome.value)
                if outcome.value is not None:
                    result[key] = self._decoded(outcome.value)  # type: ignore[assignment]
        return result

    async def size(self) -> int:
        outcomes = await self._many(self._every_partition(Kind.SIZE))
        return sum(outcome.count for outcome in outcomes)

    async def items(self) -> AsyncIterator[tuple[K, V]]:
        """Every entry, partition by partition (a few partitions per request)."""
        count = self._backend.partitions
        for first in range(0, count, PARTS_PER_SCAN):
            ops = [
                Op(self.name, part, Kind.SCAN)
                for part in range(first, min(count, first + PARTS_PER_SCAN))
            ]
            for outcome in await self._scan(ops):
                for key, value in outcome.entries or ():
                    yield self._decode_key(key), self._decoded(value)  # type: ignore[misc]

    async def keys(self) -> AsyncIterator[K]:
        async for key, _ in self.items():
            yield key

    async def _scan(self, ops: list[Op]) -> list[Outcome]:
        """SCAN outcomes for ``ops``: owned partitions read here (now, before any await),
        the others asked together; partitions whose answers together would not fit one
        packet are asked for one by one."""
        local = self._backend.local
        now = time.time()
        outcomes: list[Outcome | None] = []
        remote: list[tuple[int, Op]] = []
        for index, op in enumerate(ops):
            data = local(op.part)
            outcomes.append(apply(data, op, now) if data is not None else None)
            if data is None:
                remote.append((index, op))
        if remote:
            answers = await self._backend.run([op for _, op in remote])
            for (index, op), answer in zip(remote, answers, strict=True):
                if answer.error.startswith(TOO_LARGE):
                    answer = (await self._backend.run([op]))[0]  # alone it may fit
                outcomes[index] = self._check(answer)
        return [outcome for outcome in outcomes if outcome is not None]

    def _every_partition(self, kind: Kind) -> list[Op]:
        return [Op(self.name, part, kind) for part in range(self._backend.partitions)]

    # --------------------------------------------------------------- writes

    async def put(self, key: K, value: V, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` (for ``ttl`` seconds, if given). Returns once the
        owner applied it and the service journaled it."""
        encoded, part = self._key(key)
        op = Op(self.name, part, Kind.PUT, encoded, self._value(value), None, self._ttl(ttl))
        await self._one(op)

    async def put_all(self, entries: Mapping[K, V], *, ttl: float | None = None) -> None:
        """Store many entries: split by owner at the service and applied concurrently."""
        expires = self._ttl(ttl)
        ops = []
        for key, value in entries.items():
            encoded, part = self._key(key)
            ops.append(Op(self.name, part, Kind.PUT, encoded, self._value(value), None, expires))
        await self._many(ops)
        cache = self.near_cache
        if cache is not None:
            for op in ops:
                cache.pop(op.key, None)

    async def put_if_absent(self, key: K, value: V, *, ttl: float | None = None) -> bool:
        """Store ``value`` unless ``key`` has one; whether it stored it."""
        encoded, part = self._key(key)
        op = Op(self.name, part, Kind.PUT_IF_ABSENT, encoded, self._value(value))
        op.expires = self._ttl(ttl)
        return (await self._one(op)).ok

    async def replace(self, key: K, value: V, *, ttl: float | None = None) -> bool:
        """Store ``value`` only if ``key`` has one; whether it did."""
        encoded, part = self._key(key)
        op = Op(self.name, part, Kind.REPLACE, encoded, self._value(value), None, self._ttl(ttl))
        return (await self._one(op)).ok

    async def compare_and_set(
        self, key: K, expected: V | None, value: V | None, *, ttl: float | None = None
    ) -> bool:
        """Set ``key`` to ``value`` if it now holds ``expected`` (None: absent); a ``value``
        of None deletes. Whether it did."""
        encoded, part = self._key(key)
        op = Op(
            self.name,
            part,
            Kind.COMPARE_AND_SET,
            encoded,
            None if value is None else self._value(value),
            None if expected is None else self._value(expected),
            self._ttl(ttl),
        )
        return (await self._one(op)).ok

    async def delete(self, key: K) -> bool:
        """Remove ``key``; whether it was there."""
        encoded, part = self._key(key)
        return (await self._one(Op(self.name, part, Kind.DELETE, encoded))).ok

    async def increment(self, key: K, delta: int = 1) -> int:
        """Add ``delta`` to the integer under ``key`` (absent: 0) atomically; the new value."""
        if type(delta) is not int:
            raise TypeError(f"increment's delta is an int, not {type(delta).__name__}")
        encoded, part = self._key(key)
        op = Op(self.name, part, Kind.INCREMENT, encoded, None, None, 0.0, delta)
        outcome = await self._one(op)
        assert outcome.value is not None
        return msgspec.msgpack.decode(outcome.value, type=int)

    async def clear(self) -> None:
        """Remove every entry (one operation per partition; no entry events)."""
        await self._many(self._every_partition(Kind.CLEAR))
        if self.near_cache is not None:
            self.near_cache.clear()

    # --------------------------------------------------------------- events

    async def listen(self, listener: Listener) -> None:
        """Call ``listener(event)`` (a function or coroutine function) for every change to
        an entry: added, updated, removed, expired. Delivered through this ending's mailbox:
        in order, and kept for it while it is disconnected."""
        await self._subscribe()  # raises PermissionDenied without read access: not added
        self._listeners.append(listener)

    async def unlisten(self, listener: Listener) -> None:
        self._listeners.remove(listener)
        if not self._listeners and self.near_cache is None and self._subscribed:
            self._subscribed = False
            await self._backend.unsubscribe(self)

    async def event(self, change: int, key: bytes, value: bytes | None) -> None:
        """An entry event for this map (from the backend)."""
        cache = self.near_cache
        if cache is not None:
            if change == Change.CLEARED:
                cache.clear()
            else:
                cache.pop(key, None)
        kind = EVENT_KINDS.get(Change(change))
        if kind is None or not self._listeners:
            return
        event: EntryEvent[K, V] = EntryEvent(
            self.name, kind, self._decode_key(key), self._decoded(value)
        )
        for listener in list(self._listeners):
            result = listener(event)
            if inspect.isawaitable(result):
                await result

    def reconnected(self) -> None:
        """After a reconnect: the near cache may have missed invalidations; it starts empty."""
        if self.near_cache is not None:
            self.near_cache.clear()
