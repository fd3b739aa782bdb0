"""Smoke test of the benchmark suite (bench/): every scenario, every system, tiny counts.

The messaging scenarios need the NATS server on 127.0.0.1:4222; the backlog baselines need
it too (JetStream) and the mosquitto binary (the suite starts a private broker), one test
measures the machine's mosquitto on 127.0.0.1:1883, and the data grid's baseline needs the
Redis server on 127.0.0.1:6379. Without them the tests are skipped locally and fail under
CI=true.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import IN_CI, require_server

ROOT = Path(__file__).resolve().parents[2]

SCENARIOS = ("one-way", "req-1", "req-100")
SYSTEMS = ("packetstack", "raw", "nats")
BACKLOG_BASELINES = ("mosquitto", "jetstream")
QUICK_BACKLOG = 2_000  # Plan.quick().backlog
GRID_SCENARIOS = (
    "grid-get-1",
    "grid-put-1",
    "grid-get-100",
    "grid-put-100",
    "grid-local-get",
    "grid-put-all",
)
GRID_TARGETS = {
    "grid_get100_vs_redis",
    "grid_put100_vs_redis",
    "grid_local_get_vs_redis",
    "grid_put_all_vs_redis",
}
QUICK_PUT_ALL = 2_000  # Plan.quick().grid_put_all
MACHINE_KEYS = {"platform", "cpu_model", "python", "uvloop", "date"}
REPORT_KEYS = {"schema", "command", "options", "machine", "scenarios", "table", "targets"}


def _bench() -> ModuleType:
    """The repository's bench package (not the tests/bench folder, a namespace package)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    loaded = sys.modules.get("bench")
    if loaded is not None and getattr(loaded, "__file__", None) is None:
        for name in [n for n in sys.modules if n == "bench" or n.startswith("bench.")]:
            del sys.modules[name]
    import bench

    assert Path(bench.__file__).resolve().parent == ROOT / "bench"
    return bench


def require_mosquitto_binary(bench: ModuleType) -> None:
    """Skip (locally) or fail (under CI=true) when the mosquitto broker is not installed."""
    if bench.common.mosquitto_binary() is None:
        message = "the mosquitto binary is not installed; install it to run this test"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def run_quick(bench: ModuleType, tmp_path: Path, *argv: str) -> dict[str, Any]:
    """``python3 -m bench --quick --runs 1 ARGV``, bounded in time; the JSON report."""
    out = tmp_path / "quick.json"
    started = time.monotonic()
    status = bench.main(["--quick", "--runs", "1", "--json", str(out), "--quiet", *argv])
    took = time.monotonic() - started
    report: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    errors = [
        r["error"]
        for entry in report["scenarios"].values()
        for data in entry["systems"].values()
        for r in data["runs"]
        if r.get("error")
    ]
    assert status == 0, errors
    assert took < 60, f"the --quick suite took {took:.1f} s"
    assert set(report) >= REPORT_KEYS
    assert set(report["machine"]) >= MACHINE_KEYS
    assert report["options"]["runs"] == 1 and report["options"]["quick"] is True
    return report


def check_backlog(report: dict[str, Any], system: str) -> dict[str, Any]:
    """One backlog run of ``system`` that measured both rates; its result."""
    entry = report["scenarios"]["backlog"]["systems"][system]
    assert entry["errors"] == 0, entry["runs"]
    (run,) = entry["runs"]
    assert run["rate"] > 0 and run["accept_rate"] > 0, (system, run)
    assert run["sent"] == QUICK_BACKLOG and run["count"] + run["lost"] == run["sent"], run
    return dict(run)


def test_quick_suite_measures_every_scenario_for_every_system(tmp_path: Path) -> None:
    require_server("NATS", "127.0.0.1", 4222)
    bench = _bench()
    report = run_quick(bench, tmp_path, "--only", ",".join(SCENARIOS))

    assert set(bench.SCENARIOS) == {*SCENARIOS, "backlog", *GRID_SCENARIOS}
    assert set(bench.SYSTEMS) == {*SYSTEMS, *BACKLOG_BASELINES, "redis"}
    assert set(report["scenarios"]) == set(SCENARIOS)
    for scenario in SCENARIOS:
        systems = report["scenarios"][scenario]["systems"]
        assert set(systems) == set(SYSTEMS)
        for system in SYSTEMS:
            entry = systems[system]
            assert entry["errors"] == 0, entry["runs"]
            assert len(entry["runs"]) == 1
            assert entry["runs"][0]["rate"] > 0, (scenario, system, entry["runs"])
            assert entry["median"]["rate"] > 0, (scenario, system)
            assert set(entry) >= {"median", "ratio_vs_raw", "ratio_vs_nats", "runs"}
            if scenario == "one-way":
                assert entry["runs"][0]["lost"] == 0, (system, entry["runs"])
            else:
                assert entry["median"]["p50_us"] > 0 and entry["median"]["p99_us"] > 0
    assert len(report["table"]) == len(SCENARIOS) * len(SYSTEMS)
    messaging = {"one_way_vs_nats", "one_way_vs_raw", "req100_vs_nats", "req1_p50_vs_raw"}
    backlog = {"backlog_vs_mosquitto", "backlog_vs_jetstream"}
    assert {t["name"] for t in report["targets"]} == messaging | backlog | GRID_TARGETS
    for target in report["targets"]:
        if target["name"] in messaging:
            assert isinstance(target["met"], bool) and target["value"] > 0, target
        else:
            assert target["met"] is None, target  # the backlog and the grid were not run


