"""The write-behind flush scenario (``python3 -m bench --only flush``): PacketStack's
``service.flush()`` of N dirty entries against the same rows written by hand with the raw
driver, per database; and request/reply latency while the flush runs.

Per database (PostgreSQL and MariaDB, on 127.0.0.1 and not started by the suite), one
table of the bridge's layout (``bench_flush``: a key column and one column per field of
:class:`Row`), dropped and created anew for every measurement, and the same N rows:

- ``packetstack``: a :class:`packetstack.Service` in the bench process with the database as
  a bridge and the map ``bench_flush`` on it (``mode = "typed"``); the N entries are put
  (``put_all`` in batches of 10,000) and the journal has folded them (every one dirty)
  before the clock starts; the time is that of ``await service.flush()``. With the
  default ``flush_worker_at`` the flush runs in the service's flush worker process
  (started by this flush); its CPU time is counted with the bench process's.
- ``asyncpg-executemany``: ``INSERT ... ON CONFLICT (key) DO UPDATE`` (the bridge's upsert)
  with ``conn.executemany``, 1,000 rows per transaction (the bridge's batch).
- ``asyncpg-copy``: one ``conn.copy_records_to_table`` of all N rows into the empty table
  (no upsert: only possible because the table is empty).
- ``asyncmy-executemany``: ``INSERT ... ON DUPLICATE KEY UPDATE`` with
  ``cursor.executemany`` (which asyncmy sends as one multi-row INSERT), 1,000 rows per
  commit.

The rows of the baselines are built in memory beforehand; only the writing is timed, on a
connection opened beforehand. Rates are rows per second; "vs baseline" is PacketStack's
rate over the baseline's (> 1: faster than it), the same as the baseline's seconds over
PacketStack's.

Latency: a probe process (``bench/flush_probe.py``: a requester and a responder connected to
the service) does one request/reply round trip per millisecond throughout; the round trips
sent in the idle seconds before the flush and those sent while it ran give the two p50s.

``python3 -m bench.flush_profile`` flushes N entries from a service instrumented from
outside and then under cProfile, and says where the time goes (bench/flush_profile.py).
"""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec

from .common import fmt, latency_summary, median, perf_counter, run_loop, spawn_logged
from .flush_probe import read_samples

DESCRIPTION = (
    "write-behind: service.flush() of N dirty entries (str key -> Row(name, score, active)) to "
    "PostgreSQL and MariaDB, against raw asyncpg / asyncmy writing the same rows; request/reply "
    "p50 during the flush against idle"
)
MAP = "bench_flush"
TABLE = "bench_flush"
PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
MARIADB_URL = "mysql+asyncmy://root@127.0.0.1:3306/test"
DATABASES = ("postgresql", "mariadb")
# Per database: the systems measured; BASELINE: the one the target ratio is against.
SYSTEMS: dict[str, tuple[str, ...]] = {
    "postgresql": ("packetstack", "asyncpg-executemany", "asyncpg-copy"),
    "mariadb": ("packetstack", "asyncmy-executemany"),
}
BASELINE = {"postgresql": "asyncpg-executemany", "mariadb": "asyncmy-executemany"}
COPY = "asyncpg-copy"
SYSTEM_TEXT = {
    "packetstack": "await service.flush() of the dirty map (bridge batch 1,000)",
    "asyncpg-executemany": "conn.executemany(INSERT ... ON CONFLICT (key) DO UPDATE), "
    "1,000 rows per transaction",
    "asyncpg-copy": "conn.copy_records_to_table of all rows into the empty table",
    "asyncmy-executemany": "cursor.executemany(INSERT ... ON DUPLICATE KEY UPDATE), "
    "1,000 rows per commit",
}
MEDIAN_KEYS = (
    "rate",
    "elapsed",
    "cpu_s",
    "cpu_us_per_row",
    "loop_cpu_s",
    "store_cpu_s",
    "worker_cpu_s",
    "fill_s",
    "idle_p50_us",
    "idle_p99_us",
    "flush_p50_us",
    "flush_p99_us",
    "flush_max_us",
    "idle_samples",
    "flush_samples",
    "p50_ratio",
)
# (name, database, measure, op, threshold, text): what the issue asks of PacketStack.
TARGETS: list[tuple[str, str, str, str, float, str]] = [
    (
        "flush_pg_vs_asyncpg",
        "postgresql",
        "rate",
        ">=",
        0.7,
        "flush to PostgreSQL >= 0.7x raw asyncpg executemany upsert (1,000 rows/transaction)",
    ),
    (
        "flush_mariadb_vs_asyncmy",
        "mariadb",
        "rate",
        ">=",
        0.7,
        "flush to MariaDB >= 0.7x raw asyncmy executemany upsert (1,000 rows/commit)",
    ),
    (
        "flush_pg_p50",
        "postgresql",
        "p50_ratio",
        "<=",
        2.0,
        "request/reply p50 during the PostgreSQL flush <= 2x idle",
    ),
    (
        "flush_mariadb_p50",
        "mariadb",
        "p50_ratio",
        "<=",
        2.0,
        "request/reply p50 during the MariaDB flush <= 2x idle",
    ),
]
PROBE_READY_TIMEOUT = 30.0


