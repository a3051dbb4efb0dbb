"""scripts/bench/live_replay.py: the simulator reads the trace as the live local market replays it,
and the script runs a real master and job end to end (a small one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cbas.local.market import TraceMarket
from cbas.scheduler.traces import load_trace
from tests.tracefiles import write_trace

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "live_replay.py"
sys.path.insert(0, str(SCRIPT.parent))

import live_replay  # noqa: E402


def flapping(tmp_path: Path) -> Path:
    changes = [(hour * 1800.0, hour % 3 != 2) for hour in range(48)]
    return write_trace(tmp_path / "flap.csv", {("z1", "c5.large"): (0.03, 0.085, changes),
                                               ("z2", "c5.large"): (0.05, 0.085, [(0, True)])}, span=86400.0)


def test_the_simulator_sees_each_step_as_the_live_market_does_then(tmp_path: Path) -> None:
    """A step (the master's pass) has capacity only if the live market had it all through: the
    local market reclaims a machine at any moment of the trace without capacity."""
    trace = load_trace(flapping(tmp_path))
    market = TraceMarket(trace, offset=3 * 3600.0)
    opened, scale, step = 1_000_000.0, 120.0, 2.0
    series = trace.markets[("z1", "c5.large")]
    steps = live_replay.market_steps(series, market, opened + 7.0, opened, scale, step, 200)
    live = [all(market.available("z1", "c5.large", (7.0 + k * step + tick / 10) * scale) for tick in range(20))
            for k in range(200)]
    assert steps.available == live and True in live and False in live
    assert market.trace_time(0.0) == trace.start + 3 * 3600.0  # the replay starts at the offset


def test_the_live_replay_runs_a_real_master_beside_the_simulator(tmp_path: Path) -> None:
    out = tmp_path / "replay.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--trace", str(flapping(tmp_path)), "--jobs", "1",
                           "--scale", "720", "--work-hours", "2", "--deadline", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    for side in ("live", "simulated"):
        assert set(result[side]) == {"mean_cost_vs_ondemand", "deadline_misses", "jobs"} and result[side]["jobs"] == 1
    [job] = result["per_job"]
    assert job["live"]["state"] == "COMPLETED" and 0 < job["live"]["cost_vs_ondemand"] < 2, job
    assert "live/simulated" in done.stdout
