"""What a JDL file describes: one job, as a validated pydantic record."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

CheckpointStrategy = Literal["dmtcp", "directory", "signal", "volume"]
CheckpointStorage = Literal["chunks", "volume"]
MarketChoice = Literal["any", "spot", "on-demand"]
MIB = 1 << 20

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_DURATION = re.compile(r"^\s*(?:\d+(?:\.\d+)?\s*[smhd]\s*)+$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> timedelta | None:
    """'90m', '1d 12h', '36h' -> timedelta; None when the text is not a duration."""
    lowered = text.lower()
    if not _DURATION.match(lowered):
        return None
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(lowered))
    return timedelta(seconds=seconds)


def parse_deadline(text: str, submitted_at: datetime) -> datetime:
    """A deadline is an ISO time (UTC if no zone given) or a duration after submission."""
    duration = parse_duration(text)
    if duration is not None:
        return submitted_at + duration
    moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class JobDescription(BaseModel):
    """One job as written in a JDL file. Field names are the JDL keys in snake case."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    executable: str = Field(min_length=1)
    arguments: str = ""
    name: str | None = None
    prologue: tuple[str, ...] = ()
    input_sandbox: tuple[str, ...] = ()
    output_sandbox: tuple[str, ...] = ()
    checkpoint_strategy: CheckpointStrategy = "directory"
    # Seconds between periodic checkpoints; a spot notice triggers one at once regardless.
    checkpoint_interval: int = Field(default=600, ge=1)
    deadline: str | None = None
    # expected compute time on its instance type (a duration): with a Deadline, it lets the
    # scheduler weigh spot against on-demand and never miss a deadline on-demand could meet
    runtime: str | None = None
    max_price: float | None = Field(default=None, gt=0)
    # which machines it may run on: `spot` never falls back to on-demand (a deadline may then be
    # missed), `on-demand` never uses spot
    market: MarketChoice = "any"
    instance_types: tuple[str, ...] = ()
    environment: dict[str, str] = Field(default_factory=dict)
    # test-restore every checkpoint into a scratch folder before it counts
    validate_checkpoint: bool = False
    # AWS: build the prologue into a machine image once (cached by the prologue's hash) instead of
    # running it on every machine the job starts on
    build_image: bool = False
    # where checkpoints go: the chunked store, or snapshots of the job's data disk (`volume`;
    # with `dmtcp` it is the original system's VM strategy: images and disk in one snapshot)
    checkpoint_storage: CheckpointStorage = "chunks"
    # the data disk of volume storage, GiB
    volume_size: int = Field(default=50, ge=1, le=16384)
    # limits, enforced through the job's cgroup (processes, memory) or by the worker (disk, state)
    max_processes: int = Field(default=4096, ge=1, le=4_194_304)
    memory_limit: int | None = Field(default=None, ge=16)  # MiB; default 90% of the machine's memory
    disk_limit: int | None = Field(default=None, ge=1)  # MiB the working and checkpoint folders may hold
    state_size_limit: int | None = Field(default=None, ge=1)  # MiB a checkpoint's state may hold

    def checkpoints_on_volume(self) -> bool:
        """Checkpoints are snapshots of the job's data disk (`volume` storage, or the strategy)."""
        return self.checkpoint_strategy == "volume" or self.checkpoint_storage == "volume"

    def memory_limit_bytes(self) -> int | None:
        return self.memory_limit * MIB if self.memory_limit is not None else None

    def disk_limit_bytes(self) -> int | None:
        return self.disk_limit * MIB if self.disk_limit is not None else None

    def state_size_limit_bytes(self) -> int | None:
        return self.state_size_limit * MIB if self.state_size_limit is not None else None

    @field_validator("deadline")
    @classmethod
    def _deadline_is_time_or_duration(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if parse_duration(value) is not None:
            return value
        try:
            datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(
                f"{value!r} is neither an ISO time (2026-12-01T18:00:00Z) "
                "nor a duration (36h, 2d 12h, 90m)"
            ) from None
        return value

    @field_validator("runtime")
    @classmethod
    def _runtime_is_duration(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) is None:
            raise ValueError(f"{value!r} is not a duration (12h, 1d 6h, 90m, 45s)")
        return value

    def runtime_hours(self) -> float | None:
        duration = parse_duration(self.runtime) if self.runtime else None
        return duration.total_seconds() / 3600.0 if duration else None

    @field_validator("environment")
    @classmethod
    def _environment_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"Environment name {key!r} is not a valid variable name")
        return value

    def referenced_files(self) -> list[str]:
        """Local files the frontend must find and upload before the job can exist."""
        return [*self.prologue, *self.input_sandbox]