class Row(msgspec.Struct):
    """A small entry: three columns in the typed table."""

    name: str
    score: int
    active: bool


COLUMNS = ("key", "name", "score", "active")
Record = tuple[str, str, int, bool]


@dataclass(frozen=True)
class FlushPlan:
    rows: int = 1_000_000  # entries flushed (and rows written by each baseline)
    put_batch: int = 10_000  # entries per put_all filling the grid (not timed)
    write_batch: int = 1_000  # rows per transaction in the executemany baselines
    idle: float = 3.0  # seconds of probe round trips before the flush (the idle p50)
    interval: float = 0.001  # seconds between the probe's round trips

    @classmethod
    def quick(cls, rows: int | None = None) -> FlushPlan:
        return cls(rows=2_000 if rows is None else rows, idle=0.5)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def records(count: int, first: int = 0, stop: int | None = None) -> list[Record]:
    """Rows ``first`` to ``stop`` of the N rows every system writes: (key, name, score,
    active), keys in key order. Built anew each time: a measurement keeps no list of a
    million rows that every garbage collection of the process would have to go through."""
    width = max(7, len(str(count - 1)))
    return [
        (f"k{i:0{width}d}", f"name-{i}", i * 7919 % 1_000_003, i % 3 == 0)
        for i in range(first, count if stop is None else stop)
    ]


# ------------------------------------------------------------------------ databases


def _parts(url: str) -> dict[str, Any]:
    import sqlalchemy as sa

    parsed = sa.make_url(url)
    return {
        "host": parsed.host or "127.0.0.1",
        "port": parsed.port,
        "user": parsed.username,
        "password": parsed.password,
        "database": parsed.database,
    }


def shown_url(url: str) -> str:
    import sqlalchemy as sa

    return str(sa.make_url(url).render_as_string(hide_password=True))


async def _pg_connect(url: str) -> Any:
    import asyncpg

    p = _parts(url)
    return await asyncpg.connect(
        host=p["host"],
        port=p["port"] or 5432,
        user=p["user"],
        password=p["password"],
        database=p["database"],
        timeout=10,
    )


async def _my_connect(url: str) -> Any:
    import asyncmy

    p = _parts(url)
    return await asyncmy.connect(
        host=p["host"],
        port=p["port"] or 3306,
        user=p["user"] or "root",
        password=p["password"] or "",
        db=p["database"],
        connect_timeout=10,
    )


async def _execute(database: str, url: str, sql: str) -> Any:
    """One statement on a connection of its own; the first column of the first row."""
    if database == "postgresql":
        conn = await _pg_connect(url)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()
    conn = await _my_connect(url)
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(sql)
            row = await cursor.fetchone()
            await conn.commit()
            return row[0] if row else None
    finally:
        conn.close()


async def server_version(database: str, url: str) -> str:
    if database == "postgresql":
        text = await _execute(database, url, "SHOW server_version")
        return f"PostgreSQL {str(text).split()[0]}"
    return f"MariaDB {await _execute(database, url, 'SELECT VERSION()')}"


