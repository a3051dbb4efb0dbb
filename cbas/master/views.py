"""How the master shows a job: its JDL parsed once, where its machine is, what the API and the
dashboard see of it. Pure, given what it is passed."""

from __future__ import annotations

import functools
from typing import Any

from cbas import jdl
from cbas.models import Job, LedgerEntry, LedgerState, utcnow
from cbas.state import JobState


@functools.lru_cache(maxsize=4096)
def describe(text: str) -> jdl.JobDescription:
    """A job's JDL, parsed once: every scheduling pass needs it, and it never changes."""
    return jdl.parse(text)


def where(entry: LedgerEntry) -> str:
    return f"{entry.market} {entry.instance_type} in {entry.zone} at ${entry.price}/h"


def job_view(job: Job, ledger: list[LedgerEntry], ondemand_prices: dict[str, float]) -> dict[str, Any]:
    """What the API and the dashboard show of a job; `ledger` is the whole ledger, read once
    for all the jobs shown."""
    mine = [entry for entry in ledger if entry.job_id == job.id]
    now = utcnow()
    view = job.model_dump(mode="json", exclude={"jdl"})
    runtime = job.run_seconds
    if job.state == JobState.RUNNING and job.running_since is not None:
        runtime += (now - job.running_since).total_seconds()
    view["runtime_seconds"] = runtime
    view["cost_so_far"] = job.cost + sum(e.cost_until(now) for e in mine if e.state != LedgerState.TERMINATED)
    description = describe(job.jdl) if job.jdl else None
    view["deadline_at"] = (jdl.parse_deadline(description.deadline, job.submitted_at).isoformat()
                           if description and description.deadline else None)
    expected = description.runtime_hours() if description else None
    view["progress"] = (1.0 if job.state == JobState.COMPLETED else
                        min(runtime / 3600.0 / expected, 0.99) if expected else None)
    price = ondemand_prices.get(mine[-1].instance_type) if mine else None
    view["ondemand_cost"] = runtime / 3600.0 * price if price else None  # the same hours on demand
    return view
