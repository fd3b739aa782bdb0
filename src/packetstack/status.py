"""``packetstack status``: a readable view of a running service, once or live.

The command connects as an ending (``status-<host>-<pid>``), asks the service for its
snapshot (the ``$status`` request, service/admin.py) and prints it as rich tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import time
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .client import Client
from .errors import (
    AuthenticationFailed,
    ConfigError,
    ConnectionFailed,
    ErrorCode,
    HandshakeRefused,
    PacketStackError,
    PermissionDenied,
    RemoteError,
    RequestTimeout,
)
from .service.admin import Status, StatusReport


class StatusFailed(PacketStackError):
    """``packetstack status`` could not get the snapshot: ``cause`` and ``fix`` say why."""

    def __init__(self, cause: str, fix: str, exit_code: int = 1) -> None:
        super().__init__(f"{cause}\nfix: {fix}")
        self.cause = cause
        self.fix = fix
        self.exit_code = exit_code


def default_name(command: str = "status") -> str:
    return f"{command}-{socket.gethostname()[:64]}-{os.getpid()}"


async def show_status(
    url: str,
    token: str | None,
    *,
    watch: float | None = None,
    name: str | None = None,
    timeout: float = 3.0,
    limit: int = 100,
    console: Console | None = None,
) -> None:
    """Print the service's status once, or every ``watch`` seconds until SIGINT
    (KeyboardInterrupt) or SIGTERM. Raises StatusFailed with the cause and the fix."""
    console = console or Console()
    logging.getLogger("packetstack.client").setLevel(logging.WARNING)  # not "connected"
    connected = False
    try:
        client = Client(
            name or default_name(),
            url,
            token=token,
            reconnect=False,
            connect_timeout=timeout,
            request_timeout=timeout,
        )
        async with client:
            connected = True
            if watch is None:
                console.print(render(await _ask(client), limit))
                return
            # On a terminal the view is redrawn in place; otherwise each one is printed.
            live = Live(console=console, auto_refresh=False) if console.is_terminal else None
            stop = asyncio.Event()
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
            with live or contextlib.nullcontext():
                while not stop.is_set():
                    view = render(await _ask(client), limit, watch)
                    if live is not None:
                        live.update(view, refresh=True)
                    else:
                        console.print(view)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), watch)
    except PacketStackError as exc:
        raise explain(exc, url, connected) from exc


async def _ask(client: Client) -> dict[str, Any]:
    report: StatusReport = await client.request("service", Status())
    return report.snapshot


def explain(
    exc: PacketStackError, url: str, connected: bool, command: str = "status", right: str = "admin"
) -> StatusFailed:
    """The cause of ``exc`` (raised before or after the handshake: ``connected``) and what
    to do about it; ``command`` (status, flush) needs a principal with ``right``."""
    denied = isinstance(exc, PermissionDenied)
    if denied and connected:  # the request itself
        return StatusFailed(
            f"PermissionDenied: {str(exc).removeprefix('PermissionDenied: ')}",
            "pass --token with an operator token (the service's tokens) or the token of a "
            f"principal that has {right} = true",
        )
    if denied:  # the handshake: the principal may not claim this name
        return StatusFailed(
            f"PermissionDenied: {exc}",
            f'allow the principal to connect under this name (endings = ["{command}-*"] in '
            "its [[service.principals]] entry) or choose an allowed name with --name",
        )
    if isinstance(exc, RemoteError) and exc.code in (
        ErrorCode.NO_HANDLER,
        ErrorCode.UNKNOWN_PACKET_TYPE,
    ):
        return StatusFailed(
            f"the service at {url} does not answer {command} requests: {exc}",
            f"upgrade the service to a PacketStack version with `packetstack {command}`",
        )
    if isinstance(exc, AuthenticationFailed):
        return StatusFailed(
            f"authentication failed: {exc}",
            "pass --token with one of the service's tokens (or a principal's token)",
        )
    if isinstance(exc, HandshakeRefused):
        return StatusFailed(f"the service refused the connection: {exc}", "see the message")
    if isinstance(exc, ConnectionFailed):
        return StatusFailed(
            str(exc),
            f"start the service (packetstack serve) or check --url {url} "
            "(ps:// or pss://, host and port)",
        )
    if isinstance(exc, RequestTimeout):
        wait = "--wait" if command == "flush" else "--timeout"  # flush waits for the flush
        return StatusFailed(
            f"the service at {url} did not answer: {exc}",
            f"check that the service is not overloaded, or raise {wait}",
        )
    if isinstance(exc, ConfigError):
        return StatusFailed(str(exc), "check --url, --name and --token", exit_code=2)
    return StatusFailed(f"{type(exc).__name__}: {exc}", "see the service's log")


# ------------------------------------------------------------------ rendering


def render(snapshot: dict[str, Any], limit: int = 100, every: float | None = None) -> Group:
    """The snapshot as rich tables: overview, endings, groups, mailboxes, grid, counters,
    store."""
    endings: list[dict[str, Any]] = snapshot["endings"]
    connected = sum(1 for ending in endings if ending["connected"])
    when = time.strftime("%H:%M:%S")
    heading = Text.assemble(
        ("PacketStack service ", "bold"),
        (snapshot["url"], "bold cyan"),
        f"  at {when}",
        f" (every {every:g} s, Ctrl-C to stop)" if every is not None else "",
        f"\n{snapshot['connections']} connections, {connected} of {len(endings)} endings "
        f"connected, {len(snapshot['groups'])} groups, packets in {snapshot['packets_in']:,}, "
        f"out {snapshot['packets_out']:,}",
    )
    return Group(
        heading,
        _endings(endings, limit),
        _groups(snapshot["groups"], limit),
        _mailboxes(endings, limit),
        _grid(snapshot.get("grid"), limit),
        _bridges(snapshot.get("bridges"), snapshot.get("set_aside") or [], limit),
        _counters(snapshot),
        _store(snapshot["store"]),
    )


def _table(title: str, *columns: str, total: int = 0, limit: int = 0) -> Table:
    """A table of ``total`` rows of which the first ``limit`` are shown (the caption says
    so when that is not all of them)."""
    caption = f"first {limit} of {total}" if limit < total else None
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    for column in columns:
        numeric = column in (
            "depth",
            "in flight",
            "stored",
            "bytes",
            "acked",
            "members",
            "count",
            "owned",
            "backups",
            "dirty",
            "set aside",
        )
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    return table


def _endings(endings: list[dict[str, Any]], limit: int) -> Table:
    table = _table(
        "Endings",
        "ending",
        "connected",
        "principal",
        "peer",
        "depth",
        "in flight",
        "groups",
        total=len(endings),
        limit=limit,
    )
    for ending in endings[:limit]:
        table.add_row(
            ending["name"],
            "[green]yes[/]" if ending["connected"] else "[dim]no[/]",
            ending["principal"] or "",
            _peer(ending["peer"]),
            str(ending["depth"]),
            str(ending["in_flight"]),
            ", ".join(ending["groups"]),
        )
    return table


def _peer(peer: str | None) -> str:
    """``('10.0.0.5', 51234)`` as ``10.0.0.5:51234``; anything else as it is."""
    if peer is None:
        return ""
    found = re.fullmatch(r"\('([^']*)', (\d+)(?:, \d+, \d+)?\)", peer)
    if found is None:
        return peer
    host = f"[{found[1]}]" if ":" in found[1] else found[1]
    return f"{host}:{found[2]}"


def _groups(groups: dict[str, list[str]], limit: int) -> RenderableType:
    if not groups:
        return Text("Groups: none", style="italic")
    table = _table("Groups", "group", "members", "names", total=len(groups), limit=limit)
    for group, names in list(groups.items())[:limit]:
        more = f" … and {len(names) - 20} more" if len(names) > 20 else ""
        table.add_row(group, str(len(names)), ", ".join(names[:20]) + more)
    return table


def _mailboxes(endings: list[dict[str, Any]], limit: int) -> RenderableType:
    waiting = sorted((e for e in endings if e["depth"]), key=lambda e: (-e["depth"], e["name"]))
    if not waiting:
        return Text("Mailboxes: all empty", style="italic")
    table = _table(
        "Mailboxes (non-empty, deepest first)",
        "ending",
        "depth",
        "stored",
        "bytes",
        "in flight",
        "acked",
        total=len(waiting),
        limit=limit,
    )
    for ending in waiting[:limit]:
        table.add_row(
            ending["name"],
            str(ending["depth"]),
            str(ending["stored"]),
            f"{ending['stored_bytes']:,}",
            str(ending["in_flight"]),
            str(ending["acked"]),
        )
    return table


def _grid(grid: dict[str, Any] | None, limit: int) -> RenderableType:
    """Partitions per holder, the service's own first, and a summary line."""
    if grid is None:  # a service from before the grid
        return Text("Grid: not reported by this service", style="italic")
    holders: list[dict[str, Any]] = grid["holders"]
    table = _table(
        "Grid",
        "holder",
        "owned",
        "backups",
        "leaving",
        total=len(holders),
        limit=limit,
    )
    table.add_row("the service", str(grid["service_owned"]), "", "")
    for holder in holders[:limit]:
        table.add_row(
            holder["name"],
            str(holder["owned"]),
            str(holder["backups"]),
            "[yellow]yes[/]" if holder["leaving"] else "[dim]no[/]",
        )
    summary = Text(
        f"partitions {grid['partitions']}, backups {grid['backups']} per partition, "
        f"holders {len(holders)}, table version {grid['version']}, "
        f"paused {grid['paused']}, waiting {grid['waiting']:,}, ops {grid['ops']:,}"
    )
    return Group(table, summary)