async def drop_table(database: str, url: str) -> None:
    if database == "postgresql":
        await _execute(database, url, f"DROP TABLE IF EXISTS {TABLE}")
        return
    # MariaDB warns of DROP TABLE IF EXISTS on a missing table: look first.
    if await table_exists(database, url):
        await _execute(database, url, f"DROP TABLE `{TABLE}`")


async def table_exists(database: str, url: str) -> bool:
    """Whether the scenario's table is there (every measurement drops it at the end)."""
    if database == "postgresql":
        return bool(await _execute(database, url, f"SELECT to_regclass('{TABLE}') IS NOT NULL"))
    return bool(await _execute(database, url, f"SHOW TABLES LIKE '{TABLE}'"))


async def count_rows(database: str, url: str) -> int:
    quote = '"' if database == "postgresql" else "`"
    return int(await _execute(database, url, f"SELECT count(*) FROM {quote}{TABLE}{quote}"))


def map_bridge(database: str) -> Any:
    from packetstack.storage import MapBridge

    return MapBridge(bridge=database, mode="typed", type=Row, table=TABLE)


async def create_table(database: str, url: str) -> None:
    """The table as the bridge creates it (its open() does), empty."""
    from packetstack.storage import BridgeSettings, make_store, resolve

    store = make_store(database, BridgeSettings(url=url))
    try:
        await store.open([resolve(MAP, map_bridge(database))])
    finally:
        await store.close()


def bridge_batch() -> int:
    from packetstack.storage import BridgeSettings

    return int(BridgeSettings(url="").batch)


# ------------------------------------------------------------------- CPU accounting


