"""``packetstack flush`` against a real ``packetstack serve`` whose maps have a SQLite bridge:
progress and summary, the rows it leaves in the database, exit codes, and refusals."""

from __future__ import annotations

import signal
import sqlite3
from pathlib import Path
from typing import NamedTuple

import msgspec
import pytest
from support import (
    ServiceProcess,
    clean_env,
    config_toml,
    free_port,
    rows_after,
    run_cli,
    serve_config,
    table_rows,
)

from packetstack import Client

pytestmark = pytest.mark.timeout(120)

OPS_TOKEN = "ops-3f9d0c1b7a2e"
FLUSH_TOKEN = "flush-8a6e2d4c1b90"
APP_TOKEN = "app-c4b2a09e7d13"

# The service imports the typed map's Struct from this module (on its PYTHONPATH).
MODELS = """\
import msgspec


class Player(msgspec.Struct):
    name: str
    score: int = 0
"""


def config(database: Path) -> str:
    """The principals (an operator, a flusher, an app) and a SQLite bridge for two maps."""
    return config_toml(
        {"heartbeat": 1.0, "heartbeat_timeout": 3.0},
        {
            "bridges.local": {
                "url": f"sqlite+aiosqlite:///{database}",
                "batch": 100,
                "retries": 2,
                "retry_delay": 0.05,
            },
            "maps.players": {"bridge": "local", "mode": "typed", "type": "flushmodels:Player"},
            "maps.notes": {"bridge": "local"},
        },
        [
            {"name": "ops", "token": OPS_TOKEN, "admin": True},
            {"name": "flusher", "token": FLUSH_TOKEN, "endings": ["flush-*"], "flush": True},
            {"name": "app", "token": APP_TOKEN},
        ],
    )


class Player(msgspec.Struct):
    name: str
    score: int = 0


class NotAPlayer(msgspec.Struct):
    name: int


class Served(NamedTuple):
    service: ServiceProcess
    app: Client  # connected as the app
    database: Path  # the bridge's SQLite file


async def serve(
    tmp_path: Path,
    services: list[ServiceProcess],
    clients: list[Client],
    database: Path | None = None,
) -> Served:
    """A ``packetstack serve`` child with the principals and the SQLite bridge (to
    ``database``, by default tmp_path/app.db) above, and a client connected to it as the
    app."""
    (tmp_path / "flushmodels.py").write_text(MODELS)
    database = database or tmp_path / "app.db"
    env = clean_env(PYTHONPATH=str(tmp_path))
    service = await serve_config(tmp_path, services, config(database), env)
    app = Client("app-1", service.url, token=APP_TOKEN)
    clients.append(app)
    await app.connect()
    return Served(service, app, database)


@pytest.fixture
async def served(tmp_path: Path, services: list[ServiceProcess], clients: list[Client]) -> Served:
    return await serve(tmp_path, services, clients)


def summary_rows(out: str) -> list[list[str]]:
    """The cells of each row of the summary table (titled ``Flush: N s``) that flush prints."""
    return rows_after(out.splitlines(), lambda line: line.startswith("Flush: "))


