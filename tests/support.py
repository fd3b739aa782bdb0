"""Plain helpers shared by test files in several folders (fixtures live in conftest.py).

Importable as ``from support import ...`` from every test folder: tests/conftest.py puts
this folder on ``sys.path`` before any test module is imported."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest

from packetstack import Map, Service
from packetstack.codec import Packet
from packetstack.errors import ProtocolError
from packetstack.grid.writebehind import FlushReport
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
from packetstack.storage import BridgeSettings, MapBridge

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


async def serve_config(
    tmp_path: Path,
    services: list[ServiceProcess],
    text: str,
    env: dict[str, str] | None = None,
    *,
    args: tuple[str, ...] = (),
) -> ServiceProcess:
    """``packetstack ARGS serve --config FILE`` in a child (``FILE``: tmp_path/packetstack.toml,
    holding ``text``), added to ``services`` (the fixture that stops them) and listening."""
    config = tmp_path / "packetstack.toml"
    config.write_text(text)
    service = ServiceProcess(
        free_port(), tmp_path, env, args=args, serve_args=("--config", str(config))
    )
    services.append(service)
    service.start()
    await service.wait_listening()
    return service


async def spawn_cli(*args: str) -> asyncio.subprocess.Process:
    """``packetstack ARGS`` in a child with piped output, 200 columns wide."""
    return await asyncio.create_subprocess_exec(
        *cli_command(*args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(COLUMNS="200"),
    )


async def run_cli(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run ``packetstack ARGS`` without blocking the loop: (exit code, stdout, stderr)."""
    proc = await spawn_cli(*args)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def table_rows(out: str, title: str) -> list[list[str]]:
    """The cells of each row of the table titled ``title`` in ``packetstack status``'s output."""
    return rows_after(out.splitlines(), lambda line: line.strip() == title)


