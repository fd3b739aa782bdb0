"""Profile PacketStack's side of a scenario with py-spy: the service process and the clients.

``python3 -m bench.profile [--scenario one-way|req-100|req-1] [--seconds S] [--out DIR]``
starts ``packetstack serve`` in its own process as the suite does, attaches ``py-spy
record`` (``pip install py-spy``) to it and to this process (which runs the clients), drives
the scenario for about S seconds, then prints the functions under src/packetstack with the
largest share of samples, self (the function's own lines, including the C calls made from
them: msgspec, struct, socket writes) and inclusive (anywhere on the stack).
Raw py-spy stacks are kept in DIR for flame graphs.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

from . import sys_packetstack
from .common import ROOT, Plan, hub_dir, packetstack_hub, packetstack_source, run_loop

SRC = packetstack_source() + os.sep  # src/packetstack/, or a snapshot put first on PYTHONPATH
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*):(?P<line>\d+)\)$")


def _spy(pid: int, out: Path, rate: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("py-spy")
    if exe is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    argv = [exe, "record", "--pid", str(pid), "--format", "raw", "--full-filenames"]
    argv += ["--rate", str(rate), "--nonblocking", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _stop(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
    try:
        _, err = spy.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        _, err = spy.communicate()
    if spy.returncode not in (0, -signal.SIGINT):
        print(err.decode(errors="replace")[-2000:], file=sys.stderr)


def _drive(scenario: str, url: str, seconds: float) -> int:
    plan = replace(Plan(), timebox=seconds, one_way=10_000_000, rr100=10_000_000)
    plan = replace(plan, rr1=10_000_000)
    if scenario == "one-way":
        result = run_loop(sys_packetstack.one_way(url, plan))
    else:
        outstanding = 1 if scenario == "req-1" else plan.outstanding
        result = run_loop(sys_packetstack.request_reply(url, plan, outstanding))
    print(f"{scenario}: {result['rate']:,.0f} msg/s under the profiler", file=sys.stderr)
    return int(result["count"])


def summarize(path: Path, top: int = 15) -> str:
    """Top functions and lines under src/packetstack from a py-spy raw file."""
    total = 0
    self_fn: Counter[str] = Counter()
    incl_fn: Counter[str] = Counter()
    self_line: Counter[str] = Counter()
    leaf_fn: Counter[str] = Counter()
    for raw in path.read_text(errors="replace").splitlines():
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = []
        for text in stack.split(";"):
            match = _FRAME.match(text)
            if match is None:
                continue
            frames.append((match["func"], match["file"], int(match["line"])))
        if not frames:
            continue
        func, file, _ = frames[-1]
        leaf_fn[f"{func} ({_short(file)})"] += count
        # Self: the innermost frame inside packetstack (C calls and stdlib it made count there).
        ours = [f for f in frames if f[1].startswith(SRC)]
        if ours:
            func, file, line = ours[-1]
            name = f"{func} ({file[len(SRC) :]})"
            self_fn[name] += count
            self_line[f"{name}:{line}"] += count
        for name in {f"{f[0]} ({f[1][len(SRC) :]})" for f in ours}:
            incl_fn[name] += count
    if not total:
        return f"{path}: no samples"
    inside = sum(self_fn.values())
    lines = [
        f"{path.name}: {total} samples, {inside / total:.0%} inside src/packetstack "
        "(the rest: the event loop, asyncio, the bench harness)",
        "  self%   incl%  function (file)",
    ]
    for name, count in self_fn.most_common(top):
        lines.append(f"  {count / total:6.1%}  {incl_fn[name] / total:6.1%}  {name}")
    lines.append("  hottest lines (self%):")
    for name, count in self_line.most_common(top):
        lines.append(f"  {count / total:6.1%}  {name}")
    lines.append("  innermost Python frame, any file (self%):")
    for name, count in leaf_fn.most_common(max(5, top // 2)):
        lines.append(f"  {count / total:6.1%}  {name}")
    lines.append(f"  ({LOOP_NOTE})")
    return "\n".join(lines)


LOOP_NOTE = (
    "self time of run (transport/loop.py) or run_loop (bench/common.py) is uvloop's own C "
    "code: polling, socket reads and writes, calling callbacks"
)


def _short(file: str) -> str:
    for prefix in (SRC, str(ROOT) + os.sep):
        if file.startswith(prefix):
            return file[len(prefix) :]
    marker = "site-packages" + os.sep
    if marker in file:
        return file.split(marker, 1)[1]
    return os.path.basename(file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.profile", description=__doc__)
    parser.add_argument("--scenario", action="append", choices=["one-way", "req-1", "req-100"])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "profile"))
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for scenario in args.scenario or ["one-way", "req-100"]:
        with hub_dir() as workdir:
            hub = packetstack_hub(workdir)
            hub.start()
            try:
                assert hub.process is not None
                hub_file = out / f"{scenario}-service.txt"
                client_file = out / f"{scenario}-clients.txt"
                spies = [
                    _spy(hub.process.pid, hub_file, args.rate),
                    _spy(os.getpid(), client_file, args.rate),
                ]
                time.sleep(1.0)  # let py-spy attach
                _drive(scenario, hub.url, args.seconds)
                for spy in spies:
                    _stop(spy)
            finally:
                hub.stop()
        print(f"\n== {scenario}: service process ==")
        print(summarize(hub_file, args.top))
        print(f"\n== {scenario}: client process (producer/requester + consumer/responder) ==")
        print(summarize(client_file, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
