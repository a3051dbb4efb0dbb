"""The reaper: its pure plan, and a pass through the API with the real local backends."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from cbas.backends import Leftover
from cbas.local.volumes import FolderSnapshots
from cbas.master.reaper import Holdings, plan, stale_key_drops
from cbas.models import Job, utcnow
from cbas.state import JobState
from tests.master.test_app import AUTH, setup  # noqa: F401 (the fixture)

NOW = utcnow()
OLD, NEW = NOW - timedelta(days=30), NOW - timedelta(seconds=5)
RETENTION, GRACE = timedelta(days=7), timedelta(minutes=10)


def jobs(*specs: tuple[str, JobState, object]) -> dict[str, Job]:
    return {id_: Job(id=id_, state=state, finished_at=finished) for id_, state, finished in specs}  # type: ignore[arg-type]


def test_what_a_live_job_uses_is_kept_and_what_no_one_needs_goes() -> None:
    holdings = Holdings(
        jobs=jobs(("live", JobState.RUNNING, None), ("done", JobState.COMPLETED, OLD),
                  ("recent", JobState.FAILED, NEW)),
        live_ledger={"l-live"}, images_in_use={"ami-live"})
    leftovers = [
        Leftover(kind="machine", id="i-live", job_id="live", ledger_id="l-live", created_at=OLD),
        Leftover(kind="machine", id="i-stray", job_id="done", ledger_id="l-gone", created_at=OLD),
        Leftover(kind="machine", id="i-young", job_id="live", ledger_id="l-new", created_at=NEW),  # index lag
        Leftover(kind="snapshot", id="snap-live", job_id="live", created_at=OLD),
        Leftover(kind="snapshot", id="snap-done", job_id="done", created_at=OLD),
        Leftover(kind="volume", id="vol-orphan", job_id="nobody-knows", created_at=OLD),
        Leftover(kind="image", id="ami-live", created_at=OLD),
        Leftover(kind="image", id="ami-old", created_at=OLD),
        Leftover(kind="image", id="ami-fresh", created_at=NEW),
        Leftover(kind="queue", id="https://sqs/q-building", created_at=NOW - timedelta(minutes=30)),
        Leftover(kind="queue", id="https://sqs/q-left", created_at=OLD),
    ]
    doomed = {item.id: why for item, why in plan(leftovers, ["live", "done", "recent", "ghost"], holdings,
                                                  NOW, RETENTION, GRACE)}
    assert set(doomed) == {"i-stray", "snap-done", "vol-orphan", "ami-old", "https://sqs/q-left", "done", "ghost"}
    assert doomed["done"].startswith("finished over") and doomed["ghost"] == "no such job"


async def test_gc_through_the_api_keeps_live_jobs_files_and_snapshots(setup, tmp_path: Path) -> None:  # noqa: F811
    master, client = setup
    live = await master.store.create_job(Job(id="live0001", state=JobState.SUBMITTING))
    done = await master.store.create_job(Job(id="done0001", state=JobState.SUBMITTING))
    await master.store.mutate_job(done.id, lambda j: j.model_copy(update={"state": JobState.COMPLETED,
                                                                          "finished_at": OLD}))
    for job_id in (live.id, done.id):
        master.blobs.put_bytes(f"jobs/{job_id}/input.tar.zst", b"x")
        volume = tmp_path / f"volume-{job_id}"
        volume.mkdir()
        FolderSnapshots(tmp_path, volume).snapshot(job_id, "a0001-n00001")
    master.blobs.put_bytes("jobs/ghost001/output.tar.zst", b"x")
    master.reaper.grace = timedelta(0)  # snapshots just made count as old enough

    resp = await client.post("/api/gc", json={"dry_run": True}, headers=AUTH)
    planned = (await resp.json())["removed"]
    assert resp.status == 200 and len(planned) == 3 and master.blobs.exists("jobs/ghost001/output.tar.zst")

    resp = await client.post("/api/gc", json={}, headers=AUTH)
    report = await resp.json()
    assert sorted(line.split(" (")[0] for line in report["removed"]) == sorted(line.split(" (")[0] for line in planned)
    assert master.blobs.list("jobs/") == [f"jobs/{live.id}/input.tar.zst"]
    remaining = [p.name for p in (tmp_path / "snapshots").iterdir()]
    assert len(remaining) == 1 and (tmp_path / "snapshots" / remaining[0] / "job").read_text().startswith(live.id)
    bad = await client.post("/api/gc", json={"dry_run": "yes"}, headers=AUTH)
    assert bad.status == 400


async def test_a_job_the_listing_missed_keeps_its_files(setup) -> None:  # noqa: F811
    master, client = setup
    job = await master.store.create_job(Job(id="new00001", state=JobState.SUBMITTING))
    master.blobs.put_bytes(f"jobs/{job.id}/input.tar.zst", b"x")

    async def lagging_index(states: object = None) -> list[Job]:
        return []  # as a DynamoDB index may, just after the job was written

    master.store.list_jobs = lagging_index  # type: ignore[method-assign]
    report = await (await client.post("/api/gc", json={}, headers=AUTH)).json()
    assert report["removed"] == [] and master.blobs.exists(f"jobs/{job.id}/input.tar.zst")


def test_the_key_left_for_a_machine_that_is_gone_goes() -> None:
    keys = ["machines/l-live/key", "machines/l-gone/key"]
    assert stale_key_drops(keys, {"l-live"}) == ["machines/l-gone/key"]


async def test_gc_removes_keys_left_for_machines_that_are_gone(setup) -> None:  # noqa: F811
    master, client = setup
    from cbas.models import LedgerEntry

    await master.store.put_ledger(LedgerEntry(id="l-booting", job_id="j"))  # a launch under way keeps its key
    for ledger_id in ("l-booting", "l-gone"):
        master.blobs.put_bytes(f"machines/{ledger_id}/key", b"k")
    planned = (await (await client.post("/api/gc", json={"dry_run": True}, headers=AUTH)).json())["removed"]
    assert planned == ["key-drop machines/l-gone/key (its machine is gone)"]
    await client.post("/api/gc", json={}, headers=AUTH)
    assert master.blobs.list("machines/") == ["machines/l-booting/key"]
