"""`cbas demo`, the README's first command, end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cbas.local.cloud import MachineRecord
from tests.processes import kill_groups, wait_until_gone

pytestmark = pytest.mark.integration


def test_the_demo_survives_preemptions_and_leaves_nothing_running(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CBAS_")}
    env["TMPDIR"] = str(tmp_path)  # the demo's home lands here, where the test can inspect it
    tmp_path.chmod(0o711)
    try:
        result = subprocess.run([sys.executable, "-m", "cbas", "demo", "--keep"], env=env, capture_output=True,
                                text=True, timeout=170, start_new_session=True)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "identical to an uninterrupted run" in result.stdout
        assert "demo passed" in result.stdout
        [home] = list(tmp_path.glob("cbas-demo-*"))
        records = [MachineRecord.model_validate_json(p.read_text()) for p in (home / "home" / "cloud" / "machines").glob("*.json")]
        assert len(records) >= 3  # at least two machines were reclaimed
        assert all(r.machine.state == "terminated" for r in records)
        reclaimed = [r for r in records if r.ended_reason == "spot capacity reclaimed" or r.notice_at]
        assert len(reclaimed) >= 2
        assert wait_until_gone([r.pgid for r in records if r.pgid]) == []
    finally:
        for path in tmp_path.glob("cbas-demo-*/home/cloud/machines/*.json"):
            record = MachineRecord.model_validate_json(path.read_text())
            kill_groups([record.pgid] if record.pgid else [])
        shutil.rmtree(tmp_path, ignore_errors=True)
