"""Write-behind: the grid's bridged maps written to their databases on flush.

Nothing touches a bridge on a put. A flush (an operator's, the service's close, or the
optional interval) reads the dirty entries from the journal page by page (the next page is
read while this one is written), writes them in batches, and cleans each key only if it
did not change meanwhile (see journal.py). A batch the database cannot take now is retried
with exponential backoff up to the bridge's limit; after that the flush of that bridge
stops and its entries stay dirty for the next one. A batch the database refuses is split
in halves until the entries at fault are alone; each is set aside with its error and the
rest go in.

:class:`MapWriter` does the writing of one map. It runs in the service's process, or, for
large flushes, in a flush worker process (flush_worker.py) that reads the journal itself,
so that a flush of a million entries does not slow the service's packet traffic down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

import msgspec

from ..errors import BridgeRejected, BridgeUnavailable, ConfigError, FlushWorkerStopped
from ..storage.bridge import BridgeSettings, Entry, MapSpec, Store
from .journal import Dirty, Journal

if TYPE_CHECKING:
    from .flush_worker import FlushWorker

log = logging.getLogger("packetstack.bridge")

PAGES_AHEAD = 4  # batches per journal read
# Batches written at once: the next one is made ready while the database takes the last.
PARALLEL = 2
Progress = Callable[[str, int, int], None]  # (map, entries done, entries dirty at start)
Advanced = Callable[[int], None]  # entries of the map done so far


class MapFlush(msgspec.Struct, kw_only=True):
    """What one flush did to one map."""

    map: str
    bridge: str
    written: int = 0  # upserts that reached the database
    deleted: int = 0
    set_aside: int = 0  # refused by the database in this flush, kept dirty with their error
    failed: int = 0  # still dirty: the database could not be reached
    # Set aside after this flush, earlier ones included (skipped until they change or a
    # flush retries them): what status lists.
    still_set_aside: int = 0
    error: str = ""


class FlushReport(msgspec.Struct, kw_only=True):
    """The outcome of :meth:`Service.flush`: per map, and how long it took."""

    maps: list[MapFlush] = []
    seconds: float = 0.0

    @property
    def written(self) -> int:
        return sum(m.written for m in self.maps)

    @property
    def deleted(self) -> int:
        return sum(m.deleted for m in self.maps)

    @property
    def set_aside(self) -> int:
        return sum(m.set_aside for m in self.maps)

    @property
    def failed(self) -> int:
        return sum(m.failed for m in self.maps)

    @property
    def still_set_aside(self) -> int:
        return sum(m.still_set_aside for m in self.maps)

    @property
    def ok(self) -> bool:
        """Everything dirty reached its database: none failed, none is set aside (in this
        flush or an earlier one)."""
        return not any(m.failed or m.set_aside or m.still_set_aside or m.error for m in self.maps)


class Bridged(msgspec.Struct):
    """A map with a bridge: its spec, its store's name, the store's settings."""

    spec: MapSpec
    bridge: str
    settings: BridgeSettings


class Sleep(Protocol):
    def __call__(self, delay: float, /) -> Awaitable[None]: ...


class Pages(Protocol):
    """Where a MapWriter reads dirty entries and reports what reached the database: the
    journal itself, or a flush worker's view of it."""

    async def dirty_page(
        self, map_name: str, after: bytes | None, limit: int, retry_rejected: bool
    ) -> tuple[list[Dirty], int]: ...

    async def cleaned(
        self, map_name: str, first: bytes, last: bytes, latest: int, unreject: list[bytes]
    ) -> None: ...

    async def set_aside(self, map_name: str, key: bytes, gen: int, error: str) -> None: ...


