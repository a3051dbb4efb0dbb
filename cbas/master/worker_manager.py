"""Tracks which machines are alive: each must ping (or announce itself) before its deadline.

A machine that misses its deadline is reported dead; a spot notice moves its deadline to the
announced termination time, so a reclaimed machine is noticed without waiting for ping timeouts.
"""

from __future__ import annotations

import time
from typing import Callable

from cbas.master.timers import Deadlines
from cbas.settings import Settings

Clock = Callable[[], float]


class WorkerManager:
    def __init__(self, settings: Settings, clock: Clock = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self._deadlines = Deadlines()
        self._noticed: set[str] = set()

    def launched(self, instance_id: str) -> None:
        self._deadlines.arm(instance_id, self.clock() + self.settings.boot_timeout)

    def pinged(self, instance_id: str) -> None:
        if instance_id in self._noticed:
            return  # its end is already scheduled by the notice
        self._deadlines.arm(instance_id, self.clock() + self.settings.dead_after())

    def noticed(self, instance_id: str, ends_at: float) -> None:
        self._noticed.add(instance_id)
        grace = min(self.settings.ping_interval, 5.0)
        self._deadlines.shorten(instance_id, ends_at + grace)

    def again_soon(self, instance_id: str) -> None:
        """Handling its death failed: it is due again shortly (never left without a deadline)."""
        self._deadlines.arm(instance_id, self.clock() + min(self.settings.ping_interval, 5.0))

    def was_noticed(self, instance_id: str) -> bool:
        return instance_id in self._noticed

    def forget(self, instance_id: str) -> None:
        self._deadlines.disarm(instance_id)
        self._noticed.discard(instance_id)

    def dead(self) -> list[str]:
        return self._deadlines.pop_expired(self.clock())

    def watched(self) -> int:
        return len(self._deadlines)
