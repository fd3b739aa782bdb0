"""Pieces every system's driver shares: plans, receipt counting, request loops, statistics,
hub subprocesses and machine information.

Every system is measured by the same harness: ``drive_requests`` times each request the
same way for PacketStack, the raw relay and nats-py, and ``Receipts`` counts one-way
deliveries the same way on every consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import gc
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent

BODY_SIZE = 64  # bytes of packet body for every system and scenario
HIGH_WATER = 1024 * 1024  # write-buffer limits: the PacketStack defaults, used everywhere
LOW_WATER = 256 * 1024
REQUEST_TIMEOUT = 10.0

perf_counter = time.perf_counter

MOSQUITTO_SBIN = "/usr/sbin/mosquitto"
# The private broker's settings (besides its listener): bench/RESULTS.md explains each.
MOSQUITTO_SETTINGS = (
    "allow_anonymous true",
    "persistence false",
    "max_queued_messages 0",  # no limit: the packaged default (1000) drops the rest
    "max_inflight_messages 0",  # no limit on outgoing QoS 1 in flight (default 20)
    "log_dest stderr",
    "log_type error",
    "log_type warning",
)


@dataclass(frozen=True)
class Plan:
    """How much one measurement does."""

    one_way: int = 200_000  # packets sent by the producer
    one_way_warmup: int = 10_000
    rr1: int = 20_000  # sequential requests
    rr100: int = 100_000  # requests with 100 outstanding
    rr_warmup: int = 1_000
    outstanding: int = 100
    backlog: int = 100_000  # packets stored for an offline consumer, then replayed
    timebox: float = 10.0  # seconds: a measured phase stops sending after this long
    fill_timebox: float = 60.0  # the same for filling the backlog (slow publishers need ~12 s)
    # The data grid scenarios (PacketStack maps against Redis): small int values.
    grid_keys: int = 2_000  # keys preloaded for the get and put scenarios
    grid_ops1: int = 10_000  # gets or puts with 1 outstanding
    grid_ops100: int = 100_000  # gets or puts with 100 outstanding
    grid_local: int = 1_000_000  # gets of owned keys (in-process)
    grid_put_all: int = 100_000  # entries in one put_all (Redis: pipelines of 100 SETs)
    grid_warmup: int = 500
    # Seconds a measured grid phase may run (not the put_all): short, so that the grid
    # scenarios' 2 x 6 measurements per run stay within ~20 s.
    grid_timebox: float = 0.8

    @classmethod
    def quick(cls) -> Plan:
        return cls(
            one_way=3_000,
            one_way_warmup=300,
            rr1=300,
            rr100=3_000,
            rr_warmup=100,
            backlog=2_000,
            timebox=3.0,
            grid_keys=500,
            grid_ops1=300,
            grid_ops100=3_000,
            grid_local=5_000,
            grid_put_all=2_000,
            grid_warmup=100,
            grid_timebox=1.0,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------- CPU meter

# The hub process whose CPU time a measurement reports: set by the suite before each one.
hub_pid: int | None = None
# The grid holder process of the remote grid scenarios (reported on its own), or None.
holder_pid: int | None = None


def process_cpu_seconds(pid: int) -> float | None:
    """CPU time of every thread of ``pid`` (ns resolution from schedstat), None if unknown."""
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as stat:
                total += int(stat.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return total / 1e9


def find_pid(comm: str) -> int | None:
    """The first process whose name is ``comm`` (for a server not ours), or None."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    for entry in entries:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm", encoding="utf-8") as name:
                    if name.read().strip() == comm:
                        return int(entry)
            except OSError:
                continue
    return None


class CpuMeter:
    """CPU seconds this (client) process and the hub spend during a measured phase."""

    def __init__(self) -> None:
        self.pid = hub_pid
        self.holder_pid = holder_pid
        self.wall = perf_counter()
        self.client = time.process_time()
        self.hub = process_cpu_seconds(self.pid) if self.pid else None
        self.holder = process_cpu_seconds(self.holder_pid) if self.holder_pid else None

    def stop(self, messages: int) -> dict[str, float | None]:
        wall = perf_counter() - self.wall
        client = time.process_time() - self.client
        hub_now = process_cpu_seconds(self.pid) if self.pid else None
        hub = hub_now - self.hub if hub_now is not None and self.hub is not None else None
        per = 1e6 / messages if messages else None
        result = {
            "client_cpu_s": client,
            "hub_cpu_s": hub,
            "client_cpu_pct": 100 * client / wall if wall > 0 else None,
            "hub_cpu_pct": 100 * hub / wall if hub is not None and wall > 0 else None,
            "client_cpu_us_per_msg": client * per if per else None,
            "hub_cpu_us_per_msg": hub * per if per and hub is not None else None,
        }
        if self.holder_pid:
            now = process_cpu_seconds(self.holder_pid)
            held = now - self.holder if now is not None and self.holder is not None else None
            result["holder_cpu_s"] = held
            result["holder_cpu_pct"] = 100 * held / wall if held is not None and wall else None
            result["holder_cpu_us_per_msg"] = held * per if per and held is not None else None
        return result


