"""The data grid under real faults: holders (``Client(holds_data=True)``) in their own
processes, killed with ``kill -9`` or stopped with SIGTERM, and the ``packetstack serve``
process killed and restarted on the same data directory. What users rely on: every write
that returned reads back with its value, through the loss of owners, backups and the
service itself, and reads keep working while partitions change hands."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from support import ServiceProcess, free_port, service_env, spawn_script, wait_until

from packetstack import Client
from packetstack.grid import DEFAULT_PARTITIONS, Map
from packetstack.service.admin import Status, StatusReport

pytestmark = pytest.mark.timeout(60)  # measured 3-25 s each on a loaded 2-CPU machine

MAP = "numbers"
READ_CHUNK = 10_000

# A holding ending in its own process: connects, writes READY (its pid) and stays until it
# is killed; SIGTERM closes it gracefully (close() hands its partitions over first).
HOLDER = textwrap.dedent(
    """
    import asyncio, logging, os, signal, sys
    from packetstack import Client

    async def main(url: str, name: str, ready: str) -> None:
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
        client = Client(name, url, holds_data=True, backoff_max=0.2, connect_timeout=30)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await client.connect()
        with open(ready, "w") as out:
            out.write(str(os.getpid()))
        await stop.wait()
        logging.info("%s: SIGTERM, closing", name)
        await client.close()
        logging.info("%s: closed", name)

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
    """
)


class HolderProcess:
    """A HOLDER child process and its log."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)


async def spawn_holder(
    tmp_path: Path, url: str, processes: list[subprocess.Popen[bytes]], name: str
) -> HolderProcess:
    """Start a HOLDER process and wait until it is connected."""
    ready = tmp_path / f"{name}.ready"
    log_path = tmp_path / f"worker-{len(processes)}.log"  # spawn_script's name for it
    proc = spawn_script(tmp_path, HOLDER, [url, name, str(ready)], processes)
    holder = HolderProcess(name, proc, log_path)
    await wait_until(lambda: ready.exists() or proc.poll() is not None, 30, f"{name} to connect")
    assert proc.poll() is None, f"{name} exited with {proc.returncode}:\n{holder.log()}"
    return holder


async def start(service: ServiceProcess, processes: list[subprocess.Popen[bytes]]) -> None:
    """(Re)start the service process and wait until it listens (``processes`` cleans up)."""
    processes.append(service.start())
    await service.wait_listening()


@pytest.fixture
async def grid_service(tmp_path: Path, processes: list[subprocess.Popen[bytes]]) -> ServiceProcess:
    """``packetstack serve`` in a child process: open (the test client may ask ``$status``),
    short heartbeats."""
    service = ServiceProcess(free_port(), tmp_path, service_env(heartbeat=1, heartbeat_timeout=3))
    await start(service, processes)
    return service


@pytest.fixture
async def tester(grid_service: ServiceProcess) -> AsyncIterator[Client]:
    """A connected, non-holding client of ``grid_service``."""
    client = Client(
        "tester", grid_service.url, backoff_max=0.2, connect_timeout=30, request_timeout=30
    )
    await client.connect()
    yield client
    await client.close()


# ------------------------------------------------------------------ helpers


async def grid_status(client: Client) -> dict[str, Any]:
    """The grid part of the service's snapshot, by the admin ``$status`` request."""
    report: StatusReport = await client.request("service", Status(), timeout=10)
    return report.snapshot["grid"]  # type: ignore[no-any-return]


def owned_by(grid: dict[str, Any]) -> dict[str, int]:
    return {holder["name"]: holder["owned"] for holder in grid["holders"]}


