"""Records kept in the job store. Every record carries a version for conditional writes."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field, SecretStr

from cbas.state import JobState

Market = Literal["spot", "on-demand"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def from_epoch(seconds: float) -> datetime:
    """A time of time.time() (the master's clock), as records keep times."""
    return datetime.fromtimestamp(seconds, timezone.utc)


class Job(BaseModel):
    id: str
    state: JobState = JobState.SUBMITTING
    version: int = 0
    name: str | None = None
    jdl: str = ""
    submitted_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    started_at: datetime | None = None  # first time it ran
    finished_at: datetime | None = None
    instance_id: str | None = None  # the machine working for it now
    attempt: int = 0  # bumped at every START_JOB; messages from older attempts are stale
    restarts: int = 0  # starts after the first one
    preemptions: int = 0
    checkpoints: int = 0
    last_checkpoint: str | None = None
    restored_from: str | None = None  # checkpoint the current attempt started from
    attempt_checkpoints: int = 0  # checkpoints the current attempt has taken: its progress
    fallbacks: int = 0  # restarts that failed or stalled and fell back to an older checkpoint
    stalled_attempts: int = 0  # attempts in a row that ended without a checkpoint of their own
    last_checkpoint_error: str | None = None  # why the newest failed checkpoint did not count
    run_seconds: float = 0.0  # seconds spent RUNNING, summed over attempts
    running_since: datetime | None = None
    # the work done, as a restart would find it (cbas.master.work): time running that no
    # checkpoint saved is not progress
    saved_work_seconds: float = 0.0  # the work the newest checkpoint holds
    resumed_work_seconds: float = 0.0  # the work the current attempt started from
    cost: float = 0.0  # USD of machines already terminated
    predicted_cost: float | None = None  # USD the scheduler expected the job to cost, at its first placement
    provisioned_at: datetime | None = None  # when the current machine was asked for
    restart_seconds: float | None = None  # measured: machine asked for -> job running again
    checkpoint_seconds: float | None = None  # measured: how long a checkpoint takes (pause + upload)
    last_checkpoint_at: datetime | None = None
    exit_code: int | None = None
    error: str | None = None
    stderr_tail: str | None = None
    missing_outputs: list[str] = Field(default_factory=list)
    image_id: str | None = None  # BuildImage: the image its prologue was built into
    # what the master is doing about the job, kept here so a master restarted at any moment goes on
    move_reason: str | None = None  # a move under way: STOP_JOB (checkpoint first) was sent
    move_deadline: datetime | None = None  # ... and without a final checkpoint by then, it moves anyway
    checkpoint_requested_at: datetime | None = None  # the scheduler's last CHECKPOINT_NOW
    # exactly once under redelivery: the newest checkpoints counted, and the WORKER_STARTED
    # message the current attempt was started for (the same one again is not a restarted worker)
    counted_checkpoints: list[str] = Field(default_factory=list)
    announcement: str | None = None
    waiting_reason: str | None = None  # why it waits to be placed, as last recorded in its events


class LedgerState(StrEnum):
    LAUNCHING = "LAUNCHING"  # written before the cloud call: a crash here is reconciled
    RUNNING = "RUNNING"
    TERMINATED = "TERMINATED"


class LedgerEntry(BaseModel):
    """The ResourceManager's record of one machine it asked for; no machine exists without one."""

    id: str  # also the cloud's idempotency token and the cbas:ledger tag
    job_id: str
    state: LedgerState = LedgerState.LAUNCHING
    version: int = 0
    instance_id: str | None = None
    market: Market = "spot"
    zone: str = ""
    instance_type: str = ""
    price: float = 0.0  # USD per hour
    created_at: datetime = Field(default_factory=utcnow)
    launched_at: datetime | None = None
    terminated_at: datetime | None = None
    cost: float = 0.0
    reason: str | None = None  # why it ended
    notice_ends_at: datetime | None = None  # a spot notice was heard: the machine goes then

    def cost_until(self, now: datetime) -> float:
        """USD the machine has cost from its launch to `now` (per-second billing)."""
        if self.launched_at is None:
            return 0.0
        return self.price * max((now - self.launched_at).total_seconds(), 0.0) / 3600.0


class CheckpointRecord(BaseModel):
    job_id: str
    id: str  # sortable: a<attempt>-n<number>
    attempt: int
    manifest_key: str
    size_bytes: int
    new_bytes: int = 0
    pause_seconds: float
    upload_seconds: float
    reason: str  # interval | notice | final
    deadline_margin_seconds: float | None = None
    work_seconds: float | None = None  # the job's work it holds (None: not known, a checkpoint from before)
    snapshot_id: str | None = None  # volume strategy: the EBS snapshot that holds the state
    created_at: datetime = Field(default_factory=utcnow)
    bad: bool = False  # failed verification on restore; never used again
    snapshot_deleted: bool = False  # its disk snapshot is gone (no longer needed)


class JobEvent(BaseModel):
    job_id: str
    at: datetime = Field(default_factory=utcnow)
    kind: str
    detail: str = ""
    state: JobState | None = None  # the job's state after it, for the events of state changes


class Machine(BaseModel):
    """A machine as the cloud reports it."""

    instance_id: str
    zone: str
    instance_type: str
    market: Market
    price: float
    state: Literal["pending", "running", "terminated"] = "running"
    tags: dict[str, str] = Field(default_factory=dict)
    launched_at: datetime = Field(default_factory=utcnow)


class Offer(BaseModel):
    """What one market (zone x instance type) offers right now."""

    zone: str
    instance_type: str
    spot_price: float
    ondemand_price: float
    available: bool


class DiskSpec(BaseModel):
    """What a job's machine boots from and keeps its data on, beyond the cluster's defaults."""

    image_id: str | None = None  # the job's own image (its prologue built in); None: the cluster's
    data_volume_gib: int | None = None  # volume strategy: a data disk of this size for the job
    data_snapshot: str | None = None  # ... made from this snapshot (a restart)


class LaunchSpec(DiskSpec):
    ledger_id: str
    job_id: str
    instance_type: str
    zone: str
    market: Market
    max_price: float | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    # the machine's own key (hex; cbas.authority): handed to the machine only, never dumped or shown
    machine_key: SecretStr = Field(exclude=True, repr=False)
