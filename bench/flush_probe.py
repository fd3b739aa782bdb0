"""A latency probe in its own process, for the flush scenario (bench/flush.py).

``python3 -m bench.flush_probe --url ps://127.0.0.1:PORT --ready PATH --out PATH`` connects
a responder and a requester (two ``packetstack.Client``s, 64-byte bodies, as in req-1),
warms up, writes PATH (``--ready``; the suite waits for it), then does one request/reply
round trip every ``--interval`` seconds (after the previous reply) until SIGTERM or SIGINT
or ``--timeout``. On the way out it writes every round trip to ``--out``: pairs of doubles
(sent at, round trip seconds; -1 for a request that failed), the sending time on
``time.perf_counter()`` (CLOCK_MONOTONIC on Linux, the same clock in every process), so the
suite can pick the round trips sent while it was idle and while it flushed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from array import array
from pathlib import Path

from packetstack import Client, Context

from .common import REQUEST_TIMEOUT, perf_counter, run_loop
from .sys_packetstack import ANSWER_DATA, ASK_DATA, Answer, Ask

RESPONDER = "bench-flush-responder"
REQUESTER = "bench-flush-requester"
WARMUP = 200  # round trips before the ready file is written


def read_samples(path: Path) -> list[tuple[float, float]]:
    """The (sent at, round trip seconds or -1) pairs a probe wrote."""
    values = array("d")
    values.frombytes(path.read_bytes())
    return list(zip(values[0::2], values[1::2], strict=True))


async def probe(url: str, ready: Path, out: Path, interval: float, timeout: float) -> None:
    responder = Client(RESPONDER, url, reconnect=False, request_timeout=REQUEST_TIMEOUT)
    requester = Client(REQUESTER, url, reconnect=False, request_timeout=REQUEST_TIMEOUT)

    @responder.on(Ask)
    async def answer(packet: Ask, ctx: Context) -> Answer:
        return Answer(ANSWER_DATA)

    samples = array("d")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await responder.connect()
    await requester.connect()
    try:
        for _ in range(WARMUP):
            await requester.request(RESPONDER, Ask(ASK_DATA), timeout=REQUEST_TIMEOUT)
        ready.write_text("ready\n", encoding="ascii")
        deadline = perf_counter() + timeout
        while not stop.is_set() and perf_counter() < deadline:
            sent = perf_counter()
            try:
                await requester.request(RESPONDER, Ask(ASK_DATA), timeout=REQUEST_TIMEOUT)
                samples.extend((sent, perf_counter() - sent))
            except Exception:  # counted as a failure; the probe goes on
                samples.extend((sent, -1.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    finally:
        out.write_bytes(samples.tobytes())
        with contextlib.suppress(Exception):
            await requester.close()
        with contextlib.suppress(Exception):
            await responder.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.flush_probe", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--ready", required=True, type=Path, help="file written once warmed up")
    parser.add_argument("--out", required=True, type=Path, help="where the samples go")
    parser.add_argument("--interval", type=float, default=0.001, help="seconds between trips")
    parser.add_argument("--timeout", type=float, default=1800.0, help="stop after this long")
    args = parser.parse_args(argv)
    run_loop(probe(args.url, args.ready, args.out, args.interval, args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
