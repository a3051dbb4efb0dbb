"""Proof by model: the real Master among model workers through a hostile world
(tests/faults/model_harness.py), driven by hypothesis: messages delivered in any order, twice,
minutes late or never (after the bus's retries), the master killed between any two steps, at
a crash point inside a handler, or after any write to its store, and restarted; machines reclaimed after a notice or lost without
one; moves and checkpoint requests.

After every step: no machine is stopped by another machine's message (an old attempt's late word
never ends a live machine), a preemption is counted only for a real spot notice, a finished job's
result is its last attempt's, a finished job holds no machine, an honest worker's message is
never refused, no checkpoint is counted twice and each counted one has its event, the newest
state a job's events show is its state. At the end the world calms down and every job must finish: none lost or stuck.
Scenario tests below replay what the model found.

CBAS_MODEL_EXAMPLES=<n> runs more examples (a soak: `--timeout 0`); the default keeps the suite quick.
"""

from __future__ import annotations

import os
from typing import Iterator

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cbas.models import CheckpointRecord
from cbas.state import JobState
from tests.faults.model_harness import World
from tests.faults.model_world import ModelWorker

CRASH_POINTS = ["start-recorded", "checkpoint-recorded", "job-finished-recorded", "launch-ledger-written",
                "launch-machine-started", "move-requested", "notice-recorded"]
MAX_JOBS = 3


