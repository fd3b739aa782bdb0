"""Command line: ``packetstack serve | demo | config check | status | flush``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import click

from .errors import ConfigError, PacketStackError, StoreError
from .logs import LogFormat, setup_logging
from .service import Service
from .service.config import load
from .transport import run


@click.group()
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING…")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    help="text (the default) or json: one JSON object per line [serve: config log_format].",
)
@click.pass_context
def main(ctx: click.Context, log_level: str, log_format: LogFormat | None) -> None:
    """PacketStack: typed packets between a service and a fleet of clients."""
    ctx.obj = {"log_level": log_level, "log_format": log_format}
    setup_logging(log_level, log_format or "text")


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="TOML file.")
@click.option("--host", help="Address to listen on [127.0.0.1].")
@click.option("--port", type=int, help="TCP port [7400]; 0 picks a free one.")
@click.option("--unix", "unix_path", help="Also listen on this Unix socket path.")
@click.option("--data-dir", help="Data directory [packetstack-data].")
@click.option("--token", "tokens", multiple=True, help="Accepted token (repeatable).")
@click.option("--tls-cert", help="PEM certificate: listen with TLS.")
@click.option("--tls-key", help="PEM private key for --tls-cert.")
def serve(config_file: str | None, **flags: Any) -> None:
    """Run the service until SIGINT or SIGTERM.

    Settings come from defaults, then --config, then PACKETSTACK_* variables, then flags.
    """
    flags["tokens"] = list(flags["tokens"]) or None
    try:
        config = load(config_file, overrides=flags)
        options = click.get_current_context().find_root().obj or {}
        if options.get("log_format") is None and config.log_format != "text":
            setup_logging(options.get("log_level", "INFO"), config.log_format)  # flag wins
        run(_serve(config))
    except (ConfigError, StoreError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


async def _serve(config: Any) -> None:
    service = Service(config=config)
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    logging.getLogger("packetstack.service").info("shutting down")
    await service.close()
    logging.getLogger("packetstack.service").info("stopped")


@main.command()
@click.option("--url", help="Use a running service instead of starting one in-process.")
@click.option("--token", help="Token for --url.")
def demo(url: str | None, token: str | None) -> None:
    """Start a service on the embedded default and let two endings talk."""
    from .demo import run_demo

    logging.getLogger().setLevel(logging.WARNING)
    try:
        run(run_demo(url, token))
    except PacketStackError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@main.group("config")
def config_group() -> None:
    """Configuration files."""


@config_group.command("check")
@click.argument("file")
def config_check(file: str) -> None:
    """Validate a TOML config file: print every problem as FILE:LINE: problem and exit 1,
    or print "ok: FILE" and what it configures. PACKETSTACK_* variables are not read."""
    from .service.configcheck import check, summary

    problems = check(file)
    if problems:
        for problem in problems:
            click.echo(problem.format(file))
        sys.exit(1)
    click.echo(f"ok: {file}")
    click.echo(summary(load(file, environ={})))


@main.command()
@click.option("--url", default="ps://127.0.0.1:7400", show_default=True, help="The service.")
@click.option("--token", help="A token whose principal has admin = true.")
@click.option("--watch", type=click.FloatRange(min=0.1), help="Refresh every SECONDS.")
@click.option("--name", help="Ending name to connect as [status-<host>-<pid>].")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Seconds.")
@click.option("--limit", type=int, default=100, show_default=True, help="Rows per table.")
def status(url: str, token: str | None, watch: float | None, name: str | None, **opts: Any) -> None:
    """Show a running service: endings, groups, mailboxes, counters and store.

    With --watch SECONDS the view refreshes until Ctrl-C. Needs an admin principal."""
    from .status import StatusFailed, show_status

    try:
        run(show_status(url, token, watch=watch, name=name, **opts))
    except StatusFailed as exc:
        click.echo(f"error: {exc.cause}\nfix: {exc.fix}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        pass  # --watch ends with Ctrl-C


@main.command()
@click.option("--url", default="ps://127.0.0.1:7400", show_default=True, help="The service.")
@click.option("--token", help="A token whose principal has flush = true (or admin = true).")
@click.option("--map", "map_name", help="Flush only this map [every bridged map].")
@click.option(
    "--retry-rejected", is_flag=True, help="Also retry entries set aside by earlier flushes."
)
@click.option("--name", help="Ending name to connect as [flush-<host>-<pid>].")
@click.option("--timeout", type=float, default=3.0, show_default=True, help="Connect, seconds.")
@click.option(
    "--wait", type=float, default=3600.0, show_default=True, help="Seconds to wait for the flush."
)
def flush(url: str, token: str | None, map_name: str | None, **opts: Any) -> None:
    """Write the dirty entries of a running service's bridged maps to their databases.

    Shows a progress bar per map and a summary. Exit code 0 when everything was written,
    1 when entries were set aside or are still dirty (the database could not be reached),
    2 when the service could not be asked."""
    from .flushcmd import run_flush
    from .status import StatusFailed

    try:
        report = run(run_flush(url, token, map_name=map_name, **opts))
    except StatusFailed as exc:
        click.echo(f"error: {exc.cause}\nfix: {exc.fix}", err=True)
        sys.exit(2)
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
