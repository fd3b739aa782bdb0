"""The flush worker: a process of its own that writes large flushes to the databases.

Writing a million entries costs the process that does it several microseconds of CPU per
entry (reading the journal, decoding, building rows, the driver). On the service's event
loop that time would be taken from packet traffic, a slice at a time; in a worker process
it runs on another core. The worker reads the dirty entries from the journal's SQLite file
itself (read-only: the service's store thread stays the only writer) and writes them with
the same MapWriter the service uses for small flushes (writebehind.py). What the journal
must remember comes back to the service as messages, which it commits: the cleaned key
ranges and the entries set aside. A worker that dies, or a flush cancelled, leaves the
entries not cleaned yet dirty; the next flush writes them again.

The service starts the worker at the first flush that needs one and keeps it until it
closes. Frames on the worker's stdin and stdout: a 4-byte big-endian length, then one
msgpack-encoded message (below). A map whose value type cannot be imported by name in
another process (defined in ``__main__`` or inside a function) is flushed in the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from ..errors import BridgeUnavailable, FlushWorkerStopped
from ..storage.bridge import BridgeSettings, MapBridge, import_type

if TYPE_CHECKING:
    from .journal import Journal
    from .writebehind import Advanced, Bridged, MapFlush

log = logging.getLogger("packetstack.bridge")

LENGTH = struct.Struct(">I")
STOP_TIMEOUT = 10.0  # seconds a worker has to close its connections before it is killed
EXIT_GRACE = 2.0  # seconds a worker whose output closed has to exit before it is killed


# ------------------------------------------------------------------ service -> worker


class Start(msgspec.Struct, tag=True, kw_only=True):
    journal: str  # the journal's SQLite file
    bridges: dict[str, BridgeSettings]
    maps: dict[str, MapBridge]  # as configured, the value type by name ("module:Name")


class Flush(msgspec.Struct, tag=True, kw_only=True):
    map: str
    retry_rejected: bool


class Stop(msgspec.Struct, tag=True):
    pass


ToWorker = Start | Flush | Stop


# ------------------------------------------------------------------ worker -> service


class Cleaned(msgspec.Struct, tag=True, kw_only=True):
    """A batch reached the database: Journal.cleaned's arguments, and the map's counts so
    far (what the report says if the worker dies before it finishes)."""

    map: str
    first: bytes
    last: bytes
    latest: int
    unreject: list[bytes]
    written: int
    deleted: int


class SetAside(msgspec.Struct, tag=True, kw_only=True):
    map: str
    key: bytes
    gen: int
    error: str


class Progressed(msgspec.Struct, tag=True, kw_only=True):
    done: int  # entries of the map done so far


class Logged(msgspec.Struct, tag=True, kw_only=True):
    level: int
    text: str


class Finished(msgspec.Struct, tag=True, kw_only=True):
    retries: int  # batches retried in this flush
    error: str = ""  # the database could not be reached (BridgeUnavailable's text)


FromWorker = Cleaned | SetAside | Progressed | Logged | Finished

encoder = msgspec.msgpack.Encoder()


def frame(message: msgspec.Struct) -> bytes:
    body = encoder.encode(message)
    return LENGTH.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The next frame's body; IncompleteReadError at the end of the stream."""
    (size,) = LENGTH.unpack(await reader.readexactly(LENGTH.size))
    return await reader.readexactly(size)


def type_path(value_type: type) -> str | None:
    """``"module:Name"`` of a class another process can import by that name, else None."""
    module, name = value_type.__module__, value_type.__qualname__
    if module == "__main__" or "." in name or "<" in name:
        return None
    path = f"{module}:{name}"
    try:
        return path if import_type(path, "") is value_type else None
    except Exception:  # its module fails to import: flushed in the service
        return None


def portable(settings: MapBridge) -> MapBridge | None:
    """A map's settings with its value type by name, or None if the type cannot travel."""
    if settings.type is None or isinstance(settings.type, str):
        return settings
    path = type_path(settings.type)
    return None if path is None else msgspec.structs.replace(settings, type=path)


_from_worker = msgspec.msgpack.Decoder(FromWorker)


