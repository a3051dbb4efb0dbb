"""The reaper: finds what no job needs any more and removes it, and never what a live job uses.

`plan` is the policy, pure: given what exists and the jobs, it says what goes. `Reaper` gathers
the inputs from the store, the cloud and the blob store, and carries the plan out (or only
reports it: `cbas gc --dry-run`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog

from cbas.authority import KEY_DROPS
from cbas.backends import BlobStore, Cloud, JobStore, Leftover, MessageBus, NotFound
from cbas.models import Job, utcnow

log = structlog.get_logger(__name__)
BUILD_GRACE = timedelta(hours=2)  # longer than an image build may take (ImageBuilder.timeout)


@dataclass(frozen=True)
class Holdings:
    """What live jobs and machines reference: never removed."""

    jobs: dict[str, Job]  # every job the store knows
    live_ledger: set[str]  # ledger ids of machines asked for and not yet given back
    images_in_use: set[str]  # images of jobs that are not finished


@dataclass
class GcReport:
    removed: list[str] = field(default_factory=list)  # "kind id (why)"
    failed: list[str] = field(default_factory=list)
    dry_run: bool = False


def _finished(job: Job | None) -> bool:
    return job is None or job.state.is_terminal()


def _older(moment: datetime | None, now: datetime, age: timedelta) -> bool:
    return moment is not None and now - moment > age


def plan(leftovers: list[Leftover], job_prefixes: list[str], holdings: Holdings, now: datetime,
         retention: timedelta, grace: timedelta) -> list[tuple[Leftover, str]]:
    """What to remove, each with why. `job_prefixes` are job ids that have files in the blob store."""
    doomed: list[tuple[Leftover, str]] = []
    for item in leftovers:
        job = holdings.jobs.get(item.job_id) if item.job_id else None
        if item.kind == "machine":
            if item.ledger_id not in holdings.live_ledger and _older(item.created_at, now, grace):
                doomed.append((item, "no live ledger entry"))
        elif item.kind in ("volume", "snapshot"):
            if _finished(job) and _older(item.created_at, now, grace):
                doomed.append((item, "its job is finished" if job else "its job is unknown"))
        elif item.kind == "image":
            if item.id not in holdings.images_in_use and _older(item.created_at, now, retention):
                doomed.append((item, f"no unfinished job uses it, older than {retention}"))
        elif item.kind == "queue":  # an image builder's, left by a master that died mid-build
            if _older(item.created_at, now, max(grace, BUILD_GRACE)):
                doomed.append((item, "image builder queue past its build"))
    for job_id in job_prefixes:
        job = holdings.jobs.get(job_id)
        if job is None:
            doomed.append((Leftover(kind="job-files", id=job_id), "no such job"))
        elif job.state.is_terminal() and _older(job.finished_at, now, retention):
            doomed.append((Leftover(kind="job-files", id=job_id, job_id=job_id), f"finished over {retention} ago"))
    return doomed


def stale_key_drops(keys: list[str], live_ledger: set[str]) -> list[str]:
    """Keys left for machines' boots (machines/<ledger id>/key) whose machine is gone. `live_ledger`
    must be read after `keys` were listed: an entry is written before its key, so a launch under
    way is always live."""
    return [key for key in keys if key.removeprefix(KEY_DROPS).split("/", 1)[0] not in live_ledger]


class Reaper:
    def __init__(self, store: JobStore, cloud: Cloud, blobs: BlobStore, bus: MessageBus,
                 retention: timedelta, grace: timedelta) -> None:
        self.store, self.cloud, self.blobs, self.bus = store, cloud, blobs, bus
        self.retention, self.grace = retention, grace

    async def holdings(self) -> Holdings:
        jobs = {job.id: job for job in await self.store.list_jobs()}
        ledger = {entry.id for entry in await self.store.list_ledger(live_only=True)}
        images = {job.image_id for job in jobs.values() if job.image_id and not job.state.is_terminal()}
        return Holdings(jobs=jobs, live_ledger=ledger, images_in_use=images)

    async def run(self, dry_run: bool = False) -> GcReport:
        # the holdings are read before the cloud is listed: a job or machine made in between
        # is newer than the grace period, so it is never taken for a leftover
        holdings = await self.holdings()
        leftovers = await self.cloud.leftovers()
        prefixes = await asyncio.to_thread(self._job_prefixes)
        report = GcReport(dry_run=dry_run)
        for item, why in plan(leftovers, prefixes, holdings, utcnow(), self.retention, self.grace):
            if item.kind == "job-files" and item.job_id is None and await self._exists(item.id):
                continue  # the listing missed a job just made (a store's index may lag): it is not a ghost
            label = f"{item.kind} {item.id} ({why})"
            if dry_run:
                report.removed.append(label)
                continue
            try:
                if item.kind == "job-files":
                    await asyncio.to_thread(self._delete_prefix, f"jobs/{item.id}/")
                else:
                    await self.cloud.remove(item)
                report.removed.append(label)
                log.info("gc.removed", kind=item.kind, id=item.id, why=why)
            except Exception as exc:  # one failure must not stop the rest; the next pass retries
                report.failed.append(f"{label}: {exc}")
                log.warning("gc.failed", kind=item.kind, id=item.id, error=str(exc))
        await self._remove_key_drops(report)
        return report

    async def _remove_key_drops(self, report: GcReport) -> None:
        drops = await asyncio.to_thread(self.blobs.list, KEY_DROPS)
        live = {entry.id for entry in await self.store.list_ledger(live_only=True)}
        for key in stale_key_drops(drops, live):
            label = f"key-drop {key} (its machine is gone)"
            if report.dry_run:
                report.removed.append(label)
                continue
            try:
                await asyncio.to_thread(self.blobs.delete, key)
                report.removed.append(label)
                log.info("gc.removed", kind="key-drop", id=key)
            except Exception as exc:
                report.failed.append(f"{label}: {exc}")

    async def _exists(self, job_id: str) -> bool:
        try:
            await self.store.get_job(job_id)  # a consistent read
            return True
        except NotFound:
            return False

    def _job_prefixes(self) -> list[str]:
        return sorted({key.split("/")[1] for key in self.blobs.list("jobs/") if key.count("/") >= 2})

    def _delete_prefix(self, prefix: str) -> None:
        for key in self.blobs.list(prefix):
            self.blobs.delete(key)
