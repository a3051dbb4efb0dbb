"""Captures on a file system that clones (XFS with reflink, Amazon Linux's default): the job's files
are cloned, not copied, and the clone is a snapshot the job's later writes do not reach.

Observed on XFS (kernel 6.18): FICLONE of a whole file takes no blocks (its extents are "shared");
copy_file_range of a range whose source offset is block-aligned is a clone too, and of an
unaligned one an ordinary copy of exactly those bytes. These tests need root, mkfs.xfs and a loop
device; without them they skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from cbas.checkpoint import capture
from tests.checkpoint.test_store import store_at

MIB = 1 << 20


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A 512 MiB XFS file system with reflink, mounted from a sparse image in tmp_path."""
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        pytest.skip("needs root and mkfs.xfs (Debian's xfsprogs)")
    image, mount = tmp_path / "xfs.img", tmp_path / "xfs"
    with open(image, "wb") as out:
        out.truncate(512 * MIB)
    mount.mkdir()
    made = subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], capture_output=True)
    if made.returncode or subprocess.run(["mount", "-o", "loop", str(image), str(mount)],
                                         capture_output=True).returncode:
        pytest.skip(f"could not make and mount an XFS file system: {made.stderr.decode()[-200:]}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def used(folder: Path) -> int:
    os.sync()
    disk = os.statvfs(folder)
    return (disk.f_blocks - disk.f_bfree) * disk.f_frsize


def test_a_capture_on_xfs_clones_the_files_and_the_jobs_later_writes_do_not_reach_the_checkpoint(
        xfs: Path, tmp_path: Path) -> None:
    # another file system said first that it cannot clone: that must not stop clones on this one
    plain = tmp_path / "plain"
    plain.write_bytes(os.urandom(4096))
    fd = os.open(plain, os.O_RDONLY)
    try:
        capture._clone_or_copy(fd, tmp_path / "plain-copy", 4096, 0)
    finally:
        os.close(fd)

    state = xfs / "state"
    state.mkdir()
    before = os.urandom(64 * MIB)
    (state / "big.bin").write_bytes(before)
    store = store_at(xfs)
    taken = used(xfs)
    snapshot = store.snapshot(state, xfs / "staging")
    try:
        assert used(xfs) - taken < 2 * MIB  # 64 MiB captured, no 64 MiB written
        with open(state / "big.bin", "r+b") as job_file:  # the job goes on and rewrites its file
            job_file.write(os.urandom(64 * MIB))
        store.commit(snapshot, "a0001-n00001", "directory")
    finally:
        store.release(snapshot)
    store.restore("a0001-n00001", tmp_path / "out")
    assert (tmp_path / "out" / "big.bin").read_bytes() == before


@pytest.mark.parametrize("offset", [16 * 4096, 12345])
def test_part_of_a_file_is_cloned_where_aligned_and_copied_exactly_where_not(xfs: Path, offset: int) -> None:
    source = xfs / "source"
    data = os.urandom(32 * MIB)
    source.write_bytes(data)
    taken = used(xfs)
    fd = os.open(source, os.O_RDONLY)
    try:
        assert capture._clone_or_copy(fd, xfs / "part", len(data) - offset, offset) == len(data) - offset
    finally:
        os.close(fd)
    assert (xfs / "part").read_bytes() == data[offset:]
    grew = used(xfs) - taken
    assert grew < MIB if offset % 4096 == 0 else grew >= 31 * MIB