async def wait_for_grid(
    client: Client, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
) -> dict[str, Any]:
    """Poll ``$status`` until ``predicate(grid)`` holds; the grid snapshot that did."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        grid = await grid_status(client)
        if predicate(grid):
            return grid
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}; grid: {grid}")
        await asyncio.sleep(0.05)


def settled_on(*names: str) -> Callable[[dict[str, Any]], bool]:
    """The grid is spread over exactly these holders: they own every partition, each some,
    nothing is moving, and every partition has its backup (with two holders or more)."""

    def check(grid: dict[str, Any]) -> bool:
        owned = owned_by(grid)
        backups = sum(holder["backups"] for holder in grid["holders"])
        return (
            set(owned) == set(names)
            and all(owned.values())
            and sum(owned.values()) == DEFAULT_PARTITIONS
            and grid["service_owned"] == 0
            and grid["paused"] == 0
            and backups == (DEFAULT_PARTITIONS if len(names) > 1 else 0)
        )

    return check


async def read_all(numbers: Map[str, int], expected: dict[str, int], what: str) -> float:
    """get_all every key of ``expected`` in chunks; fails on any absent or wrong value.
    The seconds it took."""
    started = time.monotonic()
    keys = list(expected)
    missing: list[str] = []
    wrong: list[tuple[str, int, int]] = []
    for first in range(0, len(keys), READ_CHUNK):
        chunk = keys[first : first + READ_CHUNK]
        got = await asyncio.wait_for(numbers.get_all(chunk), 30)
        for key in chunk:
            if key not in got:
                missing.append(key)
            elif got[key] != expected[key]:
                wrong.append((key, got[key], expected[key]))
    assert not missing, f"{what}: {len(missing)} of {len(keys)} absent, e.g. {missing[:5]}"
    assert not wrong, f"{what}: {len(wrong)} wrong (key, got, expected), e.g. {wrong[:5]}"
    return time.monotonic() - started


class Writer:
    """``put()``s of new keys (``w<n>`` -> n) from ``tasks`` concurrent tasks until stopped;
    remembers the puts that returned and the ones that raised."""

    def __init__(self, numbers: Map[str, int], tasks: int = 4) -> None:
        self.numbers = numbers
        self.returned: dict[str, int] = {}
        self.raised: list[tuple[str, str]] = []
        self._next = 0
        self._stop = False
        self._tasks = [asyncio.create_task(self._write()) for _ in range(tasks)]

    async def _write(self) -> None:
        while not self._stop:
            n = self._next
            self._next += 1
            key = f"w{n}"
            try:
                await asyncio.wait_for(self.numbers.put(key, n), 10)
            except Exception as exc:
                self.raised.append((key, repr(exc)))
                await asyncio.sleep(0.01)
            else:
                self.returned[key] = n

    async def stop(self) -> None:
        self._stop = True
        await asyncio.wait_for(asyncio.gather(*self._tasks), 15)


class Reader:
    """Reads random keys of ``expected`` from ``tasks`` concurrent tasks until stopped:
    ``get()`` mostly, a ``get_all()`` of 64 keys every tenth time; counts reads and keeps
    every wrong value and every exception."""

    def __init__(self, numbers: Map[str, int], expected: dict[str, int], tasks: int = 4):
        self.numbers = numbers
        self.expected = expected
        self.keys = list(expected)
        self.reads = 0
        self.wrong: list[tuple[str, int | None, int]] = []
        self.errors: list[str] = []
        self._stop = False
        self._tasks = [asyncio.create_task(self._read(random.Random(i))) for i in range(tasks)]

    async def _read(self, rng: random.Random) -> None:
        expected = self.expected
        while not self._stop:
            try:
                if rng.random() < 0.1:
                    keys = rng.sample(self.keys, 64)
                    got = await asyncio.wait_for(self.numbers.get_all(keys), 10)
                    self.wrong.extend(
                        (k, got.get(k), expected[k]) for k in keys if got.get(k) != expected[k]
                    )
                    self.reads += len(keys)
                else:
                    key = rng.choice(self.keys)
                    value = await asyncio.wait_for(self.numbers.get(key), 10)
                    if value != expected[key]:
                        self.wrong.append((key, value, expected[key]))
                    self.reads += 1
            except Exception as exc:
                self.errors.append(repr(exc))
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop = True
        await asyncio.wait_for(asyncio.gather(*self._tasks), 15)

    def check(self) -> None:
        assert self.reads > 0
        assert not self.errors, f"{len(self.errors)} reads raised, e.g. {self.errors[:3]}"
        assert not self.wrong, f"{len(self.wrong)} wrong (key, got, expected): {self.wrong[:5]}"


def numbered(count: int) -> dict[str, int]:
    return {f"k{i}": i for i in range(count)}


async def put_all(numbers: Map[str, int], entries: dict[str, int]) -> float:
    started = time.monotonic()
    await asyncio.wait_for(numbers.put_all(entries), 30)
    return time.monotonic() - started


# -------------------------------------------------------------------- tests


async def test_every_entry_survives_kill9_of_two_holders_and_of_the_service(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    grid_service: ServiceProcess,
    tester: Client,
) -> None:
    """Three holder processes, 100,000 entries. kill -9 one holder (while puts go on):
    everything reads back at once, and every put that returned; kill -9 a second: the same;
    kill -9 the service and restart it on its data directory: the same, with the last
    holder back by itself."""
    service = grid_service
    started = time.monotonic()
    timings: dict[str, float] = {}
    names = ["holder-a", "holder-b", "holder-c"]
    holders = [await spawn_holder(tmp_path, service.url, processes, name) for name in names]
    a, b, c = holders
    numbers: Map[str, int] = tester.grid.map(MAP, int, str)
    expected = numbered(100_000)

    timings["put_all"] = await put_all(numbers, expected)
    grid = await wait_for_grid(tester, settled_on(*names), 30, "the three holders to own all")
    print("settled:", owned_by(grid))
    timings["read 3 holders"] = await read_all(numbers, expected, "three holders")

    writer = Writer(numbers)
    try:
        await wait_until(lambda: len(writer.returned) >= 200, 20, "200 puts before the kill")
        a.kill9()
        timings["read after kill a"] = await read_all(numbers, expected, f"{a.name} killed")
    finally:
        await writer.stop()
    # A put that raised may or may not have been applied: only the ones that returned count.
    print(f"writer: {len(writer.returned)} puts returned, {len(writer.raised)} raised")
    expected.update(writer.returned)
    await read_all(numbers, writer.returned, "puts that returned around the kill of a")
    grid = await grid_status(tester)
    print("after a:", owned_by(grid), "service", grid["service_owned"], "paused", grid["paused"])

    b.kill9()
    timings["read after kill b"] = await read_all(numbers, expected, f"{b.name} killed too")
    grid = await wait_for_grid(tester, settled_on(c.name), 30, f"{c.name} to own everything")

    service.kill9()
    await start(service, processes)
    await tester.wait_connected(30)
    timings["read after service restart"] = await read_all(
        numbers, expected, "after the service's kill -9 and restart"
    )
    await wait_for_grid(tester, settled_on(c.name), 30, f"{c.name} to come back and own all")
    timings["read with c back"] = await read_all(numbers, expected, f"{c.name} back")
    assert c.proc.poll() is None
    timings["total"] = time.monotonic() - started
    print({k: round(v, 2) for k, v in timings.items()})


async def test_partitions_move_from_the_service_to_a_holder_that_connects_under_reads(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    grid_service: ServiceProcess,
    tester: Client,
) -> None:
    """No holder: the service owns every partition. A holder process connects: every
    partition moves to it while readers read random keys (and a writer puts new ones) the
    whole time: no read raises or sees a wrong value, every put returns and reads back."""
    numbers: Map[str, int] = tester.grid.map(MAP, int, str)
    expected = numbered(100_000)
    await put_all(numbers, expected)
    grid = await grid_status(tester)
    assert grid["holders"] == [] and grid["service_owned"] == DEFAULT_PARTITIONS, grid

    reader = Reader(numbers, expected)
    writer = Writer(numbers, tasks=2)
    polls: list[tuple[int, int]] = []  # (reads so far, partitions the holder owns)
    try:
        await wait_until(lambda: reader.reads >= 500, 20, "reads from the service")
        holder = await spawn_holder(tmp_path, grid_service.url, processes, "holder-a")
        settled = settled_on(holder.name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not settled(grid := await grid_status(tester)):
            polls.append((reader.reads, owned_by(grid).get(holder.name, 0)))
            assert loop.time() < deadline, f"the holder did not take every partition: {grid}"
            await asyncio.sleep(0.02)
        after = reader.reads
        await wait_until(lambda: reader.reads >= after + 500, 20, "reads from the holder")
    finally:
        await asyncio.gather(writer.stop(), reader.stop())
    reader.check()
    assert writer.raised == [], f"{len(writer.raised)} puts raised: {writer.raised[:3]}"
    await read_all(numbers, writer.returned, "puts made during the migration")
    await read_all(numbers, expected, "after the migration")
    midway = [reads for reads, owned in polls if 0 < owned < DEFAULT_PARTITIONS]
    print(
        f"{reader.reads} reads, {len(writer.returned)} puts; {len(polls)} polls before the "
        f"holder owned all, {len(midway)} midway"
        + (f" ({midway[-1] - midway[0]} reads between them)" if midway else "")
    )
    assert holder.proc.poll() is None


async def test_graceful_holder_shutdown_hands_its_partitions_over_before_it_exits(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    grid_service: ServiceProcess,
    tester: Client,
) -> None:
    """Two holders; SIGTERM one (its close() leaves the grid first): its partitions move
    to the other before it exits, readers and a writer go on throughout without an error,
    a wrong value or a lost put."""
    a = await spawn_holder(tmp_path, grid_service.url, processes, "holder-a")
    b = await spawn_holder(tmp_path, grid_service.url, processes, "holder-b")
    numbers: Map[str, int] = tester.grid.map(MAP, int, str)
    expected = numbered(50_000)
    await put_all(numbers, expected)
    await wait_for_grid(tester, settled_on(a.name, b.name), 30, "both holders to own")

    seen: list[dict[str, Any]] = []
    reader = Reader(numbers, expected)
    writer = Writer(numbers, tasks=2)
    try:
        await wait_until(lambda: reader.reads >= 500, 20, "reads from both holders")
        a.proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 40
        while a.proc.poll() is None:
            seen.append(await grid_status(tester))
            assert loop.time() < deadline, f"{a.name} did not exit:\n{a.log()}"
            await asyncio.sleep(0.02)
        grid = await wait_for_grid(tester, settled_on(b.name), 10, f"{b.name} to own all")
        after = reader.reads
        await wait_until(lambda: reader.reads >= after + 500, 20, "reads after the shutdown")
    finally:
        await asyncio.gather(writer.stop(), reader.stop())
    reader.check()
    assert writer.raised == [], f"{len(writer.raised)} puts raised: {writer.raised[:3]}"
    await read_all(numbers, writer.returned, "puts made during the shutdown")
    assert a.proc.returncode == 0, a.log()
    assert f"{a.name}: closed" in a.log()
    assert "without handing over" not in a.log(), a.log()
    # Handed over while it was still there: nothing was left to promote when it went, and
    # the service never took a partition meanwhile.
    assert f"holder {a.name!r} left the grid: 0 partitions promoted" in grid_service.log(), (
        grid_service.log()
    )
    assert all(g["service_owned"] == 0 for g in seen), [g["service_owned"] for g in seen]
    leaving = [g for g in seen if any(h["leaving"] for h in g["holders"])]
    print(f"{len(seen)} snapshots while it shut down, {len(leaving)} with it leaving; {grid}")
    await read_all(numbers, expected, "after the graceful shutdown")


async def test_owner_and_backup_killed_together_are_rebuilt_from_the_journal(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    grid_service: ServiceProcess,
    tester: Client,
) -> None:
    """Three holders; two of them kill -9'd at once while puts go on: the partitions one
    of them owned and the other backed up have no copy left in memory and are rebuilt
    from the journal. Everything reads back, and every put that returned."""
    names = ["holder-a", "holder-b", "holder-c"]
    a, b, c = [await spawn_holder(tmp_path, grid_service.url, processes, n) for n in names]
    numbers: Map[str, int] = tester.grid.map(MAP, int, str)
    expected = numbered(100_000)
    await put_all(numbers, expected)
    await wait_for_grid(tester, settled_on(*names), 30, "the three holders to own all")

    writer = Writer(numbers)
    try:
        await wait_until(lambda: len(writer.returned) >= 200, 20, "200 puts before the kill")
        a.proc.send_signal(signal.SIGKILL)
        b.proc.send_signal(signal.SIGKILL)
        a.proc.wait(timeout=10)
        b.proc.wait(timeout=10)
        took = await read_all(numbers, expected, "owner and backup killed together")
        count = len(writer.returned)
        await wait_until(lambda: len(writer.returned) >= count + 200, 20, "puts after the kill")
    finally:
        await writer.stop()
    print(f"read in {took:.2f} s; {len(writer.returned)} puts returned, {writer.raised[:3]}")
    await read_all(numbers, writer.returned, "puts that returned around the kills")
    await wait_for_grid(tester, settled_on(c.name), 30, f"{c.name} to own everything")
    await read_all(numbers, expected, f"{c.name} alone")
    stats = (await tester.request("service", Status(), timeout=10)).snapshot["stats"]
    assert stats.get("grid_rebuilds", 0) > 0, stats  # the journal path was taken


# ------------------------------------------- kill -9 in the middle of a migration
# Hazelcast's "writes lost when a member crashes during migration": a member killed while
# partitions move to it or away from it, or the service killed meanwhile. Puts of new keys
# and increments of a few counters go on throughout; every put that returned reads back,
# every counter counts each increment that returned (and at most those that raised too).

COUNTERS = [f"c{i}" for i in range(4)]
MIGRATING_ENTRIES = 20_000
# Partitions the newcomer owns when the kill comes (of the ~135 it gets beside one other
# holder); 0: it is still being given its backups.
KILL_POINTS = (0, 1, 40, 80, 110)


class Incrementer:
    """``increment()``s of COUNTERS from ``tasks`` concurrent tasks until stopped; counts,
    per counter, the increments that returned and the ones that raised (applied or not)."""

    def __init__(self, numbers: Map[str, int], tasks: int = 4) -> None:
        self.numbers = numbers
        self.returned: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.raised: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.errors: list[str] = []
        self._stop = False
        self._tasks = [asyncio.create_task(self._increment(random.Random(i))) for i in range(tasks)]

    async def _increment(self, rng: random.Random) -> None:
        while not self._stop:
            key = rng.choice(COUNTERS)
            try:
                await asyncio.wait_for(self.numbers.increment(key), 10)
            except Exception as exc:
                self.raised[key] += 1
                self.errors.append(repr(exc))
                await asyncio.sleep(0.01)
            else:
                self.returned[key] += 1

    async def stop(self) -> None:
        self._stop = True
        await asyncio.wait_for(asyncio.gather(*self._tasks), 15)


async def check_counters(numbers: Map[str, int], incrementer: Incrementer, what: str) -> None:
    """Each counter is at least the increments that returned, at most those plus the ones
    that raised."""
    got = await asyncio.wait_for(numbers.get_all(COUNTERS), 30)
    wrong = [
        (key, got.get(key), incrementer.returned[key], incrementer.raised[key])
        for key in COUNTERS
        if not (
            incrementer.returned[key]
            <= got.get(key, 0)
            <= incrementer.returned[key] + incrementer.raised[key]
        )
    ]
    assert not wrong, f"{what}: counters off (key, value, returned, raised): {wrong}"


class Load:
    """A Writer and an Incrementer together."""

    def __init__(self, numbers: Map[str, int]) -> None:
        self.numbers = numbers
        # 12 + 12 tasks: enough operations in flight that some are at the holder killed
        # (with 3 + 3, a service made to drop those passed the first test below).
        self.writer = Writer(numbers, tasks=12)
        self.incrementer = Incrementer(numbers, tasks=12)

    def done(self) -> int:
        return len(self.writer.returned) + sum(self.incrementer.returned.values())

    async def goes_on(self, count: int, what: str) -> None:
        """Until ``count`` more operations returned."""
        start = self.done()
        await wait_until(lambda: self.done() >= start + count, 20, f"{count} writes {what}")

    async def stop(self) -> None:
        await asyncio.gather(self.writer.stop(), self.incrementer.stop())

    def summary(self) -> str:
        inc = self.incrementer
        return (
            f"{len(self.writer.returned)} puts returned, {len(self.writer.raised)} raised; "
            f"increments returned {inc.returned}, raised {inc.raised}"
        )


async def check_everything(
    numbers: Map[str, int], load: Load, expected: dict[str, int], what: str
) -> None:
    await read_all(numbers, load.writer.returned, f"{what}: puts that returned")
    await check_counters(numbers, load.incrementer, what)
    await read_all(numbers, expected, f"{what}: the original entries")


async def kill_midway(
    tester: Client, newcomer: str, at_least: int, kill: Callable[[], None]
) -> dict[str, Any] | None:
    """Poll ``$status`` until ``newcomer`` owns ``at_least`` partitions (and at most 200)
    while partitions are still moving, then ``kill()``: the last snapshot before it. None
    if the migration ended before that was seen (nothing is killed then)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    still = 0  # polls in a row with nothing moving (one may fall between two moves)
    while True:
        grid = await grid_status(tester)
        owned = owned_by(grid).get(newcomer, 0)
        if grid["paused"] and at_least <= owned <= 200:
            kill()
            return grid
        still = still + 1 if owned and not grid["paused"] else 0
        if still == 2:
            return None  # settled before: too fast to catch
        if loop.time() > deadline:
            pytest.fail(f"{newcomer} never owned {at_least}-200 partitions midway: {grid}")
        await asyncio.sleep(0.005)


