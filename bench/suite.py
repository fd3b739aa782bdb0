"""The benchmark suite: every scenario for every system in one run, medians, ratios, targets.

``python3 -m bench [--runs N] [--quick] [--only NAMES] [--json PATH]``; in-process,
``bench.main(argv)`` does the same and returns the exit status, ``bench.run(options)``
returns the report without printing it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import (
    common,
    flush,
    sys_jetstream,
    sys_mosquitto,
    sys_nats,
    sys_packetstack,
    sys_raw,
    sys_redis,
)
from .common import (
    BODY_SIZE,
    PIN_MODES,
    GridHub,
    Hub,
    Placement,
    Plan,
    find_pid,
    fmt,
    grid_hub,
    hub_dir,
    machine_info,
    median,
    mosquitto_binary,
    mosquitto_hub,
    mosquitto_version,
    packetstack_hub,
    placement_for,
    raw_hub,
    run_loop,
)

SCHEMA = "packetstack-bench/1"
MEDIAN_KEYS = (
    "rate",
    "accept_rate",
    "p50_us",
    "p99_us",
    "mean_us",
    "client_cpu_us_per_msg",
    "hub_cpu_us_per_msg",
    "client_cpu_pct",
    "hub_cpu_pct",
    "holder_cpu_us_per_msg",
    "holder_cpu_pct",
)

SCENARIOS: dict[str, str] = {
    "one-way": "producer -> hub -> consumer, 64-byte bodies, delivered packets/s at the consumer",
    "req-1": "request/reply through the hub, 1 outstanding (sequential)",
    "req-100": "request/reply through the hub, 100 outstanding (100 concurrent requesters)",
    "backlog": "packets stored durably for an offline consumer, then replayed when it connects: "
    "replayed packets/s (rate) and acknowledged-as-stored packets/s (accept_rate)",
    "grid-get-1": "data grid: remote get of preloaded keys, 1 outstanding (Redis: GET)",
    "grid-put-1": "data grid: remote put of preloaded keys, 1 outstanding (Redis: SET)",
    "grid-get-100": "data grid: remote get, 100 outstanding (Redis: GET, 100 tasks, pool of 100)",
    "grid-put-100": "data grid: remote put, 100 outstanding (Redis: SET, 100 tasks, pool of 100)",
    "grid-local-get": "data grid: get of keys whose partitions the client owns, one at a time "
    "(Redis: GET, 1 outstanding)",
    "grid-put-all": "data grid: one put_all of 100,000 int entries (Redis: pipelines of 100 SETs, "
    "transaction=False, one after another)",
}
GRID_SCENARIOS = (
    "grid-get-1",
    "grid-put-1",
    "grid-get-100",
    "grid-put-100",
    "grid-local-get",
    "grid-put-all",
)
# Scenarios with a runner and a report section of their own (bench/flush.py), run only when
# --only names them: they need servers of their own (PostgreSQL, MariaDB) and minutes.
OWN_SCENARIOS: dict[str, str] = {"flush": flush.DESCRIPTION}
# Names for several scenarios at once in --only.
SCENARIO_GROUPS: dict[str, tuple[str, ...]] = {"grid": GRID_SCENARIOS}
# PacketStack's side of these runs against a service with a holder process (GridHub):
# every operation of the measuring client (a non-holder) is remote.
REMOTE_GRID = frozenset(GRID_SCENARIOS) - {"grid-local-get"}
SYSTEMS: dict[str, str] = {
    "packetstack": "PacketStack Client -> `packetstack serve` (own process, uvloop)",
    "raw": "raw asyncio.Protocol clients -> raw relay with the same framing (own process, uvloop)",
    "nats": "nats-py clients (uvloop) -> nats-server on 127.0.0.1:4222",
    "mosquitto": "aiomqtt clients (uvloop), QoS 1, persistent session -> a private mosquitto "
    "(own process, unlimited queue, no persistence) or the broker at --mqtt-url",
    "jetstream": "nats-py JetStream (uvloop): file-storage stream, durable push consumer "
    "-> nats-server on 127.0.0.1:4222",
    "redis": "redis-py asyncio client (uvloop) -> the Redis server on 127.0.0.1:6379 "
    "(data grid scenarios)",
}
# The systems each scenario compares: the backlog needs a server that stores packets.
MESSAGING = ("packetstack", "raw", "nats")
SCENARIO_SYSTEMS: dict[str, tuple[str, ...]] = {
    "one-way": MESSAGING,
    "req-1": MESSAGING,
    "req-100": MESSAGING,
    "backlog": ("packetstack", "mosquitto", "jetstream"),
    **{scenario: ("packetstack", "redis") for scenario in GRID_SCENARIOS},
}
DURABLE_SCENARIOS = frozenset({"backlog"})  # reported in a table of their own
BASELINES = ("raw", "nats", "mosquitto", "jetstream", "redis")  # ratio_vs_<each> everywhere

# What the issue asks of PacketStack: (name, scenario, measure, against, op, threshold, text)
TARGETS: list[tuple[str, str, str, str, str, float, str]] = [
    ("one_way_vs_nats", "one-way", "rate", "nats", ">=", 2.0, "one-way rate >= 2x nats-py"),
    ("one_way_vs_raw", "one-way", "rate", "raw", ">=", 0.5, "one-way rate >= 50% of the raw relay"),
    (
        "req100_vs_nats",
        "req-100",
        "rate",
        "nats",
        ">=",
        4.0,
        "request/reply rate with 100 outstanding >= 4x nats-py",
    ),
    (
        "req1_p50_vs_raw",
        "req-1",
        "p50_us",
        "raw",
        "<=",
        1.3,
        "p50 latency with 1 outstanding <= 1.3x the raw relay",
    ),
    (
        "backlog_vs_mosquitto",
        "backlog",
        "rate",
        "mosquitto",
        ">=",
        3.0,
        "backlog replay rate >= 3x mosquitto (aiomqtt, QoS 1 persistent session)",
    ),
    (
        "backlog_vs_jetstream",
        "backlog",
        "rate",
        "jetstream",
        ">=",
        1.0,
        "backlog replay rate >= 1x NATS JetStream (nats-py, file storage)",
    ),
    (
        "grid_get100_vs_redis",
        "grid-get-100",
        "rate",
        "redis",
        ">=",
        2.0,
        "grid remote get rate with 100 outstanding >= 2x redis-py GET",
    ),
    (
        "grid_put100_vs_redis",
        "grid-put-100",
        "rate",
        "redis",
        ">=",
        2.0,
        "grid remote put rate with 100 outstanding >= 2x redis-py SET",
    ),
    (
        "grid_local_get_vs_redis",
        "grid-local-get",
        "rate",
        "redis",
        ">=",
        50.0,
        "grid get of owned keys >= 50x redis-py GET (1 outstanding)",
    ),
    (
        "grid_put_all_vs_redis",
        "grid-put-all",
        "rate",
        "redis",
        ">=",
        2.0,
        "grid put_all of 100,000 entries >= 2x redis-py pipelines of 100 SETs",
    ),
]


@dataclass
class Options:
    runs: int = 3
    quick: bool = False
    only: list[str] = field(default_factory=lambda: list(SCENARIOS))
    systems: list[str] = field(default_factory=lambda: list(SYSTEMS))
    json_path: str | None = None
    timebox: float | None = None
    nats_url: str = sys_nats.NATS_URL
    mqtt_url: str | None = None  # None: the suite starts its own mosquitto
    redis_url: str = sys_redis.REDIS_URL
    pg_url: str = flush.PG_URL
    mariadb_url: str = flush.MARIADB_URL
    flush_rows: int | None = None  # None: 1,000,000 (--quick: 2,000)
    flush_databases: list[str] = field(default_factory=lambda: list(flush.DATABASES))
    check: bool = False
    quiet: bool = False
    pin: str = "auto"

    @property
    def plan(self) -> Plan:
        plan = Plan.quick() if self.quick else Plan()
        if self.timebox is not None:
            plan = replace(plan, timebox=self.timebox)
        return plan

    @property
    def flush_plan(self) -> flush.FlushPlan:
        if self.quick:
            return flush.FlushPlan.quick(self.flush_rows)
        if self.flush_rows is None:
            return flush.FlushPlan()
        return flush.FlushPlan(rows=self.flush_rows)

    @property
    def flush_urls(self) -> dict[str, str]:
        urls = {"postgresql": self.pg_url, "mariadb": self.mariadb_url}
        return {db: urls[db] for db in flush.DATABASES if db in self.flush_databases}


# ------------------------------------------------------------------------ measuring


def _driver(
    system: str, scenario: str, address: str, plan: Plan
) -> Callable[[], Coroutine[Any, Any, dict[str, Any]]]:
    module: Any = {
        "packetstack": sys_packetstack,
        "raw": sys_raw,
        "nats": sys_nats,
        "mosquitto": sys_mosquitto,
        "jetstream": sys_jetstream,
        "redis": sys_redis,
    }[system]
    target: Any = int(address) if system == "raw" else address
    if scenario in GRID_SCENARIOS:
        return _grid_driver(system, scenario, address, plan)
    if scenario == "backlog":
        return lambda: module.backlog(target, plan)
    if scenario == "one-way":
        return lambda: module.one_way(target, plan)
    outstanding = 1 if scenario == "req-1" else plan.outstanding
    return lambda: module.request_reply(target, plan, outstanding)


def _grid_driver(
    system: str, scenario: str, address: str, plan: Plan
) -> Callable[[], Coroutine[Any, Any, dict[str, Any]]]:
    if system == "packetstack":
        remote, local_get, put_all = (
            sys_packetstack.grid_remote,
            sys_packetstack.grid_local_get,
            sys_packetstack.grid_put_all,
        )
    else:
        remote, local_get, put_all = sys_redis.remote, sys_redis.local_get, sys_redis.put_all
    if scenario == "grid-local-get":
        return lambda: local_get(address, plan)
    if scenario == "grid-put-all":
        return lambda: put_all(address, plan)
    _, op, outstanding = scenario.split("-")
    return lambda: remote(address, plan, op, int(outstanding))


def server_of(system: str, scenario: str) -> str:
    """The server a system's run of a scenario talks to: the remote grid scenarios have a
    PacketStack service of their own, with a holder process (GridHub)."""
    return "packetstack-grid" if system == "packetstack" and scenario in REMOTE_GRID else system


def measure(
    system: str,
    scenario: str,
    address: str,
    plan: Plan,
    hub_pid: int | None = None,
    holder_pid: int | None = None,
) -> dict[str, Any]:
    """One measurement on a fresh event loop, bounded in time as a whole. ``hub_pid``:
    the hub process whose CPU time the result reports (``holder_pid``: the grid holder's)."""
    common.hub_pid = hub_pid
    common.holder_pid = holder_pid
    make = _driver(system, scenario, address, plan)
    limit = plan.timebox * 2 + 120 + (plan.fill_timebox if scenario in DURABLE_SCENARIOS else 0)

    async def bounded() -> dict[str, Any]:
        return await asyncio.wait_for(make(), limit)

    started = time.perf_counter()
    result = run_loop(bounded())
    result["wall_s"] = time.perf_counter() - started
    return result


def _log(options: Options, message: str) -> None:
    if not options.quiet:
        print(message, file=sys.stderr, flush=True)


@dataclass
class _Servers:
    """Where each system's server is, the hub processes the suite started, the process whose
    CPU time a system's results report, and why a system cannot be measured."""

    hubs: dict[str, Hub] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int | None] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def _own_hubs(options: Options, needed: set[str], workdir: Path, servers: _Servers) -> None:
    """Create (not start) the hubs this run needs and runs itself."""
    if "packetstack" in needed:
        servers.hubs["packetstack"] = packetstack_hub(workdir)
    if "packetstack-grid" in needed:
        servers.hubs["packetstack-grid"] = grid_hub(workdir)
    if "raw" in needed:
        servers.hubs["raw"] = raw_hub(workdir)
    if "mosquitto" in needed and options.mqtt_url is None:
        binary = mosquitto_binary()
        if binary is None:
            servers.unavailable["mosquitto"] = (
                "the mosquitto binary was not found: install it, or pass --mqtt-url"
            )
        else:
            servers.hubs["mosquitto"] = mosquitto_hub(workdir, binary)