def thread_cpu(native_id: int | None) -> float | None:
    """CPU seconds of one thread of this process (schedstat), None if unknown."""
    if native_id is None:
        return None
    try:
        with open(f"/proc/self/task/{native_id}/schedstat", encoding="ascii") as stat:
            return int(stat.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def cpu_delta(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def store_thread_id(service: Any) -> int | None:
    """The native id of the journal store's thread (the SQLite reads and commits)."""
    thread = getattr(service.grid.bridges.journal.store, "_thread", None)
    return getattr(thread, "native_id", None)


def _timed(count: int, elapsed: float, cpu: float) -> dict[str, Any]:
    return {
        "rate": count / elapsed if elapsed > 0 else 0.0,
        "count": count,
        "elapsed": elapsed,
        "cpu_s": cpu,
        "cpu_us_per_row": cpu / count * 1e6 if count else None,
    }


# --------------------------------------------------------------------- baselines


def _upsert_pg() -> str:
    names = ", ".join(f'"{c}"' for c in COLUMNS)
    sets = ", ".join(f"{c} = EXCLUDED.{c}" for c in COLUMNS[1:])
    return (
        f'INSERT INTO "{TABLE}" ({names}) VALUES ($1, $2, $3, $4) '
        f'ON CONFLICT ("key") DO UPDATE SET {sets}'
    )


def _upsert_my() -> str:
    names = ", ".join(f"`{c}`" for c in COLUMNS)
    sets = ", ".join(f"`{c}` = VALUES(`{c}`)" for c in COLUMNS[1:])
    return f"INSERT INTO `{TABLE}` ({names}) VALUES (%s, %s, %s, %s) ON DUPLICATE KEY UPDATE {sets}"


async def asyncpg_executemany(url: str, plan: FlushPlan, rows: list[Record]) -> dict[str, Any]:
    conn = await _pg_connect(url)
    sql = _upsert_pg()
    batch = plan.write_batch
    try:
        cpu, start = time.process_time(), perf_counter()
        for first in range(0, len(rows), batch):
            async with conn.transaction():
                await conn.executemany(sql, rows[first : first + batch])
        elapsed = perf_counter() - start
        return _timed(len(rows), elapsed, time.process_time() - cpu)
    finally:
        await conn.close()


async def asyncpg_copy(url: str, plan: FlushPlan, rows: list[Record]) -> dict[str, Any]:
    conn = await _pg_connect(url)
    try:
        cpu, start = time.process_time(), perf_counter()
        await conn.copy_records_to_table(TABLE, records=rows, columns=list(COLUMNS))
        elapsed = perf_counter() - start
        return _timed(len(rows), elapsed, time.process_time() - cpu)
    finally:
        await conn.close()


async def asyncmy_executemany(url: str, plan: FlushPlan, rows: list[Record]) -> dict[str, Any]:
    conn = await _my_connect(url)
    sql = _upsert_my()
    batch = plan.write_batch
    try:
        async with conn.cursor() as cursor:
            cpu, start = time.process_time(), perf_counter()
            for first in range(0, len(rows), batch):
                await cursor.executemany(sql, rows[first : first + batch])
                await conn.commit()
            elapsed = perf_counter() - start
        return _timed(len(rows), elapsed, time.process_time() - cpu)
    finally:
        conn.close()


# ------------------------------------------------------------------- PacketStack


def make_service(database: str, url: str, data_dir: Path, **config: Any) -> Any:
    from packetstack import Service
    from packetstack.storage import BridgeSettings

    return Service(
        "127.0.0.1",
        0,
        data_dir=data_dir,
        bridges={database: BridgeSettings(url=url)},
        maps={MAP: map_bridge(database)},
        **config,
    )


def worker_cpu(service: Any) -> float | None:
    """CPU seconds of the service's flush worker process so far (None without one)."""
    worker = service.grid.bridges.write_behind.worker
    pid = None if worker is None else worker.pid
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, ValueError, IndexError):
        return None


async def fill(service: Any, count: int, batch: int) -> None:
    """Put the N rows in the service's map, ``batch`` at a time, then wait for the journal
    to fold them: every entry is dirty and nothing is left to fold when the flush starts."""
    grid_map = service.grid.map(MAP, Row, str)
    for first in range(0, count, batch):
        part = records(count, first, min(count, first + batch))
        await grid_map.put_all({k: Row(n, s, a) for k, n, s, a in part})
    dirty, _ = (await service.grid.bridges.journal.dirty_counts()).get(MAP, (0, 0))
    if dirty != count:
        raise RuntimeError(f"{dirty} dirty entries after putting {count}")
    gc.collect()  # what the fill left behind is not collected during the flush


class Probe:
    """The latency probe's process (bench/flush_probe.py)."""

    def __init__(self, url: str, workdir: Path, interval: float) -> None:
        tag = secrets.token_hex(4)
        self.ready = workdir / f"probe-{tag}.ready"
        self.out = workdir / f"probe-{tag}.samples"
        self.log = workdir / f"probe-{tag}.log"
        argv = [sys.executable, "-m", "bench.flush_probe", "--url", url]
        argv += ["--ready", str(self.ready), "--out", str(self.out), "--interval", str(interval)]
        self.process = spawn_logged(argv, self.log)

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    async def wait_ready(self, timeout: float) -> None:
        """Poll (the service runs on this loop: blocking here would stall the probe)."""
        deadline = perf_counter() + timeout
        while not self.ready.exists():
            if self.process.poll() is not None or perf_counter() > deadline:
                raise RuntimeError(f"the latency probe did not start:\n{self._tail()}")
            await asyncio.sleep(0.02)

    async def stop(self, timeout: float = 20.0) -> list[tuple[float, float]]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = perf_counter() + timeout
        while self.process.poll() is None:
            if perf_counter() > deadline:
                self.kill()
                raise RuntimeError(f"the latency probe did not stop:\n{self._tail()}")
            await asyncio.sleep(0.01)
        if self.process.returncode != 0 or not self.out.exists():
            raise RuntimeError(
                f"the latency probe exited with {self.process.returncode}:\n{self._tail()}"
            )
        return read_samples(self.out)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)


def window(samples: Sequence[tuple[float, float]], start: float, end: float) -> dict[str, Any]:
    """Latency figures of the round trips sent between ``start`` and ``end``."""
    trips = [rtt for sent, rtt in samples if start <= sent <= end]
    good = [rtt for rtt in trips if rtt >= 0]
    return {**latency_summary(good), "count": len(good), "failed": len(trips) - len(good)}


