"""The job state machine: which transitions are allowed. Pure, no I/O.

    SUBMITTING -> QUEUED -> PROVISIONING -> STARTING -> RUNNING -> COMPLETED
                    ^            |              |           |
                    |            +--------------+-----------+--> PREEMPTED --+
                    +-------------------------------------------------------+
    Any non-terminal state can also go to FAILED or CANCELLED.
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    SUBMITTING = "SUBMITTING"  # id handed out; the frontend is uploading the sandbox
    QUEUED = "QUEUED"  # waiting for the scheduler to place it on a machine
    PROVISIONING = "PROVISIONING"  # a machine is launched; its worker has not started yet
    STARTING = "STARTING"  # the worker has the job: sandbox, checkpoint restore, prologue
    RUNNING = "RUNNING"  # the executable runs and the worker pings
    PREEMPTED = "PREEMPTED"  # the machine was taken away; the job goes back to the queue
    COMPLETED = "COMPLETED"  # exited 0, output uploaded
    FAILED = "FAILED"  # exited non-zero, or could not be run at all
    CANCELLED = "CANCELLED"  # the user cancelled it

    def is_terminal(self) -> bool:
        return self in TERMINAL

    def has_machine(self) -> bool:
        """States in which a machine is (or may be) working for the job."""
        return self in (JobState.PROVISIONING, JobState.STARTING, JobState.RUNNING)


TERMINAL = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})

_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.SUBMITTING: frozenset({JobState.QUEUED}),
    JobState.QUEUED: frozenset({JobState.PROVISIONING}),
    JobState.PROVISIONING: frozenset({JobState.STARTING, JobState.PREEMPTED}),
    JobState.STARTING: frozenset({JobState.RUNNING, JobState.PREEMPTED, JobState.COMPLETED}),
    JobState.RUNNING: frozenset({JobState.PREEMPTED, JobState.COMPLETED}),
    JobState.PREEMPTED: frozenset({JobState.QUEUED}),
}


class InvalidTransition(ValueError):
    def __init__(self, current: JobState, target: JobState) -> None:
        self.current, self.target = current, target
        super().__init__(f"a job cannot go from {current} to {target}")


def can_transition(current: JobState, target: JobState) -> bool:
    if current.is_terminal():
        return False
    if target in (JobState.FAILED, JobState.CANCELLED):
        return True
    return target in _ALLOWED.get(current, frozenset())


def check_transition(current: JobState, target: JobState) -> None:
    if not can_transition(current, target):
        raise InvalidTransition(current, target)
