"""Plain helpers shared by test files in several folders (fixtures live in conftest.py).

Importable as ``from support import ...`` from every test folder: tests/conftest.py puts
this folder on ``sys.path`` before any test module is imported."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import msgspec
import pytest

from packetstack.codec import Packet
from packetstack.errors import ProtocolError
from packetstack.peer import Peer
from packetstack.protocol import (
    CloseReceived,
    Connection,
    Event,
    Hello,
    HelloReceived,
    PacketHeader,
    Role,
    State,
    Target,
    Welcome,
    WelcomeReceived,
)

# ------------------------------------------------------------------- waiting


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait for ``predicate`` (failing the test after ``timeout``); return the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not predicate():
        if loop.time() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)
    return loop.time() - start


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait for ``predicate``; TimeoutError after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# -------------------------------------------------------- child processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without PACKETSTACK_* settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKETSTACK_")}
    env.update(extra)
    return env


def cli_command(*args: str) -> list[str]:
    exe = shutil.which("packetstack")
    if exe is not None:
        return [exe, *args]
    return [sys.executable, "-m", "packetstack.cli", *args]


def spawn_script(
    tmp_path: Path, source: str, args: list[str], processes: list[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """Run ``source`` as worker.py with ``args`` (clean environment, log in a file); the
    process is added to ``processes`` for cleanup."""
    script = tmp_path / "worker.py"
    script.write_text(source)
    with open(tmp_path / f"worker-{len(processes)}.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, str(script), *args], stdout=log, stderr=log, env=clean_env()
        )
    processes.append(proc)
    return proc


class ServiceProcess:
    """``packetstack serve`` in a child process, its log in a file; ``start()`` again after
    ``kill9()`` restarts it on the same port. ``args`` go to ``packetstack`` before ``serve``
    (``--log-format json``), ``serve_args`` after it (``--config FILE``)."""

    def __init__(
        self,
        port: int,
        workdir: Path,
        env: dict[str, str] | None = None,
        *,
        args: tuple[str, ...] = (),
        serve_args: tuple[str, ...] = (),
    ) -> None:
        self.port = port
        self.args = args
        self.serve_args = serve_args
        self.workdir = workdir
        self.env = clean_env() if env is None else env
        self.data_dir = workdir / "data"
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "service-0.log"

    @property
    def url(self) -> str:
        return f"ps://127.0.0.1:{self.port}"

    def start(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        self.log_path = self.workdir / f"service-{self.starts}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cli_command(
                    *self.args,
                    "serve",
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                    *self.serve_args,
                ),
                stdout=log,
                stderr=log,
                cwd=self.workdir,
                env=self.env,
            )
        return self.proc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_listening(self, timeout: float = 20.0) -> None:
        marker = f"listening on ps://127.0.0.1:{self.port}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        assert self.proc is not None
        while marker not in self.log():
            if self.proc.poll() is not None:
                pytest.fail(f"service exited with {self.proc.returncode}:\n{self.log()}")
            if loop.time() > deadline:
                pytest.fail(f"service did not log {marker!r} within {timeout} s:\n{self.log()}")
            await asyncio.sleep(0.05)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


# ------------------------------------------------------ raw socket endings

P = TypeVar("P", bound="RawPeer")


class RawPeer(asyncio.Protocol):
    """A hand-driven socket that parses what it reads as a client would."""

    def __init__(self) -> None:
        self.parser = Connection(Role.CLIENT)
        self.transport: asyncio.Transport | None = None
        self.events: list[Event] = []
        self.parse_error: ProtocolError | None = None
        self.changed = asyncio.Event()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.events.extend(self.parser.receive_data(data))
        except ProtocolError as exc:
            self.parse_error = exc
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        self.changed.set()

    def send(self, data: bytes) -> None:
        """Write ``data``; nothing once the transport is closing."""
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(data)

    def closes(self) -> list[CloseReceived]:
        return [e for e in self.events if type(e) is CloseReceived]

    def close_codes(self) -> list[int]:
        return [e.code for e in self.closes()]

    async def wait_for(self, predicate: Callable[[], bool], timeout: float) -> None:
        """Until ``predicate()`` holds after something was read (TimeoutError after
        ``timeout``)."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    async def welcomed(self, timeout: float = 5.0, name: str | None = None) -> None:
        """Until WELCOME was read; fails if the connection is lost first."""
        who = "" if name is None else f"{name} "
        async with asyncio.timeout(timeout):
            while not any(type(e) is WelcomeReceived for e in self.events):
                assert not self.lost.done(), f"{who}closed before WELCOME: {self.events}"
                self.changed.clear()
                await self.changed.wait()

    async def handshake(self, name: str) -> None:
        """Send HELLO as ``name`` and wait for WELCOME."""
        self.send(self.parser.hello_frame(Hello(1, name)))
        await self.welcomed(name=name)


