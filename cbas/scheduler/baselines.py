"""Multi-zone baselines, so that ours is scored against what multi-zone access alone gives. Pure.

`greedy-multi`: the cheapest zone that has not refused lately, kept while it lasts; `up-failover`:
Can't Be Late's uniform progress, failing over to the next cheapest zone when its zone reclaims
a machine or refuses a launch (as in the SkyNomad paper). Both learn capacity by trying, as ours
does, and keep the same safety net as the single-zone policies.
"""

from __future__ import annotations

from cbas.scheduler.model import JobSpec, Scenario
from cbas.scheduler.policies import LearnsCapacity, UniformProgress, policy
from cbas.scheduler.simulator import ON_DEMAND, WAIT, Progress


@policy("greedy-multi")
class GreedyMulti(LearnsCapacity):
    def decide(self, now: Progress) -> int:
        seconds = self.learn(now)
        if self.must_run_on_demand(now):
            return ON_DEMAND
        if now.mode >= 0:
            return now.mode  # stay while it lasts
        untried = self.untried(now, seconds)
        return untried[0] if untried else WAIT


@policy("up-failover")
class UniformProgressFailover(UniformProgress, LearnsCapacity):
    def reset(self, job: JobSpec, scenario: Scenario) -> None:
        super().reset(job, scenario)
        self.zone: int | None = None  # where it runs spot, until that zone fails it

    def spot_market(self, now: Progress) -> int | None:
        seconds = self.learn(now)
        if now.mode >= 0:
            self.zone = now.mode
        if self.zone is None or self.outcomes.refusing(self.zone, seconds):
            untried = self.untried(now, seconds)
            self.zone = untried[0] if untried else None
        return self.zone