async def takeover_killed(
    tmp_path: Path,
    service: ServiceProcess,
    tester: Client,
    processes: list[subprocess.Popen[bytes]],
    before: list[str],
    name: str,
    at_least: int,
    victim: Callable[[HolderProcess], Callable[[], None]],
) -> tuple[HolderProcess, dict[str, Any]]:
    """With the grid settled on the holders ``before``, start holder ``name`` and, while
    partitions move to it, call the kill that ``victim(newcomer)`` gives once it owns
    ``at_least`` of them. The migration may end before a poll sees it at that point: the
    newcomer is killed then, and the next one tries (four at most)."""
    for attempt in range(4):
        newcomer = await spawn_holder(tmp_path, service.url, processes, f"{name}-{attempt}")
        grid = await kill_midway(tester, newcomer.name, at_least, victim(newcomer))
        if grid is not None:
            return newcomer, grid
        print(f"{newcomer.name}: the migration ended before {at_least} were seen; again")
        newcomer.kill9()
        await wait_for_grid(tester, settled_on(*before), 30, f"{newcomer.name} gone")
    pytest.fail(f"four migrations ended before {name} was seen owning {at_least} partitions")


async def test_writes_survive_kill9_of_the_holder_partitions_are_migrating_to(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    grid_service: ServiceProcess,
    tester: Client,
) -> None:
    """One holder owns everything (20,000 entries); puts and increments go on throughout.
    A second holder starts and is kill -9'd while partitions move to it, five times, at
    different points of its takeover (KILL_POINTS): the first holder ends up owning all
    again, and no write that returned is lost."""
    started = time.monotonic()
    a = await spawn_holder(tmp_path, grid_service.url, processes, "holder-a")
    numbers: Map[str, int] = tester.grid.map(MAP, int, str)
    expected = numbered(MIGRATING_ENTRIES)
    await put_all(numbers, expected)
    await wait_for_grid(tester, settled_on(a.name), 30, f"{a.name} to own all")

    killed: list[tuple[str, int, int]] = []  # (newcomer, partitions owned, paused)
    load = Load(numbers)
    try:
        await load.goes_on(200, "before the first newcomer")
        for n, at_least in enumerate(KILL_POINTS):
            newcomer, grid = await takeover_killed(
                tmp_path,
                grid_service,
                tester,
                processes,
                [a.name],
                f"newcomer{n}",
                at_least,
                lambda holder: holder.kill9,
            )
            killed.append((newcomer.name, owned_by(grid)[newcomer.name], grid["paused"]))
            await wait_for_grid(tester, settled_on(a.name), 30, f"{a.name} to own all again")
            await load.goes_on(200, f"after the kill of {newcomer.name}")
    finally:
        await load.stop()
    print(f"killed midway (name, owned, paused): {killed}; {load.summary()}")
    await check_everything(numbers, load, expected, "newcomers killed midway")
    assert a.proc.poll() is None
    print(f"{time.monotonic() - started:.1f} s")