def _other_servers(
    options: Options, needed: set[str], machine: dict[str, Any], servers: _Servers
) -> None:
    """Servers this run does not start: the NATS server, the machine's mosquitto."""
    if "mosquitto" in needed and options.mqtt_url is not None:
        servers.addresses["mosquitto"] = options.mqtt_url
        servers.pids["mosquitto"] = find_pid("mosquitto")  # None when it runs elsewhere
        machine["mosquitto"] = f"the broker at {options.mqtt_url} (not started by the suite)"
    for system in ("nats", "jetstream"):
        if system in needed:
            servers.addresses[system] = options.nats_url
            servers.pids[system] = find_pid("nats-server")  # None when it runs elsewhere
    if needed & {"nats", "jetstream"}:
        try:
            machine["nats_server"] = run_loop(sys_nats.server_version(options.nats_url))
        except Exception as exc:  # measured below anyway: each run records the error
            machine["nats_server"] = None
            _log(options, f"NATS at {options.nats_url} is not usable: {exc!r}")
    if "redis" in needed:
        _redis_server(options, machine, servers)


def _redis_server(options: Options, machine: dict[str, Any], servers: _Servers) -> None:
    """The Redis server the grid scenarios compare with (not started by the suite)."""
    servers.addresses["redis"] = options.redis_url
    servers.pids["redis"] = find_pid("redis-server")  # None when it runs elsewhere
    if sys_redis.aioredis is None:
        servers.unavailable["redis"] = (
            "redis-py is not installed: pip install -e '.[bench]' (or '.[test]')"
        )
        return
    try:
        machine["redis_server"] = run_loop(sys_redis.server_version(options.redis_url))
    except Exception as exc:
        machine["redis_server"] = None
        servers.unavailable["redis"] = (
            f"Redis at {options.redis_url} is not usable ({type(exc).__name__}: {exc}); "
            "start it (redis-server) or pass --redis-url"
        )


