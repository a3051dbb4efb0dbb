"""Small hand-made traces in the shared/traces format, for tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


Change = tuple[float, bool] | tuple[float, bool, float]  # seconds from start, available[, spot price from then]


def write_trace(path: Path, markets: dict[tuple[str, str], tuple[float, float, list[Change]]],
                span: float = 7200.0) -> Path:
    """markets: (zone, type) -> (spot price, on-demand price, [(seconds from start, available[, new
    spot price])])."""
    rows = []
    for (zone, kind), (spot, ondemand, changes) in markets.items():
        for change in [*changes, (span, changes[-1][1])]:
            spot = change[2] if len(change) > 2 else spot  # type: ignore[misc]
            rows.append((START + timedelta(seconds=change[0]), zone, kind, int(change[1]), spot, ondemand))
    rows.sort(key=lambda row: (row[0], row[1]))
    lines = ["timestamp,zone,instance_type,available,spot_price,ondemand_price"]
    lines += [f"{t.strftime('%Y-%m-%dT%H:%M:%SZ')},{z},{k},{a},{s},{o}" for t, z, k, a, s, o in rows]
    path.write_text("\n".join(lines) + "\n")
    return path