async def open_raw(
    port: int,
    rcvbuf: int | None = None,
    peer: Callable[[], P] = RawPeer,  # type: ignore[assignment]
) -> P:
    """A ``peer`` connected to 127.0.0.1:``port``; with ``rcvbuf``, a socket whose receive
    buffer is set before connecting, so the advertised window is small from the start."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), 5)
        _, protocol = await loop.create_connection(peer, sock=sock)
    except BaseException:
        sock.close()
        raise
    return protocol


def close_raw(peer: RawPeer) -> None:
    if peer.transport is not None:
        peer.transport.abort()


# ------------------------------------------------- sans-I/O protocol pairs

# The limits of the SERVICE connections built below, and of their WELCOME, by default.
MAX_FRAME = 4096
MAX_PAYLOAD = 100_000
CHUNK_SIZE = 1024


def raw_frame(kind: int, header: bytes = b"\x90", payload: bytes = b"") -> bytes:
    """One frame, assembled by the wire layout (``length:u32 | kind:u8 | header_length:u16 |
    header | payload``) rather than by the code under test."""
    body = struct.pack(">BH", kind, len(header)) + header + payload
    return struct.pack(">I", len(body)) + body


def raw_deliver(seq: int, header: bytes = b"\x90", payload: bytes = b"") -> bytes:
    """One DELIVER frame (kind 11), by the wire layout: ``length:u32 | kind:u8 |
    header_length:u16 | seq:u64 | header | payload``."""
    body = struct.pack(">BHQ", 11, len(header), seq) + header + payload
    return struct.pack(">I", len(body)) + body


def pack(obj: object) -> bytes:
    return msgspec.msgpack.encode(obj)


def welcome(**overrides: object) -> Welcome:
    fields: dict[str, object] = {
        "v": 1,
        "session": "sess-1",
        "heartbeat": 5.0,
        "timeout": 15.0,
        "max_frame": MAX_FRAME,
        "max_payload": MAX_PAYLOAD,
        "chunk_size": CHUNK_SIZE,
    }
    fields.update(overrides)
    return Welcome(**fields)  # type: ignore[arg-type]


def service_conn(**limits: int) -> Connection:
    options = {"max_frame": MAX_FRAME, "max_payload": MAX_PAYLOAD, "chunk_size": CHUNK_SIZE}
    options.update(limits)
    return Connection(Role.SERVICE, **options)


def pair(greeting: Welcome | None = None, **service_limits: int) -> tuple[Connection, Connection]:
    """A CLIENT and a SERVICE connection after a full HELLO/WELCOME handshake; the WELCOME
    is ``greeting``, by default one that states the service's limits."""
    client = Connection(Role.CLIENT)
    service = service_conn(**service_limits)
    events = service.receive_data(client.hello_frame(Hello(1, "alpha")))
    assert events == [HelloReceived(Hello(1, "alpha"))]
    w = greeting or welcome(
        max_frame=service.max_frame,
        max_payload=service.max_payload,
        chunk_size=service.chunk_size,
    )
    events = client.receive_data(service.welcome_frame(w))
    assert events == [WelcomeReceived(w)]
    assert client.state is State.OPEN
    assert service.state is State.OPEN
    return client, service


