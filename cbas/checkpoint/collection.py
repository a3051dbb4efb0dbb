"""Forgetting a job's old checkpoints: garbage collection of manifests and chunks, and the
claim by which an attempt tells an older one's worker (a zombie, cut off from the master) that
it must collect nothing. A part of ChunkStore (cbas.checkpoint.store), whose pins it respects."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import TYPE_CHECKING, Iterable

import structlog

from cbas.backends import BlobStore
from cbas.checkpoint.manifest import CorruptCheckpoint
from cbas.messages import checkpoint_record_key

if TYPE_CHECKING:
    from cbas.checkpoint.manifest import Manifest

log = structlog.get_logger(__name__)
# a chunk no manifest names yet may be another writer's commit under way: it is left this long
GC_GRACE_SECONDS = 3600.0


class Collection:
    """ChunkStore's garbage collection (the store supplies these)."""

    blobs: BlobStore
    job_id: str
    gc_grace_seconds: float
    _lock: threading.Lock
    _pinned: Counter[str]
    _collecting: int
    _unpin_later: list[set[str]]

    def chunk_key(self, chunk_id: str) -> str: ...
    def manifest_key(self, checkpoint_id: str) -> str: ...
    def known_chunks(self) -> set[str]: ...
    def checkpoint_ids(self) -> list[str]: ...
    def manifest(self, checkpoint_id: str) -> Manifest: ...
    def _unpin(self, chunk_ids: set[str]) -> None: ...

    def attempt_key(self, attempt: int) -> str:
        return f"jobs/{self.job_id}/attempts/a{attempt:04d}.json"

    def claim_attempt(self, attempt: int, restored_from: str | None) -> None:
        """Say that `attempt` writes this job's checkpoints now (before its job runs): the worker
        of an older attempt, still running cut off from the master (a zombie), then collects
        nothing, for it would delete chunks the newer attempt reuses from what it restored."""
        self.blobs.put_bytes(self.attempt_key(attempt), json.dumps({"restored_from": restored_from}).encode())

    def newest_attempt(self) -> int:
        names = [key.rsplit("/", 1)[1] for key in self.blobs.list(f"jobs/{self.job_id}/attempts/")]
        return max((int(name[1:5]) for name in names if name[:1] == "a" and name[1:5].isdigit()), default=0)

    def collect_garbage(self, keep: int = 3, protect: Iterable[str] = (), attempt: int | None = None) -> tuple[list[str], int]:
        """Keep the newest `keep` checkpoints (and `protect`ed ones); delete other manifests and
        every chunk no kept manifest uses, no snapshot under way has pinned, and older than the
        grace period (another writer's commit under way has stored it, not yet its manifest).
        With the collector's `attempt`, nothing is collected once a newer attempt has claimed
        the job. Returns the deleted checkpoint ids and chunk count."""
        if attempt is not None and self.newest_attempt() > attempt:
            log.warning("checkpoint.collect_skipped", job_id=self.job_id, attempt=attempt,
                        why="a newer attempt writes this job's checkpoints: this one is not the job's any more")
            return [], 0
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
            self.blobs.delete(checkpoint_record_key(self.job_id, cid))  # its report (the worker's record)
        removed = 0
        young = time.time() - self.gc_grace_seconds
        for key, written in sorted(self.blobs.list_modified(f"jobs/{self.job_id}/chunks/").items()):
            chunk_id = key.rsplit("/", 1)[1]
            if chunk_id in used or written > young:
                continue
            with self._lock:  # a snapshot that finds it known pins it first, or stages a new copy
                if chunk_id in self._pinned:
                    continue
                self.known_chunks().discard(chunk_id)
                self.blobs.delete(key)
            removed += 1
        return dropped, removed
