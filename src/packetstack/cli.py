"""Command line: ``packetstack serve | demo``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Any

import click

from .errors import ConfigError, PacketStackError, StoreError
from .service import Service
from .service.config import load
from .transport import run


@click.group()
@click.option("--log-level", default="INFO", show_default=True, help="DEBUG, INFO, WARNING…")
def main(log_level: str) -> None:
    """PacketStack: typed packets between a service and a fleet of clients."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


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


if __name__ == "__main__":
    main()
