"""Checkpoints in the blob store: a state archive plus a manifest written last.

    jobs/<id>/ckpt/<checkpoint id>/state.tar.zst
    jobs/<id>/ckpt/<checkpoint id>/manifest.json   (size and sha256 of the archive, log offsets)
A checkpoint exists only once its manifest is stored; restore verifies size and hash first.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ValidationError

from cbas.archive import sha256_file
from cbas.backends import BlobNotFound, BlobStore
from cbas.models import utcnow


class CorruptCheckpoint(RuntimeError):
    pass


class Manifest(BaseModel):
    job_id: str
    checkpoint_id: str
    strategy: str
    archive_key: str
    size_bytes: int
    sha256: str
    stdout_bytes: int = 0  # log lengths at the checkpoint: a restore truncates the logs to them
    stderr_bytes: int = 0
    created_at: str = ""


def checkpoint_prefix(job_id: str, checkpoint_id: str) -> str:
    return f"jobs/{job_id}/ckpt/{checkpoint_id}"


def save(blobs: BlobStore, manifest: Manifest, archive: Path) -> str:
    """Upload the archive, then the manifest; returns the manifest key."""
    blobs.put_file(manifest.archive_key, archive)
    key = f"{checkpoint_prefix(manifest.job_id, manifest.checkpoint_id)}/manifest.json"
    blobs.put_bytes(key, manifest.model_copy(update={"created_at": utcnow().isoformat()}).model_dump_json().encode())
    return key


def new_manifest(job_id: str, checkpoint_id: str, strategy: str, archive: Path, stdout: int, stderr: int) -> Manifest:
    return Manifest(
        job_id=job_id, checkpoint_id=checkpoint_id, strategy=strategy,
        archive_key=f"{checkpoint_prefix(job_id, checkpoint_id)}/state.tar.zst",
        size_bytes=archive.stat().st_size, sha256=sha256_file(archive), stdout_bytes=stdout, stderr_bytes=stderr,
    )


def fetch(blobs: BlobStore, job_id: str, checkpoint_id: str, scratch: Path) -> tuple[Manifest, Path]:
    """Download and verify a checkpoint; raise CorruptCheckpoint if anything does not match."""
    key = f"{checkpoint_prefix(job_id, checkpoint_id)}/manifest.json"
    try:
        manifest = Manifest.model_validate(json.loads(blobs.get_bytes(key)))
    except BlobNotFound:
        raise CorruptCheckpoint(f"checkpoint {checkpoint_id} has no manifest") from None
    except (ValueError, ValidationError) as exc:
        raise CorruptCheckpoint(f"checkpoint {checkpoint_id} has an unreadable manifest: {exc}") from None
    if manifest.job_id != job_id or manifest.checkpoint_id != checkpoint_id:
        raise CorruptCheckpoint(f"checkpoint {checkpoint_id}'s manifest names another checkpoint")
    archive = scratch / f"{checkpoint_id}.tar.zst"
    try:
        blobs.get_file(manifest.archive_key, archive)
    except BlobNotFound:
        raise CorruptCheckpoint(f"checkpoint {checkpoint_id} has no state archive") from None
    size = archive.stat().st_size
    if size != manifest.size_bytes:
        raise CorruptCheckpoint(f"checkpoint {checkpoint_id}: archive is {size} bytes, manifest says {manifest.size_bytes}")
    if sha256_file(archive) != manifest.sha256:
        raise CorruptCheckpoint(f"checkpoint {checkpoint_id}: archive sha256 does not match its manifest")
    return manifest, archive
