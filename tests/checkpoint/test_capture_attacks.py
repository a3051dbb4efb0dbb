"""The capture boundary against a hostile job: what the root worker copies while the job is held,
and what the job can still do to it once it runs again."""

from __future__ import annotations

import asyncio
import os
import subprocess
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest

from cbas.checkpoint import capture
from cbas.checkpoint.base import JobContext
from cbas.checkpoint.store import StateChanged, UnsupportedFile
from cbas.messages import MessageType
from cbas.worker.checkpoints import Checkpoints
from cbas.worker.job_files import JobLayout
from tests.checkpoint.test_store import store_at

JOB_UID = 4242
SECRET = b"root-only secret " * 64
IMAGE = frozenset({".dmtcp/ckpt_*.dmtcp"})


def everything_stored(tmp: Path) -> bytes:
    """Every byte the worker wrote for the checkpoints: blobs and its own capture folders."""
    return b"".join(p.read_bytes() for p in sorted(tmp.rglob("*")) if p.is_file() and "state" not in p.parts
                    and p.name != "secret")


def secret_file(tmp: Path) -> Path:
    secret = tmp / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)  # root's, and only root's
    return secret


class HeldStill:
    """A strategy whose hold is a no-op (the job is a fake); the state folder is given."""

    name = "directory"
    exclude: frozenset[str] = frozenset()
    immutable: frozenset[str] = frozenset()

    def __init__(self, state: Path) -> None:
        self.state = state

    def state_dir(self, ctx: JobContext) -> Path:
        return self.state

    @asynccontextmanager
    async def quiesced(self, ctx: JobContext, job: object) -> AsyncIterator[None]:
        yield


class Running:
    class process:  # noqa: N801  (the attribute JobProcess has)
        returncode: int | None = None

        @staticmethod
        async def wait() -> int:
            await asyncio.Event().wait()  # it runs on
            return 0


def worker_flow(tmp: Path, user: tuple[int, int] | None = (JOB_UID, JOB_UID)) -> tuple[Checkpoints, JobContext, list]:  # type: ignore[type-arg]
    layout = JobLayout(tmp / "disk")
    layout.staging.mkdir(parents=True)
    state = tmp / "state"
    state.mkdir(exist_ok=True)
    logs = tmp / "logs"
    logs.mkdir()
    ctx = JobContext(job_id="j", workdir=state, checkpoint_dir=state, stdout=logs / "out", stderr=logs / "err",
                     env={}, user=user)
    sent: list = []  # type: ignore[type-arg]

    async def report(kind: MessageType, body: object) -> bool:
        sent.append((kind, body))
        return True

    return Checkpoints("j", 1, layout, HeldStill(state), store_at(tmp), report), ctx, sent  # type: ignore[arg-type]


def take(checkpoints: Checkpoints, ctx: JobContext) -> bool:
    async def go() -> bool:
        taken = await checkpoints.take(ctx, Running(), "interval")  # type: ignore[arg-type]
        await checkpoints.reported()
        return taken

    return asyncio.run(go())


def test_a_hard_link_to_a_file_the_job_may_not_read_is_refused_not_copied(tmp_path: Path) -> None:
    # protected_hardlinks stops most of these; a file the job was once given, or a kernel without
    # it, does not: the root worker must not read it for the job
    secret = secret_file(tmp_path)
    checkpoints, ctx, sent = worker_flow(tmp_path)
    (tmp_path / "state" / "mine.txt").write_text("the job's")
    os.chown(tmp_path / "state" / "mine.txt", JOB_UID, JOB_UID)
    os.link(secret, tmp_path / "state" / "linked")
    assert not take(checkpoints, ctx)
    [(kind, failure)] = sent
    assert kind == MessageType.CHECKPOINT_FAILED and "belongs to uid 0, not to the job" in failure.error
    assert SECRET not in everything_stored(tmp_path)
    assert store_at(tmp_path).checkpoint_ids() == []


def test_a_file_swapped_for_a_link_to_a_root_only_file_during_the_capture_is_never_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = secret_file(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / "data").write_bytes(b"the job's data" * 1000)
    real_open = os.open

    def swapping_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if str(path) == "data" and not (state / "data").is_symlink():  # listed as a file; now a link
            (state / "data").unlink()
            (state / "data").symlink_to(secret)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr("os.open", swapping_open)
    with pytest.raises(UnsupportedFile):
        store_at(tmp_path).snapshot(state, tmp_path / "staging")
    monkeypatch.undo()
    assert SECRET not in everything_stored(tmp_path)