def _bridges(
    bridges: dict[str, Any] | None, set_aside: list[dict[str, Any]], limit: int
) -> RenderableType:
    """Dirty entries per bridged map, the running flush, and the entries set aside."""
    if not bridges or not bridges["maps"]:
        return Text("Bridges: no map has a database bridge", style="italic")
    maps: dict[str, dict[str, Any]] = bridges["maps"]
    table = _table(
        "Bridges (write-behind)",
        "map",
        "bridge",
        "table",
        "load",
        "dirty",
        "set aside",
        "flushing",
        total=len(maps),
        limit=limit,
    )
    for name, info in list(maps.items())[:limit]:
        flushing = info["flushing"]
        table.add_row(
            name,
            info["bridge"],
            info["table"],
            info["load"],
            f"{info['dirty']:,}",
            f"[red]{info['set_aside']:,}[/]" if info["set_aside"] else "0",
            f"{flushing[0]:,} / {flushing[1]:,}" if flushing else "",
        )
    last = bridges["last_flush"]
    summary = Text(
        f"flushes {bridges['flushes']}, retries {bridges['retries']}"
        + (
            ""
            if last is None
            else f"; last flush: {last['written']:,} written, {last['deleted']:,} deleted, "
            f"{last['set_aside']:,} set aside, {last['failed']:,} still dirty, "
            f"{last['seconds']:.1f} s"
        )
    )
    if not set_aside:
        return Group(table, summary)
    aside = _table("Set aside by flushes", "map", "key", "error", total=len(set_aside), limit=limit)
    for entry in set_aside[:limit]:
        aside.add_row(entry["map"], entry["key"], entry["error"])
    return Group(table, summary, aside)


def _counters(snapshot: dict[str, Any]) -> Table:
    table = _table("Counters", "counter", "count")
    table.add_row("packets_in", f"{snapshot['packets_in']:,}")
    table.add_row("packets_out", f"{snapshot['packets_out']:,}")
    for key, count in sorted(snapshot["stats"].items()):
        table.add_row(key, f"{count:,}")
    by_tag = sorted(snapshot["packets_in_by_tag"].items(), key=lambda item: -item[1])
    for tag, count in by_tag[:10]:
        table.add_row(f"packets_in tag {tag}", f"{count:,}")
    return table


def _store(store: dict[str, Any]) -> Table:
    table = _table("Store", "path", "commits", "writes", "unsaved rows")
    table.add_row(
        store["path"], f"{store['commits']:,}", f"{store['writes']:,}", str(store["unsaved_rows"])
    )
    return table