def rows_after(lines: list[str], is_title: Callable[[str], bool]) -> list[list[str]]:
    """The cells of each row of the first (rich) table whose title line passes ``is_title``;
    a cell folded over several lines (its row's first cell is blank there) is joined back
    together."""
    start = next(i for i, line in enumerate(lines) if is_title(line))
    body = next(i for i in range(start, len(lines)) if lines[i].startswith("┡"))
    rows: list[list[str]] = []
    for line in lines[body + 1 :]:
        if not line.startswith("│"):
            break
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if rows and not cells[0]:
            rows[-1] = [(a + " " + b).strip() for a, b in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    return rows


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


# ------------------------------------------------------------ database bridges

# The machine's SQL servers for bridge tests; SQLite is a file in the test's tmp_path.
SQL_SERVERS: dict[str, tuple[str, int]] = {
    "postgresql": ("postgresql+asyncpg://postgres@127.0.0.1:5432/test", 5432),
    "mariadb": ("mysql+asyncmy://root@127.0.0.1:3306/test", 3306),
}


class SqlDatabase:
    """One SQL database of a bridge test: its URL, uniquely named tables (``name()``; all
    dropped by ``drop()``, which a fixture runs even when the test fails) and direct reads
    with SQLAlchemy, independent of the code under test. ``kind``: postgresql, mariadb or
    sqlite; ``port``: the server's (None for SQLite)."""

    def __init__(self, kind: str, url: str, port: int | None) -> None:
        from sqlalchemy.ext.asyncio import create_async_engine
        from sqlalchemy.pool import NullPool

        self.kind = kind
        self.url = url
        self.port = port
        self.engine = create_async_engine(url, poolclass=NullPool)
        self.tables: list[str] = []

    def name(self, prefix: str) -> str:
        """A table (and map) name no other test uses, dropped at the end."""
        name = f"{prefix}_{os.getpid()}_{next(_table_numbers)}_{os.urandom(3).hex()}"
        self.tables.append(name)
        return name

    def through(self, port: int) -> str:
        """This database's URL with its port replaced (a proxy's on 127.0.0.1)."""
        import sqlalchemy as sa

        url = sa.make_url(self.url).set(host="127.0.0.1", port=port)
        return url.render_as_string(hide_password=False)

    async def execute(self, statement: object, rows: list[dict[str, object]] | None = None) -> None:
        """Run ``statement`` (SQL text or a SQLAlchemy statement) in a transaction."""
        import sqlalchemy as sa

        if isinstance(statement, str):
            statement = sa.text(statement)
        async with self.engine.begin() as conn:
            await conn.execute(statement, rows)  # type: ignore[arg-type]

    async def rows(
        self, table: str, *columns: str, json: tuple[str, ...] = ()
    ) -> list[tuple[object, ...]]:
        """Every row of ``table`` (those columns), sorted in Python (collations differ);
        the ``json`` columns decoded where the driver gives JSON back as text (asyncpg
        decodes it itself)."""
        import sqlalchemy as sa

        query = sa.select(*(sa.column(c) for c in columns)).select_from(sa.table(table))
        async with self.engine.connect() as conn:
            found = (await conn.execute(query)).all()
        decode = [c in json and self.kind != "postgresql" for c in columns]
        return sorted(
            tuple(
                msgspec.json.decode(cell) if json_cell and isinstance(cell, str | bytes) else cell
                for json_cell, cell in zip(decode, row, strict=True)
            )
            for row in found
        )

    async def count(self, table: str) -> int:
        import sqlalchemy as sa

        query = sa.select(sa.func.count()).select_from(sa.table(table))
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def exists(self, table: str) -> bool:
        import sqlalchemy as sa

        async with self.engine.connect() as conn:
            return bool(await conn.run_sync(lambda sync: sa.inspect(sync).has_table(table)))

    async def drop(self) -> None:
        """Drop every table named by ``name()`` (DROP TABLE IF EXISTS), then let go."""
        import sqlalchemy as sa

        quote = self.engine.dialect.identifier_preparer.quote
        try:
            for table in self.tables:
                async with self.engine.begin() as conn:
                    await conn.execute(sa.text(f"DROP TABLE IF EXISTS {quote(table)}"))
        finally:
            await self.engine.dispose()


_table_numbers = itertools.count()


def sql_database(kind: str, tmp_path: Path) -> SqlDatabase:
    """The SqlDatabase of ``kind``: a real server (skipped locally, failed under CI=true
    when it is not listening) or an SQLite file in ``tmp_path``."""
    if kind == "sqlite":
        return SqlDatabase(kind, f"sqlite+aiosqlite:///{tmp_path / 'bridge.sqlite'}", None)
    from conftest import require_server

    url, port = SQL_SERVERS[kind]
    require_server(kind, "127.0.0.1", port)
    return SqlDatabase(kind, url, port)


class DatabaseProxy(TcpProxy):
    """A TcpProxy in front of a database that can go away: ``down()`` cuts every proxied
    connection and stops listening (new connections are refused), ``up()`` listens again
    on the same port. ``down()`` is synchronous: a flush's progress callback may call it."""

    def down(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            self._server = None

    async def up(self) -> None:
        assert self._server is None and self.port, "start() it first, and down() before up()"
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)


class Player(msgspec.Struct):
    """The value type of the bridge tests' typed maps (a column per field)."""

    name: str
    score: int
    level: int | None = None


def players(count: int, name: str = "p", start: int = 0) -> dict[str, Player]:
    """``count`` entries ``{name}00000``..., every third with a level (the others None)."""
    return {
        f"{name}{n:05d}": Player(f"{name}-{n}", n, None if n % 3 else n * 10)
        for n in range(start, start + count)
    }


async def delete_five_and_a_fleeting_key(
    grid: Map[str, Player], expected: dict[str, Player]
) -> None:
    """Delete the first five keys of ``expected`` (from it too), put and delete a key
    between two flushes, and delete a key that was never there: six deletes for the next
    flush (one of a key the database never had), the last changing nothing."""
    for key in list(expected)[:5]:
        assert await grid.delete(key)
        del expected[key]
    await grid.put("fleeting", Player("never flushed", 1))
    assert await grid.delete("fleeting")  # put and deleted between two flushes
    assert not await grid.delete("never-there")  # changes nothing: nothing to write


# The same type for `packetstack serve` children (``type = "bridge_types:Player"``):
# written into the test's tmp_path as bridge_types.py, which goes on their PYTHONPATH.
BRIDGE_TYPES = """
import msgspec


class Player(msgspec.Struct):
    name: str
    score: int
    level: int | None = None
"""


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return msgspec.json.encode(value).decode()  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML for {value!r}")


def config_toml(
    settings: dict[str, object],
    tables: dict[str, dict[str, object]],
    principals: Sequence[dict[str, object]] = (),
    section: str = "service",
) -> str:
    """A service config file's text: ``[service]`` with ``settings``, a
    ``[[service.principals]]`` table per principal, then a ``[service.NAME]`` table per
    entry of ``tables`` (NAME as in "bridges.local", "maps.players"). With ``section=""``
    the settings and tables stand at the top level (``[bridges.local]``)."""
    prefix = f"{section}." if section else ""
    lines = [f"[{section}]"] if section else []
    blocks = [("", settings)]
    blocks += [(f"[[{prefix}principals]]", principal) for principal in principals]
    blocks += [(f"[{prefix}{name}]", table) for name, table in tables.items()]
    for header, values in blocks:
        if header:
            lines.append(f"\n{header}")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def bridge_config(
    path: Path,
    bridges: dict[str, dict[str, object]],
    maps: dict[str, dict[str, object]],
    **settings: object,
) -> Path:
    """Write a service config file with ``settings`` at the top, ``[bridges.NAME]`` and
    ``[maps.NAME]`` tables; return its path."""
    tables = {f"bridges.{name}": table for name, table in bridges.items()}
    tables.update({f"maps.{name}": table for name, table in maps.items()})
    path.write_text(config_toml(settings, tables, section=""))
    return path


def bridge_service(tmp_path: Path, config: Path, port: int | None = None) -> ServiceProcess:
    """A ServiceProcess of ``packetstack serve --config config`` that can import
    bridge_types (written into ``tmp_path``)."""
    (tmp_path / "bridge_types.py").write_text(BRIDGE_TYPES)
    env = clean_env(PYTHONPATH=str(tmp_path))
    return ServiceProcess(
        free_port() if port is None else port, tmp_path, env, serve_args=("--config", str(config))
    )


async def exited(proc: subprocess.Popen[bytes], timeout: float, what: str) -> int:
    """Wait (without blocking the event loop) for ``proc`` to exit; its return code."""
    await wait_until(lambda: proc.poll() is not None, timeout, what)
    assert proc.returncode is not None
    return proc.returncode


async def until(check: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``await check()`` until it is true (failing the test after ``timeout``); the
    seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not await check():  # type: ignore[misc]
        if loop.time() - start > timeout:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
    return loop.time() - start


def player_rows(players: dict[str, Player]) -> list[tuple[object, ...]]:
    """The rows a typed Player table (``key, name, score, level``) holds for ``players``."""
    return sorted((k, p.name, p.score, p.level) for k, p in players.items())


# ---------------------------------------------- bridged services in this process

PLAYER_COLUMNS = ("key", "name", "score", "level")  # a typed Player table's


class BridgedServices:
    """In-process services with one bridge "db" to the test's database (few, quick retries:
    a test that goes wrong fails fast) and short heartbeats. The ``bridged`` fixture closes
    those still running before the tables are dropped; ``close(service)`` closes one (and
    the fixture leaves it be)."""

    def __init__(self, db: SqlDatabase, tmp_path: Path) -> None:
        self.db = db
        self.data_dir = tmp_path / "data"
        self.running: list[Service] = []

    async def start(
        self,
        maps: dict[str, MapBridge],
        url: str | None = None,
        bridge: dict[str, object] | None = None,
        **options: Any,
    ) -> Service:
        """A started service with ``maps`` on the database at ``url`` (by default the
        test's), ``bridge`` settings on top of the quick ones; ``options`` go to Service."""
        settings = {
            "url": url or self.db.url,
            "retries": 2,
            "retry_delay": 0.05,
            "connect_timeout": 5,
            **(bridge or {}),
        }
        options = {
            "data_dir": self.data_dir,
            "heartbeat": 0.5,
            "heartbeat_timeout": 2.0,
            **options,
        }
        service = Service(
            "127.0.0.1",
            0,
            bridges={"db": msgspec.convert(settings, BridgeSettings)},
            maps=maps,
            **options,
        )
        await service.start()
        self.running.append(service)
        return service

    async def start_typed(
        self,
        prefix: str,
        url: str | None = None,
        bridge: dict[str, object] | None = None,
        **options: Any,
    ) -> tuple[str, Service, Map[Any, Player]]:
        """``start()`` with one typed map of Players on a table named for ``prefix``: the
        table (and map) name, the service, and the map in its grid."""
        table = self.db.name(prefix)
        service = await self.start({table: typed()}, url, bridge, **options)
        return table, service, service.grid.map(table, Player)

    async def close(self, service: Service) -> FlushReport | None:
        self.running.remove(service)
        return await service.close()


def typed(**options: Any) -> MapBridge:
    """A typed map of Player values on bridge "db"."""
    return MapBridge(bridge="db", mode="typed", type=Player, **options)


def figures(report: FlushReport) -> list[tuple[str, int, int, int, int]]:
    """Per map of a flush's report: (map, written, deleted, set aside, failed), all on
    bridge "db"."""
    assert all(m.bridge == "db" for m in report.maps)
    return [(m.map, m.written, m.deleted, m.set_aside, m.failed) for m in report.maps]


async def grid_items(service: Service, map_name: str, value_type: Any = Player) -> dict[Any, Any]:
    """What the service's grid map holds."""
    return {k: v async for k, v in service.grid.map(map_name, value_type).items()}


async def flush_writes(
    service: Service,
    db: SqlDatabase,
    table: str,
    counts: tuple[int, int, int, int],
    expected: dict[str, Player],
) -> None:
    """Flush ``service``: its report is of the one map ``table`` with ``counts`` (written,
    deleted, set aside, failed), and the table then holds exactly ``expected``."""
    report = await service.flush()
    assert figures(report) == [(table, *counts)]
    assert await db.rows(table, *PLAYER_COLUMNS) == player_rows(expected)


async def sigterm(serve: ServiceProcess) -> str:
    """SIGTERM the service; it exits 0 (after its flush); its log."""
    assert serve.proc is not None
    serve.proc.send_signal(signal.SIGTERM)
    code = await exited(serve.proc, 60, "the service to flush and exit after SIGTERM")
    assert code == 0, serve.log()
    return serve.log()


def closing_figures(log: str) -> tuple[int, int, int, int]:
    """From the log's "flush on close: ..." line: (written, deleted, set aside, still dirty)."""
    found = re.findall(
        r"flush on close: (\d+) written, (\d+) deleted, (\d+) set aside[^,]*, (\d+) still dirty",
        log,
    )
    assert len(found) == 1, log
    written, deleted, set_aside, dirty = (int(n) for n in found[0])
    return written, deleted, set_aside, dirty


async def write_acknowledged(grid: Map[str, Player], expected: dict[str, Player]) -> None:
    """Put ``expected`` (keys p00000 up), update 200 of them and delete the last 100, each
    acknowledged; ``expected`` is left holding what the map holds."""
    await grid.put_all(expected)
    for n in range(0, 400, 2):
        key = f"p{n:05d}"
        expected[key] = Player("upd", -n, n)
        await grid.put(key, expected[key])
    for n in range(len(expected) - 100, len(expected)):
        assert await grid.delete(f"p{n:05d}")
        del expected[f"p{n:05d}"]


async def flush_while_changing(
    service: Service, grid: Map[str, Player], span: int
) -> tuple[FlushReport, int]:
    """``service.flush()`` while a writer keeps putting and deleting (one in ten) keys
    ``p00000`` to ``p{span}`` of ``grid`` (early and late in the flush's order, new keys
    too), one per loop iteration; the report and how many changes were made. Fails the
    test if no change was made while the flush ran."""
    rng = random.Random(span)
    changes = 0
    stop = asyncio.Event()

    async def writer() -> None:
        nonlocal changes
        while not stop.is_set():
            n = rng.randrange(span)
            key = f"p{n:05d}"
            if rng.random() < 0.1:
                await grid.delete(key)
            else:
                await grid.put(key, Player(f"changed-{changes}", changes, n))
            changes += 1
            await asyncio.sleep(0)

    during: list[int] = []
    task = asyncio.create_task(writer())
    try:
        report = await service.flush(progress=lambda *_: during.append(changes))
    finally:
        stop.set()
        await task
    assert during[-1] > during[0], "the writer made no change while the flush ran"
    return report, changes
