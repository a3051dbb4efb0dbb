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
(64 files by default: a job's working directory), and "layouts" holds every one. With one big
file (a DMTCP image is one) every byte must be read and hashed again, so its second checkpoint
costs about as much time as a full archive; it still stores only the changed chunks.
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


def measure(size_mib: int, files: int, regions: int, seed: int, workdir: Path | None) -> dict[str, float]:
    rng = random.Random(seed)
    scratch = Path(tempfile.mkdtemp(prefix="cbas-bench-", dir=workdir))
    try:
        state = scratch / "state"
        make_state(state, size_mib, files, rng)
        store = ChunkStore(FolderBlobStore(scratch / "blobs"), "bench", b"bench checkpoint key")
        staging = scratch / "staging"

        first, first_s = timed(store.save, state, "c1", "directory", staging)
        _, first_archive_s = timed(pack_directory, state, scratch / "full1.tar.zst")
        first_archive_bytes = (scratch / "full1.tar.zst").stat().st_size
        (scratch / "full1.tar.zst").unlink()

        changed = change_state(state, 0.01, regions, rng)
        second, second_s = timed(store.save, state, "c2", "directory", staging)
        _, archive_s = timed(pack_directory, state, scratch / "full2.tar.zst")
        archive_bytes = (scratch / "full2.tar.zst").stat().st_size

        restored = scratch / "restored"
        _, restore_s = timed(store.restore, "c2", restored)
        for path in state.iterdir():  # the restore must be exact
            assert (restored / path.name).read_bytes() == path.read_bytes(), f"{path.name} differs after restore"
        total = sum(p.stat().st_size for p in state.iterdir())
    finally:
        drop(scratch)

    rows = [
        ("first checkpoint", first.new_bytes, first_s, first_archive_bytes, first_archive_s),
        ("second checkpoint", second.new_bytes, second_s, archive_bytes, archive_s),
    ]
    print(f"\nstate {total / MIB:.0f} MiB in {files} file(s), {changed / MIB:.1f} MiB (1%) changed in "
          f"{regions} regions (one an insertion)")
    print(f"{'':20} {'chunked MiB':>12} {'chunked s':>10} {'tar+zstd MiB':>13} {'tar+zstd s':>11} {'bytes ratio':>12} {'time ratio':>11}")
    for name, ours_bytes, ours_s, full_bytes, full_s in rows:
        print(f"{name:20} {ours_bytes / MIB:12.1f} {ours_s:10.2f} {full_bytes / MIB:13.1f} {full_s:11.2f} "
              f"{ours_bytes / full_bytes:12.4f} {ours_s / full_s:11.3f}")
    restore_rate = total / MIB / restore_s
    print(f"restore of the second checkpoint: {restore_s:.2f} s, {restore_rate:.0f} MiB/s (verified byte for byte)")
    return {
        "size_mib": size_mib, "files": files, "changed_mib": changed / MIB, "regions": regions,
        "first_checkpoint_bytes": first.new_bytes, "first_checkpoint_seconds": first_s,
        "second_checkpoint_bytes": second.new_bytes, "second_checkpoint_seconds": second_s,
        "full_archive_bytes": archive_bytes, "full_archive_seconds": archive_s,
        "second_checkpoint_bytes_ratio": second.new_bytes / archive_bytes,
        "second_checkpoint_time_ratio": second_s / archive_s,
        "restore_seconds": restore_s, "restore_mib_per_s": restore_rate,
    }


if __name__ == "__main__":
    main()
