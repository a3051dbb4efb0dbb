"""Small hand-made traces in the shared/traces format, for tests."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

START = datetime(2026, 1, 1, tzinfo=timezone.utc)


def write_trace(path: Path, markets: dict[tuple[str, str], tuple[float, float, list[tuple[float, bool]]]],
                span: float = 7200.0) -> Path:
    """markets: (zone, type) -> (spot price, on-demand price, [(seconds from start, available)])."""
    rows = []
    for (zone, kind), (spot, ondemand, changes) in markets.items():
        for offset, available in [*changes, (span, changes[-1][1])]:
            rows.append((START + timedelta(seconds=offset), zone, kind, int(available), spot, ondemand))
    rows.sort(key=lambda row: (row[0], row[1]))
    lines = ["timestamp,zone,instance_type,available,spot_price,ondemand_price"]
    lines += [f"{t.strftime('%Y-%m-%dT%H:%M:%SZ')},{z},{k},{a},{s},{o}" for t, z, k, a, s, o in rows]
    path.write_text("\n".join(lines) + "\n")
    return path
