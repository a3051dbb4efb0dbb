"""The chunked checkpoint store: content-defined chunks, stored once, verified on restore.

A checkpoint is a directory's files, each cut into content-defined chunks (FastCDC, ~1 MiB on
average). A chunk is stored once per job under its sha256, zstd-compressed unless it does not
compress; a manifest listing files, modes, sizes and chunk lists, written last, makes the
checkpoint exist. A new checkpoint stores only chunks the job does not have yet, so a small change
to a big state costs little. Restore checks every chunk's sha256 and length.

    jobs/<id>/chunks/<sha256[:2]>/<sha256>
    jobs/<id>/ckpt/<checkpoint id>/manifest.json

Taking a checkpoint has two halves. snapshot() runs while the job is held and only captures its
state locally, in copies the job cannot change (cbas.checkpoint.capture); commit() runs after the
job goes on: it cuts, hashes, compresses and stores the chunks in parallel
(cbas.checkpoint.pipeline), then writes the manifest. The captured bytes are kept after a commit:
the next capture compares a changed file with them instead of copying and hashing all of it.
Restoring is cbas.checkpoint.restore's; the manifest and its seal, cbas.checkpoint.manifest's.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterable

import structlog
from pydantic import ValidationError

from cbas.backends import BlobNotFound, BlobStore
from cbas.checkpoint.capture import (
    FileStamp, Pack, Piece, Snapshot, capture_file, check_in_place, check_owner, disk_room, stamp,
)
from cbas.checkpoint.chunking import StateChanged, UnsupportedFile, excluded, walk
from cbas.checkpoint.collection import GC_GRACE_SECONDS, Collection
from cbas.checkpoint.manifest import (
    CorruptCheckpoint, DirEntry, FileEntry, Manifest, list_id, seal, unseal,
)
from cbas.checkpoint.pipeline import CommitCancelled, capture_deferred, cut_and_store
from cbas.checkpoint.restore import fetch_chunk, restore_files
from cbas.models import utcnow

log = structlog.get_logger(__name__)

__all__ = ["ChunkStore", "CommitCancelled", "CorruptCheckpoint", "Manifest", "Snapshot", "StateChanged",
           "UnsupportedFile", "seal", "unseal"]


class StateTooLarge(UnsupportedFile):
    pass


class DiskFull(UnsupportedFile):
    """The worker's disk filled up while the state was captured."""


def _threads() -> int:
    return max(2, os.cpu_count() or 2)


Seen = tuple[FileStamp, FileEntry, list[Piece] | None]  # a file last time: stamp, entry, bytes kept


