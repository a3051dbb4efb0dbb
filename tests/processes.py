"""Look at process groups through /proc: which members are alive (zombies are not)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def live_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def wait_until_gone(pgids: list[int], timeout: float = 5.0) -> list[int]:
    """Returns the process groups that still have live members after the timeout."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pgid for pgid in pgids if live_members(pgid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def kill_groups(pgids: list[int]) -> None:
    for pgid in pgids:
        try:
            os.killpg(pgid, 9)
        except (ProcessLookupError, PermissionError):
            pass
