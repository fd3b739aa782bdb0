"""The service's database bridges: built from the config, opened at start (with eager
maps preloaded), flushed on request, on an interval and on close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from functools import partial
from typing import Any

from ..errors import BridgeError, BridgeUnavailable, ConfigError
from ..grid.flush_worker import FlushWorker
from ..grid.journal import Journal
from ..grid.partitions import partition_of
from ..grid.writebehind import Bridged, FlushReport, Progress, WriteBehind
from ..storage import Store, make_store, resolve
from .config import ServiceConfig, hide_password

log = logging.getLogger("packetstack.bridge")


class ServiceBridges:
    def __init__(self, config: ServiceConfig, journal: Journal, stats: Counter[str]) -> None:
        self.config = config
        self.stats = stats
        self.stores: dict[str, Store] = {
            name: make_store(name, settings) for name, settings in config.bridges.items()
        }
        maps = {
            name: Bridged(resolve(name, spec), spec.bridge, config.bridges[spec.bridge])
            for name, spec in config.maps.items()
        }
        journal.bridged = frozenset(maps)
        self.journal = journal
        worker = None
        if config.flush_worker_at and maps:
            worker = FlushWorker(journal, config.bridges, config.maps, config.flush_worker_at)
        self.write_behind = WriteBehind(journal, self.stores, maps, worker=worker)
        self._opened: set[str] = set()  # stores whose open() succeeded
        self._interval: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def maps(self) -> dict[str, Bridged]:
        return self.write_behind.maps

    async def open(self) -> None:
        """Connect every bridge and check its tables. A bridge that cannot be reached is
        retried at the first flush, unless one of its maps is loaded eagerly: then the
        service cannot start without it (BridgeUnavailable naming it)."""
        for name in self.stores:
            try:
                await self._open_store(name)
            except BridgeUnavailable as exc:
                eager = [
                    m for m, b in self.maps.items() if b.bridge == name and b.spec.load == "eager"
                ]
                if eager:
                    raise BridgeUnavailable(
                        f"{exc}: maps {eager} load from it at start (load = 'eager'); start it, "
                        f"fix bridges.{name}.url, or set their load to 'lazy' or 'none'"
                    ) from exc
                log.error("%s; the service starts without it and retries at the next flush", exc)
        if self.config.flush_interval > 0 and self.maps:
            self._interval = asyncio.create_task(self._every(self.config.flush_interval))

    async def _open_store(self, name: str) -> None:
        if name in self._opened:
            return
        specs = [b.spec for b in self.maps.values() if b.bridge == name]
        await self.stores[name].open(specs)
        self._opened.add(name)
        log.info(
            "bridge %s: %s, maps %s",
            name,
            hide_password(self.config.bridges[name].url),
            [spec.name for spec in specs],
        )

    async def preload(self) -> None:
        """Load the eager maps into the journal (before the grid reads it at start). A key
        the journal already holds, or deleted without a flush, keeps the journal's version."""
        partitions = self.config.grid_partitions

        def part_of(key: bytes) -> int:
            return partition_of(key, partitions)

        for name, bridged in self.maps.items():
            if bridged.spec.load != "eager":
                continue
            started, loaded, added = time.monotonic(), 0, 0
            async for page in self.stores[bridged.bridge].iterate(name, bridged.settings.batch):
                added += len(await self.journal.add_loaded(part_of, name, page))
                loaded += len(page)
            log.info(
                "map %s: loaded %d entries from bridge %s in %.1f s (%d already in the journal)",
                name,
                loaded,
                bridged.bridge,
                time.monotonic() - started,
                loaded - added,
            )

    async def load_through(self, map_name: str, keys: list[bytes]) -> dict[bytes, bytes]:
        """What the database of a lazy map holds of ``keys``, except keys deleted in the
        grid and not flushed yet (their database row is stale)."""
        bridged = self.maps[map_name]
        await self._open_store(bridged.bridge)
        store = self.stores[bridged.bridge]
        found: dict[bytes, bytes] = {}
        batch = bridged.settings.batch
        for start in range(0, len(keys), batch):
            found.update(await store.load_many(map_name, keys[start : start + batch]))
        if found:
            for key in await self.journal.dirty_keys(map_name, list(found)):
                del found[key]
        return found

    async def flush(
        self,
        map_name: str | None = None,
        *,
        retry_rejected: bool = False,
        progress: Progress | None = None,
    ) -> FlushReport:
        if not self.maps:
            if map_name is not None:
                raise ConfigError(f"map {map_name!r} has no bridge: no [maps] are configured")
            return FlushReport()
        down: dict[str, str] = {}
        for name in {b.bridge for b in self.maps.values()} - self._opened:
            try:
                await self.write_behind.writer.retrying(
                    name, self.config.bridges[name], partial(self._open_store, name)
                )
            except BridgeError as exc:  # unreachable, or its table does not fit the map
                log.error("%s (its maps stay dirty)", exc)
                down[name] = str(exc)
        report = await self.write_behind.flush(
            map_name, retry_rejected=retry_rejected, progress=progress, down=down
        )
        stats = self.stats
        stats["flushes"] += 1
        stats["flush_written"] += report.written
        stats["flush_deleted"] += report.deleted
        stats["flush_set_aside"] += report.set_aside
        stats["flush_failures"] += sum(1 for m in report.maps if m.error)
        return report

    async def _every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                report = await self.flush()
            except Exception:  # the next interval tries again; nothing is lost meanwhile
                log.exception("interval flush failed")
                continue
            if report.written or report.deleted or not report.ok:
                log.info("interval flush: %s", summary(report))

    async def close(self) -> FlushReport | None:
        """The last flush (if any map has a bridge), then close every bridge. Once."""
        if self._closed:
            return None
        self._closed = True
        if self._interval is not None:
            self._interval.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._interval
        report = None
        if self.maps:
            log.info("flushing %d bridged maps before closing", len(self.maps))
            report = await self.flush()
            (log.info if report.ok else log.error)("flush on close: %s", summary(report))
        await self.close_stores()
        return report

    async def close_stores(self) -> None:
        await self.write_behind.close()
        for store in self.stores.values():
            await store.close()

    def snapshot(self) -> dict[str, Any]:
        """Per map: its bridge, dirty entries (at the last count), entries set aside, the
        running flush's progress; and the last flush's figures."""
        write_behind = self.write_behind
        maps = {}
        for name, bridged in self.maps.items():
            dirty, set_aside = write_behind.dirty.get(name, (0, 0))
            running = write_behind.running.get(name)
            maps[name] = {
                "bridge": bridged.bridge,
                "table": bridged.spec.table,
                "load": bridged.spec.load,
                "dirty": dirty,
                "set_aside": set_aside,
                "flushing": list(running) if running is not None else None,
            }
        last = write_behind.last
        return {
            "maps": maps,
            "flushes": write_behind.flushes,
            "retries": write_behind.retries,
            "last_flush": None
            if last is None
            else {
                "written": last.written,
                "deleted": last.deleted,
                "set_aside": last.set_aside,
                "failed": last.failed,
                "seconds": round(last.seconds, 3),
            },
        }

    async def rejected(self, limit: int) -> list[tuple[str, bytes, str, float]]:
        """Entries set aside by flushes (map, key, error, when), the latest first."""
        if not self.maps:
            return []
        return await self.journal.rejected(limit)

    async def count_dirty(self) -> None:
        """Refresh the dirty counts that snapshot() shows."""
        if self.maps:
            self.write_behind.dirty = await self.journal.dirty_counts()


def summary(report: FlushReport) -> str:
    text = (
        f"{report.written} written, {report.deleted} deleted, {report.set_aside} set aside "
        f"({report.still_set_aside} in all), {report.failed} still dirty, "
        f"in {report.seconds:.1f} s"
    )
    errors = {m.error for m in report.maps if m.error}
    return text + ("" if not errors else " (" + "; ".join(sorted(errors)) + ")")