class ChunkStore(Collection):
    """One job's checkpoints in a blob store. Transfers run in parallel, bounded by `workers`.

    Like restic or git, a file whose size, times and inode are what they were at the previous
    committed capture (or restore) is not read again: its chunk list is reused. A file changed
    after that capture began is always read ("racily clean" files are not trusted).
    """

    def __init__(self, blobs: BlobStore, job_id: str, key: bytes, workers: int = 8) -> None:
        if not key:
            raise ValueError(f"job {job_id}'s checkpoint store needs the job's checkpoint key to seal its manifests")
        self.blobs = blobs
        self.job_id = job_id
        self._key = key  # the job's checkpoint key (cbas.authority): the job itself never has it
        self.workers = workers
        self._known: set[str] | None = None
        self._seen: dict[str, Seen] = {}  # path -> the newest committed capture's (or a restore's)
        self._seen_since_ns = 0  # when the capture that filled _seen began
        self._sizes: dict[str, int] = {}  # chunk id -> raw length, for reused entries
        self._lock = threading.Lock()  # snapshots pin what they use; garbage collection respects pins
        self._pinned: Counter[str] = Counter()
        self._collecting = 0  # collections under way: pins are kept until they end
        self._unpin_later: list[set[str]] = []
        self._captures = 0
        self._kept: set[Path] = set()  # capture folders whose bytes _seen uses
        self.gc_grace_seconds = GC_GRACE_SECONDS

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
                 immutable: frozenset[str] = frozenset(), size_limit: int | None = None,
                 owner: int | None = None) -> Snapshot:
        """Capture the state while the job is held (cbas.checkpoint.capture): files are opened
        without following links from their folder's descriptor, read or copied, never mapped.
        A state over size_limit bytes (by the files' sizes) is refused before anything is read;
        with `owner`, a file that is not that uid's is refused."""
        try:
            return self._snapshot(root, staging, exclude, immutable, size_limit, owner, room=None)
        except DiskFull as full:  # something else filled the disk: all of it in place, nothing copied
            log.warning("checkpoint.disk_full_capturing_in_place", job_id=self.job_id, error=str(full))
            return self._snapshot(root, staging, exclude, immutable, size_limit, owner, room=0)

    def _snapshot(self, root: Path, staging: Path, exclude: frozenset[str], immutable: frozenset[str],
                  size_limit: int | None, owner: int | None, room: int | None) -> Snapshot:
        with self._lock:
            self._captures += 1
            folder = staging / f"capture-{self._captures:05d}"
        folder.mkdir(parents=True, mode=0o700)
        snapshot = Snapshot(files=[], dirs=[], chunk_sizes={}, staging=folder, began_ns=time.time_ns(),
                            room=disk_room(folder) if room is None else room)
        pack = Pack(folder / "pack")
        try:
            self._capture_into(snapshot, pack, root, exclude, immutable, size_limit, owner)
        except OSError as exc:
            self.release(snapshot)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"the worker's disk is full: the state could not be captured ({exc.strerror})") from None
            raise
        except BaseException:
            self.release(snapshot)
            raise
        finally:
            pack.close()
        return snapshot

    def _capture_into(self, snapshot: Snapshot, pack: Pack, root: Path, exclude: frozenset[str],
                      immutable: frozenset[str], size_limit: int | None, owner: int | None) -> None:
        listed = 0
        known = self.known_chunks()
        for relative, info, fd in walk(root, exclude):
            if fd is None:
                snapshot.dirs.append(DirEntry(path=relative, mode=stat.S_IMODE(info.st_mode)))
                continue
            try:
                check_owner(relative, info, owner)
                listed += info.st_size
                if size_limit is not None and listed > size_limit:
                    raise StateTooLarge(f"the state holds more than {size_limit} bytes (StateSizeLimit), "
                                        f"{relative} included")
                index = len(snapshot.files)
                with self._lock:  # its chunks must still be there when the manifest names them
                    entry = self._unchanged(relative, info, known)
                    if entry is not None:
                        self._pin(snapshot, entry.chunks)
                mode = stat.S_IMODE(info.st_mode)
                if entry is not None:
                    snapshot.chunk_sizes.update((c, self._sizes[c]) for c in entry.chunks)
                    kept = self._seen[relative][2]
                    if kept is not None:
                        snapshot.pieces_kept[index] = kept
                elif excluded(relative, immutable):
                    if snapshot.fits(info.st_size):  # copied once the job runs again
                        snapshot.deferred.append((index, relative, info, os.dup(fd)))
                    else:  # never changed in place: read where it is, the job running on
                        snapshot.pieces[index] = snapshot.read_in_place(index, relative, fd, info.st_size, held=False)
                elif not snapshot.fits(info.st_size):
                    snapshot.pieces[index] = snapshot.read_in_place(index, relative, fd, info.st_size, held=True)
                else:
                    previous = self._seen.get(relative)
                    snapshot.pieces[index] = capture_file(relative, info, fd, snapshot.staging / f"file-{index:06d}",
                                                          pack, previous[2] if previous else None)
                    for piece in snapshot.pieces[index]:
                        if piece.chunk_id is not None and piece.source == pack.path:
                            snapshot.staged[piece.chunk_id] = pack.path
                if entry is None:  # its chunks are known once it is cut
                    entry = FileEntry(path=relative, mode=mode, size=0, chunks=[], sha256="")
            finally:
                os.close(fd)
            snapshot.files.append(entry)
            snapshot.stamps[index] = stamp(info)

    def finish(self, snapshot: Snapshot) -> None:
        """Capture the files snapshot() only opened; the job may run meanwhile. Idempotent."""
        capture_deferred(snapshot, {path: seen[2] for path, seen in self._seen.items() if seen[2]})

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
        """A snapshot committed or given up: its chunks may be collected; its captured bytes go,
        unless they are what the next capture compares with. Given up while a commit still runs
        (its caller was cancelled; the thread goes on): the commit stops and lets it go itself."""
        if not snapshot.committing.acquire(blocking=False):
            snapshot.abandoned.set()
            return
        try:
            self._release(snapshot)
        finally:
            snapshot.committing.release()

    def _release(self, snapshot: Snapshot) -> None:
        for _, _, _, fd in snapshot.deferred:
            os.close(fd)
        snapshot.deferred = []
        for fd, _ in snapshot.in_place.values():
            os.close(fd)
        snapshot.in_place = {}
        with self._lock:
            if self._collecting:  # a collection under way listed the manifests before this one's
                self._unpin_later.append(snapshot.pinned)
            else:
                self._unpin(snapshot.pinned)
            snapshot.pinned = set()
            keep = snapshot.staging in self._kept
        if not keep:
            _remove(snapshot.staging)

    def _unchanged(self, relative: str, info: os.stat_result, known: set[str]) -> FileEntry | None:
        previous = self._seen.get(relative)
        if previous is None or previous[0] != stamp(info) or info.st_mtime_ns >= self._seen_since_ns:
            return None
        entry = previous[1]
        if entry.mode != stat.S_IMODE(info.st_mode) or not entry.sha256 \
                or not all(c in known and c in self._sizes for c in entry.chunks):
            return None
        return entry

    def _keep(self, snapshot: Snapshot) -> None:
        """A committed snapshot's files and bytes are what the next capture starts from."""
        seen: dict[str, Seen] = {}
        for index, entry in enumerate(snapshot.files):
            # read in place: no bytes of the worker's own to compare the next capture with
            kept = None if index in snapshot.in_place else snapshot.pieces.get(index, snapshot.pieces_kept.get(index))
            seen[entry.path] = (snapshot.stamps[index], entry, kept)
        folders = {p.source.parent for _, _, kept in seen.values() for p in kept or ()}
        with self._lock:
            if snapshot.began_ns < self._seen_since_ns:
                return  # a newer capture was committed first
            self._seen, self._seen_since_ns = seen, snapshot.began_ns
            dropped, self._kept = self._kept - folders, folders
        for folder in dropped:
            _remove(folder)

    def remember(self, root: Path, manifest: "Manifest") -> None:
        """After a restore: the files just written are known, so the next snapshot skips them."""
        self._sizes.update(manifest.chunk_sizes)
        self.known_chunks().update(manifest.chunk_sizes)
        began = time.time_ns()
        self._seen = {entry.path: (stamp((root / entry.path).lstat()), entry, None) for entry in manifest.files}
        self._seen_since_ns = began

    def commit(self, snapshot: Snapshot, checkpoint_id: str, strategy: str, stdout_bytes: int = 0,
               stderr_bytes: int = 0, cancelled: threading.Event | None = None) -> Manifest:
        """Cut and store the captured files' new chunks, then the manifest: only then does the
        checkpoint exist. Setting `cancelled` stops it between chunks (CommitCancelled); the
        caller releases the snapshot."""
        with snapshot.committing:
            try:
                return self._commit(snapshot, checkpoint_id, strategy, stdout_bytes, stderr_bytes, cancelled)
            finally:
                if snapshot.abandoned.is_set():  # released meanwhile: now it goes
                    self._release(snapshot)

    def _commit(self, snapshot: Snapshot, checkpoint_id: str, strategy: str, stdout_bytes: int, stderr_bytes: int,
                cancelled: threading.Event | None) -> Manifest:
        try:
            self.finish(snapshot)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFull(f"the worker's disk is full: the state could not be captured ({exc.strerror})") from None
            raise
        stored = cut_and_store(self, snapshot, cancelled, cutters=_threads(), workers=self.workers)
        check_in_place(snapshot)
        manifest = Manifest(
            job_id=self.job_id, checkpoint_id=checkpoint_id, strategy=strategy, created_at=utcnow().isoformat(),
            files=snapshot.files, dirs=snapshot.dirs, chunk_sizes=snapshot.chunk_sizes,
            total_bytes=snapshot.total_bytes, new_bytes=stored.new_bytes, stdout_bytes=stdout_bytes,
            stderr_bytes=stderr_bytes,
        )
        if snapshot.given_up(cancelled):
            raise CommitCancelled(f"checkpoint {checkpoint_id} was superseded before it was uploaded")
        self.blobs.put_bytes(self.manifest_key(checkpoint_id), seal(manifest.model_dump_json().encode(), self._key))
        with self._lock:
            self.known_chunks().update(stored.chunk_ids)
            self._sizes.update(snapshot.chunk_sizes)
        self._keep(snapshot)
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
        restore_files(self.blobs, self.chunk_key, manifest, target, self.workers)
        self.remember(target, manifest)
        return manifest

    def _fetch_chunk(self, chunk_id: str, expected: int) -> bytes | memoryview:
        return fetch_chunk(self.blobs, self.chunk_key(chunk_id), chunk_id, expected)

    def forget(self, checkpoint_id: str) -> None:
        """A checkpoint that must never be restored (it failed validation): its manifest goes."""
        self.blobs.delete(self.manifest_key(checkpoint_id))

    def checkpoint_ids(self) -> list[str]:
        keys = self.blobs.list(f"jobs/{self.job_id}/ckpt/")
        return sorted({key.split("/")[3] for key in keys if key.endswith("/manifest.json")})

def _remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    try:
        folder.parent.rmdir()  # the checkpoint's staging folder, once its last capture is gone
    except OSError:
        pass