class Protocol(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.world = World()

    @initialize(jobs=st.integers(1, MAX_JOBS))
    def submit(self, jobs: int) -> None:
        self.world.submit(jobs)

    @rule(seconds=st.sampled_from([5, 30, 30, 30, 30, 30, 90, 400]), prompt=st.sampled_from([True, True, True, False]))
    def time_passes(self, seconds: float, prompt: bool) -> None:
        """Mostly the network is prompt (all in flight arrives, in order, before the clock moves);
        sometimes it is not, and machines miss their pings."""
        if prompt:
            self.world.deliver_everything()
        self.world.time_passes(seconds)

    @precondition(lambda self: self.world.network.to_master or self.world.network.to_workers)
    @rule(data=st.data(), count=st.integers(1, 8))
    def network_delivers(self, data: st.DataObject, count: int) -> None:
        """Mostly the oldest first (index 0, where hypothesis shrinks to), but any may overtake;
        a delivery whose answer is lost comes again later."""
        network = self.world.network
        for _ in range(count):
            queues = [name for name in ("to_master", "to_workers") if getattr(network, name)]
            if not queues:
                return
            name = data.draw(st.sampled_from(queues))
            index = data.draw(st.integers(0, len(getattr(network, name)) - 1))
            again = data.draw(st.booleans())
            if name == "to_master":
                self.world.deliver_to_master(index, again)
            else:
                self.world.deliver_to_worker(index, again)

    @precondition(lambda self: self.world.network.to_master or self.world.network.to_workers)
    @rule(data=st.data())
    def network_loses(self, data: st.DataObject) -> None:
        network = self.world.network
        queue = data.draw(st.sampled_from([q for q in (network.to_master, network.to_workers) if q]))
        del queue[data.draw(st.integers(0, len(queue) - 1))]

    @precondition(lambda self: self.world.running_workers())
    @rule(data=st.data(), event=st.sampled_from(["checkpoint", "finish", "notice"]))
    def worker_acts(self, data: st.DataObject, event: str) -> None:
        worker = data.draw(st.sampled_from(self.world.running_workers()))
        if event == "checkpoint":
            worker.checkpoint()
        elif event == "finish":
            worker.finish()
        else:
            self.world.spot_notice(worker)

    @precondition(lambda self: self.world.cloud.live_workers())
    @rule(data=st.data())
    def machine_dies(self, data: st.DataObject) -> None:
        self.world.cloud.gone(data.draw(st.sampled_from(self.world.cloud.live_workers())).instance_id)

    @precondition(lambda self: self.world.master is not None)
    @rule(data=st.data(), move=st.booleans())
    def scheduler_decides(self, data: st.DataObject, move: bool) -> None:
        running = [job for job in self.world.jobs_now() if job.state == JobState.RUNNING]
        if running:
            self.world.scheduler_decides(data.draw(st.sampled_from(running)), move)

    @precondition(lambda self: self.world.master is not None)
    @rule()
    def master_killed(self) -> None:
        self.world.master_down()

    @precondition(lambda self: self.world.master is None)
    @rule()
    def master_restarted(self) -> None:
        self.world.master_up()

    @precondition(lambda self: self.world.master is not None)
    @rule()
    def master_restarted_at_once(self) -> None:
        """kill -9 and start again, as systemd does: what it had in memory is gone."""
        self.world.master_down()
        self.world.master_up()

    @precondition(lambda self: self.world.master is not None and self.world.crash_at is None)
    @rule(point=st.sampled_from(CRASH_POINTS))
    def master_will_die_at(self, point: str) -> None:
        self.world.crash_at = point

    @precondition(lambda self: self.world.master is not None and self.world.writes_left is None)
    @rule(writes=st.integers(1, 8))
    def master_will_die_after_writes(self, writes: int) -> None:
        """kill -9 between any two of the store's writes, not only at the named points."""
        self.world.writes_left = writes

    @invariant()
    def always(self) -> None:
        self.world.check()

    def teardown(self) -> None:
        try:
            self.world.calm_down()
        finally:
            self.world.close()


Protocol.TestCase.settings = settings(
    max_examples=int(os.environ.get("CBAS_MODEL_EXAMPLES", "300")), stateful_step_count=80, deadline=None,
    derandomize=True, database=None, suppress_health_check=list(HealthCheck),
)
TestProtocol = Protocol.TestCase


# --- what the model found, as scenarios ------------------------------------------------------------
@pytest.fixture
def world() -> Iterator[World]:
    world = World()
    try:
        yield world
    finally:
        world.close()


def running_job(world: World) -> None:
    world.submit(1)
    for _ in range(2):
        world.deliver_everything()
        world.time_passes(5)
    world.deliver_everything()
    [job] = world.jobs_now()
    assert job.state == JobState.RUNNING


def test_a_move_asked_for_before_the_master_died_is_a_move_not_a_preemption(world: World) -> None:
    running_job(world)
    [job] = world.jobs_now()
    world.scheduler_decides(job, move=True)  # STOP_JOB (checkpoint first) is on its way
    world.master_down()
    world.master_up()
    world.deliver_everything()  # the worker checkpoints and stops; the new master hears it
    world.check()
    [job] = world.jobs_now()
    assert job.preemptions == 0 and job.state in (JobState.QUEUED, JobState.PROVISIONING), job
    world.calm_down()


def test_a_spot_notice_heard_before_the_master_died_counts_when_the_machine_goes(world: World) -> None:
    running_job(world)
    [worker] = world.running_workers()
    world.spot_notice(worker)
    world.network.to_master[:] = [f for f in world.network.to_master if f.message.type.value == "SPOT_NOTICE"]
    world.deliver_everything()  # the notice arrives; its final checkpoint never does
    world.master_down()
    world.master_up()
    world.time_passes(150)  # EC2 takes the machine back
    world.time_passes(30)
    [job] = world.jobs_now()
    assert job.preemptions == 1, job
    world.calm_down()


def placed_again_on_a_second_machine(world: World) -> tuple[str, str]:
    """The job ran on a first machine, which the master gave up on; it is now placed on a second
    (PROVISIONING: still attempt 1, which only a start bumps). The two machines' ids."""
    running_job(world)
    [first] = world.running_workers()
    world.network.to_master.clear()
    world.time_passes(400)  # no word from it: given up, the job placed again
    [job] = world.jobs_now()
    assert job.state == JobState.PROVISIONING and job.instance_id != first.instance_id and job.attempt == 1
    assert job.instance_id is not None
    return first.instance_id, job.instance_id


def test_a_late_final_checkpoint_of_the_old_machine_never_ends_the_new_one(world: World) -> None:
    """The gate fences a message before its handler runs; between the two (the duplicate check
    awaits the store) the job may be placed elsewhere. The handler must fence on the sender too."""
    old, new = placed_again_on_a_second_machine(world)
    [job] = world.jobs_now()
    record = CheckpointRecord(job_id=job.id, id="a0001-n00009", attempt=1, manifest_key="k", size_bytes=1,
                              pause_seconds=0.1, upload_seconds=0.1, reason="notice")
    world.on_master(lambda master: master.checkpoint_done(record, final=True, instance_id=old))
    [job] = world.jobs_now()
    assert world.cloud.live(new) and job.instance_id == new and job.preemptions == 0, job
    world.calm_down()


def test_a_late_job_failed_of_the_old_machine_never_fails_the_job_on_the_new_one(world: World) -> None:
    old, new = placed_again_on_a_second_machine(world)
    [job] = world.jobs_now()
    world.on_master(lambda master: master.job_finished(job.id, 1, ok=False, update={"exit_code": 1},
                                                       detail="exit code 1", instance_id=old))
    [job] = world.jobs_now()
    assert world.cloud.live(new) and job.state == JobState.PROVISIONING, job
    world.calm_down()


def test_a_final_checkpoint_handled_again_after_a_failed_release_requeues_the_job(world: World) -> None:
    """The first handling ends the attempt (PREEMPTED) and fails to let the machine go; the copy
    delivered again is fenced out. The ending must still be finished, not left half-done (it was
    left PREEMPTED for good, its machine held, until the master restarted)."""
    running_job(world)
    [worker] = world.running_workers()
    world.spot_notice(worker)
    world.cloud.terminations_failing = 1
    with pytest.raises(RuntimeError):
        world.deliver_everything()
    [job] = world.jobs_now()
    assert job.state == JobState.PREEMPTED
    world.deliver_everything()  # delivered again: fenced (the job has left the machine), acked
    world.time_passes(30)  # the master's pass over machines no job needs finishes the ending
    [job] = world.jobs_now()
    assert job.state in (JobState.QUEUED, JobState.PROVISIONING) and job.preemptions == 1, job
    world.calm_down()


def test_a_job_whose_machine_was_lost_after_it_finished_completes_with_its_result(world: World) -> None:
    """Its JOB_DONE never arrives (the machine and its outbox are gone), but the end it recorded in
    the blob store before sending is read when the master gives up on the machine: not run again."""
    running_job(world)
    [worker] = world.running_workers()
    assert worker.finish() is not None
    world.network.to_master.clear()
    world.cloud.gone(worker.instance_id)
    world.time_passes(400)  # no word from it: given up
    [job] = world.jobs_now()
    assert job.state == JobState.COMPLETED and job.restarts == 0, job
    world.check()  # with the result of that attempt on that machine
    world.calm_down()


def checkpoint_recorded_then_the_master_dies(world: World) -> ModelWorker:
    """A running job's worker checkpoints; the master records it and is killed before counting it."""
    running_job(world)
    [worker] = world.running_workers()
    world.crash_at = "checkpoint-recorded"
    worker.checkpoint()
    world.deliver_everything()
    assert world.master is None
    return worker


def test_a_checkpoint_recorded_before_the_master_died_is_counted_when_its_worker_says_it_again(world: World) -> None:
    """Recorded, not yet counted, then kill -9: the worker sends the fact again (not ACKed) and it
    must count then (it was taken for a copy of one counted: the job showed no checkpoint, and a
    restart loop judged by it fell back from a good checkpoint)."""
    checkpoint_recorded_then_the_master_dies(world)
    world.master_up()
    world.time_passes(5)  # the worker pings, and sends what was not ACKed again
    world.deliver_everything()
    [job] = world.jobs_now()
    assert job.checkpoints == 1 and job.attempt_checkpoints == 1 and job.last_checkpoint is not None, job
    world.check()
    world.calm_down()


def test_an_announcement_handled_again_after_the_master_died_starts_the_job_on_its_machine(world: World) -> None:
    """STARTING recorded, START_JOB not sent, kill -9: the same WORKER_STARTED comes again. It is
    the same worker, not one that restarted and lost its job (its machine was let go as lost)."""
    world.submit(1)
    world.crash_at = "start-recorded"
    world.deliver_everything()
    assert world.master is None
    world.master_up()
    for _ in range(3):
        world.deliver_everything()
        world.time_passes(5)
    [job] = world.jobs_now()
    assert job.state == JobState.RUNNING and job.restarts == 0 and len(world.cloud.machines) == 1, job
    world.calm_down()


@pytest.mark.parametrize("writes", range(1, 13))
def test_the_master_dying_after_any_write_of_a_job_s_first_run_loses_nothing(world: World, writes: int) -> None:
    """kill -9 after the n-th store write from submission to a checkpoint: every state change has
    its event, every checkpoint is counted once, and the job runs on its first machine."""
    def a_few_steps_with_the_master_started_again_if_it_died() -> None:
        for _ in range(3):
            if world.master is None:
                world.master_up()
            world.deliver_everything()
            world.time_passes(5)
            world.check()
        if world.master is None:
            world.master_up()

    world.submit(1)
    world.writes_left = writes
    a_few_steps_with_the_master_started_again_if_it_died()
    for worker in world.running_workers():
        worker.checkpoint()
    a_few_steps_with_the_master_started_again_if_it_died()
    [job] = world.jobs_now()
    assert job.restarts == 0 and len(world.cloud.machines) == 1, job
    world.calm_down()


def test_a_checkpoint_recorded_before_the_master_died_counts_even_if_its_machine_is_lost(world: World) -> None:
    """Recorded, not yet counted, kill -9, and the machine is gone with the fact in its outbox
    (found by the model): the job must still restart from it, and count it."""
    worker = checkpoint_recorded_then_the_master_dies(world)
    world.network.to_master.clear()
    world.cloud.gone(worker.instance_id)
    world.master_up()
    world.time_passes(30)
    [job] = world.jobs_now()
    assert job.checkpoints == 1 and job.last_checkpoint == "a0001-n00001" and job.restarts == 0, job
    world.deliver_everything()
    world.time_passes(5)
    [job] = world.jobs_now()
    assert job.restored_from == "a0001-n00001", job
    world.calm_down()