# --------------------------------------------------------------------- one-way receipts


class Receipts:
    """Counts deliveries at a consumer; done once ``expected`` have arrived."""

    __slots__ = ("count", "done", "expected", "first", "last")

    def __init__(self, expected: int) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        self.expected = expected
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def hit(self) -> None:
        now = perf_counter()
        if not self.count:
            self.first = now
        self.count += 1
        self.last = now
        if self.count >= self.expected and not self.done.done():
            self.done.set_result(None)

    def expect(self, expected: int) -> None:
        """The producer stopped early (time-box): ``expected`` is what it really sent."""
        self.expected = expected
        if self.count >= expected and not self.done.done():
            self.done.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """True when every expected packet arrived within ``timeout`` seconds."""
        try:
            await asyncio.wait_for(asyncio.shield(self.done), timeout)
        except TimeoutError:
            return False
        return True

    async def settle(self, idle: float, timeout: float) -> bool:
        """Like ``wait``, but give up as soon as nothing arrived for ``idle`` seconds: a
        server that dropped packets never delivers the last one."""
        deadline = perf_counter() + timeout
        while perf_counter() < deadline:
            seen = self.count
            if await self.wait(min(idle, max(0.0, deadline - perf_counter()))):
                return True
            if self.count == seen:
                return False
        return self.done.done()


def one_way_result(
    receipts: Receipts, sent: int, send_elapsed: float, meter: CpuMeter
) -> dict[str, Any]:
    """Delivered packets per second at the consumer, first to last receipt."""
    span = receipts.last - receipts.first
    count = receipts.count
    rate = (count - 1) / span if count > 1 and span > 0 else 0.0
    return {
        "rate": rate,
        "count": count,
        "sent": sent,
        "lost": sent - count,
        "elapsed": span,
        "send_elapsed": send_elapsed,
        "p50_us": None,
        "p99_us": None,
        **meter.stop(count),
    }


def backlog_result(
    receipts: Receipts,
    sent: int,
    accept_elapsed: float,
    replay_started: float,
    meter: CpuMeter,
) -> dict[str, Any]:
    """The backlog scenario's figures. ``rate``: packets replayed per second, from the moment
    the consumer started (re)connecting to the last packet received; ``accept_rate``: packets
    per second the server acknowledged as stored, first send to the last acknowledgement.
    A server that dropped some reports the rate over what arrived and ``lost`` > 0."""
    count = receipts.count
    span = receipts.last - replay_started if count else 0.0
    return {
        "rate": count / span if span > 0 else 0.0,
        "accept_rate": sent / accept_elapsed if accept_elapsed > 0 else 0.0,
        "count": count,
        "sent": sent,
        "lost": sent - count,
        "elapsed": span,
        "accept_elapsed": accept_elapsed,
        "p50_us": None,
        "p99_us": None,
        **meter.stop(count),
    }