async def test_writes_survive_kill9_of_the_holder_partitions_are_migrating_from(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    grid_service: ServiceProcess,
    tester: Client,
) -> None:
    """One holder owns everything (20,000 entries); puts and increments go on throughout.
    A second holder starts, and the first is kill -9'd while partitions move away from
    it: the second ends up owning all, and no write that returned is lost. Five times,
    the survivor the old owner of the next, killed at different points (KILL_POINTS)."""
    started = time.monotonic()
    old = await spawn_holder(tmp_path, grid_service.url, processes, "holder-a")
    numbers: Map[str, int] = tester.grid.map(MAP, int, str)
    expected = numbered(MIGRATING_ENTRIES)
    await put_all(numbers, expected)
    await wait_for_grid(tester, settled_on(old.name), 30, f"{old.name} to own all")

    killed: list[tuple[str, int, int]] = []  # (old owner, partitions the newcomer owned, paused)
    load = Load(numbers)
    try:
        await load.goes_on(200, "before the first newcomer")
        for n, at_least in enumerate(KILL_POINTS):
            newcomer, grid = await takeover_killed(
                tmp_path,
                grid_service,
                tester,
                processes,
                [old.name],
                f"newcomer{n}",
                at_least,
                lambda _, victim=old: victim.kill9,
            )
            killed.append((old.name, owned_by(grid)[newcomer.name], grid["paused"]))
            await wait_for_grid(tester, settled_on(newcomer.name), 30, f"{newcomer.name} alone")
            await load.goes_on(200, f"after the kill of {old.name}")
            old = newcomer
    finally:
        await load.stop()
    print(f"killed midway (name, newcomer owned, paused): {killed}; {load.summary()}")
    await check_everything(numbers, load, expected, "old owners killed midway")
    assert old.proc.poll() is None
    stats = (await tester.request("service", Status(), timeout=10)).snapshot["stats"]
    print({k: v for k, v in stats.items() if k.startswith("grid_")})
    print(f"{time.monotonic() - started:.1f} s")