async def packetstack_flush(
    database: str, url: str, plan: FlushPlan, workdir: Path
) -> dict[str, Any]:
    data_dir = workdir / f"flush-{database}-{secrets.token_hex(4)}"
    service = make_service(database, url, data_dir)
    await service.start()
    probe: Probe | None = None
    try:
        probe = Probe(service.url, workdir, plan.interval)
        began = perf_counter()
        await fill(service, plan.rows, plan.put_batch)
        fill_s = perf_counter() - began
        await probe.wait_ready(PROBE_READY_TIMEOUT)
        idle_from = perf_counter()
        await asyncio.sleep(plan.idle)
        idle_to = perf_counter()
        loop_tid, store_tid = threading.get_native_id(), store_thread_id(service)
        loop_cpu, store_cpu = thread_cpu(loop_tid), thread_cpu(store_tid)
        cpu, start = time.process_time(), perf_counter()
        report = await service.flush()
        end = perf_counter()
        cpu = time.process_time() - cpu
        worker_cpu_s = worker_cpu(service)  # the worker starts with this flush
        cpu += worker_cpu_s or 0.0
        loop_cpu = cpu_delta(thread_cpu(loop_tid), loop_cpu)
        store_cpu = cpu_delta(thread_cpu(store_tid), store_cpu)
        samples = await probe.stop()
        probe = None
    finally:
        if probe is not None:
            probe.kill()
        await service.close()
        shutil.rmtree(data_dir, ignore_errors=True)
    if not report.ok or report.written != plan.rows:
        raise RuntimeError(f"the flush wrote {report.written} of {plan.rows}: {report}")
    idle, during = window(samples, idle_from, idle_to), window(samples, start, end)
    result = _timed(report.written, end - start, cpu)
    result.update(
        loop_cpu_s=loop_cpu,
        store_cpu_s=store_cpu,
        worker_cpu_s=worker_cpu_s,
        fill_s=fill_s,
        idle_p50_us=idle["p50_us"],
        idle_p99_us=idle["p99_us"],
        idle_samples=idle["count"],
        flush_p50_us=during["p50_us"],
        flush_p99_us=during["p99_us"],
        flush_max_us=during["max_us"],
        flush_samples=during["count"],
        probe_failures=idle["failed"] + during["failed"],
        p50_ratio=(
            during["p50_us"] / idle["p50_us"] if during["p50_us"] and idle["p50_us"] else None
        ),
    )
    return result


# -------------------------------------------------------------------- measuring

Driver = Callable[[str, FlushPlan, list[Record]], Coroutine[Any, Any, dict[str, Any]]]
BASELINES: dict[str, Driver] = {
    "asyncpg-executemany": asyncpg_executemany,
    "asyncpg-copy": asyncpg_copy,
    "asyncmy-executemany": asyncmy_executemany,
}


async def measure_one(
    database: str, system: str, url: str, plan: FlushPlan, workdir: Path
) -> dict[str, Any]:
    """One measurement: a fresh table, the N rows written, counted, the table dropped."""
    await drop_table(database, url)
    try:
        if system == "packetstack":
            result = await packetstack_flush(database, url, plan, workdir)
        else:
            await create_table(database, url)
            rows = records(plan.rows)
            gc.collect()
            result = await BASELINES[system](url, plan, rows)
            del rows
        stored = await count_rows(database, url)
        if stored != plan.rows:
            raise RuntimeError(f"{stored} rows in {TABLE} after writing {plan.rows}")
        return result
    finally:
        await drop_table(database, url)


def measure(database: str, system: str, url: str, plan: FlushPlan, workdir: Path) -> dict[str, Any]:
    """:func:`measure_one` on a fresh event loop, bounded in time; an error is a result."""
    limit = 120 + plan.rows / 1_000  # a flush at 1,000 rows/s would be far off any target

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(measure_one(database, system, url, plan, workdir), limit)

    started, load = perf_counter(), os.getloadavg()[0]
    try:
        result = run_loop(bounded())
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "rate": None}
    result["wall_s"] = perf_counter() - started
    result["loadavg_1m"] = [load, os.getloadavg()[0]]  # at the start and the end
    return result


