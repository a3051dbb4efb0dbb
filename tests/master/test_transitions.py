"""The transition core, as a pure function: the state machine's guard, fencing on attempt and
machine, and the run-time accounting. No store, no clock: `now` is given."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from cbas.master.transitions import next_job
from cbas.models import Job
from cbas.state import JobState, can_transition

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
S = JobState


def job(state: JobState = S.RUNNING, **fields: object) -> Job:
    return Job(id="j1", state=state, attempt=2, instance_id="i-2", **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize("current", list(JobState))
@pytest.mark.parametrize("target", list(JobState))
def test_it_moves_exactly_where_the_state_machine_allows(current: JobState, target: JobState) -> None:
    new = next_job(job(current), target, attempt=None, instance_id=None, now=NOW)
    assert (new is not None) == can_transition(current, target)
    if new is not None:
        assert new.state == target


@pytest.mark.parametrize(("attempt", "instance_id", "applies"), [
    (None, None, True),  # not checked
    (2, None, True),
    (None, "i-2", True),
    (2, "i-2", True),
    (1, None, False),  # an older attempt
    (3, "i-2", False),
    (None, "i-1", False),  # a machine the job has left
    (2, "i-1", False),
])
def test_a_message_changes_the_job_only_for_its_current_attempt_and_machine(
        attempt: int | None, instance_id: str | None, applies: bool) -> None:
    new = next_job(job(S.RUNNING), S.PREEMPTED, attempt=attempt, instance_id=instance_id, now=NOW)
    assert (new is not None) == applies


def test_fencing_a_job_on_no_machine_refuses_any_machine() -> None:
    queued = Job(id="j1", state=S.QUEUED)
    assert next_job(queued, S.PROVISIONING, attempt=None, instance_id="i-1", now=NOW) is None
    assert next_job(queued, S.PROVISIONING, attempt=0, instance_id=None, now=NOW) is not None


def test_leaving_running_adds_the_time_spent_running() -> None:
    running = job(S.RUNNING, run_seconds=100.0, running_since=NOW - timedelta(seconds=30))
    new = next_job(running, S.PREEMPTED, attempt=None, instance_id=None, now=NOW)
    assert new is not None
    assert new.run_seconds == 130.0 and new.running_since is None
    assert new.finished_at is None  # PREEMPTED is not an end


def test_leaving_running_without_a_start_time_adds_nothing() -> None:
    new = next_job(job(S.RUNNING, run_seconds=5.0), S.COMPLETED, attempt=None, instance_id=None, now=NOW)
    assert new is not None and new.run_seconds == 5.0 and new.running_since is None


def test_running_starts_the_clock_and_the_first_run_is_the_start() -> None:
    new = next_job(job(S.STARTING), S.RUNNING, attempt=None, instance_id=None, now=NOW)
    assert new is not None
    assert new.running_since == NOW and new.started_at == NOW


def test_a_later_run_keeps_the_first_start() -> None:
    first = NOW - timedelta(hours=3)
    new = next_job(job(S.STARTING, started_at=first, run_seconds=60.0), S.RUNNING,
                   attempt=None, instance_id=None, now=NOW)
    assert new is not None
    assert new.started_at == first and new.running_since == NOW and new.run_seconds == 60.0


@pytest.mark.parametrize("target", [S.COMPLETED, S.FAILED, S.CANCELLED])
def test_an_end_is_dated_and_closes_the_running_time(target: JobState) -> None:
    running = job(S.RUNNING, running_since=NOW - timedelta(seconds=10))
    new = next_job(running, target, attempt=None, instance_id=None, now=NOW)
    assert new is not None
    assert new.finished_at == NOW and new.run_seconds == 10.0 and new.running_since is None


def test_an_end_from_a_state_that_never_ran_is_dated_only() -> None:
    new = next_job(Job(id="j1", state=S.QUEUED), S.CANCELLED, attempt=None, instance_id=None, now=NOW)
    assert new is not None
    assert new.finished_at == NOW and new.run_seconds == 0.0 and new.started_at is None


def test_the_update_sees_the_job_before_the_change_and_has_the_last_word() -> None:
    seen: list[Job] = []

    def update(before: Job) -> dict[str, object]:
        seen.append(before)
        return {"attempt": before.attempt + 1, "running_since": None}

    new = next_job(job(S.STARTING), S.RUNNING, attempt=2, instance_id="i-2", now=NOW, update=update)
    assert new is not None
    assert seen[0].state == S.STARTING and seen[0].attempt == 2
    assert new.attempt == 3 and new.running_since is None  # the update overrode the accounting
    assert new.started_at == NOW


def test_no_update_is_asked_for_a_change_that_does_not_apply() -> None:
    def update(_: Job) -> dict[str, object]:
        raise AssertionError("not to be called")

    assert next_job(job(S.COMPLETED), S.FAILED, attempt=None, instance_id=None, now=NOW, update=update) is None
    assert next_job(job(S.RUNNING), S.PREEMPTED, attempt=1, instance_id=None, now=NOW, update=update) is None


def test_the_job_given_is_left_as_it_was() -> None:
    running = job(S.RUNNING, running_since=NOW - timedelta(seconds=10))
    before = running.model_dump()
    next_job(running, S.COMPLETED, attempt=None, instance_id=None, now=NOW, update=lambda _: {"exit_code": 0})
    assert running.model_dump() == before
