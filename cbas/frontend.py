"""What `cbas submit` and `cbas fetch` do, apart from printing.

Submit: validate the JDL and every file it names before anything happens; get a job id from the
master; archive and upload the prologue and input sandbox; only then submit it (POST
/api/jobs/<id>/submit, with the API token: jobs never come through the message bus).
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterator

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

from cbas import jdl
from cbas.archive import Member, pack, unpack
from cbas.backends import BlobNotFound, BlobStore
from cbas.client import MasterClient
from cbas.settings import Settings
from cbas.wiring import open_blobs


class SubmitError(ValueError):
    pass


@dataclass
class Prepared:
    description: jdl.JobDescription
    text: str
    prologue: list[Member]
    inputs: list[Member]


def _sandbox_name(name: str) -> str:
    """Where an input lands in the job's directory: its relative path, or its base name."""
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        return path.name
    return str(path)


def prepare(jdl_path: Path) -> Prepared:
    """Parse the JDL and find every file it needs; raise SubmitError naming all that are missing."""
    try:
        text = jdl_path.read_text()
    except OSError as exc:
        raise SubmitError(f"cannot read {jdl_path}: {exc.strerror}") from None
    description = jdl.parse(text, filename=str(jdl_path))
    base = jdl_path.parent
    inputs = list(description.input_sandbox)
    executable = description.executable
    if not os.path.isabs(executable) and (base / executable).is_file() and executable not in inputs:
        inputs.append(executable)  # the executable travels with the job, as users expect
    problems: list[str] = []

    def members(names: list[str], kind: str, flat: bool) -> list[Member]:
        found = []
        for name in names:
            path = (base / name) if not os.path.isabs(name) else Path(name)
            if not path.exists():
                problems.append(f"{kind} file {name!r} not found (looked at {path})")
            elif not (path.is_file() or path.is_dir()):
                problems.append(f"{kind} file {name!r} is not a regular file or directory")
            else:
                found.append(Member(path.resolve(), path.name if flat else _sandbox_name(name)))
        return found

    prologue = members(list(description.prologue), "Prologue", flat=True)
    input_members = members(inputs, "InputSandbox", flat=False)
    if problems:
        raise SubmitError(f"{jdl_path}: " + "; ".join(problems))
    return Prepared(description, text, prologue, input_members)


@contextmanager
def transfer_bar(enabled: bool) -> Iterator[Callable[[str, int], Callable[[int], None]]]:
    """A rich progress bar per transfer; yields a factory: (label, total) -> advance callback."""
    if not enabled:
        yield lambda label, total: (lambda n: None)
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True,
    ) as progress:

        def track(label: str, total: int) -> Callable[[int], None]:
            task = progress.add_task(label, total=total)
            return lambda n: progress.advance(task, n)

        yield track


def upload(blobs: BlobStore, key: str, path: Path, track: Callable[[str, int], Callable[[int], None]]) -> None:
    blobs.put_file(key, path, progress=track(f"uploading {path.name}", path.stat().st_size))


def submit(settings: Settings, jdl_path: Path, show_progress: bool = True) -> str:
    prepared = prepare(jdl_path)  # nothing happens unless every file is there
    client = MasterClient(settings)
    blobs = open_blobs(settings)
    job_id = client.create_job(prepared.description.name)
    with tempfile.TemporaryDirectory(prefix="cbas-submit-") as scratch, transfer_bar(show_progress) as track:
        blobs.put_bytes(f"jobs/{job_id}/jdl", prepared.text.encode())
        for name, members in (("prologue", prepared.prologue), ("input", prepared.inputs)):
            if members:
                archive = Path(scratch) / f"{name}.tar.zst"
                pack(members, archive)
                upload(blobs, f"jobs/{job_id}/{name}.tar.zst", archive, track)
    client.submit_job(job_id, prepared.text)
    return job_id


def cancel(settings: Settings, job_id: str) -> None:
    MasterClient(settings).cancel_job(job_id)


def fetch(settings: Settings, job_id: str, target: Path, show_progress: bool = True) -> list[str]:
    """Download and unpack the output sandbox, the logs and the job's machines' console logs;
    returns what was written."""
    blobs = open_blobs(settings)
    target.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cbas-fetch-") as scratch, transfer_bar(show_progress) as track:
        key = f"jobs/{job_id}/output.tar.zst"
        if blobs.exists(key):
            archive = Path(scratch) / "output.tar.zst"
            blobs.get_file(key, archive, progress=track("downloading output", blobs.size(key)))
            written += unpack(archive, target)
        for name in ("stdout", "stderr"):
            try:
                data = blobs.get_bytes(f"jobs/{job_id}/logs/{name}")
            except BlobNotFound:
                continue
            (target / name).write_bytes(data)
            written.append(name)
        for key in blobs.list(f"jobs/{job_id}/logs/console/"):  # each machine's console, kept
            name = f"machine-consoles/{key.rsplit('/', 1)[1]}"
            (target / "machine-consoles").mkdir(exist_ok=True)
            (target / name).write_bytes(blobs.get_bytes(key))
            written.append(name)
    return written