def rows(database: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(database) as db:
        return db.execute(sql).fetchall()


async def test_flush_writes_the_rows_with_progress_and_a_summary(served: Served) -> None:
    service, app, database = served
    players = app.grid.map("players", Player)
    await players.put_all({f"p{n:03}": Player(f"Player {n}", n) for n in range(250)})
    for score in range(5):  # coalesced: one row with the last value
        await players.put("p000", Player("Ann", score))
    await players.delete("p249")
    notes = app.grid.map("notes", dict)
    await notes.put("motd", {"text": "hello", "tags": ["a", "b"]})
    # Tables are created at start; nothing is written before a flush.
    assert rows(database, "SELECT count(*) FROM players") == [(0,)]

    code, out, err = await run_cli("flush", "--url", service.url, "--token", FLUSH_TOKEN)

    assert code == 0, out + err
    assert "map players" in out and "250/250" in out  # the progress bar, drawn to the end
    assert "map notes" in out and "1/1" in out
    assert summary_rows(out) == [
        ["players", "local", "249", "1", "0", "0", "0", ""],  # p249: put, then deleted: a delete
        ["notes", "local", "1", "0", "0", "0", "0", ""],
    ]
    assert "still dirty entries" not in out  # the caption of a flush that left some
    assert rows(database, "SELECT count(*) FROM players") == [(249,)]
    assert rows(database, "SELECT * FROM players WHERE key = 'p000'") == [("p000", "Ann", 4)]
    assert rows(database, "SELECT * FROM players WHERE key = 'p007'") == [("p007", "Player 7", 7)]
    assert rows(database, "SELECT * FROM notes") == [("motd", '{"text":"hello","tags":["a","b"]}')]
    assert "connected to" not in err  # the command's own client logs are quiet

    # Deletes become deletes; --map flushes that map only.
    await players.delete("p001")
    await notes.delete("motd")
    code, out, err = await run_cli(
        "flush", "--url", service.url, "--token", FLUSH_TOKEN, "--map", "notes"
    )
    assert code == 0, out + err
    assert summary_rows(out) == [["notes", "local", "0", "1", "0", "0", "0", ""]]
    assert rows(database, "SELECT count(*) FROM notes") == [(0,)]
    assert rows(database, "SELECT count(*) FROM players") == [(249,)]

    # The status shows what is still dirty (p001's delete) and the flushes so far.
    code, out, err = await run_cli("status", "--url", service.url, "--token", OPS_TOKEN)
    assert code == 0, err
    assert table_rows(out, "Bridges (write-behind)") == [
        ["players", "local", "players", "none", "1", "0", ""],
        ["notes", "local", "notes", "none", "0", "0", ""],
    ]
    assert "flushes 2, retries 0; last flush: 0 written, 1 deleted, 0 set aside" in out

    code, out, err = await run_cli("flush", "--url", service.url, "--token", OPS_TOKEN)  # admin may
    assert code == 0, out + err
    assert summary_rows(out) == [
        ["players", "local", "0", "1", "0", "0", "0", ""],
        ["notes", "local", "0", "0", "0", "0", "0", ""],
    ]
    assert rows(database, "SELECT count(*) FROM players WHERE key = 'p001'") == [(0,)]


async def test_flush_refused_to_a_principal_without_the_flush_right(served: Served) -> None:
    service, app, database = served
    await app.grid.map("players", Player).put("ann", Player("Ann"))

    code, out, err = await run_cli("flush", "--url", service.url, "--token", APP_TOKEN)

    assert code == 2, out + err
    assert "Flush:" not in out
    assert (
        "error: PermissionDenied: principal 'app' may not flush the grid's bridged maps: "
        "that takes a principal with flush = true"
    ) in err
    fix = next(line for line in err.splitlines() if line.startswith("fix: "))
    assert "--token" in fix and "flush = true" in fix
    assert APP_TOKEN not in err
    assert "Traceback" not in err
    assert rows(database, "SELECT count(*) FROM players") == [(0,)]  # nothing written

    code, out, _ = await run_cli("status", "--url", service.url, "--token", OPS_TOKEN)
    assert code == 0
    row = next(line for line in out.splitlines() if "permission_denied" in line)
    assert row.split("│")[2].strip() == "1"  # the refusal was counted


async def test_flush_of_a_service_that_is_not_running(tmp_path: Path) -> None:
    url = f"ps://127.0.0.1:{free_port()}"

    code, out, err = await run_cli(
        "flush", "--url", url, "--token", FLUSH_TOKEN, "--timeout", "0.5"
    )

    assert code == 2, out + err
    assert f"error: cannot reach the service at {url}" in err
    assert "fix: start the service (packetstack serve) or check --url" in err
    assert "Traceback" not in err


async def test_flush_of_a_map_without_a_bridge(served: Served) -> None:
    service, app, database = served
    await app.grid.map("players", Player).put("ann", Player("Ann"))

    args = ("--url", service.url, "--token", FLUSH_TOKEN, "--map", "unknown")
    code, out, err = await run_cli("flush", *args)

    assert code == 2, out + err
    error = next(line for line in err.splitlines() if line.startswith("error: "))
    assert "map 'unknown' has no bridge" in error
    assert "flush one of ['notes', 'players']" in error  # the maps it could flush
    assert "fix: " in err
    assert "Traceback" not in err
    assert rows(database, "SELECT count(*) FROM players") == [(0,)]  # nothing flushed


async def test_entries_set_aside_exit_1_until_they_are_fixed(served: Served) -> None:
    service, app, database = served
    await app.grid.map("players", Player).put_all({"ann": Player("Ann", 1), "bob": Player("Bob")})
    await app.grid.map("players", NotAPlayer).put("eve", NotAPlayer(7))  # not a Player
    flush = ("--url", service.url, "--token", FLUSH_TOKEN)

    code, out, err = await run_cli("flush", *flush)

    assert code == 1, out + err
    assert summary_rows(out)[0] == ["players", "local", "2", "0", "1", "1", "0", ""]
    assert rows(database, "SELECT key FROM players ORDER BY key") == [("ann",), ("bob",)]
    code, out, err = await run_cli("status", "--url", service.url, "--token", OPS_TOKEN)
    assert code == 0, err
    assert table_rows(out, "Bridges (write-behind)")[0][4:6] == ["1", "1"]  # dirty, set aside
    [aside] = table_rows(out, "Set aside by flushes")
    assert aside[:2] == ["players", repr(msgspec.msgpack.encode("eve"))]
    assert "does not decode" in aside[2]

    # Skipped by later flushes, which still report it (status 1: a cron job keeps seeing
    # it), and tried again (and refused again) only when asked.
    code, out, _ = await run_cli("flush", *flush)
    assert code == 1 and summary_rows(out)[0] == ["players", "local", "0", "0", "0", "1", "0", ""]
    code, out, _ = await run_cli("flush", *flush, "--retry-rejected")
    assert code == 1 and summary_rows(out)[0] == ["players", "local", "0", "0", "1", "1", "0", ""]

    # Fixed in the grid: the next flush writes it and forgets the error.
    await app.grid.map("players", Player).put("eve", Player("Eve", 3))
    code, out, err = await run_cli("flush", *flush)
    assert code == 0, out + err
    assert summary_rows(out)[0] == ["players", "local", "1", "0", "0", "0", "0", ""]
    assert rows(database, "SELECT * FROM players WHERE key = 'eve'") == [("eve", "Eve", 3)]
    code, out, _ = await run_cli("status", "--url", service.url, "--token", OPS_TOKEN)
    assert "Set aside by flushes" not in out


async def test_an_unreachable_database_leaves_the_entries_dirty(
    tmp_path: Path, services: list[ServiceProcess], clients: list[Client]
) -> None:
    folder = tmp_path / "not-yet"  # SQLite cannot open a file in a folder that does not exist
    service, app, database = await serve(tmp_path, services, clients, folder / "app.db")
    assert "the service starts without it and retries at the next flush" in service.log()
    await app.grid.map("players", Player).put_all({f"p{n}": Player(f"P{n}") for n in range(3)})
    flush = ("--url", service.url, "--token", FLUSH_TOKEN)

    code, out, err = await run_cli("flush", *flush)

    assert code == 1, out + err
    players, notes = summary_rows(out)
    assert players[:7] == ["players", "local", "0", "0", "0", "0", "3"]  # 3 still dirty
    assert "unable to open database file" in players[7]
    assert "gave up after 2 attempts" in out
    assert notes[:7] == ["notes", "local", "0", "0", "0", "0", "0"]  # not tried: same bridge
    assert "still dirty entries are written by the next flush" in out

    folder.mkdir()
    code, out, err = await run_cli("flush", *flush)
    assert code == 0, out + err
    assert summary_rows(out)[0] == ["players", "local", "3", "0", "0", "0", "0", ""]
    assert rows(database, "SELECT count(*) FROM players") == [(3,)]


async def test_stopping_the_service_flushes_and_a_kill_loses_nothing(served: Served) -> None:
    service, app, database = served
    players = app.grid.map("players", Player)
    await players.put_all({f"p{n}": Player(f"P{n}", n) for n in range(10)})

    # kill -9: the changes are dirty in the journal, and the next start's flush writes them.
    service.kill9()
    service.start()
    await service.wait_listening()
    assert rows(database, "SELECT count(*) FROM players") == [(0,)]
    await app.wait_connected()
    await players.put("p10", Player("P10", 10))

    # SIGTERM: the service flushes before it stops.
    assert service.proc is not None
    service.proc.send_signal(signal.SIGTERM)
    assert service.proc.wait(timeout=30) == 0, service.log()
    log = service.log()
    assert "flushing 2 bridged maps before closing" in log
    assert "flush on close: 11 written, 0 deleted, 0 set aside (0 in all), 0 still dirty" in log
    assert rows(database, "SELECT count(*) FROM players") == [(11,)]
