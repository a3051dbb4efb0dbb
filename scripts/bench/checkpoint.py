#!/usr/bin/env python3
"""Checkpoint benchmark: the chunked store against a plain tar+zstd archive of the state.

A state of --size-mib MiB of random (incompressible) data is checkpointed, 1% of it is changed
(--regions contiguous regions at random places, one of them an insertion that shifts everything
after it), and it is checkpointed again; then the second checkpoint is restored into an empty
folder. The same two states are archived with tar+zstd for comparison. Runs on the local
backend's folder blob store. Prints a table and writes JSON.

    scripts/bench/checkpoint.py [--size-mib 1024] [--files 64,1] [--json bench-results/checkpoint.json]
    scripts/bench/checkpoint.py --dmtcp [--memory-mib 1024] [--json bench-results/checkpoint-dmtcp.json]

Each --files layout is measured in turn; the JSON's top-level figures are the first layout's
(64 files by default: a job's working directory), and "layouts" holds every one, each with the
figures of issue 13: "files", "pause_s" (the longest the job was held: the local capture),
"first_durable_s" and "second_durable_s" (from the capture's start until the manifest is
written), "tar_zstd_s" (the second state archived; "tar_zstd_durable_s" with its fsync, as the
store's blobs have), "second_bytes_ratio" and "restore_mib_per_s". A checkpoint is taken as the
worker takes it: snapshot() (the pause), then commit() after the job would go on. The changed
file of a second checkpoint is compared with the bytes captured the first time, not hashed
again. Run it two or three times: the figures are noisy while other work runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cbas.archive import pack_directory  # noqa: E402
from cbas.checkpoint.store import ChunkStore  # noqa: E402
from cbas.local.blobs import FolderBlobStore  # noqa: E402

MIB = 1 << 20


def make_state(folder: Path, size_mib: int, files: int, rng: random.Random) -> None:
    folder.mkdir(parents=True)
    per_file = size_mib // files
    for index in range(files):
        with open(folder / f"state-{index:03d}.bin", "wb") as out:
            for _ in range(per_file):
                out.write(rng.randbytes(MIB))


def change_state(folder: Path, fraction: float, regions: int, rng: random.Random) -> int:
    """Overwrite `fraction` of the bytes in `regions` runs; the first run is an insertion."""
    paths = sorted(folder.iterdir())
    total = sum(p.stat().st_size for p in paths)
    region = max(1, int(total * fraction / regions))
    changed = 0
    for number in range(regions):
        path = rng.choice(paths)
        data = bytearray(path.read_bytes()) if number == 0 else None
        offset = rng.randrange(0, max(1, path.stat().st_size - region))
        if data is not None:  # an insertion: everything after it moves
            data[offset:offset] = rng.randbytes(region)
            path.write_bytes(data)
        else:
            with open(path, "r+b") as handle:
                handle.seek(offset)
                handle.write(rng.randbytes(region))
        changed += region
    return changed


def timed(func, *args):  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    result = func(*args)
    return result, time.perf_counter() - started


def drop(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", default="64,1", help="layouts to measure: the state split over N files, comma-separated")
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("bench-results/checkpoint.json"))
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--dmtcp", action="store_true",
                        help="a process holding --memory-mib MiB under the real DMTCP (see checkpoint_dmtcp.py)")
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--small-mib", type=int, default=256, help="--dmtcp: the smaller notice checkpoint")
    args = parser.parse_args()
    if args.dmtcp:
        from checkpoint_dmtcp import run_benchmark  # noqa: E402  (beside this script)

        result = run_benchmark(args.memory_mib, args.small_mib, args.workdir)
        target = args.json if args.json != Path("bench-results/checkpoint.json") else Path("bench-results/checkpoint-dmtcp.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2))
        print(f"wrote {target}")
        return
    layouts = [measure(args.size_mib, int(files), args.regions, args.seed, args.workdir) for files in args.files.split(",")]
    result = {**layouts[0], "layouts": layouts, "cpus": os.cpu_count()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


def checkpoint(store: ChunkStore, state: Path, checkpoint_id: str, staging: Path) -> tuple[object, float, float]:
    """As the worker takes one: the capture (the job held), then the commit. Returns the manifest,
    the pause and the time until the checkpoint is durable (from the capture's start)."""
    started = time.perf_counter()
    snapshot = store.snapshot(state, staging)
    pause = time.perf_counter() - started
    try:
        manifest = store.commit(snapshot, checkpoint_id, "directory")
    finally:
        store.release(snapshot)
    return manifest, pause, time.perf_counter() - started


def archive(state: Path, target: Path) -> tuple[int, float, float]:
    """tar+zstd of the state: its bytes, its seconds, and its seconds until it is on the disk (fsync,
    as the chunked store's blobs are)."""
    started = time.perf_counter()
    pack_directory(state, target)
    packed = time.perf_counter() - started
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    durable = time.perf_counter() - started
    size = target.stat().st_size
    target.unlink()
    return size, packed, durable


def measure(size_mib: int, files: int, regions: int, seed: int, workdir: Path | None) -> dict[str, float]:
    rng = random.Random(seed)
    scratch = Path(tempfile.mkdtemp(prefix="cbas-bench-", dir=workdir))
    try:
        state = scratch / "state"
        make_state(state, size_mib, files, rng)
        os.sync()  # the state on the disk, as a job's would be: no writeback in the figures
        store = ChunkStore(FolderBlobStore(scratch / "blobs"), "bench", b"bench checkpoint key")
        staging = scratch / "staging"

        first, first_pause, first_s = checkpoint(store, state, "c1", staging)
        first_archive_bytes, first_archive_s, first_archive_durable = archive(state, scratch / "full1.tar.zst")

        changed = change_state(state, 0.01, regions, rng)
        os.sync()
        second, second_pause, second_s = checkpoint(store, state, "c2", staging)
        archive_bytes, archive_s, archive_durable = archive(state, scratch / "full2.tar.zst")

        restored = scratch / "restored"
        _, restore_s = timed(store.restore, "c2", restored)
        for path in state.iterdir():  # the restore must be exact
            assert (restored / path.name).read_bytes() == path.read_bytes(), f"{path.name} differs after restore"
        total = sum(p.stat().st_size for p in state.iterdir())
    finally:
        drop(scratch)

    rows = [
        ("first checkpoint", first_pause, first.new_bytes, first_s, first_archive_bytes, first_archive_s,  # type: ignore[attr-defined]
         first_archive_durable),
        ("second checkpoint", second_pause, second.new_bytes, second_s, archive_bytes, archive_s, archive_durable),  # type: ignore[attr-defined]
    ]
    print(f"\nstate {total / MIB:.0f} MiB in {files} file(s), {changed / MIB:.1f} MiB (1%) changed in "
          f"{regions} regions (one an insertion)")
    print(f"{'':18} {'pause s':>8} {'stored MiB':>11} {'durable s':>10} {'tar+zstd MiB':>13} {'tar+zstd s':>11} "
          f"{'+fsync s':>9} {'bytes ratio':>12} {'time ratio':>11}")
    for name, pause, ours_bytes, ours_s, full_bytes, full_s, full_durable in rows:
        print(f"{name:18} {pause:8.2f} {ours_bytes / MIB:11.1f} {ours_s:10.2f} {full_bytes / MIB:13.1f} {full_s:11.2f} "
              f"{full_durable:9.2f} {ours_bytes / full_bytes:12.4f} {ours_s / full_s:11.3f}")
    restore_rate = total / MIB / restore_s
    print(f"restore of the second checkpoint: {restore_s:.2f} s, {restore_rate:.0f} MiB/s (every chunk verified; "
          f"then compared byte for byte)")
    return {
        "size_mib": size_mib, "files": files, "changed_mib": changed / MIB, "regions": regions,
        "first_checkpoint_bytes": first.new_bytes, "first_checkpoint_seconds": first_s,  # type: ignore[attr-defined]
        "second_checkpoint_bytes": second.new_bytes, "second_checkpoint_seconds": second_s,  # type: ignore[attr-defined]
        "full_archive_bytes": archive_bytes, "full_archive_seconds": archive_s,
        "second_checkpoint_bytes_ratio": second.new_bytes / archive_bytes,  # type: ignore[attr-defined]
        "second_checkpoint_time_ratio": second_s / archive_s,
        "restore_seconds": restore_s, "restore_mib_per_s": restore_rate,
        # issue 13's figures: the job's longest pause, time to durable, tar+zstd beside them
        "pause_s": max(first_pause, second_pause), "first_pause_s": first_pause, "second_pause_s": second_pause,
        "first_durable_s": first_s, "second_durable_s": second_s, "tar_zstd_s": archive_s,
        "first_tar_zstd_s": first_archive_s, "tar_zstd_durable_s": archive_durable,
        "first_tar_zstd_durable_s": first_archive_durable,
        "second_bytes_ratio": second.new_bytes / archive_bytes,  # type: ignore[attr-defined]
    }


if __name__ == "__main__":
    main()
