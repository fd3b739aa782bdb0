"""Where a PacketStack flush spends its time: ``python3 -m bench.flush_profile [--rows N]
[--db postgresql|mariadb] [--out PATH] [--top N]``.

Fills a service (in this process, as the flush scenario does: bench/flush.py) with N
entries of a bridged map and flushes them twice, each time into a fresh table:

1. instrumented from outside, not profiled: the flush's wall time; the wall time and the
   event-loop thread's CPU time spent in the bridge's ``write`` calls (row building,
   SQLAlchemy, the driver, the database's answer), in the journal's page reads and in its
   cleaning commits; the journal store thread's CPU time per kind of read and in all;
2. under cProfile with a CPU-time timer (``time.thread_time``: the event-loop thread's CPU,
   not the time it waits; SQLAlchemy's greenlet switches make a wall-clock profile count
   the database's answer as its callers' own time), its own time summed by category.

The profile is saved (``--out``) for ``python3 -m pstats`` or snakeviz.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import perf_counter, run_loop
from .flush import (
    DATABASES,
    MARIADB_URL,
    PG_URL,
    FlushPlan,
    cpu_delta,
    create_table,
    drop_table,
    fill,
    fmt,
    make_service,
    store_thread_id,
    thread_cpu,
)

MSGPACK = "msgpack decode (msgspec Decoder.decode of keys and values)"
CATEGORIES = (
    # (test of "path function", category): the first that matches
    (lambda t: "msgspec" in t and "decode" in t, MSGPACK),
    (lambda t: "packetstack/storage/sql.py" in t, "row building (sql.py: _Table.row, to_db)"),
    (lambda t: "packetstack/storage/bridge.py" in t, "EntryCodec.key/value (bridge.py)"),
    (
        lambda t: "packetstack/grid/" in t or "packetstack/service/" in t,
        "write-behind bookkeeping (writebehind.py, journal.py: batches, cleaning lists)",
    ),
    (
        lambda t: "sqlalchemy/sql/" in t and "compile" in t.rsplit(" ", 1)[-1].lower(),
        "SQLAlchemy statement compilation (cached after the first batch)",
    ),
    (
        lambda t: (
            "sqlalchemy/sql/" in t
            or ("sqlalchemy/engine/default.py" in t and ("_init_compiled" in t or "listcomp" in t))
        ),
        "SQLAlchemy per-row parameters (construct_params, bind processors, dict -> tuple)",
    ),
    (
        lambda t: "asyncpg" in t or "asyncmy" in t or "_executemany_async" in t,
        "driver (asyncpg; asyncmy's Cython code shows in SQLAlchemy's _executemany_async)",
    ),
    (
        lambda t: "sqlalchemy" in t or "greenlet" in t,
        "SQLAlchemy engine, pool, asyncio shim (begin/commit, pre-ping, greenlets)",
    ),
    (lambda t: "uvloop" in t or "asyncio" in t or "selectors" in t, "event loop, asyncio"),
)
OTHER = "other"


def _category(path: str, name: str) -> str:
    """Where a profiled function belongs, for the breakdown."""
    text = f"{path} {name}"
    for test, category in CATEGORIES:
        if test(text):
            return category
    return OTHER


def breakdown(stats: pstats.Stats) -> list[tuple[str, float]]:
    """Own time (tottime) per category, largest first. A built-in (getattr, dict.items,
    list.append: no file of its own) counts in its callers' categories, in proportion to
    the time it spent for each; msgspec's decode and greenlet switches are their own."""
    sums: dict[str, float] = {}
    entries = stats.stats  # type: ignore[attr-defined]
    for (path, _, name), entry in entries.items():
        own = _category(path, name)
        callers = entry[4]
        if path == "~" and own == OTHER and callers:
            for (c_path, _, c_name), timing in callers.items():
                key = _category(c_path, c_name)
                sums[key] = sums.get(key, 0.0) + timing[2]
            continue
        sums[own] = sums.get(own, 0.0) + entry[2]
    return sorted(sums.items(), key=lambda item: -item[1])