def test_quick_backlog_baselines_replay_everything(tmp_path: Path) -> None:
    """mosquitto (a private broker with an unlimited queue) and JetStream (file storage)
    store every message for the offline consumer and replay all of them."""
    require_server("NATS", "127.0.0.1", 4222)
    bench = _bench()
    require_mosquitto_binary(bench)
    report = run_quick(
        bench, tmp_path, "--only", "backlog", "--systems", ",".join(BACKLOG_BASELINES)
    )

    assert set(report["scenarios"]["backlog"]["systems"]) == set(BACKLOG_BASELINES)
    for system in BACKLOG_BASELINES:
        assert check_backlog(report, system)["lost"] == 0, system
    assert "max_queued_messages 0" in report["machine"]["mosquitto"]
    row = next(r for r in report["table"] if r["system"] == "mosquitto")
    assert row["ratio_vs_mosquitto"] == 1.0 and row["ratio_vs_jetstream"] > 0


def test_quick_backlog_counts_what_the_machines_mosquitto_drops(tmp_path: Path) -> None:
    """The machine's broker (--mqtt-url) may queue fewer messages than were sent (the
    packaged default is 1000 per client): the run reports what arrived and the rest as lost."""
    require_server("Mosquitto", "127.0.0.1", 1883)
    bench = _bench()
    url = "mqtt://127.0.0.1:1883"
    report = run_quick(
        bench, tmp_path, "--only", "backlog", "--systems", "mosquitto", "--mqtt-url", url
    )

    run = check_backlog(report, "mosquitto")
    assert run["count"] > 0
    assert report["options"]["mqtt_url"] == url
    row = next(r for r in report["table"] if r["system"] == "mosquitto")
    assert row["lost_max"] == run["lost"]


def test_quick_backlog_packetstack_replays_its_mailbox(tmp_path: Path) -> None:
    """Packets sent to an ending that is not connected wait in its mailbox at the service
    and all arrive once it connects; the last send's ack says they are stored."""
    bench = _bench()
    report = run_quick(bench, tmp_path, "--only", "backlog", "--systems", "packetstack")

    assert check_backlog(report, "packetstack")["lost"] == 0


def check_grid(report: dict[str, Any], systems: tuple[str, ...]) -> None:
    """Every grid scenario measured once for each of ``systems``, with latencies where
    operations were timed one by one and the whole put_all stored."""
    assert set(report["scenarios"]) == set(GRID_SCENARIOS)
    assert report["options"]["only"] == list(GRID_SCENARIOS)
    assert "--only grid" in report["command"]
    for scenario in GRID_SCENARIOS:
        entries = report["scenarios"][scenario]["systems"]
        assert set(entries) == set(systems), scenario
        for system in systems:
            entry = entries[system]
            assert entry["errors"] == 0, entry["runs"]
            (run,) = entry["runs"]
            assert run["rate"] > 0 and run["count"] > 0, (scenario, system, run)
            if scenario == "grid-put-all":
                assert run["count"] == QUICK_PUT_ALL, run
            elif scenario != "grid-local-get":
                assert run["p50_us"] > 0 and run["p99_us"] >= run["p50_us"], run
            if system == "packetstack" and scenario != "grid-local-get":
                assert run["holder_cpu_s"] is not None, run  # the holder process served it


def test_quick_grid_packetstack_remote_and_owned(tmp_path: Path) -> None:
    """PacketStack's side of the grid scenarios alone (no Redis needed): remote operations
    through a service with a holder process, and gets of keys the client owns."""
    bench = _bench()
    report = run_quick(bench, tmp_path, "--only", "grid", "--systems", "packetstack")

    check_grid(report, ("packetstack",))
    assert all(t["met"] is None for t in report["targets"])  # nothing to compare with


def require_redis_py() -> None:
    """Skip (locally) or fail (under CI=true) when redis-py is not installed."""
    try:
        import redis  # noqa: F401
    except ImportError:
        message = "redis-py is not installed; pip install -e '.[test]' brings it"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


async def _redis_keys(prefixes: list[str]) -> list[bytes]:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url("redis://127.0.0.1:6379", socket_timeout=5)
    try:
        return [
            key
            for prefix in prefixes
            async for key in client.scan_iter(match=prefix + "*", count=10_000)
        ]
    finally:
        await client.aclose()


