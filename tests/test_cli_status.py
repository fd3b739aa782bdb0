"""``packetstack status`` and ``--log-format json`` against a real ``packetstack serve``."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from rich.console import Console
from support import (
    ServiceProcess,
    clean_env,
    cli_command,
    config_toml,
    free_port,
    run_cli,
    serve_config,
    service_env,
    spawn_cli,
    table_rows,
)

from packetstack import Client, Packet
from packetstack.errors import AuthenticationFailed
from packetstack.logs import JsonFormatter
from packetstack.status import render

pytestmark = pytest.mark.timeout(90)

OPS_TOKEN = "ops-0f3c9a8e77d2"
APP_TOKEN = "app-5b1e4c0d92aa"
WATCHER_TOKEN = "watcher-77c1d0e3b5f4"
PRINCIPALS = config_toml(
    {"heartbeat": 1.0, "heartbeat_timeout": 3.0},
    {},
    [
        {"name": "ops", "token": OPS_TOKEN, "admin": True},
        {"name": "app", "token": APP_TOKEN},
        {"name": "watcher", "token": WATCHER_TOKEN, "endings": ["watch-*"], "admin": True},
    ],
)


class StatusNote(Packet):
    packet_tag: ClassVar[str] = "tests.status.Note"
    n: int


async def serve(
    tmp_path: Path, services: list[ServiceProcess], *args: str, **settings: object
) -> ServiceProcess:
    """A ``packetstack serve`` child with the principals above (``packetstack ARGS serve``)."""
    return await serve_config(tmp_path, services, PRINCIPALS, service_env(**settings), args=args)


async def status(*args: str) -> tuple[int, str, str]:
    """Run ``packetstack status ARGS``: (exit code, stdout, stderr)."""
    return await run_cli("status", *args, timeout=30.0)


async def test_status_shows_endings_groups_and_mailboxes(
    tmp_path: Path, services: list[ServiceProcess], clients: list[Client]
) -> None:
    service = await serve(tmp_path, services)
    worker = Client("worker-1", service.url, token=APP_TOKEN)
    clients.append(worker)
    await worker.connect()
    await worker.join("crew")
    for n in range(3):
        await worker.send("parked", StatusNote(n), ack=True)

    code, out, err = await status("--url", service.url, "--token", OPS_TOKEN)

    assert code == 0, err
    assert f"PacketStack service {service.url}" in out
    lines = out.splitlines()
    row = next(line for line in lines if "worker-1" in line and "app" in line)
    assert "yes" in row and "crew" in row and "127.0.0.1:" in row
    assert any("parked" in line and "no" in line for line in lines)
    # The admin's own session shows too, under its principal.
    assert any("status-" in line and "ops" in line and "yes" in line for line in lines)
    assert any("crew" in line and "worker-1" in line and "1" in line for line in lines)
    mailbox = [line for line in lines if "parked" in line][-1]
    assert mailbox.split("│")[2].strip() == "3"  # Mailboxes: ending, depth 3, ...
    assert "mailbox_stored" in out
    assert "packetstack.db" in out
    assert "connected to" not in err  # the status client's own INFO lines are quiet


async def test_status_shows_the_grid(
    tmp_path: Path, services: list[ServiceProcess], clients: list[Client]
) -> None:
    service = await serve(tmp_path, services)
    code, out, err = await status("--url", service.url, "--token", OPS_TOKEN)
    assert code == 0, err
    assert table_rows(out, "Grid") == [["the service", "271", "", ""]]  # no holder yet
    assert "partitions 271, backups 1 per partition, holders 0, table version 0, " in out
    assert "paused 0, waiting 0, ops 0" in out

    holder = Client("holder-1", service.url, token=APP_TOKEN, holds_data=True)
    clients.append(holder)
    await holder.connect()
    numbers = holder.grid.map("m", int)
    for n in range(4):
        await numbers.put(f"k{n}", n)

    # The partitions move to the holder; once they have, the service owns none.
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        code, out, err = await status("--url", service.url, "--token", OPS_TOKEN)
        assert code == 0, err
        rows = table_rows(out, "Grid")
        assert [row[0] for row in rows] == ["the service", "holder-1"]
        assert int(rows[0][1]) + int(rows[1][1]) == 271  # owned by one or the other
        if rows[0][1] == "0" and "paused 0," in out:
            break
        assert asyncio.get_running_loop().time() < deadline, out
        await asyncio.sleep(0.2)
    assert rows == [["the service", "0", "", ""], ["holder-1", "271", "0", "no"]]
    summary = next(line for line in out.splitlines() if line.startswith("partitions 271"))
    assert "holders 1," in summary and "paused 0, waiting 0, ops 4" in summary
    version = int(summary.split("table version ")[1].split(",")[0])
    assert version >= 271  # one change of hands per partition at least
    assert "grid_migrations" in out  # the grid's counters are among the counters


def test_grid_table_rows_limit_and_older_services() -> None:
    snapshot: dict[str, Any] = {
        "url": "ps://127.0.0.1:7400",
        "connections": 0,
        "endings": [],
        "groups": {},
        "packets_in": 0,
        "packets_out": 0,
        "packets_in_by_tag": {},
        "stats": {},
        "store": {"path": "packetstack.db", "commits": 0, "writes": 0, "unsaved_rows": 0},
        "grid": {
            "partitions": 271,
            "backups": 1,
            "version": 1234,
            "holders": [
                {"name": "h1", "owned": 100, "backups": 90, "leaving": False},
                {"name": "h2", "owned": 90, "backups": 100, "leaving": True},
                {"name": "h3", "owned": 81, "backups": 81, "leaving": False},
            ],
            "service_owned": 0,
            "paused": 3,
            "waiting": 1500,
            "ops": 1_000_000,
            "journal_retries": 0,
            "listeners": {},
        },
    }
    console = Console(width=200, record=True)
    console.print(render(snapshot, limit=2))
    out = console.export_text()
    assert table_rows(out, "Grid") == [
        ["the service", "0", "", ""],
        ["h1", "100", "90", "no"],
        ["h2", "90", "100", "yes"],
    ]
    assert "first 2 of 3" in out
    assert (
        "partitions 271, backups 1 per partition, holders 3, table version 1234, "
        "paused 3, waiting 1,500, ops 1,000,000"
    ) in out

    del snapshot["grid"]  # a service from before the grid
    console = Console(width=200, record=True)
    console.print(render(snapshot))
    assert "Grid: not reported by this service" in console.export_text()


async def test_status_refused_for_a_principal_without_admin(
    tmp_path: Path, services: list[ServiceProcess]
) -> None:
    service = await serve(tmp_path, services)

    code, out, err = await status("--url", service.url, "--token", APP_TOKEN)

    assert code == 1
    assert out == ""
    assert "error: PermissionDenied: principal 'app' may not ask for the service's status" in err
    assert "fix: pass --token with an operator token" in err and "admin = true" in err
    assert APP_TOKEN not in err

    code, out, _ = await status("--url", service.url, "--token", OPS_TOKEN)
    assert code == 0
    row = next(line for line in out.splitlines() if "permission_denied" in line)
    assert row.split("│")[2].strip() == "1"  # the refusal was counted


async def test_status_errors_name_the_cause_and_the_fix(
    tmp_path: Path, services: list[ServiceProcess]
) -> None:
    service = await serve(tmp_path, services)

    code, _, err = await status("--url", service.url, "--token", "wrong-token")
    assert code == 1
    assert "error: authentication failed" in err
    assert "fix: pass --token" in err

    code, _, err = await status("--url", f"ps://127.0.0.1:{free_port()}", "--timeout", "0.5")
    assert code == 1
    assert "error: cannot reach the service" in err
    assert "fix: start the service" in err

    # An admin that may not claim status-* names: the fix says so, and --name helps.
    code, _, err = await status("--url", service.url, "--token", WATCHER_TOKEN)
    assert code == 1
    assert "principal 'watcher' may not connect as 'status-" in err
    assert "--name" in err
    args = ("--url", service.url, "--token", WATCHER_TOKEN, "--name", "watch-1")
    code, out, err = await status(*args)
    assert code == 0, err
    assert any("watch-1" in line and "watcher" in line for line in out.splitlines())

    code, _, err = await status("--url", "http://127.0.0.1:1")
    assert code == 2
    assert "error: " in err and "fix: " in err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_status_watch_refreshes_until_interrupted(
    tmp_path: Path, services: list[ServiceProcess], signum: int
) -> None:
    service = await serve(tmp_path, services)
    proc = await spawn_cli("status", "--url", service.url, "--token", OPS_TOKEN, "--watch", "0.2")
    assert proc.stdout is not None
    marker = b"every 0.2 s, Ctrl-C to stop"  # in each view's heading
    seen = b""
    async with asyncio.timeout(30):  # three views, printed one after another (not a terminal)
        while seen.count(marker) < 3:
            chunk = await proc.stdout.read(65536)
            assert chunk, f"status --watch ended by itself: {seen.decode()}"
            seen += chunk
    assert proc.returncode is None, "status --watch ended by itself"
    proc.send_signal(signum)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err
    assert (seen + out).count(marker) >= 3
    assert "status-" in (seen + out).decode()


# ------------------------------------------------------------------ JSON logs


def json_lines(text: str) -> list[dict[str, str]]:
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    return entries


@pytest.mark.parametrize("how", ["flag", "config"])
async def test_json_logs_parse_line_by_line_without_tokens(
    tmp_path: Path, services: list[ServiceProcess], how: str
) -> None:
    if how == "flag":
        service = await serve(tmp_path, services, "--log-format", "json")
    else:
        service = await serve(tmp_path, services, log_format="json")
    with pytest.raises(AuthenticationFailed):
        async with Client("intruder", service.url, token="not-" + OPS_TOKEN, reconnect=False):
            pass
    async with Client("worker-1", service.url, token=APP_TOKEN):
        pass
    assert service.proc is not None
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(timeout=20) == 0

    text = service.log()
    entries = json_lines(text)
    messages = [entry["message"] for entry in entries]
    assert any(m.startswith("listening on ps://127.0.0.1:") for m in messages)
    assert any("refused 'intruder'" in m for m in messages)
    assert any("ending 'worker-1' joined" in m for m in messages)
    assert messages[-1] == "stopped"
    assert {entry["logger"] for entry in entries} >= {"packetstack.service"}
    assert OPS_TOKEN not in text and APP_TOKEN not in text


def test_json_formatter_carries_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed %d", (3,), sys.exc_info()
        )
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed 3"
    assert entry["level"] == "ERROR"
    assert entry["logger"] == "x"
    assert entry["time"].endswith("+00:00")
    assert "ValueError: boom" in entry["exception"]
    assert "\n" not in JsonFormatter().format(record)


def test_log_format_flag_is_checked(tmp_path: Path) -> None:
    result = subprocess.run(
        cli_command("--log-format", "xml", "serve"),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=clean_env(),
    )
    assert result.returncode == 2
    assert "'xml' is not one of 'text', 'json'" in result.stderr
