"""The `volume` strategy on the local backend: a machine's job folder stands for its data disk,
and a snapshot is a copy of it under the home, which the next machine's disk is made from."""

from __future__ import annotations

import secrets
import shutil
from datetime import datetime, timezone
from pathlib import Path

from cbas.backends import Leftover
from cbas.untrusted import copy_tree


def snapshots_root(home: Path) -> Path:
    return home / "snapshots"


class FolderSnapshots:
    def __init__(self, home: Path, volume: Path) -> None:
        self.root = snapshots_root(home)
        self.volume = volume

    def snapshot(self, job_id: str, checkpoint_id: str) -> str:
        snapshot_id = "snap-" + secrets.token_hex(8)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        partial = self.root / f".{snapshot_id}.partial"
        partial.mkdir(mode=0o700)
        copy_tree(self.volume, partial / "volume")  # by descriptors, never following a link
        (partial / "job").write_text(f"{job_id} {checkpoint_id}\n")
        partial.rename(self.root / snapshot_id)  # whole or not at all
        return snapshot_id

    def wait(self, snapshot_id: str) -> None:
        if not (self.root / snapshot_id).is_dir():
            raise FileNotFoundError(f"snapshot {snapshot_id} is missing")


def restore_volume(home: Path, snapshot_id: str, volume: Path) -> None:
    """Make a new machine's disk from a snapshot."""
    source = snapshots_root(home) / snapshot_id / "volume"
    if not source.is_dir():
        raise FileNotFoundError(f"snapshot {snapshot_id} is missing from {snapshots_root(home)}")
    copy_tree(source, volume)  # 0700 until its worker gives the job its folders


def list_snapshots(home: Path) -> list[Leftover]:
    found = []
    for folder in sorted(snapshots_root(home).glob("snap-*")):
        try:
            job_id = (folder / "job").read_text().split()[0]
        except (OSError, IndexError):
            job_id = None
        created = datetime.fromtimestamp(folder.stat().st_mtime, timezone.utc)
        found.append(Leftover(kind="snapshot", id=folder.name, job_id=job_id, created_at=created))
    return found


def delete_snapshot(home: Path, snapshot_id: str) -> None:
    if not snapshot_id.startswith("snap-") or "/" in snapshot_id:
        raise ValueError(f"not a snapshot id: {snapshot_id!r}")
    shutil.rmtree(snapshots_root(home) / snapshot_id, ignore_errors=True)
