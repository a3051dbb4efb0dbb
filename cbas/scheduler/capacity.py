"""Spot capacity as launches and preemptions found it. Pure.

EC2 says nothing about a market's capacity: a launch either starts a machine or is refused
(InsufficientInstanceCapacity), and a running machine is reclaimed with a notice. So a market
that refused a launch, or just took a machine back, is left for a while (doubled at each refusal
in a row) before it is tried again; every other market is presumed to have capacity until a
launch says otherwise. The master and the simulator's `cbas` policy keep the same record.
"""

from __future__ import annotations

from typing import Generic, Hashable, Iterable, TypeVar

Key = TypeVar("Key", bound=Hashable)
RETRY_FULL_MARKET_SECONDS = (60.0, 1800.0)  # first wait after a refusal, longest wait


class LaunchOutcomes(Generic[Key]):
    def __init__(self, retry_seconds: tuple[float, float] = RETRY_FULL_MARKET_SECONDS) -> None:
        self.first, self.longest = retry_seconds
        self._refusing: dict[Key, tuple[int, float]] = {}  # market -> refusals in a row, tried again after
        self._confirmed: set[Key] = set()  # a launch there worked, and nothing since says otherwise

    def refused(self, key: Key, now: float) -> float:
        """A launch there found no capacity: it is left until the time returned (seconds)."""
        refusals = self._refusing.get(key, (0, 0.0))[0] + 1
        until = now + min(self.longest, self.first * 2 ** (refusals - 1))
        self._refusing[key] = (refusals, until)
        self._confirmed.discard(key)
        return until

    def preempted(self, key: Key, now: float) -> float:
        """It took a running machine back: it has no capacity now, as if a launch was refused."""
        return self.refused(key, now)

    def launched(self, key: Key) -> None:
        self._refusing.pop(key, None)
        self._confirmed.add(key)

    def state(self, key: Key, now: float) -> bool | None:
        """True: a launch there worked since it last refused; False: it refuses now; None: unknown
        (never tried, or its wait is over), so presumed to have capacity until tried."""
        if self.refusing(key, now):
            return False
        return True if key in self._confirmed else None

    def refusing(self, key: Key, now: float) -> bool:
        return self._refusing.get(key, (0, 0.0))[1] > now

    def retry_at(self, keys: Iterable[Key], now: float) -> float | None:
        """When the first of these markets that refuses now may be tried again, if any refuses."""
        times = [until for key in keys if (until := self._refusing.get(key, (0, 0.0))[1]) > now]
        return min(times, default=None)
