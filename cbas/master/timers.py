"""Deadlines keyed by name, checked against an injected clock. Pure: tests never sleep."""

from __future__ import annotations


class Deadlines:
    def __init__(self) -> None:
        self._due: dict[str, float] = {}

    def arm(self, key: str, due: float) -> None:
        self._due[key] = due

    def shorten(self, key: str, due: float) -> None:
        """Move a deadline earlier (never later), arming it if absent."""
        self._due[key] = min(self._due.get(key, due), due)

    def disarm(self, key: str) -> None:
        self._due.pop(key, None)

    def due(self, key: str) -> float | None:
        return self._due.get(key)

    def pop_expired(self, now: float) -> list[str]:
        expired = [key for key, due in self._due.items() if due <= now]
        for key in expired:
            del self._due[key]
        return sorted(expired)

    def __len__(self) -> int:
        return len(self._due)