class WriteBehind:
    def __init__(
        self,
        journal: Journal,
        stores: dict[str, Store],
        maps: dict[str, Bridged],
        sleep: Sleep = asyncio.sleep,
        worker: FlushWorker | None = None,
    ) -> None:
        self.journal = journal
        self.maps = maps
        self.writer = MapWriter(journal, stores, sleep)
        self.worker = worker  # takes the flushes of large maps, when there is one
        self._lock = asyncio.Lock()
        self.flushes = 0
        self.running: dict[str, tuple[int, int]] = {}  # map -> (done, total) while flushing
        self.last: FlushReport | None = None
        self.dirty: dict[str, tuple[int, int]] = {}  # map -> (dirty, set aside), last count

    @property
    def retries(self) -> int:
        """Batches (and opens) retried because a database could not be reached."""
        return self.writer.retries + (self.worker.retries if self.worker is not None else 0)

    async def flush(
        self,
        map_name: str | None = None,
        *,
        retry_rejected: bool = False,
        progress: Progress | None = None,
        down: dict[str, str] | None = None,
    ) -> FlushReport:
        """Write every dirty entry (of one map, or all); one flush runs at a time. The
        maps of the bridges in ``down`` (name: why) are left dirty with that error."""
        if map_name is not None and map_name not in self.maps:
            raise ConfigError(
                f"map {map_name!r} has no bridge: configure [maps.{map_name}] with a bridge, "
                f"or flush one of {sorted(self.maps)}"
            )
        names = [map_name] if map_name is not None else list(self.maps)
        async with self._lock:
            started = time.monotonic()
            self.dirty = await self.journal.dirty_counts()
            report = FlushReport()
            down = dict(down or {})  # bridges that failed in this flush: why
            for name in names:
                bridged = self.maps[name]
                result = MapFlush(map=name, bridge=bridged.bridge)
                report.maps.append(result)
                dirty, set_aside = self.dirty.get(name, (0, 0))
                total = dirty if retry_rejected else dirty - set_aside  # what it will try
                if bridged.bridge in down:
                    result.error = down[bridged.bridge]
                    continue
                try:
                    await self._flush_map(bridged, result, total, retry_rejected, progress)
                except FlushWorkerStopped as exc:  # its bridge may be fine: the rest goes on
                    result.error = str(exc)
                    log.error("flush of map %s stopped: %s", name, exc)
                except BridgeUnavailable as exc:
                    down[bridged.bridge] = result.error = str(exc)
                    log.error(
                        "flush of map %s stopped: %s; its entries stay dirty for the next flush",
                        name,
                        exc,
                    )
                finally:
                    self.running.pop(name, None)
            self.dirty = await self.journal.dirty_counts()
            for result in report.maps:  # now that the cleaning is committed
                dirty, set_aside = self.dirty.get(result.map, (0, 0))
                result.still_set_aside = set_aside
                if result.error:
                    result.failed = dirty - set_aside
            report.seconds = time.monotonic() - started
            self.flushes += 1
            self.last = report
            return report

    async def _flush_map(
        self,
        bridged: Bridged,
        result: MapFlush,
        total: int,
        retry_rejected: bool,
        progress: Progress | None,
    ) -> None:
        name = bridged.spec.name
        self.running[name] = (0, total)

        def advanced(done: int) -> None:
            self.running[name] = (done, max(total, done))
            if progress is not None:
                progress(name, done, max(total, done))

        if self.worker is not None and self.worker.takes(name, total):
            await self.worker.write_map(bridged, result, advanced, retry_rejected)
        else:
            await self.writer.write_map(bridged, result, advanced, retry_rejected)

    async def close(self) -> None:
        if self.worker is not None:
            await self.worker.close()