class Spans:
    """Wall and event-loop-thread CPU time of calls to a coroutine method, and the journal
    store thread's CPU time per kind of read: instruments one service's flush from outside
    (instance attributes shadow the methods; nothing in src/ changes)."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}  # name -> [count, wall s, loop CPU s]
        self.reads: dict[str, list[float]] = {}  # read -> [count, thread CPU s, thread wall s]

    def wrap(self, owner: Any, method: str, label: str) -> Callable[[], None]:
        original = getattr(owner, method)
        entry = self.calls.setdefault(label, [0, 0.0, 0.0])

        async def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = perf_counter(), time.thread_time()
            try:
                return await original(*args, **kwargs)
            finally:
                entry[0] += 1
                entry[1] += perf_counter() - wall
                entry[2] += time.thread_time() - cpu

        setattr(owner, method, timed)
        return lambda: delattr(owner, method)

    def wrap_reads(self, store: Any) -> Callable[[], None]:
        original = store.read
        reads = self.reads

        async def timed_read(fn: Callable[[Any], Any]) -> Any:
            def wrapped(db: Any) -> Any:
                cpu, wall = time.thread_time(), perf_counter()
                try:
                    return fn(db)
                finally:
                    entry = reads.setdefault(fn.__qualname__.split(".")[1], [0, 0.0, 0.0])
                    entry[0] += 1
                    entry[1] += time.thread_time() - cpu
                    entry[2] += perf_counter() - wall

            return await original(wrapped)

        store.read = timed_read
        return lambda: delattr(store, "read")


async def _timed_flush(service: Any, profiler: cProfile.Profile | None) -> dict[str, Any]:
    loop_tid, store_tid = threading.get_native_id(), store_thread_id(service)
    loop_cpu, store_cpu = thread_cpu(loop_tid), thread_cpu(store_tid)
    start = perf_counter()
    if profiler is not None:
        profiler.enable()
    report = await service.flush()
    if profiler is not None:
        profiler.disable()
    wall = perf_counter() - start
    if not report.ok:
        raise RuntimeError(f"the flush did not write everything: {report}")
    return {
        "written": report.written,
        "wall": wall,
        "loop_cpu": cpu_delta(thread_cpu(loop_tid), loop_cpu),
        "store_cpu": cpu_delta(thread_cpu(store_tid), store_cpu),
    }


async def profile_flush(
    database: str, url: str, rows: int, workdir: Path, out: Path, top: int
) -> None:
    """Two flushes of ``rows`` entries from one service, each into a fresh table:

    1. instrumented, not profiled: the flush's wall time; the wall time and the event-loop
       thread's CPU time spent in the bridge's ``write`` calls (row building, SQLAlchemy,
       the driver, the database's answer), the journal's page reads and cleaning; the
       journal store thread's CPU time (per kind of read, and in all);
    2. under cProfile with a CPU-time timer (``time.thread_time``: the event-loop thread's
       CPU, not the time it waits: SQLAlchemy's greenlet switches make a wall-clock
       profile of its async calls count waiting as the callers' own time), its own time
       summed by category: msgpack decode, row building, SQLAlchemy, the driver, ...
    """
    plan = FlushPlan(rows=rows)
    await drop_table(database, url)
    # In the service's process (flush_worker_at = 0), where it can be profiled: the flush
    # worker process runs the same MapWriter (the journal read from its own connection).
    service = make_service(database, url, workdir / "profile-data", flush_worker_at=0)
    await service.start()
    lines = []
    try:
        await fill(service, rows, plan.put_batch)
        spans = Spans()
        journal = service.grid.bridges.journal
        undo = [
            spans.wrap(
                service.grid.bridges.stores[database], "write", "bridge write (SQLStore.write)"
            ),
            spans.wrap(journal, "dirty_page", "journal page read (awaited)"),
            spans.wrap(journal, "cleaned", "journal cleaning commit (awaited)"),
            spans.wrap_reads(journal.store),
        ]
        first = await _timed_flush(service, None)
        for restore in undo:
            restore()
        lines += [
            f"flush 1 (not profiled): {first['written']:,} rows to {database} in "
            f"{first['wall']:.2f} s ({first['written'] / first['wall']:,.0f} rows/s); CPU: "
            f"event-loop thread {fmt(first['loop_cpu'], '.2f')} s, journal store thread "
            f"{fmt(first['store_cpu'], '.2f')} s",
        ]
        for label, (count, wall, cpu) in spans.calls.items():
            lines.append(
                f"  {label}: {count:,.0f} calls, {wall:.2f} s wall in all "
                f"({wall / first['wall']:.0%} of the flush), {cpu:.2f} s event-loop CPU meanwhile"
            )
        for name, (count, cpu, wall) in sorted(spans.reads.items()):
            lines.append(
                f"  store thread, Journal.{name}: {count:,.0f} reads, {cpu:.2f} s CPU, "
                f"{wall:.2f} s on the thread (GIL waits included)"
            )
        await drop_table(database, url)
        await create_table(database, url)
        await fill(service, rows, plan.put_batch)
        profiler = cProfile.Profile(time.thread_time)
        second = await _timed_flush(service, profiler)
    finally:
        await service.close()
        await drop_table(database, url)
    profiler.dump_stats(str(out))
    stats = pstats.Stats(str(out))
    profiled = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
    lines += [
        f"flush 2 (cProfile, CPU-time timer): {second['wall']:.2f} s wall, event-loop thread "
        f"CPU {fmt(second['loop_cpu'], '.2f')} s of which {profiled:.2f} s profiled, own time "
        "by category (the profiler inflates Python-level code more than C calls):",
    ]
    unprofiled = first["loop_cpu"] or 0.0
    lines.append(
        f"    profiled s   share  ~unprofiled µs/row (share x flush 1's {unprofiled:.2f} s)"
    )
    for category, seconds in breakdown(stats):
        share = seconds / profiled
        per_row = share * unprofiled / second["written"] * 1e6
        lines.append(f"    {seconds:9.2f}  {share:6.1%}  {per_row:6.2f}  {category}")
    lines.append(f"  profile saved to {out}; top {top} by own CPU time, then by cumulative:")
    print("\n".join(lines), flush=True)
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench.flush_profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", choices=DATABASES, default="postgresql")
    parser.add_argument("--pg-url", default=PG_URL)
    parser.add_argument("--mariadb-url", default=MARIADB_URL)
    parser.add_argument("--out", default="bench/results/flush-profile.pstats")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args(argv)
    url = args.pg_url if args.db == "postgresql" else args.mariadb_url
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="packetstack-flush-profile-") as tmp:
        run_loop(profile_flush(args.db, url, args.rows, Path(tmp), out, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