def header(pid: int = 1, **overrides: object) -> PacketHeader:
    fields: dict[str, object] = {
        "id": pid,
        "target": int(Target.ENDING),
        "dst": "beta",
        "src": "alpha",
        "tag": "demo.move",
    }
    fields.update(overrides)
    return PacketHeader(**fields)  # type: ignore[arg-type]


# ---------------------------------------------------- mailboxes and processes


def service_env(**settings: object) -> dict[str, str]:
    """A clean environment that configures a ``packetstack serve`` child through
    PACKETSTACK_<SETTING> variables: ``ServiceProcess(port, dir, service_env(heartbeat=1))``."""
    return clean_env(**{f"PACKETSTACK_{k.upper()}": str(v) for k, v in settings.items()})


def read_records(path: Path) -> list[tuple[int, int]]:
    """``(seq, n)`` pairs a receiving worker appended to ``path``, one ``"seq n"`` line
    each (flushed per line); a missing file is an empty list, a torn last line is ignored."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.split("\n"):
        parts = line.split()
        if len(parts) == 2:
            records.append((int(parts[0]), int(parts[1])))
    return records


def vm_rss_mb(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def is_stopped(pid: int) -> bool:
    """Whether process ``pid`` is stopped by a signal (state T in /proc/<pid>/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def assert_exactly_once_in_order(records: list[tuple[int, int]], count: int) -> None:
    """``records`` of handled deliveries, ``(ctx.seq, n)``, hold every n in range(count)
    exactly once and in order, with rising sequence numbers."""
    numbers = [n for _, n in records]
    repeated = len(numbers) - len(set(numbers))
    assert repeated == 0, f"{repeated} packets handled more than once"
    first_wrong = next((i for i, n in enumerate(numbers) if n != i), None)
    assert numbers == list(range(count)), f"{len(numbers)} packets, first wrong at {first_wrong}"
    seqs = [seq for seq, _ in records]
    assert all(a < b for a, b in itertools.pairwise(seqs)), "sequence numbers do not rise"


async def send_acked(
    client: Peer, to: str, make: Callable[[int], Packet], numbers: range, window: int = 200
) -> None:
    """``client.send(to, make(n), ack=True)`` for each n, ``window`` sends at a time (each
    returns once its packet is durably stored at the service or handled by ``to``)."""
    for start in range(numbers.start, numbers.stop, window):
        stop = min(start + window, numbers.stop)
        await asyncio.gather(*(client.send(to, make(n), ack=True) for n in range(start, stop)))


class TcpProxy:
    """A TCP proxy on 127.0.0.1 to ``target_port``. ``swallow_replies = True`` drops what
    the target sends back from then on (acks lost on the way, the connection still up);
    ``cut()`` aborts every proxied connection (both sides see it break)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.swallow_replies = False
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"ps://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer, replies=False),
            self._pipe(up_reader, writer, replies=True),
        )

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, replies: bool
    ) -> None:
        try:
            while data := await source.read(65536):
                if replies and self.swallow_replies:
                    continue
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            sink.transport.abort()

    def cut(self) -> None:
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.transport.abort()

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


# ------------------------------------------------------ hostile raw endings


async def raw_handshake(peer: RawPeer, name: str, token: str | None) -> None:
    """``peer.handshake(name)`` with a token: send HELLO, wait for WELCOME."""
    peer.send(peer.parser.hello_frame(Hello(1, name, token)))
    await peer.welcomed(name=name)


async def closed_by_service(peer: RawPeer, timeout: float) -> list[int]:
    """Wait (at most ``timeout``, else the test fails) for the service to close ``peer``'s
    connection; the CLOSE codes it sent."""
    try:
        await asyncio.wait_for(asyncio.shield(peer.lost), timeout)
    except TimeoutError:
        pytest.fail(f"the service kept the connection open for {timeout} s: {peer.events[-3:]}")
    return peer.close_codes()
