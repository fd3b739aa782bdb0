"""Smoke test of the benchmark suite (bench/): every scenario, every system, tiny counts.

It needs the NATS server on 127.0.0.1:4222 (one of the three systems measured); without it
the test is skipped locally and fails under CI=true.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import ModuleType

from conftest import require_server

ROOT = Path(__file__).resolve().parents[2]

SCENARIOS = ("one-way", "req-1", "req-100")
SYSTEMS = ("packetstack", "raw", "nats")
MACHINE_KEYS = {"platform", "cpu_model", "python", "uvloop", "date"}
REPORT_KEYS = {"schema", "command", "options", "machine", "scenarios", "table", "targets"}


def _bench() -> ModuleType:
    """The repository's bench package (not the tests/bench folder, a namespace package)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    loaded = sys.modules.get("bench")
    if loaded is not None and getattr(loaded, "__file__", None) is None:
        for name in [n for n in sys.modules if n == "bench" or n.startswith("bench.")]:
            del sys.modules[name]
    import bench

    assert Path(bench.__file__).resolve().parent == ROOT / "bench"
    return bench


def test_quick_suite_measures_every_scenario_for_every_system(tmp_path: Path) -> None:
    require_server("NATS", "127.0.0.1", 4222)
    bench = _bench()
    out = tmp_path / "quick.json"

    started = time.monotonic()
    status = bench.main(["--quick", "--runs", "1", "--json", str(out), "--quiet"])
    took = time.monotonic() - started

    assert status == 0
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report) >= REPORT_KEYS
    assert set(report["machine"]) >= MACHINE_KEYS
    assert report["options"]["runs"] == 1 and report["options"]["quick"] is True
    assert set(bench.SCENARIOS) == set(SCENARIOS) and set(bench.SYSTEMS) == set(SYSTEMS)
    for scenario in SCENARIOS:
        systems = report["scenarios"][scenario]["systems"]
        assert set(systems) == set(SYSTEMS)
        for system in SYSTEMS:
            entry = systems[system]
            assert entry["errors"] == 0, entry["runs"]
            assert len(entry["runs"]) == 1
            assert entry["runs"][0]["rate"] > 0, (scenario, system, entry["runs"])
            assert entry["median"]["rate"] > 0, (scenario, system)
            assert set(entry) >= {"median", "ratio_vs_raw", "ratio_vs_nats", "runs"}
            if scenario == "one-way":
                assert entry["runs"][0]["lost"] == 0, (system, entry["runs"])
            else:
                assert entry["median"]["p50_us"] > 0 and entry["median"]["p99_us"] > 0
    assert len(report["table"]) == len(SCENARIOS) * len(SYSTEMS)
    assert {t["name"] for t in report["targets"]} == {
        "one_way_vs_nats",
        "one_way_vs_raw",
        "req100_vs_nats",
        "req1_p50_vs_raw",
    }
    assert all(isinstance(t["met"], bool) and t["value"] > 0 for t in report["targets"])
    assert took < 60, f"the --quick suite took {took:.1f} s"