async def test_writes_survive_kill9_of_the_service_mid_migration(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    grid_service: ServiceProcess,
    tester: Client,
) -> None:
    """One holder owns everything (20,000 entries); puts and increments go on throughout.
    A second holder starts and the service is kill -9'd while partitions move to it, then
    restarted on its data directory: the holders come back by themselves, the grid
    settles on them, and no write that returned is lost. Four times, a holder more each
    time, killed at different points (the newcomer still taking its backups, then owning
    1, 40, 35 partitions: of 135, 90, 67, 54)."""
    service = grid_service
    started = time.monotonic()
    holders = [await spawn_holder(tmp_path, service.url, processes, "holder-a")]
    numbers: Map[str, int] = tester.grid.map(MAP, int, str)
    expected = numbered(MIGRATING_ENTRIES)
    await put_all(numbers, expected)
    await wait_for_grid(tester, settled_on("holder-a"), 30, "holder-a to own all")

    killed: list[tuple[str, int, int]] = []  # (newcomer, partitions owned, paused)
    load = Load(numbers)
    try:
        await load.goes_on(200, "before the first newcomer")
        for n, at_least in enumerate((0, 1, 40, 35)):
            names = [h.name for h in holders]
            newcomer, grid = await takeover_killed(
                tmp_path,
                service,
                tester,
                processes,
                names,
                f"newcomer{n}",
                at_least,
                lambda _: service.kill9,
            )
            killed.append((newcomer.name, owned_by(grid)[newcomer.name], grid["paused"]))
            holders.append(newcomer)
            await start(service, processes)
            await tester.wait_connected(30)
            names = [h.name for h in holders]
            await wait_for_grid(tester, settled_on(*names), 30, f"{names} back, owning all")
            await load.goes_on(200, f"after restart {n + 1}")
    finally:
        await load.stop()
    print(f"service killed midway (newcomer, owned, paused): {killed}; {load.summary()}")
    print("errors:", sorted(set(load.incrementer.errors))[:5], load.writer.raised[:3])
    await check_everything(numbers, load, expected, "the service killed midway")
    assert all(h.proc.poll() is None for h in holders)
    print(f"{time.monotonic() - started:.1f} s")
