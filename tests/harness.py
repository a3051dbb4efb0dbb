"""Runs the worker's JobRun directly: real processes and a real folder blob store; the messages
it would send to the master are collected instead."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cbas import authority
from cbas.archive import Member, pack
from cbas.local.blobs import FolderBlobStore
from cbas.messages import Envelope, MessageType, StartJob
from cbas.settings import Settings
from cbas.worker.job_run import JobRun


MASTER_KEY = b"the harness plays the master"  # the job keys derive from it as the master's do


class Harness:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = FolderBlobStore(root / "blobs")
        self.sent: list[Envelope] = []
        self.settings = Settings(home=root, log_upload_interval=0.2)
        self.attempt = 0

    async def deliver(self, message: Envelope) -> bool:
        self.sent.append(message)
        return True

    def checkpoint_key(self, job_id: str) -> bytes:
        """The job's checkpoint key, as the master derives it (a test opening the job's checkpoints)."""
        return authority.checkpoint_key(MASTER_KEY, job_id)

    def upload_inputs(self, job_id: str, files: dict[str, bytes | Path]) -> None:
        scratch = self.root / "scratch-in"
        scratch.mkdir(exist_ok=True)
        members = []
        for name, content in files.items():
            path = content if isinstance(content, Path) else scratch / name
            if not isinstance(content, Path):
                path.write_bytes(content)
                path.chmod(0o755)
            members.append(Member(path, name))
        pack(members, scratch / "input.tar.zst")
        self.blobs.put_file(f"jobs/{job_id}/input.tar.zst", scratch / "input.tar.zst")

    def run(self, job_id: str, text: str, checkpoints: list[str] | None = None) -> JobRun:
        self.attempt += 1
        disk = self.root / f"disk{self.attempt}"
        disk.mkdir(mode=0o711)
        start = StartJob(job_id=job_id, attempt=self.attempt, jdl=text, checkpoints=checkpoints or [], ping_interval=1)
        start = start.with_checkpoint_key(self.checkpoint_key(job_id))  # as the worker opens it
        return JobRun(self.settings, f"i-{self.attempt}", disk, self.blobs, start, self.deliver)

    def of_type(self, kind: MessageType) -> list[Envelope]:
        return [m for m in self.sent if m.type == kind]


async def wait_for_line(path: Path, text: str, timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.05)):
        if path.exists() and text in path.read_text():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} never appeared in {path}")


async def wait_running(run: JobRun, timeout: float = 30) -> None:
    for _ in range(int(timeout / 0.05)):
        if run.phase == "running":
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the job never ran (phase {run.phase})")