class Window:
    """Up to ``size`` operations in flight at once, for clients whose every call waits for its
    own acknowledgement: ``await add(coroutine)`` starts one; ``await flush()`` waits for all."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pending: list[asyncio.Future[Any]] = []

    async def add(self, operation: Awaitable[Any]) -> None:
        self.pending.append(asyncio.ensure_future(operation))
        if len(self.pending) >= self.size:
            await self.flush()

    async def flush(self) -> None:
        pending, self.pending = self.pending, []
        await asyncio.gather(*pending)


async def produce(
    send: Callable[[int], Awaitable[None]] | None,
    count: int,
    timebox: float,
    send_sync: Callable[[int], bool] | None = None,
    drain: Callable[[], Awaitable[None]] | None = None,
) -> tuple[int, float]:
    """Send up to ``count`` packets, stopping early after ``timebox`` seconds.

    Either ``send(i)`` (awaited each time) or ``send_sync(i)`` (returns True when the
    caller must ``await drain()`` before going on). Returns (sent, seconds)."""
    start = perf_counter()
    deadline = start + timebox
    sent = 0
    while sent < count:
        stop = min(count, sent + 1024)
        if send is not None:
            for i in range(sent, stop):
                await send(i)
        else:
            assert send_sync is not None and drain is not None
            for i in range(sent, stop):
                if send_sync(i):
                    await drain()
        sent = stop
        if perf_counter() > deadline:
            break
    return sent, perf_counter() - start


# ------------------------------------------------------------------- request loops


async def drive_key_ops(
    get: Callable[[str], Awaitable[Any]],
    put: Callable[[str, int], Awaitable[Any]],
    keys: list[str],
    op: str,
    plan: Plan,
    outstanding: int,
) -> dict[str, Any]:
    """``get`` (each must find its preloaded key) or ``put`` of ``keys`` in turn, with
    ``outstanding`` tasks: the grid scenarios' driver, the same for every system."""
    total = plan.grid_ops1 if outstanding == 1 else plan.grid_ops100
    count = len(keys)
    turn = [0]

    if op == "get":

        async def request() -> None:
            i = turn[0]
            turn[0] = i + 1
            if await get(keys[i % count]) is None:
                raise RuntimeError(f"the preloaded key {keys[i % count]!r} is gone")

    else:

        async def request() -> None:
            i = turn[0]
            turn[0] = i + 1
            await put(keys[i % count], i)

    await drive_requests(request, plan.grid_warmup, outstanding, 60)
    return await drive_requests(request, total, outstanding, plan.grid_timebox)


async def drive_requests(
    request: Callable[[], Awaitable[Any]], total: int, outstanding: int, timebox: float
) -> dict[str, Any]:
    """Run ``outstanding`` tasks issuing requests back to back until ``total`` were
    issued or ``timebox`` seconds passed. Each request's latency is timed on its own."""
    latencies: list[float] = []
    record = latencies.append
    issued = 0
    start = perf_counter()
    deadline = start + timebox
    stop_at = [0.0]

    async def worker() -> None:
        nonlocal issued
        while issued < total:
            issued += 1
            t0 = perf_counter()
            await request()
            t1 = perf_counter()
            record(t1 - t0)
            if t1 > deadline:
                issued = total  # time-box: every worker stops after its current request
            stop_at[0] = t1

    meter = CpuMeter()
    tasks = [asyncio.ensure_future(worker()) for _ in range(min(outstanding, total))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
    elapsed = stop_at[0] - start
    count = len(latencies)
    return {
        "rate": count / elapsed if elapsed > 0 else 0.0,
        "count": count,
        "elapsed": elapsed,
        "outstanding": outstanding,
        **latency_summary(latencies),
        **meter.stop(count),
    }


async def drive_loop(
    call: Callable[[Any], Awaitable[Any]], keys: Sequence[Any], total: int, timebox: float
) -> dict[str, Any]:
    """``await call(key)`` over ``keys`` (round and round), one at a time, until ``total``
    calls were made or ``timebox`` seconds passed. Not timed one by one: for operations of a
    few microseconds the clock would be a good part of what is measured."""
    count = len(keys)
    meter = CpuMeter()
    start = perf_counter()
    deadline = start + timebox
    done = 0
    while done < total:
        stop = min(total, done + 1024)
        for i in range(done, stop):
            await call(keys[i % count])
        done = stop
        if perf_counter() > deadline:
            break
    elapsed = perf_counter() - start
    return {
        **untimed_result(done, elapsed, meter),
        "outstanding": 1,
        "mean_us": elapsed / done * 1e6 if done else None,
    }


def untimed_result(count: int, elapsed: float, meter: CpuMeter) -> dict[str, Any]:
    """The figures of ``count`` operations timed together (no latency of their own)."""
    return {
        "rate": count / elapsed if elapsed > 0 else 0.0,
        "count": count,
        "elapsed": elapsed,
        "p50_us": None,
        "p99_us": None,
        **meter.stop(count),
    }


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def latency_summary(latencies: list[float]) -> dict[str, float | None]:
    if not latencies:
        return {"p50_us": None, "p99_us": None, "mean_us": None, "max_us": None}
    ordered = sorted(latencies)
    return {
        "p50_us": percentile(ordered, 0.50) * 1e6,
        "p99_us": percentile(ordered, 0.99) * 1e6,
        "mean_us": sum(ordered) / len(ordered) * 1e6,
        "max_us": ordered[-1] * 1e6,
    }


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    """``value`` formatted for a table: ``-`` when it was not measured."""
    return "-" if value is None else f"{value:{spec}}{suffix}"


def median(values: list[float]) -> float | None:
    clean = sorted(v for v in values if v is not None and not math.isnan(v))
    if not clean:
        return None
    mid = len(clean) // 2
    if len(clean) % 2:
        return clean[mid]
    return (clean[mid - 1] + clean[mid]) / 2


# ---------------------------------------------------------------- event loop per run


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run one measurement on a fresh uvloop event loop (asyncio's when uvloop is missing),
    after a full garbage collection so one run's garbage does not land in the next."""
    gc.collect()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a PacketStack dependency on Linux
        return asyncio.run(main)
    return uvloop.run(main)


# -------------------------------------------------------------------- hub processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def python_env() -> dict[str, str]:
    """The environment for bench subprocesses: this repository importable as ``bench``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def spawn_logged(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """A child process of the suite, its output in ``log_path``."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=python_env(),
            cwd=str(ROOT),
        )


@dataclass
class Hub:
    """A hub (PacketStack service, raw relay or private broker) running as its own process."""

    name: str
    argv: list[str]
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    scheme: str = "ps"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        self.process = spawn_logged(self.argv, self.log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the {self.name} hub exited with {self.process.returncode} before "
                    f"listening on port {self.port}:\n{self.log_tail()}"
                )
            if port_open("127.0.0.1", self.port, 0.5):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the {self.name} hub did not listen on port {self.port} in time")

    def log_tail(self, limit: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextlib.contextmanager
def hub_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="packetstack-bench-") as tmp:
        yield Path(tmp)


def packetstack_hub(workdir: Path, port: int | None = None) -> Hub:
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "packetstack.cli",
        "--log-level",
        "WARNING",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(workdir / "ps-data"),
    ]
    return Hub("packetstack", argv, port, workdir / "packetstack-hub.log")


