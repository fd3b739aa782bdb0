"""PacketStack's benchmark suite: PacketStack against a raw asyncio relay and nats-py
(messaging), against mosquitto and NATS JetStream (a durable backlog), and against redis-py
and Redis (the data grid's maps: ``--only grid``), side by side; ``--only flush`` measures the
grid's write-behind flush to PostgreSQL and MariaDB against their raw drivers (bench/flush.py).

Run ``python3 -m bench --help``; bench/RESULTS.md has the latest figures. ``main(argv)``
runs it in-process like the command line; ``run(Options(...))`` returns the report.

To measure one commit while the work tree keeps changing, put a snapshot of its src/ first
on PYTHONPATH (the hub subprocesses inherit it) and name the commit for the JSON::

    git archive COMMIT src | tar -x -C /tmp/snap
    BENCH_SOURCE_COMMIT=COMMIT PYTHONPATH=/tmp/snap/src python3 -m bench --runs 5
"""

from .suite import SCENARIOS, SYSTEMS, Options, format_report, main, parse_args, run

__all__ = ["SCENARIOS", "SYSTEMS", "Options", "format_report", "main", "parse_args", "run"]
