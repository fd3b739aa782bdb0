"""A data-grid holder in its own process, for the remote grid scenarios.

``python3 -m bench.grid_holder --url ps://127.0.0.1:PORT --ready PATH`` connects a
``Client(holds_data=True)``, waits until it owns every partition of the grid, writes PATH
(the suite waits for it), then holds them until SIGTERM or SIGINT, when it closes the
client gracefully (the service moves its partitions back first).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from pathlib import Path

from packetstack import Client

from .common import REQUEST_TIMEOUT, run_loop

HOLDER_NAME = "bench-holder"


async def hold(url: str, name: str, ready: Path, timeout: float) -> None:
    client = Client(name, url, reconnect=False, request_timeout=REQUEST_TIMEOUT, holds_data=True)
    await client.connect()
    try:
        holding = client.grid.holding
        assert holding is not None
        deadline = time.monotonic() + timeout
        while len(holding.owned) < client.grid.partitions:
            if time.monotonic() > deadline or not client.connected:
                raise SystemExit(
                    f"{name} owns {len(holding.owned)} of {client.grid.partitions} partitions "
                    f"after {timeout:g} s"
                )
            await asyncio.sleep(0.01)
        ready.write_text(f"{len(holding.owned)}\n", encoding="ascii")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        while not stop.is_set():
            if not client.connected:
                raise SystemExit(f"{name} lost its connection to {url}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    finally:
        with contextlib.suppress(Exception):
            await client.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.grid_holder", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--name", default=HOLDER_NAME)
    parser.add_argument("--ready", required=True, type=Path, help="file written once ready")
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    run_loop(hold(args.url, args.name, args.ready, args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
