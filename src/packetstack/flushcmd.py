"""``packetstack flush``: flush a running service's bridged maps, with a progress bar.

The command connects as an ending (``flush-<host>-<pid>``), sends the ``$flush`` request
(service/admin.py) and draws the ``$flush.progress`` packets the service sends meanwhile.
The flush runs in the service: interrupting the command does not stop it.
"""

from __future__ import annotations

import logging

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from .client import Client
from .dispatch import Context
from .errors import PacketStackError
from .grid.writebehind import FlushReport
from .service.admin import Flush, FlushDone, FlushProgress
from .status import default_name, explain


async def run_flush(
    url: str,
    token: str | None,
    *,
    map_name: str | None = None,
    retry_rejected: bool = False,
    name: str | None = None,
    timeout: float = 3.0,
    wait: float = 3600.0,
    console: Console | None = None,
) -> FlushReport:
    """Flush and show progress and a summary; the report. Raises StatusFailed with the
    cause and the fix when the service cannot be asked."""
    console = console or Console()
    logging.getLogger("packetstack.client").setLevel(logging.WARNING)
    connected = False
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    tasks: dict[str, TaskID] = {}
    try:
        client = Client(
            name or default_name("flush"),
            url,
            token=token,
            reconnect=False,
            connect_timeout=timeout,
            request_timeout=timeout,
        )

        @client.on(FlushProgress)
        def progressed(packet: FlushProgress, _: Context) -> None:
            if not tasks:
                bars.start()  # at the first progress: a refused flush draws nothing
            task = tasks.get(packet.map)
            if task is None:
                task = tasks[packet.map] = bars.add_task(f"map {packet.map}", total=packet.total)
            bars.update(task, completed=packet.done, total=packet.total)

        async with client:
            connected = True
            try:
                done: FlushDone = await client.request(
                    "service", Flush(map_name, retry_rejected), timeout=wait
                )
            finally:
                bars.stop()
    except PacketStackError as exc:
        raise explain(exc, url, connected, "flush", "flush") from exc
    console.print(summary_table(done.report))
    return done.report


def _count(count: int) -> str:
    return f"[red]{count:,}[/]" if count else "0"


def summary_table(report: FlushReport) -> Table:
    table = Table(
        title=f"Flush: {report.seconds:.1f} s",
        title_justify="left",
        caption=None
        if report.ok
        else "still dirty entries are written by the next flush; entries set aside wait for "
        "a change or --retry-rejected (packetstack status lists them)",
        caption_justify="left",
    )
    columns = ("map", "bridge", "written", "deleted", "set aside", "set aside (all)", "still dirty")
    for column in (*columns, "error"):
        numeric = column in columns[2:]
        table.add_column(column, justify="right" if numeric else "left", overflow="fold")
    for result in report.maps:
        table.add_row(
            result.map,
            result.bridge,
            f"{result.written:,}",
            f"{result.deleted:,}",
            _count(result.set_aside),
            _count(result.still_set_aside),
            _count(result.failed),
            result.error,
        )
    return table
