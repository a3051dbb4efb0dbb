"""scripts/bench/scheduler.py end to end on a small made-up trace: both grids, the JSON it writes."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench" / "scheduler.py"
KEYS = {"mean_cost_vs_ondemand", "p90_cost_vs_ondemand", "mean_cost_vs_omniscient", "p90_cost_vs_omniscient",
        "deadline_misses", "runs"}


def write_trace(folder: Path) -> None:
    """Five days, two zones: one flaps every few hours, the other is dearer and steady."""
    t0 = datetime(2023, 1, 1, tzinfo=timezone.utc)
    rows = ["timestamp,zone,instance_type,available,spot_price,ondemand_price"]
    for hour in range(120):
        stamp = (t0 + timedelta(hours=hour)).isoformat()
        rows.append(f"{stamp},z1,c5.large,{int(hour % 5 != 4)},0.03,0.085")
        rows.append(f"{stamp},z2,c5.large,1,0.05,0.085")
    (folder / "made-up.csv").write_text("\n".join(rows) + "\n")


@pytest.mark.parametrize("grid", ["ours", "peer"])
def test_the_benchmark_scores_every_policy_per_set_and_overall(tmp_path: Path, grid: str) -> None:
    write_trace(tmp_path)
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--traces", str(tmp_path), "--grid", grid, "--starts", "2",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    result = json.loads(out.read_text())
    names = {"on-demand", "greedy", "uniform-progress", "greedy-multi", "up-failover", "cbas", "omniscient"}
    assert set(result["policies"]) == names and all(KEYS <= set(row) for row in result["policies"].values())
    assert set(result["sets"]) == {"made-up.csv"} and set(result["sets"]["made-up.csv"]) == names
    assert result["omniscient_exact"] is (grid == "ours")
    rows = result["policies"]
    assert rows["cbas"]["deadline_misses"] == 0 and rows["omniscient"]["mean_cost_vs_omniscient"] == 1.0
    assert rows["cbas"]["runs"] == (17 * 4 if grid == "peer" else 18 * 2)  # the peer grid's 17 feasible jobs, 4 starts
    assert "greedy-multi" in run.stdout and "made-up.csv" in run.stdout
