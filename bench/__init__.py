"""PacketStack's benchmark suite: PacketStack, a raw asyncio relay and nats-py, side by side.

Run ``python3 -m bench --help``; bench/RESULTS.md has the latest figures. ``main(argv)``
runs it in-process like the command line; ``run(Options(...))`` returns the report.
"""

from .suite import SCENARIOS, SYSTEMS, Options, format_report, main, parse_args, run

__all__ = ["SCENARIOS", "SYSTEMS", "Options", "format_report", "main", "parse_args", "run"]
