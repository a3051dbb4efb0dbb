"""The chunked checkpoint store: content-defined chunks, stored once, verified on restore.

A checkpoint is a directory's files, each cut into content-defined chunks (FastCDC, ~1 MiB on
average). A chunk is stored once per job under its sha256, zstd-compressed unless it does not
compress; a manifest listing files, modes, sizes and chunk lists, written last, makes the
checkpoint exist. A new checkpoint stores only chunks the job does not have yet, so a small change
to a big state costs little. Restore checks every chunk's sha256 and length.

    jobs/<id>/chunks/<sha256[:2]>/<sha256>
    jobs/<id>/ckpt/<checkpoint id>/manifest.json

Taking a checkpoint has two halves: snapshot() reads the state while the job is held (it chunks,
hashes, and copies only new chunks to a staging folder of the checkpoint's own; files that are
never changed in place, DMTCP's images, it only opens), commit() reads those (finish()), uploads
the new chunks and then the manifest, after the job has been let go. Reading files is
cbas.checkpoint.chunking's; the manifest and its seal are cbas.checkpoint.manifest's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pydantic import ValidationError

from cbas.backends import BlobNotFound, BlobStore
from cbas.checkpoint.chunking import UnsupportedFile, decode, encode, excluded, pieces, walk
from cbas.checkpoint.manifest import (
    CorruptCheckpoint, DirEntry, FileEntry, Manifest, inside, list_id, seal, unseal,
)
from cbas.models import utcnow

__all__ = ["ChunkStore", "CommitCancelled", "CorruptCheckpoint", "Manifest", "Snapshot", "UnsupportedFile",
           "seal", "unseal"]

class StateTooLarge(UnsupportedFile):
    pass


class CommitCancelled(RuntimeError):
    """A newer checkpoint (a spot notice's) took this one's place before it was uploaded."""


@dataclass
class Snapshot:
    """A checkpoint taken but not yet committed: its file list and the new chunks, staged."""

    files: list[FileEntry]
    dirs: list[DirEntry]
    chunk_sizes: dict[str, int]
    staging: Path = Path(".")  # this checkpoint's own staging folder
    staged: dict[str, Path] = field(default_factory=dict)  # new chunk id -> staged blob
    # files opened but not read yet (see ChunkStore.finish): index in files, path, stat, descriptor
    deferred: list[tuple[int, str, os.stat_result, int]] = field(default_factory=list)
    pinned: set[str] = field(default_factory=set)  # chunks it uses: garbage collection leaves them

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def _threads() -> int:
    return max(2, os.cpu_count() or 2)


FileStamp = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode


def _stamp(info: os.stat_result) -> FileStamp:
    return (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)


class ChunkStore:
    """One job's checkpoints in a blob store. Transfers run in parallel, bounded by `workers`.

    Like restic or git, a file whose size, times and inode are what they were at the previous
    snapshot (or restore) is not read again: its chunk list is reused. A file changed after that
    snapshot began is always read ("racily clean" files are not trusted).
    """

    def __init__(self, blobs: BlobStore, job_id: str, key: bytes, workers: int = 8) -> None:
        if not key:
            raise ValueError(f"job {job_id}'s checkpoint store needs the job's checkpoint key to seal its manifests")
        self.blobs = blobs
        self.job_id = job_id
        self._key = key  # the job's checkpoint key (cbas.authority): the job itself never has it
        self.workers = workers
        self._known: set[str] | None = None
        self._seen: dict[str, tuple[FileStamp, FileEntry]] = {}  # path -> stamp and entry last time
        self._seen_since_ns = 0  # when the snapshot that filled _seen began
        self._sizes: dict[str, int] = {}  # chunk id -> raw length, for reused entries
        self._lock = threading.Lock()  # snapshots pin what they use; garbage collection respects pins
        self._pinned: Counter[str] = Counter()
        self._collecting = 0  # collections under way: pins are kept until they end
        self._unpin_later: list[set[str]] = []

    # --- keys ---------------------------------------------------------------------------------
    def chunk_key(self, chunk_id: str) -> str:
        return f"jobs/{self.job_id}/chunks/{chunk_id[:2]}/{chunk_id}"

    def manifest_key(self, checkpoint_id: str) -> str:
        return f"jobs/{self.job_id}/ckpt/{checkpoint_id}/manifest.json"

    def known_chunks(self) -> set[str]:
        """Chunks already stored for this job (listed once, then kept up to date)."""
        if self._known is None:
            self._known = {key.rsplit("/", 1)[1] for key in self.blobs.list(f"jobs/{self.job_id}/chunks/")}
        return self._known

    # --- taking a checkpoint ----------------------------------------------------------------------
    def snapshot(self, root: Path, staging: Path, exclude: frozenset[str] = frozenset(),
                 immutable: frozenset[str] = frozenset(), size_limit: int | None = None) -> Snapshot:
        """Read the state while the job is held: chunk and hash every file under root and stage
        its new chunks, except files matching `immutable` (never changed in place once written),
        which are only opened: finish() reads them through that descriptor after the job goes on.
        Files are opened without following links from their folder's descriptor, and read, never
        mapped (a file the job truncates meanwhile is a short read, not a SIGBUS). A state over
        size_limit bytes (by the files' sizes) is refused before anything is read."""
        staging.mkdir(parents=True, exist_ok=True)
        known = self.known_chunks()
        snapshot = Snapshot(files=[], dirs=[], chunk_sizes={}, staging=staging)
        began_ns = time.time_ns()
        seen: dict[str, tuple[FileStamp, FileEntry]] = {}
        try:
            self._snapshot_into(snapshot, root, exclude, immutable, known, seen, size_limit)
        except BaseException:
            self.release(snapshot)
            raise
        self._seen, self._seen_since_ns = seen, began_ns
        self._sizes.update(snapshot.chunk_sizes)
        return snapshot

    def _snapshot_into(self, snapshot: Snapshot, root: Path, exclude: frozenset[str], immutable: frozenset[str],
                       known: set[str], seen: dict[str, tuple[FileStamp, FileEntry]], size_limit: int | None) -> None:
        listed = 0
        with ThreadPoolExecutor(max_workers=_threads()) as pool:
            for relative, info, fd in walk(root, exclude):
                if fd is None:
                    snapshot.dirs.append(DirEntry(path=relative, mode=stat.S_IMODE(info.st_mode)))
                    continue
                listed += info.st_size
                if size_limit is not None and listed > size_limit:
                    os.close(fd)
                    raise StateTooLarge(f"the state holds more than {size_limit} bytes (StateSizeLimit), "
                                        f"{relative} included")
                try:
                    with self._lock:  # its chunks must still be there when the manifest names them
                        entry = self._unchanged(relative, info, known)
                        if entry is not None:
                            self._pin(snapshot, entry.chunks)
                    if entry is not None:
                        snapshot.chunk_sizes.update((c, self._sizes[c]) for c in entry.chunks)
                    elif excluded(relative, immutable):
                        snapshot.deferred.append((len(snapshot.files), relative, info, os.dup(fd)))
                        entry = FileEntry(path=relative, mode=stat.S_IMODE(info.st_mode), size=0, chunks=[], sha256="")
                    else:
                        entry = self._read_file(relative, info, fd, pool, known, snapshot)
                finally:
                    os.close(fd)
                snapshot.files.append(entry)
                seen[relative] = (_stamp(info), entry)

    def finish(self, snapshot: Snapshot) -> None:
        """Read the files snapshot() only opened; the job may run meanwhile. Idempotent."""
        known = self.known_chunks()
        with ThreadPoolExecutor(max_workers=_threads()) as pool:
            while snapshot.deferred:
                index, relative, info, fd = snapshot.deferred.pop(0)
                try:
                    entry = self._read_file(relative, info, fd, pool, known, snapshot)
                finally:
                    os.close(fd)
                snapshot.files[index] = entry
                self._seen[relative] = (_stamp(info), entry)
        self._sizes.update(snapshot.chunk_sizes)

    def _pin(self, snapshot: Snapshot, chunk_ids: Iterable[str]) -> None:
        for chunk_id in chunk_ids:
            if chunk_id not in snapshot.pinned:
                snapshot.pinned.add(chunk_id)
                self._pinned[chunk_id] += 1

    def _unpin(self, chunk_ids: set[str]) -> None:
        for chunk_id in chunk_ids:
            self._pinned[chunk_id] -= 1
            if self._pinned[chunk_id] <= 0:
                del self._pinned[chunk_id]

    def release(self, snapshot: Snapshot) -> None:
        """A snapshot committed or given up: its chunks may be collected, its staging goes."""
        for _, _, _, fd in snapshot.deferred:
            os.close(fd)
        snapshot.deferred = []
        with self._lock:
            if self._collecting:  # a collection under way listed the manifests before this one's
                self._unpin_later.append(snapshot.pinned)
            else:
                self._unpin(snapshot.pinned)
            snapshot.pinned = set()
        shutil.rmtree(snapshot.staging, ignore_errors=True)

    def _unchanged(self, relative: str, info: os.stat_result, known: set[str]) -> FileEntry | None:
        previous = self._seen.get(relative)
        if previous is None or previous[0] != _stamp(info) or info.st_mtime_ns >= self._seen_since_ns:
            return None
        entry = previous[1]
        if entry.mode != stat.S_IMODE(info.st_mode) or not entry.sha256 \
                or not all(c in known and c in self._sizes for c in entry.chunks):
            return None
        return entry

    def remember(self, root: Path, manifest: "Manifest") -> None:
        """After a restore: the files just written are known, so the next snapshot skips them."""
        self._sizes.update(manifest.chunk_sizes)
        self.known_chunks().update(manifest.chunk_sizes)
        began = time.time_ns()
        self._seen = {}
        for entry in manifest.files:
            self._seen[entry.path] = (_stamp((root / entry.path).lstat()), entry)
        self._seen_since_ns = began

    def _read_file(self, relative: str, info: os.stat_result, fd: int, pool: ThreadPoolExecutor, known: set[str],
                   snapshot: Snapshot) -> FileEntry:
        """Cut a file into chunks as it is read, block by block; each chunk is hashed, and staged if
        new, in the pool, from the one copy that was read (what is stored is what was hashed)."""

        def take(piece: memoryview) -> tuple[str, int]:
            chunk_id = hashlib.sha256(piece).hexdigest()
            with self._lock:  # against collect_garbage: a chunk found known stays until committed
                new = chunk_id not in known and chunk_id not in snapshot.staged
                if new:
                    snapshot.staged[chunk_id] = snapshot.staging / chunk_id
                self._pin(snapshot, (chunk_id,))
            if new:
                (snapshot.staging / chunk_id).write_bytes(encode(piece))
            return chunk_id, len(piece)

        results: list[Future[tuple[str, int]]] = []
        in_flight: list[list[Future[tuple[str, int]]]] = []
        for block in pieces(fd, info.st_size):
            futures = [pool.submit(take, piece) for piece in block]
            results += futures
            in_flight.append(futures)
            if len(in_flight) > 2:  # at most a few blocks in memory
                for future in in_flight.pop(0):
                    future.result()
        ids, size = [], 0
        for future in results:
            chunk_id, length = future.result()
            snapshot.chunk_sizes[chunk_id] = length
            ids.append(chunk_id)
            size += length
        return FileEntry(path=relative, mode=stat.S_IMODE(info.st_mode), size=size, chunks=ids, sha256=list_id(ids))

    def commit(self, snapshot: Snapshot, checkpoint_id: str, strategy: str, stdout_bytes: int = 0,
               stderr_bytes: int = 0, cancelled: threading.Event | None = None) -> Manifest:
        """Upload the new chunks, then the manifest: only then does the checkpoint exist. Setting
        `cancelled` stops it between chunks (CommitCancelled); the caller releases the snapshot."""
        self.finish(snapshot)
        staged = list(snapshot.staged.items())

        def upload(item: tuple[str, Path]) -> int:
            if cancelled is not None and cancelled.is_set():
                raise CommitCancelled(f"checkpoint {checkpoint_id} was superseded before it was uploaded")
            chunk_id, path = item
            size = path.stat().st_size
            self.blobs.put_file(self.chunk_key(chunk_id), path)
            return size

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            new_bytes = sum(pool.map(upload, staged))
        manifest = Manifest(
            job_id=self.job_id, checkpoint_id=checkpoint_id, strategy=strategy, created_at=utcnow().isoformat(),
            files=snapshot.files, dirs=snapshot.dirs, chunk_sizes=snapshot.chunk_sizes,
            total_bytes=snapshot.total_bytes, new_bytes=new_bytes, stdout_bytes=stdout_bytes, stderr_bytes=stderr_bytes,
        )
        self.blobs.put_bytes(self.manifest_key(checkpoint_id), seal(manifest.model_dump_json().encode(), self._key))
        self.known_chunks().update(snapshot.staged)
        return manifest

    def save(self, root: Path, checkpoint_id: str, strategy: str, staging: Path) -> Manifest:
        """snapshot() and commit() in one call, for callers that need no pause in between."""
        snapshot = self.snapshot(root, staging)
        try:
            return self.commit(snapshot, checkpoint_id, strategy)
        finally:
            self.release(snapshot)

    # --- restoring ----------------------------------------------------------------------------------
    def manifest(self, checkpoint_id: str) -> Manifest:
        try:
            sealed = self.blobs.get_bytes(self.manifest_key(checkpoint_id))
            manifest = Manifest.model_validate(json.loads(unseal(sealed, self._key)))
        except BlobNotFound:
            raise CorruptCheckpoint(f"checkpoint {checkpoint_id} has no manifest") from None
        except (ValueError, ValidationError) as exc:
            raise CorruptCheckpoint(f"checkpoint {checkpoint_id} has an unreadable manifest: {str(exc)[:200]}") from None
        if manifest.job_id != self.job_id or manifest.checkpoint_id != checkpoint_id:
            raise CorruptCheckpoint(f"checkpoint {checkpoint_id}'s manifest names another checkpoint")
        for entry in manifest.files:
            if list_id(entry.chunks) != entry.sha256:
                raise CorruptCheckpoint(f"checkpoint {checkpoint_id}: {entry.path}'s chunk list does not match its sha256")
            if sum(manifest.chunk_sizes.get(c, -1) for c in entry.chunks) != entry.size:
                raise CorruptCheckpoint(f"checkpoint {checkpoint_id}: {entry.path}'s chunks do not add up to its size")
        return manifest

    def restore(self, checkpoint_id: str, target: Path) -> Manifest:
        """Write the checkpoint's files into target, verifying every chunk on the way."""
        manifest = self.manifest(checkpoint_id)
        target.mkdir(parents=True, exist_ok=True)
        for entry in manifest.dirs:
            directory = inside(target, entry.path)
            directory.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for entry in manifest.files:
                self._restore_file(entry, manifest, inside(target, entry.path), pool)
        for entry in manifest.dirs:
            inside(target, entry.path).chmod((entry.mode | 0o700) & 0o777)
        self.remember(target, manifest)
        return manifest

    def _fetch_chunk(self, chunk_id: str, expected: int) -> bytes:
        try:
            data = decode(self.blobs.get_bytes(self.chunk_key(chunk_id)), chunk_id)
        except BlobNotFound:
            raise CorruptCheckpoint(f"chunk {chunk_id[:12]} is missing") from None
        if len(data) != expected or hashlib.sha256(data).hexdigest() != chunk_id:
            raise CorruptCheckpoint(f"chunk {chunk_id[:12]} does not match its sha256")
        return data

    def _restore_file(self, entry: FileEntry, manifest: Manifest, path: Path, pool: ThreadPoolExecutor) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        sizes = manifest.chunk_sizes
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as out:
            for data in pool.map(lambda c: self._fetch_chunk(c, sizes[c]), entry.chunks):
                out.write(data)
            os.fchmod(out.fileno(), entry.mode & 0o777)  # never setuid, setgid or sticky

    def forget(self, checkpoint_id: str) -> None:
        """A checkpoint that must never be restored (it failed validation): its manifest goes."""
        self.blobs.delete(self.manifest_key(checkpoint_id))

    # --- forgetting -----------------------------------------------------------------------------------
    def checkpoint_ids(self) -> list[str]:
        keys = self.blobs.list(f"jobs/{self.job_id}/ckpt/")
        return sorted({key.split("/")[3] for key in keys if key.endswith("/manifest.json")})

    def collect_garbage(self, keep: int = 3, protect: Iterable[str] = ()) -> tuple[list[str], int]:
        """Keep the newest `keep` checkpoints (and `protect`ed ones); delete other manifests and
        every chunk no kept manifest uses and no snapshot under way has pinned. Returns the
        deleted checkpoint ids and chunk count."""
        with self._lock:
            self._collecting += 1
        try:
            return self._collect(keep, protect)
        finally:
            with self._lock:
                self._collecting -= 1
                if not self._collecting:
                    for chunk_ids in self._unpin_later:
                        self._unpin(chunk_ids)
                    self._unpin_later = []

    def _collect(self, keep: int, protect: Iterable[str]) -> tuple[list[str], int]:
        ids = self.checkpoint_ids()
        kept = set(ids[-keep:]) | (set(protect) & set(ids))
        dropped = [cid for cid in ids if cid not in kept]
        used: set[str] = set()
        for cid in kept:
            try:
                used.update(self.manifest(cid).chunk_sizes)
            except CorruptCheckpoint:
                continue
        for cid in dropped:
            self.blobs.delete(self.manifest_key(cid))
        removed = 0
        for key in self.blobs.list(f"jobs/{self.job_id}/chunks/"):
            chunk_id = key.rsplit("/", 1)[1]
            if chunk_id in used:
                continue
            with self._lock:  # a snapshot that finds it known pins it first, or stages a new copy
                if chunk_id in self._pinned:
                    continue
                self.known_chunks().discard(chunk_id)
                self.blobs.delete(key)
            removed += 1
        return dropped, removed