def _start_hubs(options: Options, machine: dict[str, Any], servers: _Servers) -> None:
    for name, hub in servers.hubs.items():
        hub.start()
        servers.addresses[name] = str(hub.port) if name == "raw" else hub.url
        text = f"hub {name}: pid {hub.process.pid if hub.process else '?'}, port {hub.port}"
        if isinstance(hub, GridHub) and hub.holder is not None:
            text += f", grid holder pid {hub.holder.pid}"
        _log(options, text)
    mosquitto = servers.hubs.get("mosquitto")
    if mosquitto is not None:
        version = mosquitto_version(mosquitto.argv[0]) or "mosquitto"
        machine["mosquitto"] = f"{version} started by the suite: " + ", ".join(
            common.MOSQUITTO_SETTINGS[:4]
        )


def _measure_one(
    options: Options, servers: _Servers, placement: Placement, scenario: str, system: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One run of ``scenario`` for ``system``: (result, CPU placement)."""
    server = server_of(system, scenario)
    own = servers.hubs.get(server)
    if own is not None and not own.alive():
        _log(options, f"hub {server} died; restarting:\n{own.log_tail()}")
        own.stop()  # what is left of it (a GridHub is two processes)
        own.start()
    if own is not None and own.process is not None:
        servers.pids[server] = own.process.pid
    holder = own.holder.pid if isinstance(own, GridHub) and own.holder is not None else None
    # Only hubs this suite started are pinned; the NATS and Redis servers are not ours.
    placed = placement.apply(
        placement_for(options.pin, scenario),
        own.process.pid if own is not None and own.process else None,
        [holder] if holder else [],
    )
    if server in servers.unavailable:
        return {"error": servers.unavailable[server], "rate": None}, placed
    try:
        result = measure(
            system,
            scenario,
            servers.addresses[server],
            options.plan,
            servers.pids.get(server),
            holder,
        )
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "rate": None}
    return result, placed


def run(options: Options) -> dict[str, Any]:
    """Measure every selected scenario for every selected system ``options.runs`` times
    (each scenario only for the systems it compares: SCENARIO_SYSTEMS)."""
    options = replace(options, only=expand_scenarios(options.only))
    unknown = [s for s in options.only if s not in SCENARIOS and s not in OWN_SCENARIOS]
    unknown += [s for s in options.systems if s not in SYSTEMS]
    unknown += [d for d in options.flush_databases if d not in flush.DATABASES]
    if unknown:
        raise ValueError(
            f"unknown scenario, system or database {unknown}; scenarios: "
            f"{[*SCENARIOS, *OWN_SCENARIOS]}, databases: {list(flush.DATABASES)}"
        )
    if options.runs < 1:
        raise ValueError("--runs must be at least 1")
    if options.flush_rows is not None and options.flush_rows < 1:
        raise ValueError("--flush-rows must be at least 1")
    if options.pin not in PIN_MODES:
        raise ValueError(f"--pin must be one of {', '.join(PIN_MODES)}")
    plan = options.plan
    pairs = {
        sc: [sy for sy in SCENARIO_SYSTEMS[sc] if sy in options.systems]
        for sc in SCENARIOS
        if sc in options.only
    }
    needed = {server_of(sy, sc) for sc, systems in pairs.items() for sy in systems}
    machine = machine_info()
    began = time.perf_counter()
    raw_runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        sc: {sy: [] for sy in systems} for sc, systems in pairs.items()
    }
    servers = _Servers()
    placement = Placement()
    placed: dict[str, dict[str, dict[str, Any]]] = {sc: {} for sc in pairs}
    flushing = "flush" in options.only
    flush_runs: flush.Runs = {}
    flush_down: dict[str, str] = {}  # databases that cannot be measured: why
    with hub_dir() as workdir:
        try:
            _own_hubs(options, needed, workdir, servers)
            _start_hubs(options, machine, servers)
            _other_servers(options, needed, machine, servers)
            if flushing:
                machine.update(flush.machine(options.flush_urls))
                for database in options.flush_urls:
                    why = machine.get(f"{database}_unavailable")
                    if why:
                        flush_down[database] = f"{database} is not usable: {why}"
            for index in range(options.runs):
                for scenario, systems in pairs.items():
                    # Rotate the order each run so slow drift on a shared machine spreads evenly.
                    turn = index % len(systems) if systems else 0
                    for system in systems[turn:] + systems[:turn]:
                        result, placed[scenario][system] = _measure_one(
                            options, servers, placement, scenario, system
                        )
                        result["run"] = index + 1
                        raw_runs[scenario][system].append(result)
                        _log(options, _progress(index + 1, options.runs, scenario, system, result))
                if flushing:
                    flush.run_once(
                        index,
                        options.flush_urls,
                        options.flush_plan,
                        workdir,
                        flush_runs,
                        flush_down,
                        lambda text: _log(options, text),
                    )
        finally:
            placement.restore()
            for hub in servers.hubs.values():
                hub.stop()
    try:
        machine["loadavg_end"] = list(os.getloadavg())
    except OSError:
        machine["loadavg_end"] = None
    report = _report(options, plan, machine, raw_runs)
    if flushing:
        report["flush"] = flush.section(options.flush_plan, options.flush_urls, flush_runs)
        report["targets"] += flush.targets(report["flush"])
    for scenario, by_system in placed.items():
        report["scenarios"][scenario]["placement"] = by_system
    report["duration_s"] = round(time.perf_counter() - began, 1)
    return report


def _progress(index: int, runs: int, scenario: str, system: str, result: dict[str, Any]) -> str:
    head = f"run {index}/{runs} {scenario:<8} {system:<12}"
    if result.get("error"):
        return f"{head} ERROR {result['error']}"
    unit = "ops/s" if scenario in GRID_SCENARIOS else "msg/s"
    text = f"{head} {result['rate']:>12,.0f} {unit}"
    if result.get("p50_us") is not None:
        text += f"  p50 {result['p50_us']:8.1f} µs  p99 {result['p99_us']:8.1f} µs"
    if result.get("accept_rate") is not None:
        text += f"  accepted {result['accept_rate']:>10,.0f} msg/s"
    if result.get("lost"):
        text += f"  LOST {result['lost']}"
    return text


# ------------------------------------------------------------------------- reporting


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _wire_bytes() -> dict[str, int]:
    """Bytes one 64-byte-body packet takes on the wire from the sender, per system."""
    from packetstack.codec import encode
    from packetstack.protocol import Connection, PacketHeader, Role

    header = PacketHeader(123456, 0, "bench-consumer", "bench-producer", "bench.blob")
    ps = Connection(Role.CLIENT).send_packet(
        header, encode(sys_packetstack.Blob(sys_packetstack.BLOB_DATA))
    )
    subject = "bench.0123456789abcdef0123456789abcdef.oneway"
    nats_pub = f"PUB {subject} {BODY_SIZE}\r\n".encode() + sys_nats.PAYLOAD + b"\r\n"
    return {"packetstack": len(ps), "raw": 16 + BODY_SIZE, "nats": len(nats_pub)}


def _report(
    options: Options,
    plan: Plan,
    machine: dict[str, Any],
    raw_runs: dict[str, dict[str, list[dict[str, Any]]]],
) -> dict[str, Any]:
    scenarios: dict[str, Any] = {}
    table: list[dict[str, Any]] = []
    for scenario, by_system in raw_runs.items():
        medians: dict[str, dict[str, float | None]] = {}
        for system, runs in by_system.items():
            good = [r for r in runs if not r.get("error")]
            medians[system] = {
                key: median([r[key] for r in good if r.get(key) is not None]) for key in MEDIAN_KEYS
            }
        systems: dict[str, Any] = {}
        for system, runs in by_system.items():
            med = medians[system]
            ratios = {
                f"ratio_vs_{base}": _ratio(med["rate"], medians.get(base, {}).get("rate"))
                for base in BASELINES
            }
            entry = {
                "runs": runs,
                "errors": sum(1 for r in runs if r.get("error")),
                "median": med,
                **ratios,
                "p50_ratio_vs_raw": _ratio(med["p50_us"], medians.get("raw", {}).get("p50_us")),
                "p50_ratio_vs_redis": _ratio(med["p50_us"], medians.get("redis", {}).get("p50_us")),
            }
            systems[system] = entry
            losses = [r["lost"] for r in runs if not r.get("error") and r.get("lost") is not None]
            table.append(
                {
                    "scenario": scenario,
                    "system": system,
                    "rate": med["rate"],
                    "accept_rate": med["accept_rate"],
                    "p50_us": med["p50_us"],
                    "p99_us": med["p99_us"],
                    "lost_max": max(losses) if losses else None,
                    **ratios,
                    "p50_ratio_vs_redis": entry["p50_ratio_vs_redis"],
                }
            )
        scenarios[scenario] = {"description": SCENARIOS[scenario], "systems": systems}
    targets = []
    for name, scenario, key, against, op, threshold, text in TARGETS:
        ours = scenarios.get(scenario, {}).get("systems", {}).get("packetstack")
        theirs = scenarios.get(scenario, {}).get("systems", {}).get(against)
        value = None
        if ours is not None and theirs is not None:
            value = _ratio(ours["median"][key], theirs["median"][key])
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        targets.append(
            {
                "name": name,
                "description": text,
                "scenario": scenario,
                "measure": key,
                "against": against,
                "op": op,
                "threshold": threshold,
                "value": value,
                "met": met,
            }
        )
    return {
        "schema": SCHEMA,
        "command": "python3 -m bench " + " ".join(_argv_of(options)),
        "options": {
            "runs": options.runs,
            "quick": options.quick,
            "only": [s for s in [*SCENARIOS, *OWN_SCENARIOS] if s in options.only],
            "systems": [s for s in SYSTEMS if s in options.systems],
            "nats_url": options.nats_url,
            "mqtt_url": options.mqtt_url,
            "redis_url": options.redis_url,
            **(
                {
                    "pg_url": flush.shown_url(options.pg_url),
                    "mariadb_url": flush.shown_url(options.mariadb_url),
                    "flush_databases": list(options.flush_urls),
                }
                if "flush" in options.only
                else {}
            ),
            "pin": options.pin,
            "plan": plan.as_dict(),
            "body_bytes": BODY_SIZE,
        },
        "machine": machine,
        "systems": SYSTEMS,
        "wire_bytes_per_packet": _wire_bytes(),
        "scenarios": scenarios,
        "table": table,
        "targets": targets,
    }


def _argv_of(options: Options) -> list[str]:
    argv = ["--runs", str(options.runs)]
    if options.quick:
        argv.append("--quick")
    if set(options.only) != set(SCENARIOS):
        argv += ["--only", ",".join(_grouped(options.only))]
    if set(options.systems) != set(SYSTEMS):
        argv += ["--systems", ",".join(options.systems)]
    if options.timebox is not None:
        argv += ["--timebox", str(options.timebox)]
    if options.pin != "auto":
        argv += ["--pin", options.pin]
    if options.mqtt_url is not None:
        argv += ["--mqtt-url", options.mqtt_url]
    if options.redis_url != sys_redis.REDIS_URL:
        argv += ["--redis-url", options.redis_url]
    if "flush" in options.only:
        if options.flush_rows is not None:
            argv += ["--flush-rows", str(options.flush_rows)]
        if list(options.flush_urls) != list(flush.DATABASES):
            argv += ["--flush-db", ",".join(options.flush_urls)]
        if options.pg_url != flush.PG_URL:
            argv += ["--pg-url", flush.shown_url(options.pg_url)]
        if options.mariadb_url != flush.MARIADB_URL:
            argv += ["--mariadb-url", flush.shown_url(options.mariadb_url)]
    if options.json_path:
        argv += ["--json", options.json_path]
    return argv


def expand_scenarios(names: Sequence[str]) -> list[str]:
    """Scenario names with each group name (``grid``) replaced by its scenarios."""
    out: list[str] = []
    for name in names:
        for scenario in SCENARIO_GROUPS.get(name, (name,)):
            if scenario not in out:
                out.append(scenario)
    return out


def _grouped(names: Sequence[str]) -> list[str]:
    """The inverse, for the command line a report shows: whole groups by their name."""
    out = [s for s in SCENARIOS if s in names]
    for group, members in SCENARIO_GROUPS.items():
        if set(members) <= set(out):
            first = out.index(members[0])
            out = [s for s in out if s not in members]
            out.insert(min(first, len(out)), group)
    return out + [s for s in OWN_SCENARIOS if s in names]


Cells = tuple[str, ...]


def _grid(head: Cells, rows: Sequence[Cells], rule: bool = True) -> list[str]:
    """Aligned lines: the first two columns to the left, the figures to the right; a blank
    line wherever the first column changes."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: Cells) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(head)]
    if rule:
        out.append("  ".join("-" * w for w in widths))
    previous = None
    for row in rows:
        if rule and previous is not None and row[0] != previous:
            out.append("")
        out.append(line(row))
        previous = row[0]
    return out


def table_kind(scenario: str) -> str:
    """Which table a scenario's rows go in: "messaging", "durable" or "grid"."""
    if scenario in DURABLE_SCENARIOS:
        return "durable"
    return "grid" if scenario in GRID_SCENARIOS else "messaging"


def _rows(report: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [r for r in report["table"] if table_kind(r["scenario"]) == kind]


# A figure column: its heading, the row's key, the format spec and a suffix.
Column = tuple[str, str, str, str]


def _figures(report: dict[str, Any], kind: str, columns: Sequence[Column]) -> str:
    """The rows of one kind of table: scenario, system, then ``columns``."""
    head = ("scenario", "system", *(heading for heading, _, _, _ in columns))
    rows = [
        (
            row["scenario"],
            row["system"],
            *(fmt(row.get(key), spec, suffix) for _, key, spec, suffix in columns),
        )
        for row in _rows(report, kind)
    ]
    return "\n".join(_grid(head, rows))


def format_table(report: dict[str, Any]) -> str:
    """The messaging scenarios (one-way, request/reply): rates, latencies, ratios."""
    return _figures(
        report,
        "messaging",
        [
            ("rate (msg/s)", "rate", ",.0f", ""),
            ("p50 µs", "p50_us", ",.1f", ""),
            ("p99 µs", "p99_us", ",.1f", ""),
            ("ratio vs raw", "ratio_vs_raw", ".2f", "x"),
            ("ratio vs nats", "ratio_vs_nats", ".2f", "x"),
        ],
    )


def format_backlog(report: dict[str, Any]) -> str:
    """The durable scenarios: replay rate, accept (publish-acknowledged) rate, losses."""
    return _figures(
        report,
        "durable",
        [
            ("replay (msg/s)", "rate", ",.0f", ""),
            ("accepted (msg/s)", "accept_rate", ",.0f", ""),
            ("lost (worst run)", "lost_max", ",d", ""),
            ("replay vs mosquitto", "ratio_vs_mosquitto", ".2f", "x"),
            ("vs jetstream", "ratio_vs_jetstream", ".2f", "x"),
        ],
    )


def format_data_grid(report: dict[str, Any]) -> str:
    """The data grid scenarios: operations per second, latencies, ratios against redis-py."""
    return _figures(
        report,
        "grid",
        [
            ("rate (ops/s)", "rate", ",.0f", ""),
            ("p50 µs", "p50_us", ",.1f", ""),
            ("p99 µs", "p99_us", ",.1f", ""),
            ("vs redis", "ratio_vs_redis", ".2f", "x"),
            ("p50 vs redis", "p50_ratio_vs_redis", ".2f", "x"),
        ],
    )


def format_cpu(report: dict[str, Any]) -> str:
    """Where the CPU goes: per delivered message/request, in the client process and the hub
    (and the grid holder process, when a scenario has one)."""
    holders = has_holder(report)
    head: Cells = ("scenario", "system", "client µs/msg", "hub µs/msg", "client CPU", "hub CPU")
    if holders:
        head += ("holder µs/msg", "holder CPU")
    rows = []
    for scenario, entry in report["scenarios"].items():
        for system, data in entry["systems"].items():
            med = data["median"]
            row: Cells = (
                scenario,
                system,
                fmt(med.get("client_cpu_us_per_msg"), ".2f"),
                fmt(med.get("hub_cpu_us_per_msg"), ".2f"),
                fmt(med.get("client_cpu_pct"), ".0f", "%"),
                fmt(med.get("hub_cpu_pct"), ".0f", "%"),
            )
            if holders:
                row += (
                    fmt(med.get("holder_cpu_us_per_msg"), ".2f"),
                    fmt(med.get("holder_cpu_pct"), ".0f", "%"),
                )
            rows.append(row)
    lines = _grid(head, rows, rule=False)
    title = "CPU per message (median; 100% = one core busy for the whole measured phase):"
    return "\n".join([title, *("  " + line for line in lines)])


def has_holder(report: dict[str, Any]) -> bool:
    """Whether some scenario's medians include a grid holder process's CPU."""
    return any(
        data["median"].get("holder_cpu_us_per_msg") is not None
        for entry in report["scenarios"].values()
        for data in entry["systems"].values()
    )


def format_targets(report: dict[str, Any]) -> str:
    out = ["Targets (PacketStack, from the issue):"]
    for t in report["targets"]:
        if t["met"] is None:
            verdict, value = "NOT MEASURED", "-"
        else:
            verdict = "met" if t["met"] else "NOT MET"
            value = f"{t['value']:.2f}x"
        out.append(
            f"  [{verdict:^12}] {t['description']}: {value} (needs {t['op']} {t['threshold']:g}x)"
        )
    return "\n".join(out)


def _placement_line(report: dict[str, Any]) -> str:
    parts = []
    for scenario, entry in report["scenarios"].items():
        modes = {p["mode"] for p in entry.get("placement", {}).values()}
        parts.append(f"{scenario}: {'/'.join(sorted(modes)) or '?'}")
    return (
        f"CPU placement (--pin {report['options']['pin']}; split = hub and clients on two "
        "CPUs, same = one CPU; servers the suite did not start (NATS, Redis, --mqtt-url) are never "
        "pinned): " + ", ".join(parts)
    )


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    runs = report["options"]["runs"]
    lines = [
        f"PacketStack benchmark: median of {runs} run{'s' if runs != 1 else ''}"
        + (
            " (--quick: smoke-test counts, figures mean nothing)"
            if report["options"]["quick"]
            else ""
        ),
        f"{m['cpu_model']} x{m['cpu_count']}, {m['platform']}, Python {m['python']}, "
        f"uvloop {m['uvloop']}, nats-server {m.get('nats_server') or '?'}, {m['date']}",
    ]
    if m.get("mosquitto"):
        lines.append(f"mosquitto: {m['mosquitto']}; aiomqtt {m.get('aiomqtt') or '?'}")
    if m.get("redis_server"):
        lines.append(
            f"redis: {m['redis_server']} (not started by the suite); redis-py "
            f"{m.get('redis_py') or '?'}, hiredis {m.get('hiredis') or 'not installed'}"
        )
    if report.get("flush"):
        lines.append(flush_machine_line(m))
    if report["scenarios"]:
        lines.append(_placement_line(report))
    for kind, table in (
        ("messaging", format_table),
        ("durable", format_backlog),
        ("grid", format_data_grid),
    ):
        if _rows(report, kind):
            lines += ["", table(report)]
    if report.get("flush"):
        lines += ["", flush.format_table(report["flush"])]
    if report["scenarios"]:
        lines += ["", format_cpu(report)]
    lines += ["", format_targets(report)]
    errors = [
        f"  {sc} / {sy}: {r['error']}"
        for sc, entry in report["scenarios"].items()
        for sy, data in entry["systems"].items()
        for r in data["runs"]
        if r.get("error")
    ]
    if report.get("flush"):
        errors += ["  " + line for line in flush.errors(report["flush"])]
    if errors:
        lines += ["", "Errors:", *errors]
    return "\n".join(lines)


def flush_machine_line(m: dict[str, Any]) -> str:
    """The flush scenario's databases and drivers (not started by the suite)."""
    servers = ", ".join(f"{m.get(db + '_server') or db + ' unavailable'}" for db in flush.DATABASES)
    return (
        f"flush: {servers} (not started by the suite, never pinned); asyncpg "
        f"{m.get('asyncpg') or '?'}, asyncmy {m.get('asyncmy') or '?'}, SQLAlchemy "
        f"{m.get('sqlalchemy') or '?'}"
    )


# ----------------------------------------------------------------------------- CLI


def _names(values: list[str] | None, default: list[str]) -> list[str]:
    if not values:
        return list(default)
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def parse_args(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(
        prog="python3 -m bench",
        description="PacketStack against a raw asyncio relay, nats-py, mosquitto, NATS "
        "JetStream and redis-py, in the same run.",
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="repeat each scenario N times and report the median [3]"
    )
    parser.add_argument("--quick", action="store_true", help="tiny counts: a smoke test")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAMES",
        help=f"comma-separated scenarios to run: {', '.join(SCENARIOS)}; "
        f"'grid' for every data grid scenario; 'flush' (never run unless named: needs "
        f"PostgreSQL and MariaDB) for the write-behind flush to databases",
    )
    parser.add_argument(
        "--systems",
        action="append",
        metavar="NAMES",
        help=f"comma-separated systems to run: {', '.join(SYSTEMS)}",
    )
    parser.add_argument(
        "--json",
        dest="json_path",
        metavar="PATH",
        help="write every figure, the medians and the machine to PATH",
    )
    parser.add_argument(
        "--timebox", type=float, help="seconds a measured phase may send for [10, --quick: 3]"
    )
    parser.add_argument("--nats-url", default=sys_nats.NATS_URL)
    parser.add_argument(
        "--mqtt-url",
        metavar="URL",
        help="measure mosquitto at URL (e.g. " + sys_mosquitto.MQTT_URL + ") instead of a private "
        "broker the suite starts; a packaged broker queues only 1000 messages per client",
    )
    parser.add_argument(
        "--redis-url",
        default=sys_redis.REDIS_URL,
        metavar="URL",
        help="the Redis server the data grid scenarios compare with [%(default)s]",
    )
    parser.add_argument(
        "--pg-url",
        default=flush.PG_URL,
        metavar="URL",
        help="the PostgreSQL database of the flush scenario [%(default)s]",
    )
    parser.add_argument(
        "--mariadb-url",
        default=flush.MARIADB_URL,
        metavar="URL",
        help="the MariaDB database of the flush scenario [%(default)s]",
    )
    parser.add_argument(
        "--flush-rows",
        type=int,
        metavar="N",
        help="entries flushed (rows written) per measurement [1,000,000; --quick: 2,000]",
    )
    parser.add_argument(
        "--flush-db",
        action="append",
        metavar="NAMES",
        help="comma-separated databases of the flush scenario: postgresql, mariadb [both]",
    )
    parser.add_argument(
        "--pin",
        choices=PIN_MODES,
        default="auto",
        help="CPU placement of the hub and the clients: split = two CPUs, same = one CPU, "
        "none = the scheduler's choice; auto [default] = same for req-1, grid-get-1 and "
        "grid-put-1, split otherwise",
    )
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is not met")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)
    return Options(
        runs=args.runs,
        quick=args.quick,
        only=expand_scenarios(_names(args.only, list(SCENARIOS))),
        systems=_names(args.systems, list(SYSTEMS)),
        json_path=args.json_path,
        timebox=args.timebox,
        nats_url=args.nats_url,
        mqtt_url=args.mqtt_url,
        redis_url=args.redis_url,
        pg_url=args.pg_url,
        mariadb_url=args.mariadb_url,
        flush_rows=args.flush_rows,
        flush_databases=_names(args.flush_db, list(flush.DATABASES)),
        check=args.check,
        quiet=args.quiet,
        pin=args.pin,
    )


def write_json(report: dict[str, Any], path: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run the suite as the command line would; return the exit status."""
    try:
        options = parse_args(argv)
        report = run(options)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report), flush=True)
    if options.json_path:
        write_json(report, options.json_path)
        print(f"\nwrote {options.json_path}")
    failed_runs = sum(
        data["errors"]
        for entry in report["scenarios"].values()
        for data in entry["systems"].values()
    ) + len(flush.errors(report.get("flush") or {"databases": {}}))
    if failed_runs:
        return 1
    if options.check and any(t["met"] is False for t in report["targets"]):
        return 1
    return 0


__all__ = ["SCENARIOS", "SYSTEMS", "Options", "format_report", "main", "parse_args", "run"]