@dataclass
class GridHub(Hub):
    """A PacketStack service with a grid holder in a second process that owns every
    partition (``bench/grid_holder.py``): a client connected to it that holds no data
    reaches every key through the service and the holder. ``process`` is the service's."""

    holder: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    holder_timeout: float = 30.0

    @property
    def holder_log(self) -> Path:
        return self.log_path.with_name("grid-holder.log")

    def start(self, timeout: float = 20.0) -> None:
        super().start(timeout)
        ready = self.log_path.with_name("grid-holder.ready")
        ready.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "bench.grid_holder", "--url", self.url]
        argv += ["--ready", str(ready), "--timeout", str(self.holder_timeout)]
        self.holder = spawn_logged(argv, self.holder_log)
        deadline = time.monotonic() + self.holder_timeout + 10
        while not ready.exists():
            if self.holder.poll() is not None or time.monotonic() > deadline:
                tail = self.holder_log.read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"the grid holder did not take the partitions:\n{tail}")
            time.sleep(0.02)

    def alive(self) -> bool:
        return super().alive() and self.holder is not None and self.holder.poll() is None

    def log_tail(self, limit: int = 2000) -> str:
        try:
            holder = self.holder_log.read_text(errors="replace")[-limit:]
        except OSError:
            holder = ""
        return super().log_tail(limit) + ("\n[grid holder]\n" + holder if holder else "")

    def stop(self) -> None:
        holder = self.holder
        if holder is not None and holder.poll() is None:
            holder.send_signal(signal.SIGTERM)  # a graceful leave: the service takes back
            try:
                holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait(timeout=5)
        super().stop()


def grid_hub(workdir: Path, port: int | None = None) -> GridHub:
    """A second PacketStack service (its own data directory) with a holder process."""
    hub = packetstack_hub(workdir / "grid", port)
    (workdir / "grid").mkdir(exist_ok=True)
    return GridHub("packetstack-grid", hub.argv, hub.port, workdir / "grid" / "hub.log")


def raw_hub(workdir: Path, port: int | None = None) -> Hub:
    port = port or free_port()
    argv = [sys.executable, "-m", "bench.relay", "--port", str(port)]
    return Hub("raw", argv, port, workdir / "raw-hub.log")