def test_a_job_writing_into_a_file_after_its_capture_changes_nothing_captured(tmp_path: Path) -> None:
    # a hard-link "snapshot" would share the job's inode: these writes would land in the checkpoint
    state = tmp_path / "state"
    state.mkdir()
    data = state / "data.bin"
    data.write_bytes(os.urandom(3 << 20))
    captured = data.read_bytes()
    store = store_at(tmp_path)
    snapshot = store.snapshot(state, tmp_path / "staging")
    with open(data, "r+b") as handle:  # the job goes on, in place
        handle.write(b"after the capture" * 1000)
    store.commit(snapshot, "c1", "directory")
    store.release(snapshot)
    store_at(tmp_path).restore("c1", tmp_path / "out")
    assert (tmp_path / "out" / "data.bin").read_bytes() == captured


def test_an_image_written_into_after_its_capture_fails_the_checkpoint(tmp_path: Path) -> None:
    # images are only opened while the job is held: a job that writes into one afterwards must
    # not get a torn image counted as its checkpoint
    state = tmp_path / "state"
    (state / ".dmtcp").mkdir(parents=True)
    image = state / ".dmtcp" / "ckpt_a.dmtcp"
    image.write_bytes(os.urandom(2 << 20))
    store = store_at(tmp_path)
    snapshot = store.snapshot(state, tmp_path / "staging", immutable=IMAGE)
    with open(image, "r+b") as handle:
        handle.seek(1 << 20)
        handle.write(b"torn")
    with pytest.raises(StateChanged, match="changed while it was captured"):
        store.commit(snapshot, "c1", "dmtcp")
    store.release(snapshot)
    assert store_at(tmp_path).checkpoint_ids() == []


def test_a_file_that_grows_while_it_is_captured_fails_the_capture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a process the hold missed appends while the worker copies
    state = tmp_path / "state"
    state.mkdir()
    (state / "log.bin").write_bytes(os.urandom(1 << 20))
    real = {2: os.read, 4: os.sendfile, 5: os.copy_file_range}  # by their number of arguments
    names = {2: "os.read", 4: "os.sendfile", 5: "os.copy_file_range"}

    def growing(*args, **kwargs):  # type: ignore[no-untyped-def]
        with open(state / "log.bin", "ab") as handle:
            handle.write(b"more" * 1000)
        for count, name in names.items():
            monkeypatch.setattr(name, real[count])
        return real[len(args)](*args, **kwargs)

    for name in names.values():
        monkeypatch.setattr(name, growing)
    with pytest.raises(StateChanged, match="log.bin changed while it was captured"):
        store_at(tmp_path).snapshot(state, tmp_path / "staging")


@contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("needs to mount a small tmpfs (root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class Watched(HeldStill):
    """The hold, noted in `seen` when it begins and ends."""

    def __init__(self, state: Path, seen: list[str]) -> None:
        super().__init__(state)
        self.seen = seen

    @asynccontextmanager
    async def quiesced(self, ctx: JobContext, job: object) -> AsyncIterator[None]:
        self.seen.append("held")
        try:
            yield
        finally:
            self.seen.append("released")


def watched_flow(tmp_path: Path) -> tuple[Checkpoints, JobContext, list, list[str]]:  # type: ignore[type-arg]
    checkpoints, ctx, sent = worker_flow(tmp_path, user=None)
    seen: list[str] = []
    checkpoints.checkpointer = Watched(tmp_path / "state", seen)  # type: ignore[assignment]
    blobs = checkpoints.store.blobs
    put = blobs.put_bytes

    def noted(key: str, data: bytes) -> None:
        put(key, data)
        if key.endswith("/manifest.json"):
            seen.append("stored")

    blobs.put_bytes = noted  # type: ignore[method-assign]
    return checkpoints, ctx, sent, seen


def test_a_state_bigger_than_the_free_disk_is_stored_in_place_with_the_job_held(tmp_path: Path) -> None:
    """Tens of gigabytes of state on a disk that cannot hold a second copy: copying it would fail
    every checkpoint with a full disk (and take the job's own room to write). The files that do
    not fit are read where they are, the job held until they are stored; nothing is copied."""
    checkpoints, ctx, sent, seen = watched_flow(tmp_path)
    state = tmp_path / "state"
    (state / "small.bin").write_bytes(os.urandom(512 << 10))
    with small_disk(checkpoints.layout.staging, "80m"):  # 80 MiB, less the job's reserve (64 MiB)
        assert take(checkpoints, ctx)  # fits beside the job: copied, the job let go at once
        assert seen == ["held", "released", "stored"]
        (state / "big.bin").write_bytes(os.urandom(24 << 20))  # more than the disk has room for
        seen.clear()
        assert take(checkpoints, ctx)
        assert seen == ["held", "stored", "released"]  # stored before the job went on
        assert not [p for p in checkpoints.layout.staging.rglob("file-*") if p.stat().st_size > 1 << 20]
    [_, done] = [body for kind, body in sent if kind == MessageType.CHECKPOINT_DONE]
    assert done.pause_seconds >= done.upload_seconds  # the pause is the upload: it says so
    out = tmp_path / "out"
    store_at(tmp_path).restore(done.checkpoint_id, out)
    assert (out / "big.bin").read_bytes() == (state / "big.bin").read_bytes()
    assert (out / "small.bin").read_bytes() == (state / "small.bin").read_bytes()


def test_a_disk_that_fills_up_during_the_capture_is_captured_again_in_place(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The free space looked ample (something else then wrote to the disk): the copy hits a full
    disk, and the capture starts again in place; nothing half-copied stays, the checkpoint counts."""
    from cbas.checkpoint import store

    checkpoints, ctx, sent = worker_flow(tmp_path, user=None)
    state = tmp_path / "state"
    (state / "big.bin").write_bytes(os.urandom(6 << 20))
    monkeypatch.setattr(store, "disk_room", lambda folder: 1 << 40)  # the free space it saw
    with small_disk(checkpoints.layout.staging, "2m"):
        assert take(checkpoints, ctx)
        assert not [p for p in checkpoints.layout.staging.rglob("file-*") if p.stat().st_size]
    [done] = [body for kind, body in sent if kind == MessageType.CHECKPOINT_DONE]
    store_at(tmp_path).restore(done.checkpoint_id, tmp_path / "out")
    assert (tmp_path / "out" / "big.bin").read_bytes() == (state / "big.bin").read_bytes()


def test_a_full_blob_store_fails_the_checkpoint_cleanly_and_the_last_checkpoint_stays(tmp_path: Path) -> None:
    checkpoints, ctx, sent = worker_flow(tmp_path, user=None)
    state = tmp_path / "state"
    (state / "small.bin").write_bytes(os.urandom(512 << 10))
    with small_disk(tmp_path / "blobs", "3m"):  # the local backend's blob store, on a disk of its own
        assert take(checkpoints, ctx)
        (state / "big.bin").write_bytes(os.urandom(6 << 20))  # more than the store has room for
        assert not take(checkpoints, ctx)
        failures = [body for kind, body in sent if kind == MessageType.CHECKPOINT_FAILED]
        assert len(failures) == 1 and "No space left" in failures[0].error, failures
        assert store_at(tmp_path).checkpoint_ids() == ["a0001-n00001"]  # still the newest good one
        store_at(tmp_path).restore("a0001-n00001", tmp_path / "out")
    assert (tmp_path / "out" / "small.bin").read_bytes() == (state / "small.bin").read_bytes()
    assert not [p for p in checkpoints.layout.staging.rglob("*") if "a0001-n00002" in str(p)]  # nothing left


def test_a_file_read_in_place_that_changes_before_it_is_stored_fails_the_checkpoint(tmp_path: Path) -> None:
    """In place, the bytes read are the job's own file's: if it changes before they are stored
    (an image the job writes into, a hold that broke), the checkpoint must not count."""
    state = tmp_path / "state"
    (state / ".dmtcp").mkdir(parents=True)
    (state / ".dmtcp" / "ckpt_a.dmtcp").write_bytes(os.urandom(2 << 20))
    (state / "data.bin").write_bytes(os.urandom(1 << 20))
    for changed in (".dmtcp/ckpt_a.dmtcp", "data.bin"):
        store = store_at(tmp_path)
        snapshot = store._snapshot(state, tmp_path / "staging", frozenset(), IMAGE, None, None, room=0)
        assert len(snapshot.in_place) == 2 and snapshot.held_for_upload and "data.bin" in snapshot.held_for_upload
        with open(state / changed, "r+b") as job_file:
            job_file.seek(1000)
            job_file.write(b"changed after the capture")
        with pytest.raises(StateChanged, match="changed while it was read in place"):
            store.commit(snapshot, "a0001-n00001", "directory")
        store.release(snapshot)
        assert store.checkpoint_ids() == []


def test_reflinks_are_tried_then_left_for_a_plain_copy(tmp_path: Path) -> None:
    source = tmp_path / "a"
    source.write_bytes(os.urandom(100_000))
    fd = os.open(source, os.O_RDONLY)
    try:
        assert capture._clone_or_copy(fd, tmp_path / "b", 100_000, 0) == 100_000
    finally:
        os.close(fd)
    assert (tmp_path / "b").read_bytes() == source.read_bytes()
    assert (tmp_path / "b").stat().st_mode & 0o777 == 0o600


def test_a_snapshot_let_go_while_its_commit_runs_never_reads_another_file(tmp_path: Path) -> None:
    """A checkpoint given up mid-upload (its task cancelled: the job ended, a newer one took its
    place) while its thread goes on: the descriptors it reads in place must stay open until it
    stops, or their numbers, reused by the worker's next open, would put another file's bytes
    (a root-only one) into a checkpoint that counts."""
    import threading

    from cbas.checkpoint.store import CommitCancelled

    state = tmp_path / "state"
    (state / ".dmtcp").mkdir(parents=True)
    (state / ".dmtcp" / "ckpt_a.dmtcp").write_bytes(os.urandom(4 << 20))
    store = store_at(tmp_path)
    snapshot = store._snapshot(state, tmp_path / "staging", frozenset(), IMAGE, None, None, room=0)
    [(fd, _)] = snapshot.in_place.values()
    first_chunk, go_on = threading.Event(), threading.Event()
    put = store.blobs.put_bytes

    def slow(key: str, data: bytes) -> None:
        if "/chunks/" in key and not first_chunk.is_set():
            first_chunk.set()
            assert go_on.wait(10)
        put(key, data)

    store.blobs.put_bytes = slow  # type: ignore[method-assign]
    failed: list[BaseException] = []

    def commit() -> None:
        try:
            store.commit(snapshot, "a0001-n00001", "dmtcp")
        except BaseException as exc:
            failed.append(exc)

    committing = threading.Thread(target=commit)
    committing.start()
    assert first_chunk.wait(10)
    store.release(snapshot)  # the caller gives up; the thread is still in the upload
    other = secret_file(tmp_path)
    opened = os.open(other, os.O_RDONLY)  # the number the in-place descriptor had, if it was closed
    try:
        go_on.set()
        committing.join(10)
        assert isinstance(failed[0], CommitCancelled) and store.checkpoint_ids() == []
        assert SECRET not in everything_stored(tmp_path)
    finally:
        os.close(opened)
    with pytest.raises(OSError):
        os.fstat(fd)  # and once it stopped, the snapshot was let go


def test_a_capture_that_fails_because_the_job_ended_is_not_a_failed_checkpoint(tmp_path: Path) -> None:
    """The interval checkpoint begins as the job exits: DMTCP's coordinator is gone before the
    worker sees the exit (seen under load). That is the job's end, not a checkpoint that failed."""
    from cbas.checkpoint.base import CheckpointFailed

    class Ending:
        class process:  # noqa: N801
            returncode: int | None = None

            @classmethod
            async def wait(cls) -> int:
                await asyncio.sleep(0.1)
                cls.returncode = 0
                return 0

    class GoneWithTheJob(HeldStill):
        @asynccontextmanager
        async def quiesced(self, ctx: JobContext, job: object) -> AsyncIterator[None]:
            raise CheckpointFailed("DMTCP's coordinator (port 1) is gone")
            yield

    checkpoints, ctx, sent = worker_flow(tmp_path, user=None)
    checkpoints.checkpointer = GoneWithTheJob(tmp_path / "state")  # type: ignore[assignment]

    async def go(job: object) -> bool:
        taken = await checkpoints.take(ctx, job, "interval")  # type: ignore[arg-type]
        await checkpoints.reported()
        return taken

    assert not asyncio.run(go(Ending()))
    assert not [kind for kind, _ in sent if kind == MessageType.CHECKPOINT_FAILED]
    assert not asyncio.run(go(Running()))  # the job runs on: that one is a failure, and says so
    [(_, failure)] = [(kind, body) for kind, body in sent if kind == MessageType.CHECKPOINT_FAILED]
    assert "coordinator (port 1) is gone" in failure.error