def test_quick_grid_against_redis(tmp_path: Path) -> None:
    """Every grid scenario for PacketStack and redis-py; the ratios and targets are
    computed, and the Redis keys the runs wrote are gone afterwards."""
    require_server("Redis", "127.0.0.1", 6379)
    require_redis_py()
    bench = _bench()
    report = run_quick(bench, tmp_path, "--only", "grid")

    check_grid(report, ("packetstack", "redis"))
    assert report["machine"]["redis_server"].startswith("redis-server")
    rows = [r for r in report["table"] if r["scenario"] in GRID_SCENARIOS]
    assert len(rows) == 2 * len(GRID_SCENARIOS)
    for row in rows:
        assert row["ratio_vs_redis"] > 0, row
        if row["system"] == "redis":
            assert row["ratio_vs_redis"] == 1.0
    targets = {t["name"]: t for t in report["targets"]}
    for name in GRID_TARGETS:
        assert isinstance(targets[name]["met"], bool) and targets[name]["value"] > 0
    prefixes = [
        entry["systems"]["redis"]["runs"][0]["keyspace"]
        for scenario, entry in report["scenarios"].items()
    ]
    assert all(p.startswith("bench:grid:") for p in prefixes) and len(set(prefixes)) == 6
    assert asyncio.run(_redis_keys(prefixes)) == []  # each run deleted what it wrote


QUICK_FLUSH_ROWS = 2_000  # FlushPlan.quick().rows
FLUSH_TARGETS = {
    "flush_pg_vs_asyncpg",
    "flush_mariadb_vs_asyncmy",
    "flush_pg_p50",
    "flush_mariadb_p50",
}


def require_sql_drivers() -> None:
    """Skip (locally) or fail (under CI=true) when asyncpg, asyncmy or SQLAlchemy is missing."""
    try:
        import asyncmy  # noqa: F401
        import asyncpg  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as exc:
        message = f"{exc.name} is not installed; pip install -e '.[test]' brings it"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


async def _flush_tables_left(bench: ModuleType) -> dict[str, bool]:
    flush = bench.flush
    urls = {"postgresql": flush.PG_URL, "mariadb": flush.MARIADB_URL}
    return {db: await flush.table_exists(db, url) for db, url in urls.items()}


def test_quick_flush_to_postgresql_and_mariadb(tmp_path: Path) -> None:
    """The write-behind flush scenario with tiny counts: PacketStack's flush and the raw
    drivers' writes of the same 2,000 rows to PostgreSQL and MariaDB, each counted in the
    table afterwards; the probe's round trips idle and during the flush; the ratios and the
    targets computed; the table dropped after every measurement."""
    require_server("PostgreSQL", "127.0.0.1", 5432)
    require_server("MariaDB", "127.0.0.1", 3306)
    require_sql_drivers()
    bench = _bench()
    started = time.monotonic()
    report = run_quick(bench, tmp_path, "--only", "flush")
    assert time.monotonic() - started < 20

    assert report["scenarios"] == {} and report["options"]["only"] == ["flush"]
    assert "--only flush" in report["command"]
    assert "flush" not in bench.SCENARIOS  # run only when --only names it
    flush = report["flush"]
    assert flush["plan"]["rows"] == QUICK_FLUSH_ROWS
    assert report["machine"]["postgresql_server"].startswith("PostgreSQL")
    assert report["machine"]["mariadb_server"].startswith("MariaDB")
    for database, systems in bench.flush.SYSTEMS.items():
        entry = flush["databases"][database]
        assert set(entry["systems"]) == set(systems), database
        for system, data in entry["systems"].items():
            assert data["errors"] == 0, data["runs"]
            (run,) = data["runs"]
            assert run["count"] == QUICK_FLUSH_ROWS and run["rate"] > 0, (database, system, run)
            assert run["cpu_s"] > 0, run
        assert entry["systems"][entry["baseline"]]["ratio_vs_baseline"] == 1.0
        (ours,) = entry["systems"]["packetstack"]["runs"]
        assert ours["idle_samples"] > 0 and ours["flush_samples"] > 0, ours
        assert ours["probe_failures"] == 0, ours
        assert ours["flush_p50_us"] > 0 and ours["p50_ratio"] > 0, ours
        assert entry["systems"]["packetstack"]["ratio_vs_baseline"] > 0
    assert flush["databases"]["postgresql"]["systems"]["asyncpg-copy"]["ratio_vs_copy"] == 1.0
    assert len(flush["table"]) == sum(len(s) for s in bench.flush.SYSTEMS.values())
    targets = {t["name"]: t for t in report["targets"] if t["scenario"] == "flush"}
    assert set(targets) == FLUSH_TARGETS
    for target in targets.values():
        assert isinstance(target["met"], bool) and target["value"] > 0, target
    assert asyncio.run(_flush_tables_left(bench)) == {"postgresql": False, "mariadb": False}
