"""Render a saved report: ``python3 -m bench.report bench/results/latest.json [--markdown]``.

Without ``--markdown`` it prints what the suite printed; with it, the Markdown tables that
bench/RESULTS.md is written from.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import flush
from .suite import flush_machine_line, format_report, has_holder, table_kind


def _cell(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _load(values: list[float] | None) -> str:
    return "?" if not values else " / ".join(f"{v:.2f}" for v in values)


def _messaging(report: dict[str, Any]) -> list[str]:
    """The messaging scenarios' table, or nothing when none was run."""
    rows = [r for r in report["table"] if table_kind(r["scenario"]) == "messaging"]
    if not rows:
        return []
    lines = [
        "",
        "| scenario | system | rate (msg/s) | p50 µs | p99 µs | ratio vs raw | ratio vs nats |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['scenario']} | {row['system']} | {_cell(row['rate'], ',.0f')} | "
            f"{_cell(row['p50_us'], ',.1f')} | {_cell(row['p99_us'], ',.1f')} | "
            f"{_cell(row['ratio_vs_raw'], '.2f', 'x')} | "
            f"{_cell(row['ratio_vs_nats'], '.2f', 'x')} |"
        )
    return lines


def _backlog(report: dict[str, Any]) -> list[str]:
    """The durable scenarios' table, or nothing when none was run."""
    rows = [r for r in report["table"] if table_kind(r["scenario"]) == "durable"]
    if not rows:
        return []
    lines = [
        "",
        "| scenario | system | replay (msg/s) | accepted (msg/s) | lost (worst run) |"
        " replay vs mosquitto | replay vs jetstream |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['scenario']} | {row['system']} | {_cell(row['rate'], ',.0f')} | "
            f"{_cell(row['accept_rate'], ',.0f')} | {_cell(row['lost_max'], ',d')} | "
            f"{_cell(row['ratio_vs_mosquitto'], '.2f', 'x')} | "
            f"{_cell(row['ratio_vs_jetstream'], '.2f', 'x')} |"
        )
    return lines


def _data_grid(report: dict[str, Any]) -> list[str]:
    """The data grid scenarios' table, or nothing when none was run."""
    rows = [r for r in report["table"] if table_kind(r["scenario"]) == "grid"]
    if not rows:
        return []
    lines = [
        "",
        "| scenario | system | rate (ops/s) | p50 µs | p99 µs | rate vs redis | p50 vs redis |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['scenario']} | {row['system']} | {_cell(row['rate'], ',.0f')} | "
            f"{_cell(row['p50_us'], ',.1f')} | {_cell(row['p99_us'], ',.1f')} | "
            f"{_cell(row['ratio_vs_redis'], '.2f', 'x')} | "
            f"{_cell(row.get('p50_ratio_vs_redis'), '.2f', 'x')} |"
        )
    return lines


def _cpu(report: dict[str, Any]) -> list[str]:
    """The CPU table of the suite's scenarios, or nothing when none was run."""
    if not report["scenarios"]:
        return []
    holders = has_holder(report)
    grid = any(table_kind(scenario) == "grid" for scenario in report["scenarios"])
    lines = [
        "",
        "| scenario | system | client CPU µs/msg | hub CPU µs/msg | client CPU | hub CPU |"
        + (" holder CPU µs/msg | holder CPU |" if holders else "")
        + (" rates of the runs (msg/s; grid: ops/s) |" if grid else " rates of the runs (msg/s) |"),
        "| --- | --- | ---: | ---: | ---: | ---: |"
        + (" ---: | ---: |" if holders else "")
        + " --- |",
    ]
    for scenario, entry in report["scenarios"].items():
        for system, data in entry["systems"].items():
            med = data["median"]
            rates = ", ".join(_cell(r.get("rate"), ",.0f") for r in data["runs"])
            holder = (
                f"{_cell(med.get('holder_cpu_us_per_msg'), '.2f')} | "
                f"{_cell(med.get('holder_cpu_pct'), '.0f', '%')} | "
                if holders
                else ""
            )
            lines.append(
                f"| {scenario} | {system} | {_cell(med.get('client_cpu_us_per_msg'), '.2f')} | "
                f"{_cell(med.get('hub_cpu_us_per_msg'), '.2f')} | "
                f"{_cell(med.get('client_cpu_pct'), '.0f', '%')} | "
                f"{_cell(med.get('hub_cpu_pct'), '.0f', '%')} | {holder}{rates} |"
            )
    return lines


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"- command: `{report['command']}`",
        f"- machine: {m['cpu_model']}, {m['cpu_count']} CPUs, {m['platform']}",
        f"- Python {m['python']} ({m['python_implementation']}), uvloop {m['uvloop']}, "
        f"msgspec {m['msgspec']}, nats-py {m['nats_py']}, {m.get('nats_server') or '?'}",
        *(
            [f"- mosquitto: {m['mosquitto']}; aiomqtt {m.get('aiomqtt')}"]
            if m.get("mosquitto")
            else []
        ),
        *(
            [
                f"- redis: {m['redis_server']} (not started by the suite); redis-py "
                f"{m.get('redis_py')}, hiredis {m.get('hiredis') or 'not installed'}"
            ]
            if m.get("redis_server")
            else []
        ),
        *([f"- {flush_machine_line(m)}"] if report.get("flush") else []),
        f"- packetstack {m['packetstack']} from `{m.get('packetstack_source')}`, commit "
        f"`{m.get('git_commit')}`"
        + (" (with uncommitted changes in src/)" if m.get("git_src_dirty") else ""),
        f"- date {m['date']}, load average {_load(m.get('loadavg_start'))} at the start, "
        f"{_load(m.get('loadavg_end'))} at the end; the suite took {report.get('duration_s')} s",
    ]
    lines += _messaging(report)
    lines += _backlog(report)
    lines += _data_grid(report)
    if report.get("flush"):
        lines += ["", flush.markdown(report["flush"])]
    lines += _cpu(report)
    lines += ["", "| target | value | needs | met |", "| --- | ---: | ---: | --- |"]
    for t in report["targets"]:
        value = _cell(t["value"], ".2f", "x")
        met = "not measured" if t["met"] is None else ("**yes**" if t["met"] else "**no**")
        lines.append(f"| {t['description']} | {value} | {t['op']} {t['threshold']:g}x | {met} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.report", description=__doc__)
    parser.add_argument("path")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args(argv)
    with open(args.path, encoding="utf-8") as file:
        report = json.load(file)
    print(markdown(report) if args.markdown else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