class FlushWorker:
    """The service's side: starts the worker, hands it a map, commits what it reports."""

    def __init__(
        self,
        journal: Journal,
        bridges: dict[str, BridgeSettings],
        maps: dict[str, MapBridge],
        at: int,
    ) -> None:
        self.journal = journal
        self.bridges = bridges
        self.at = at  # dirty entries from which a map's flush goes to the worker
        self.maps: dict[str, MapBridge] = {}
        for name, settings in maps.items():
            found = portable(settings)
            if found is None:
                log.info(
                    "map %s: its type %r cannot be imported by name in another process; its "
                    "flushes run in the service",
                    name,
                    settings.type,
                )
            else:
                self.maps[name] = found
        self.retries = 0
        self.started = 0  # worker processes started
        self._process: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def takes(self, map_name: str, dirty: int) -> bool:
        return 0 < self.at <= dirty and map_name in self.maps

    async def _running(self) -> asyncio.subprocess.Process:
        process = self._process
        if process is not None and process.returncode is None:
            return process
        # The service's import path: the worker imports packetstack and the maps' value
        # types from where the service did.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p or os.getcwd() for p in sys.path))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "packetstack.grid.flush_process",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            # Its own session: a Ctrl-C meant for the service must not stop the worker in
            # the middle of the flush the service then makes on its way out.
            start_new_session=True,
        )
        self._process = process
        self.started += 1
        used = {m.bridge for m in self.maps.values()}
        start = Start(
            journal=str(Path(self.journal.store.path).resolve()),
            bridges={name: s for name, s in self.bridges.items() if name in used},
            maps=self.maps,
        )
        assert process.stdin is not None
        process.stdin.write(frame(start))
        log.info("flush worker started (pid %d)", process.pid)
        return process

    async def write_map(
        self, bridged: Bridged, result: MapFlush, advanced: Advanced, retry_rejected: bool
    ) -> None:
        """MapWriter.write_map, in the worker; raises BridgeUnavailable as it does, and
        when the worker dies (what it had not cleaned stays dirty)."""
        name = bridged.spec.name
        cleaning: list[asyncio.Future[None]] = []
        finished: Finished | None = None
        written = deleted = set_aside = 0  # as the worker reported them
        try:
            process = await self._running()
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(frame(Flush(map=name, retry_rejected=retry_rejected)))
            await process.stdin.drain()
            while finished is None:
                message = _from_worker.decode(await read_frame(process.stdout))
                if isinstance(message, Cleaned):
                    written, deleted = message.written, message.deleted
                    # Queued in order in the store: committed in the order they came.
                    cleaning.append(
                        asyncio.ensure_future(
                            self.journal.cleaned(
                                name, message.first, message.last, message.latest, message.unreject
                            )
                        )
                    )
                elif isinstance(message, SetAside):
                    set_aside += 1
                    cleaning.append(
                        asyncio.ensure_future(
                            self.journal.set_aside(name, message.key, message.gen, message.error)
                        )
                    )
                elif isinstance(message, Progressed):
                    advanced(message.done)
                elif isinstance(message, Logged):
                    log.log(message.level, "%s", message.text)
                else:
                    finished = message
        except (OSError, asyncio.IncompleteReadError, msgspec.DecodeError) as exc:
            code = await self._end(EXIT_GRACE)
            raise FlushWorkerStopped(
                f"the flush worker of map {name!r} stopped ({_how(exc, code)})"
            ) from exc
        except BaseException:  # cancelled: the worker's flush cannot be stopped midway
            await self._end(0.0)
            raise
        finally:
            await asyncio.gather(*cleaning)
            result.written += written
            result.deleted += deleted
            result.set_aside += set_aside
        self.retries += finished.retries
        if finished.error:
            raise BridgeUnavailable(finished.error)

    async def _end(self, grace: float) -> int | None:
        """The worker's exit code, once it has exited: by itself within ``grace`` seconds
        (its output closed: it is on its way out), else killed."""
        process, self._process = self._process, None
        if process is None:
            return None
        with contextlib.suppress(TimeoutError):
            # Not killed at once: a kill would reap an exiting worker under asyncio's feet
            # (which then reports an unknown child and code 255) and hide its own exit code.
            return await asyncio.wait_for(process.wait(), grace)
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return await process.wait()

    async def close(self) -> None:
        """Let the worker close its connections and exit (killed if it does not)."""
        process = self._process
        if process is None or process.returncode is not None:
            self._process = None
            return
        assert process.stdin is not None
        with contextlib.suppress(OSError):
            process.stdin.write(frame(Stop()))
            await process.stdin.drain()
            process.stdin.close()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("the flush worker did not stop within %g s: killed", STOP_TIMEOUT)
        await self._end(0.0)


def _how(exc: BaseException, code: int | None) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return f"it exited with code {code}"
    return f"{type(exc).__name__}: {exc}; exit code {code}"
