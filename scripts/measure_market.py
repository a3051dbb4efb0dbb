#!/usr/bin/env python3
"""Measure spot availability from traces: the numbers behind the local market's built-in model.

For every market with availability data: how long capacity lasts and how long it stays away
(median and mean hours), the share of time it exists, and mean spot price / on-demand.
cbas/local/market.py's BUILTIN_ZONES were taken from aws-p3.2xlarge-9zones-2023-02-15.

    scripts/measure_market.py ../shared/traces [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cbas.scheduler.traces import availability_stats, load_trace, load_traces  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", type=Path, help="a trace file or a folder of them")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    traces = load_traces(args.traces) if args.traces.is_dir() else [load_trace(args.traces)]
    rows = []
    for trace in traces:
        for series in trace.markets.values():
            stats = availability_stats(series)
            if stats is not None:
                rows.append({"trace": trace.name, **stats.summary()})
    columns = ["trace", "zone", "instance_type", "up_median_h", "up_mean_h", "down_median_h", "down_mean_h",
               "periods", "up_share", "price_ratio"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) if rows else len(c) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(str(row[c]).ljust(widths[c]) for c in columns))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
