"""All configuration in one pydantic-settings model, built once in the CLI and passed down.

Every field can be set from the environment as CBAS_<NAME> (CBAS_HOME, CBAS_PING_INTERVAL, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


LOCAL_NOTICE_FLOOR = 10.0  # wall seconds


def _default_home() -> Path:
    return Path.home() / ".cbas"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CBAS_", extra="ignore")

    home: Path = Field(default_factory=_default_home, description="state of the local backend")
    backend: Literal["local", "aws"] = "local"
    cluster: str = "default"  # tag value that marks this installation's machines

    # master
    master_host: str = "127.0.0.1"
    master_port: int = 0  # 0: pick a free port and publish it in <home>/master.json
    ping_interval: float = 30.0  # seconds between worker pings
    ping_missed_max: int = 4  # a worker is dead after this many missed pings
    # the local bus delivers as SNS does without a delivery policy: a recipient that cannot be
    # reached is tried again this many times, this many seconds apart, then the message is dropped
    bus_delivery_retries: int = 3
    bus_retry_seconds: float = 20.0
    boot_timeout: float = 300.0  # seconds for a launched machine's worker to announce itself
    schedule_interval: float = 5.0  # seconds between scheduler passes over queued jobs
    default_instance_type: str = "m5.large"
    batch_window: float = 1.0  # seconds to gather arrivals before a scheduling pass
    # a market that refused a launch (or reclaimed a machine) is left this long, doubled at each
    # refusal in a row up to 30 minutes, before it is tried again
    capacity_retry_seconds: float = Field(default=60.0, gt=0)
    # seconds from launch to running again, until measured (the job's own, or else the median of
    # the cluster's running jobs'); None: 300 on aws (an EC2 boot and a restore), 10 on local
    restart_overhead: float | None = Field(default=None, ge=0)
    migrate_timeout: float = 120.0  # seconds a moving job's worker has to checkpoint and stop
    # seconds a message id is remembered: longer than a delivery is accepted (its timestamp may be
    # an hour old), so a duplicate is either remembered or refused as stale
    seen_message_window: float = 4000.0
    # a restart from a checkpoint that takes no new checkpoint within this many seconds is stalled
    # (default: 3 checkpoint intervals plus a minute); it falls back to the checkpoint before
    restart_stall_timeout: float | None = None
    max_fallbacks: int = 3  # then the job fails: it is in a restart loop
    # attempts in a row that end without a new checkpoint before the job is judged in a restart
    # loop: it fails with the last checkpoint failure, or (none reported) runs on demand
    max_stalled_attempts: int = 3

    # worker
    # seconds between spot/instance-action polls: EC2's advice is 5 s; None: 5 s on AWS, 1 s on the
    # local backend (its metadata is a file, and its notices are shorter)
    notice_poll_interval: float | None = None
    # the worker's message endpoint: where it listens, and the host it tells the bus to deliver to
    # ("metadata": the machine's public address from instance metadata, as on EC2)
    worker_listen_host: str = "127.0.0.1"
    worker_port: int = 0  # 0: any free port
    worker_advertise_host: str = ""  # "": the listen host
    log_upload_interval: float = 5.0
    # who jobs run as: "slots", a user of their own per job (cbas-slot<N>, made on first use by a
    # root worker); a user name, one fixed user; "worker", a non-root worker's own user (no isolation)
    job_user: str = "slots"
    job_slot_dir: Path = Path("/run/cbas/slots")  # the slot locks, shared by the workers of one host
    job_slots: int = 64
    dmtcp_checkpoint_signal: int = 62  # not SIGUSR2, DMTCP's default: the JVM uses it
    signal_checkpoint_timeout: float = 60.0
    blob_retry_seconds: float = 120.0  # transient blob store errors are retried this long, then reported
    checkpoints_kept: int = 3  # older checkpoints' manifests and unshared chunks are deleted
    # the reaper: a finished job's files stay this long; anything unclaimed is left alone this long
    retention_days: float = Field(default=7.0, ge=0)
    reaper_interval: float = 600.0
    reaper_grace: float = 600.0

    # local backend
    machines_dir: Path | None = None  # each local machine's disk; see machines_root()
    market_time_scale: float = 60.0  # simulated seconds per wall second
    # wall seconds of the 2-minute notice; None: two minutes of market time, but never less than
    # LOCAL_NOTICE_FLOOR, so a worker polling every second has time to checkpoint
    market_notice_seconds: float | None = None
    market_seed: int | None = None
    market_trace: Path | None = None  # replay this trace instead of the built-in model
    market_trace_offset_hours: float = Field(default=0.0, ge=0)  # from this far into the trace

    # aws backend (cbas aws bootstrap prints these)
    aws_region: str = "us-east-1"
    aws_bucket: str = ""
    aws_table: str = ""
    aws_topic_arn: str = ""
    aws_inbox_queue_url: str = ""  # the master's queue on the topic: its messages wait there while it is away
    aws_image_id: str = ""
    aws_instance_profile: str = ""
    aws_security_groups: list[str] = Field(default_factory=list)
    # fetch SNS signing certificates through this endpoint instead of the certificate URL's host
    # (a VPC endpoint, an AWS emulator); the URL itself is checked as always
    aws_sns_certificate_endpoint: str = ""
    # where a bus pushes to this master's /messages; "{port}" stands for the port it bound. Unused on
    # AWS, where the master reads its queue (aws_inbox_queue_url) and SNS never calls it
    public_url: str = ""
    aws_worker_wheel: Path | None = None  # the cbas wheel workers install (uploaded to the bucket)

    log_level: str = "INFO"

    def machines_root(self) -> Path:
        """Local machines' disks. As root they must be reachable by the job user, so not ~root."""
        if self.machines_dir is not None:
            return self.machines_dir
        if os.geteuid() == 0:
            return Path("/var/tmp/cbas-machines")
        return self.home / "machines"

    def default_restart_seconds(self) -> float:
        """A restart's cost before any is measured: an EC2 machine boots in minutes, a local one
        (a process) in about a second."""
        if self.restart_overhead is not None:
            return self.restart_overhead
        return 300.0 if self.backend == "aws" else 10.0

    def notice_seconds(self) -> float:
        if self.market_notice_seconds is not None:
            return self.market_notice_seconds
        return max(120.0 / self.market_time_scale, LOCAL_NOTICE_FLOOR)

    def notice_poll_seconds(self) -> float:
        if self.notice_poll_interval is not None:
            return self.notice_poll_interval
        return 1.0 if self.backend == "local" else 5.0

    def interruption_notice_seconds(self) -> float:
        """How long a reclaimed spot machine has: EC2's two minutes, or the local market's."""
        return self.notice_seconds() if self.backend == "local" else 120.0

    def dead_after(self) -> float:
        return self.ping_interval * self.ping_missed_max