class MapWriter:
    """Writes the dirty entries of one map at a time to its store."""

    def __init__(self, pages: Pages, stores: dict[str, Store], sleep: Sleep = asyncio.sleep):
        self.pages = pages
        self.stores = stores
        self._sleep = sleep
        self.retries = 0

    async def write_map(
        self, bridged: Bridged, result: MapFlush, advanced: Advanced, retry_rejected: bool
    ) -> None:
        """Every dirty entry of the map, page by page, PARALLEL batches at once; raises
        BridgeUnavailable when its database stays unreachable."""
        name = bridged.spec.name
        size = bridged.settings.batch
        store = self.stores[bridged.bridge]
        cleaning: list[Awaitable[None]] = []
        writing: set[asyncio.Future[int]] = set()
        done = 0

        async def settle(at_most: int) -> None:
            """Wait until at most ``at_most`` batches are being written."""
            nonlocal done
            while len(writing) > at_most:
                finished, _ = await asyncio.wait(writing, return_when=asyncio.FIRST_COMPLETED)
                for write in finished:
                    writing.discard(write)
                    done += write.result()  # BridgeUnavailable ends the map's flush
                    advanced(done)

        ahead: asyncio.Future[tuple[list[Dirty], int]] | None = None
        try:
            page, latest = await self.pages.dirty_page(
                name, None, size * PAGES_AHEAD, retry_rejected
            )
            while page:
                ahead = asyncio.ensure_future(
                    self.pages.dirty_page(name, page[-1][0], size * PAGES_AHEAD, retry_rejected)
                )
                for start in range(0, len(page), size):
                    batch = page[start : start + size]
                    await settle(PARALLEL - 1)
                    writing.add(
                        asyncio.ensure_future(
                            self._write(store, bridged, batch, latest, result, cleaning)
                        )
                    )
                page, latest = await ahead
            await settle(0)
        except BaseException:
            for pending in (ahead, *writing):
                if pending is not None:
                    pending.cancel()
            await asyncio.gather(*writing, *cleaning, return_exceptions=True)
            if ahead is not None:
                await asyncio.gather(ahead, return_exceptions=True)
            raise
        await asyncio.gather(*cleaning)

    async def _write(
        self,
        store: Store,
        bridged: Bridged,
        batch: list[Dirty],
        latest: int,
        result: MapFlush,
        cleaning: list[Awaitable[None]],
    ) -> int:
        """Write a batch (or, refused, its halves down to the entries at fault); how many
        entries it took care of."""
        upserts: list[Entry] = [(key, value) for key, _, value, _ in batch if value is not None]
        deletes = [key for key, _, value, _ in batch if value is None]
        name = bridged.spec.name
        try:
            await self.retrying(
                bridged.bridge, bridged.settings, lambda: store.write(name, upserts, deletes)
            )
        except BridgeRejected as exc:
            if len(batch) == 1:
                key, gen, _, _ = batch[0]
                result.set_aside += 1
                log.warning("flush of map %s: entry set aside: %s", name, exc)
                await self.pages.set_aside(name, key, gen, str(exc))
                return 1
            half = len(batch) // 2
            return await self._write(
                store, bridged, batch[:half], latest, result, cleaning
            ) + await self._write(store, bridged, batch[half:], latest, result, cleaning)
        result.written += len(upserts)
        result.deleted += len(deletes)
        # Cleaning commits in the store's next group commit; the flush goes on meanwhile.
        unreject = [key for key, _, _, aside in batch if aside]
        cleaning.append(
            asyncio.ensure_future(
                self.pages.cleaned(name, batch[0][0], batch[-1][0], latest, unreject)
            )
        )
        return len(batch)

    async def retrying(
        self, bridge: str, settings: BridgeSettings, attempt: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``attempt`` until it does not raise BridgeUnavailable, waiting retry_delay,
        twice that, ... (at most retry_max_delay) in between, at most ``retries`` times."""
        delay = settings.retry_delay
        for tries in range(1, settings.retries + 1):
            try:
                await attempt()
                return
            except BridgeUnavailable as exc:
                if tries == settings.retries:
                    raise BridgeUnavailable(f"{exc} (gave up after {tries} attempts)") from exc
                self.retries += 1
                log.warning(
                    "bridge %s: %s; attempt %d of %d in %.1f s",
                    bridge,
                    exc,
                    tries + 1,
                    settings.retries,
                    delay,
                )
                await self._sleep(delay)
                delay = min(settings.retry_max_delay, delay * 2)