def machine(urls: dict[str, str]) -> dict[str, Any]:
    """Server versions (or why one is not usable) and the drivers' versions."""
    from importlib import metadata

    info: dict[str, Any] = {}
    for dist in ("asyncpg", "asyncmy", "sqlalchemy"):
        try:
            info[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info[dist] = None
    for database, url in urls.items():
        try:
            info[f"{database}_server"] = run_loop(server_version(database, url))
        except Exception as exc:
            info[f"{database}_server"] = None
            info[f"{database}_unavailable"] = f"{type(exc).__name__}: {exc}"
    return info


Runs = dict[str, dict[str, list[dict[str, Any]]]]  # database -> system -> results


def run_once(
    index: int,
    urls: dict[str, str],
    plan: FlushPlan,
    workdir: Path,
    runs: Runs,
    unavailable: dict[str, str],
    log: Callable[[str], None],
) -> None:
    """Measure every system of every database once (systems rotated from run to run)."""
    for database, url in urls.items():
        systems = list(SYSTEMS[database])
        turn = index % len(systems)
        for system in systems[turn:] + systems[:turn]:
            if database in unavailable:
                result = {"error": unavailable[database], "rate": None}
            else:
                result = measure(database, system, url, plan, workdir)
            result["run"] = index + 1
            runs.setdefault(database, {}).setdefault(system, []).append(result)
            log(progress(index + 1, database, system, result))


def progress(index: int, database: str, system: str, result: dict[str, Any]) -> str:
    head = f"run {index} flush {database:<10} {system:<20}"
    if result.get("error"):
        return f"{head} ERROR {result['error']}"
    text = f"{head} {result['rate']:>10,.0f} rows/s  {result['elapsed']:6.2f} s"
    if result.get("p50_ratio") is not None:
        text += (
            f"  p50 idle {result['idle_p50_us']:.0f} µs, during {result['flush_p50_us']:.0f} µs"
            f" ({result['p50_ratio']:.2f}x)"
        )
    return text


# ------------------------------------------------------------------------ reporting


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def section(plan: FlushPlan, urls: dict[str, str], runs: Runs) -> dict[str, Any]:
    """The flush part of the report: every run, the medians, the ratios and the table."""
    databases: dict[str, Any] = {}
    table: list[dict[str, Any]] = []
    for database, by_system in runs.items():
        medians = {
            system: {
                key: median(
                    [r[key] for r in results if not r.get("error") and r.get(key) is not None]
                )
                for key in MEDIAN_KEYS
            }
            for system, results in by_system.items()
        }
        base = medians.get(BASELINE[database], {}).get("rate")
        copy = medians.get(COPY, {}).get("rate")
        systems = {}
        for system, results in by_system.items():
            med = medians[system]
            entry = {
                "runs": results,
                "errors": sum(1 for r in results if r.get("error")),
                "median": med,
                "ratio_vs_baseline": _ratio(med["rate"], base),
                "ratio_vs_copy": _ratio(med["rate"], copy) if database == "postgresql" else None,
            }
            systems[system] = entry
            table.append(
                {
                    "database": database,
                    "system": system,
                    **{k: med[k] for k in MEDIAN_KEYS},
                    "ratio_vs_baseline": entry["ratio_vs_baseline"],
                    "ratio_vs_copy": entry["ratio_vs_copy"],
                }
            )
        databases[database] = {
            "url": shown_url(urls[database]),
            "baseline": BASELINE[database],
            "systems": systems,
        }
    return {
        "description": DESCRIPTION,
        "plan": plan.as_dict(),
        "bridge_batch": bridge_batch(),
        "table_name": TABLE,
        "systems": SYSTEM_TEXT,
        "databases": databases,
        "table": table,
    }


def targets(flush: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, in the suite's form (met None: not measured)."""
    out = []
    for name, database, key, op, threshold, text in TARGETS:
        ours = flush["databases"].get(database, {}).get("systems", {}).get("packetstack")
        value = None
        if ours is not None:
            value = ours["ratio_vs_baseline"] if key == "rate" else ours["median"][key]
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out.append(
            {
                "name": name,
                "description": text,
                "scenario": "flush",
                "measure": key,
                "against": BASELINE[database] if key == "rate" else "idle",
                "op": op,
                "threshold": threshold,
                "value": value,
                "met": met,
            }
        )
    return out


def errors(flush: dict[str, Any]) -> list[str]:
    return [
        f"flush / {database} / {system}: {r['error']}"
        for database, entry in flush["databases"].items()
        for system, data in entry["systems"].items()
        for r in data["runs"]
        if r.get("error")
    ]


def _rate_cells(row: dict[str, Any]) -> tuple[str, ...]:
    return (
        row["database"],
        row["system"],
        fmt(row["rate"], ",.0f"),
        fmt(row["elapsed"], ".2f"),
        fmt(row["cpu_us_per_row"], ".1f"),
        fmt(row["ratio_vs_baseline"], ".2f", "x"),
        fmt(row["ratio_vs_copy"], ".2f", "x"),
    )


RATE_HEAD = (
    "database",
    "system",
    "rate (rows/s)",
    "seconds",
    "CPU µs/row",
    "vs baseline",
    "vs COPY",
)
LATENCY_HEAD = (
    "database",
    "system",
    "p50 idle µs",
    "p50 flush µs",
    "p99 idle µs",
    "p99 flush µs",
    "max flush µs",
    "trips idle/flush",
    "p50 flush/idle",
)


def _latency_cells(row: dict[str, Any]) -> tuple[str, ...]:
    return (
        row["database"],
        row["system"],
        fmt(row["idle_p50_us"], ",.1f"),
        fmt(row["flush_p50_us"], ",.1f"),
        fmt(row["idle_p99_us"], ",.1f"),
        fmt(row["flush_p99_us"], ",.1f"),
        fmt(row["flush_max_us"], ",.0f"),
        f"{fmt(row['idle_samples'], ',.0f')}/{fmt(row['flush_samples'], ',.0f')}",
        fmt(row["p50_ratio"], ".2f", "x"),
    )


def _aligned(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return [line(head), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def format_table(flush: dict[str, Any]) -> str:
    """The flush tables as the suite prints them."""
    plan = flush["plan"]
    rows = flush["table"]
    ours = [r for r in rows if r["system"] == "packetstack"]
    lines = [
        f"Flush to databases (write-behind): {plan['rows']:,} rows of Row(name, score, active); "
        "rate = rows written per second, the writing alone; vs baseline = rate / the rate of "
        "asyncpg-executemany (PostgreSQL) or asyncmy-executemany (MariaDB), > 1 = faster; "
        "vs COPY = rate / asyncpg-copy's",
        *_aligned(RATE_HEAD, [_rate_cells(r) for r in rows]),
    ]
    if ours:
        lines += [
            "",
            f"Request/reply round trips during the flush (one every "
            f"{plan['interval'] * 1e3:g} ms; idle = the {plan['idle']:g} s before it; "
            "p50 flush/idle: median of the runs' ratios):",
            *_aligned(LATENCY_HEAD, [_latency_cells(r) for r in ours]),
        ]
    return "\n".join(lines)


def markdown(flush: dict[str, Any]) -> str:
    """The flush tables in Markdown (bench/RESULTS.md)."""
    lines = [
        "| database | system | rate (rows/s) | seconds | CPU µs/row | vs baseline | vs COPY |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += ["| " + " | ".join(_rate_cells(r)) + " |" for r in flush["table"]]
    ours = [r for r in flush["table"] if r["system"] == "packetstack"]
    if ours:
        lines += [
            "",
            "| " + " | ".join(LATENCY_HEAD) + " |",
            "| --- | --- |" + " ---: |" * (len(LATENCY_HEAD) - 2),
        ]
        lines += ["| " + " | ".join(_latency_cells(r)) + " |" for r in ours]
    lines += ["", "| database | system | rates of the runs (rows/s) |", "| --- | --- | --- |"]
    for database, entry in flush["databases"].items():
        for system, data in entry["systems"].items():
            rates = ", ".join(fmt(r.get("rate"), ",.0f") for r in data["runs"])
            lines.append(f"| {database} | {system} | {rates} |")
    return "\n".join(lines)