def mosquitto_binary() -> str | None:
    """The mosquitto broker's executable (Debian installs it in /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return MOSQUITTO_SBIN if os.access(MOSQUITTO_SBIN, os.X_OK) else None


def mosquitto_version(binary: str) -> str | None:
    """The version line ``mosquitto -h`` prints ("mosquitto version 2.0.11"), or None."""
    try:
        out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0].strip() if first else None


def mosquitto_hub(workdir: Path, binary: str, port: int | None = None) -> Hub:
    """A private mosquitto on 127.0.0.1 for the backlog scenario: unlike the packaged
    defaults (max_queued_messages 1000 per client, the rest dropped) it queues every
    message for an offline client, and it keeps them in memory only (no persistence file)."""
    port = port or free_port()
    config = workdir / "mosquitto.conf"
    lines = [f"listener {port} 127.0.0.1", *MOSQUITTO_SETTINGS]
    config.write_text("\n".join(lines) + "\n", encoding="utf-8")
    argv = [binary, "-c", str(config)]
    return Hub("mosquitto", argv, port, workdir / "mosquitto.log", scheme="mqtt")


# -------------------------------------------------------------------- CPU placement

PIN_MODES = ("auto", "split", "same", "none")


# Scenarios of one request or operation at a time: placed like req-1 by --pin auto.
SEQUENTIAL_SCENARIOS = frozenset({"req-1", "grid-get-1", "grid-put-1"})


def placement_for(pin: str, scenario: str) -> str:
    """Where a scenario runs: "split" (hub and clients on two different CPUs), "same" (one
    CPU for both) or "none" (the scheduler decides).

    "auto": split for the throughput scenarios, same for the sequential request/reply. On a
    virtual machine a wake-up across CPUs can cost tens of microseconds (an IPI through the
    hypervisor), and left to itself the scheduler flips between placements every second or
    so, which turns 1-outstanding latencies bimodal: sharing one CPU costs a sequential
    round trip nothing and measures the software path alone."""
    if pin == "auto":
        return "same" if scenario in SEQUENTIAL_SCENARIOS else "split"
    return pin


def _set_affinity(pid: int, cpus: set[int]) -> None:
    tasks = os.listdir(f"/proc/{pid}/task") if pid else ["0"]
    for task in tasks:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), cpus)


class Placement:
    """Pins this process (the clients) and a hub process to CPUs, and restores ours after."""

    def __init__(self) -> None:
        self.original = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self.cpus = sorted(self.original)

    def apply(
        self, mode: str, hub_pid: int | None, companions: Sequence[int] = ()
    ) -> dict[str, Any]:
        """Pin the clients (this process), the hub and the hub's ``companions`` (processes
        that serve with it: the grid holder), which go on the hub's CPU."""
        if mode == "none" or len(self.cpus) < 2:
            self.restore()
            for pid in companions:
                _set_affinity(pid, set(self.original))
            if hub_pid:
                _set_affinity(hub_pid, set(self.original))
            return {"mode": "none", "client_cpu": None, "hub_cpu": None}
        client, hub = self.cpus[0], self.cpus[1] if mode == "split" else self.cpus[0]
        _set_affinity(0, {client})
        if hub_pid:
            _set_affinity(hub_pid, {hub})
        for pid in companions:
            _set_affinity(pid, {hub})
        return {"mode": mode, "client_cpu": client, "hub_cpu": hub if hub_pid else None}

    def restore(self) -> None:
        if self.original:
            _set_affinity(0, set(self.original))


# ------------------------------------------------------------------ machine details


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def git_src_dirty() -> bool | None:
    """True when src/ has uncommitted changes: the figures are not of git_commit alone."""
    status = _git("status", "--porcelain", "--", "src")
    return None if status is None else bool(status)


def packetstack_source() -> str:
    """The folder ``packetstack`` is imported from (a snapshot via PYTHONPATH, or src/)."""
    import packetstack

    return str(Path(packetstack.__file__).resolve().parent)


def machine_info() -> dict[str, Any]:
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    source = packetstack_source()
    in_tree = source == str(ROOT / "src" / "packetstack")
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "uvloop": _version("uvloop"),
        "msgspec": _version("msgspec"),
        "nats_py": _version("nats-py"),
        "aiomqtt": _version("aiomqtt"),
        "redis_py": _version("redis"),
        "hiredis": _version("hiredis"),
        "packetstack": _version("packetstack"),
        "packetstack_source": source,
        # Only meaningful when packetstack comes from this work tree's src/.
        "git_commit": git_commit() if in_tree else os.environ.get("BENCH_SOURCE_COMMIT"),
        "git_src_dirty": git_src_dirty() if in_tree else None,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "loadavg_start": load,
    }
