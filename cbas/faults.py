"""Crash points for fault-injection tests: a process whose CBAS_CRASH_AT names a point (a comma
list may name several) kills itself with SIGKILL when it reaches it, as `kill -9` at that very
step would. With CBAS_CRASH_MARKER set, only the first process to get there crashes (it creates
that file), so a restarted master or the next machine's worker goes on. Unset, a set lookup."""

from __future__ import annotations

import os
import signal

CRASH_AT = frozenset(filter(None, os.environ.get("CBAS_CRASH_AT", "").split(",")))


def crash_point(name: str) -> None:
    if name not in CRASH_AT:
        return
    marker = os.environ.get("CBAS_CRASH_MARKER")
    if marker:
        try:
            os.close(os.open(f"{marker}.{name}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            return  # crashed here once already
    os.kill(os.getpid(), signal.SIGKILL)
