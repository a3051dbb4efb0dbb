"""The master's Prometheus metrics (GET /metrics). Counters and histograms are updated where
things happen; gauges (jobs by state, machines by market, cost) are read from the store at each
scrape, so they are right after a master restart too."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from cbas.backends import JobStore
from cbas.models import utcnow
from cbas.state import JobState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()  # one per master: tests run several
        r = self.registry
        self.jobs = Gauge("cbas_jobs", "Jobs by state", ["state"], registry=r)
        self.machines = Gauge("cbas_machines", "Machines held, by market", ["market"], registry=r)
        self.cost = Gauge("cbas_cost_usd", "Machine cost of all jobs so far, USD", registry=r)
        self.preemptions = Counter("cbas_preemptions", "Spot machines taken away from running jobs", registry=r)
        self.restarts = Counter("cbas_restarts", "Jobs started again after their first start", registry=r)
        self.checkpoint_seconds = Histogram(
            "cbas_checkpoint_seconds", "Checkpoint duration (pause and upload)", registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900))
        self.checkpoint_failures = Counter("cbas_checkpoint_failures", "Checkpoints that did not count, with "
                                           "their reason in the job's events", registry=r)
        self.checkpoint_bytes = Histogram(
            "cbas_checkpoint_new_bytes", "Bytes a checkpoint had to store", registry=r,
            buckets=tuple(float(1 << n) for n in range(10, 41, 3)))
        self.messages = Histogram(
            "cbas_message_seconds", "Time to handle a delivered message, by type", ["type"], registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
        self.rejected = Counter("cbas_messages_rejected", "Deliveries refused (bad signature, malformed)",
                                registry=r)
        self.refused = Counter("cbas_messages_refused", "Signed deliveries refused: a sender saying what it may "
                               "not (no or bad auth, another machine, another job, a type it may not send)",
                               ["reason"], registry=r)
        self.ignored = Counter("cbas_messages_ignored", "Genuine but stale messages (a machine the job has left, "
                               "an older attempt): answered, nothing changed", ["reason"], registry=r)

    async def render(self, store: JobStore) -> bytes:
        counts = {state: 0 for state in JobState}
        cost = 0.0
        for job in await store.list_jobs():
            counts[job.state] += 1
            cost += job.cost
        for state, count in counts.items():
            self.jobs.labels(state=state.value).set(count)
        markets = {"spot": 0, "on-demand": 0}
        now = utcnow()
        for entry in await store.list_ledger(live_only=True):
            markets[entry.market] = markets.get(entry.market, 0) + 1
            cost += entry.cost_until(now)  # what running machines cost so far
        for market, count in markets.items():
            self.machines.labels(market=market).set(count)
        self.cost.set(cost)
        return generate_latest(self.registry)
