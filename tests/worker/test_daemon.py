"""The worker's message handlers, dispatched through its registry as deliveries are."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cbas import authority
from cbas.local.blobs import FolderBlobStore
from cbas.local.bus import LocalMessageBus
from cbas.messages import CheckpointNow, Envelope, MessageType, StopJob, envelope
from cbas.settings import Settings
from cbas.worker.daemon import Worker, registry
from cbas.worker.imds import MetadataClient


CREDENTIAL = authority.Credential("l-1", authority.machine_key(b"master key", "l-1"))


class RecordingJob:
    job_id = "j1"

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def checkpoint(self, reason: str, final: bool = False, deadline: float | None = None) -> bool:
        self.calls.append(f"checkpoint:{reason}")
        return True

    async def on_notice(self, deadline: float | None = None) -> None:
        self.calls.append("notice")

    def stop(self) -> None:
        self.calls.append("stop")


async def test_checkpoint_and_stop_requests_reach_the_job(tmp_path: Path) -> None:
    bus = LocalMessageBus(tmp_path, tmp_path / "cbas.db")
    worker = Worker(Settings(home=tmp_path), "i-1", tmp_path, MetadataClient("http://127.0.0.1:9"),
                    FolderBlobStore(tmp_path / "blobs"), bus, credential=CREDENTIAL)
    job = RecordingJob()
    worker.job = job  # type: ignore[assignment]
    for body, type_ in [
        (CheckpointNow(job_id="j1", reason="market about to go"), MessageType.CHECKPOINT_NOW),
        (CheckpointNow(job_id="other"), MessageType.CHECKPOINT_NOW),  # not this worker's job: ignored
        (StopJob(job_id="j1", checkpoint=True), MessageType.STOP_JOB),
        (StopJob(job_id="j1"), MessageType.STOP_JOB),
    ]:
        await registry.dispatch(worker, envelope(type_, body, "master", "worker/i-1"))
    await asyncio.sleep(0.05)
    assert sorted(job.calls) == ["checkpoint:scheduler", "notice", "stop"]  # stop is immediate, the rest run in the background
    await bus.close()


class RecordingBus:
    def __init__(self) -> None:
        self.sent: list[Envelope] = []

    async def send(self, message: Envelope) -> None:
        self.sent.append(message)


async def test_everything_the_worker_and_its_job_send_is_signed_with_the_machine_key(tmp_path: Path) -> None:
    from cbas.messages import JobDone

    bus = RecordingBus()
    worker = Worker(Settings(home=tmp_path), "i-1", tmp_path, MetadataClient("http://127.0.0.1:9"),
                    FolderBlobStore(tmp_path / "blobs"), bus, credential=CREDENTIAL)  # type: ignore[arg-type]
    await worker.ping()
    # what a JobRun reports goes through the same outbox (JobRun gets worker.outbox.deliver)
    assert await worker.outbox.deliver(envelope(MessageType.JOB_DONE, JobDone(job_id="j1", attempt=1),
                                                "worker/i-1", "master"))
    assert [m.type for m in bus.sent] == [MessageType.PING, MessageType.JOB_DONE]
    for message in bus.sent:
        authority.verify(message, CREDENTIAL)
        assert message.auth and message.auth.startswith("v1:l-1:")
