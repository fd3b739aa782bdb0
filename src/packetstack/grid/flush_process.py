"""The flush worker's process: ``python -m packetstack.grid.flush_process``, started by the
service (flush_worker.py), talking to it over stdin and stdout in frames.

It opens its own connections to the bridges and to the journal's SQLite file (reads only),
writes each map it is asked to flush with MapWriter, and reports back what the journal
must remember. It exits when asked to, or when the service goes away (stdin closes), even
in the middle of a flush: what was not cleaned stays dirty in the journal.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import msgspec

from ..errors import BridgeError
from ..storage import Store, make_store, resolve
from ..transport.loop import run
from .flush_worker import (
    Cleaned,
    Finished,
    Flush,
    Logged,
    Progressed,
    SetAside,
    Start,
    Stop,
    ToWorker,
    frame,
    read_frame,
)
from .journal import Dirty, read_dirty_page
from .writebehind import Bridged, MapFlush, MapWriter

_to_worker = msgspec.msgpack.Decoder(ToWorker)


class Channel:
    """Frames to the service, on the stdout the process had at start."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport

    def send(self, message: msgspec.Struct) -> None:
        if not self.transport.is_closing():
            self.transport.write(frame(message))


class JournalPages:
    """The journal as the MapWriter reads it, from this process: pages from a connection
    of its own (in a thread: SQLite works there while the loop builds rows), cleaning and
    setting aside sent to the service, which commits them."""

    def __init__(self, path: str, channel: Channel) -> None:
        self.result = MapFlush(map="", bridge="")  # the map being flushed: its counts so far
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA query_only = ON")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="journal-reader")
        self._channel = channel

    async def dirty_page(
        self, map_name: str, after: bytes | None, limit: int, retry_rejected: bool
    ) -> tuple[list[Dirty], int]:
        read = partial(read_dirty_page, self._db, map_name, after, limit, retry_rejected)
        return await asyncio.get_running_loop().run_in_executor(self._reader, read)

    async def cleaned(
        self, map_name: str, first: bytes, last: bytes, latest: int, unreject: list[bytes]
    ) -> None:
        self._channel.send(
            Cleaned(
                map=map_name,
                first=first,
                last=last,
                latest=latest,
                unreject=unreject,
                written=self.result.written,
                deleted=self.result.deleted,
            )
        )

    async def set_aside(self, map_name: str, key: bytes, gen: int, error: str) -> None:
        self._channel.send(SetAside(map=map_name, key=key, gen=gen, error=error))

    def close(self) -> None:
        self._reader.shutdown(wait=True)
        self._db.close()


class Forward(logging.Handler):
    """Log records sent to the service, which logs them as its own."""

    def __init__(self, channel: Channel) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(message)s"))  # the service adds the rest
        self._channel = channel

    def emit(self, record: logging.LogRecord) -> None:
        text = f"flush worker: {self.format(record)}"
        self._channel.send(Logged(level=record.levelno, text=text))


class Worker:
    def __init__(self, start: Start, channel: Channel) -> None:
        self.channel = channel
        self.maps = {
            name: Bridged(resolve(name, settings), settings.bridge, start.bridges[settings.bridge])
            for name, settings in start.maps.items()
        }
        self.stores: dict[str, Store] = {
            name: make_store(name, settings, shared_loop=False)
            for name, settings in start.bridges.items()
        }
        self.pages = JournalPages(start.journal, channel)
        self.writer = MapWriter(self.pages, self.stores)
        self._opened: set[str] = set()

    async def flush(self, request: Flush) -> None:
        bridged = self.maps[request.map]
        result = self.pages.result = MapFlush(map=request.map, bridge=bridged.bridge)
        retries, error = self.writer.retries, ""
        try:
            if bridged.bridge not in self._opened:
                specs = [b.spec for b in self.maps.values() if b.bridge == bridged.bridge]
                opening = partial(self.stores[bridged.bridge].open, specs)
                await self.writer.retrying(bridged.bridge, bridged.settings, opening)
                self._opened.add(bridged.bridge)
            await self.writer.write_map(
                bridged,
                result,
                lambda done: self.channel.send(Progressed(done=done)),
                request.retry_rejected,
            )
        except BridgeError as exc:  # unreachable, or its table does not fit
            error = str(exc)
        except Exception as exc:
            logging.getLogger("packetstack.bridge").exception("flush of map %s", request.map)
            error = f"the flush worker failed: {type(exc).__name__}: {exc}"
        self.channel.send(Finished(retries=self.writer.retries - retries, error=error))

    async def close(self) -> None:
        for store in self.stores.values():
            await store.close()
        self.pages.close()


async def serve(reader: asyncio.StreamReader, channel: Channel) -> None:
    start = _to_worker.decode(await read_frame(reader))
    if not isinstance(start, Start):
        raise SystemExit(f"the flush worker expected Start, got {type(start).__name__}")
    worker = Worker(start, channel)
    # Always one read pending: the service going away (the end of stdin) is noticed during
    # a flush, and ends it at once; a frame that comes early waits for the flush to end.
    incoming = asyncio.ensure_future(read_frame(reader))
    try:
        while True:
            try:
                request = _to_worker.decode(await incoming)
            except asyncio.IncompleteReadError:
                return  # the service went away
            if isinstance(request, Stop):
                return
            incoming = asyncio.ensure_future(read_frame(reader))
            if isinstance(request, Flush):
                flushing = asyncio.ensure_future(worker.flush(request))
                await asyncio.wait((flushing, incoming), return_when=asyncio.FIRST_COMPLETED)
                if incoming.done() and incoming.exception() is not None:
                    flushing.cancel()
                    await asyncio.gather(flushing, return_exceptions=True)
                    return
                await flushing
    finally:
        incoming.cancel()
        await worker.close()


async def main(out: Any) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    transport, _ = await loop.connect_write_pipe(asyncio.Protocol, out)
    channel = Channel(transport)
    logging.basicConfig(level=logging.INFO, handlers=[Forward(channel)], force=True)
    try:
        await serve(reader, channel)
    finally:
        transport.close()


if __name__ == "__main__":
    # The service stops the worker when it is done with it (a Stop frame, or its stdin
    # closing); a SIGTERM or SIGINT sent to all of the service's processes (systemd's
    # control group) must not cut short the flush the service makes as it stops.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The frames go out on a copy of stdout; stdout itself becomes stderr, so that nothing
    # printed by a library (or a value type's module) can break a frame.
    frames = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    run(main(frames))
