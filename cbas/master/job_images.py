"""BuildImage: a job waits while its prologue is built into a machine image (once per prologue:
the builder reuses an image made from the same files); then its machines boot from it."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Awaitable, Callable

import structlog

from cbas import jdl
from cbas.archive import unpack
from cbas.backends import BlobStore, ImageBuilder, JobStore
from cbas.models import Job, JobEvent

log = structlog.get_logger(__name__)


class JobImages:
    def __init__(self, builder: ImageBuilder | None, store: JobStore, blobs: BlobStore,
                 on_failed: Callable[[str, str], Awaitable[object]], on_ready: Callable[[], None]) -> None:
        self.builder, self.store, self.blobs = builder, store, blobs
        self.on_failed, self.on_ready = on_failed, on_ready
        self._building: dict[str, asyncio.Task[None]] = {}  # job id -> its build
        self._noted: set[str] = set()

    async def ready(self, job: Job, description: jdl.JobDescription) -> bool:
        """False while the job waits for its image; starts the build if none runs."""
        if not (description.build_image and description.prologue) or job.image_id:
            return True
        if self.builder is None:
            if job.id not in self._noted:
                self._noted.add(job.id)
                await self.store.add_event(JobEvent(job_id=job.id, kind="image", detail=(
                    "this backend builds no images: the prologue runs on each machine before the job")))
            return True
        if job.id not in self._building:
            self._building[job.id] = asyncio.create_task(self._build(job.id, description), name=f"image-{job.id}")
        return False

    async def stop(self) -> None:
        """Builds under way stop; the next master starts them again (a finished image is found by hash)."""
        for build in list(self._building.values()):
            build.cancel()
        await asyncio.gather(*self._building.values(), return_exceptions=True)

    async def _build(self, job_id: str, description: jdl.JobDescription) -> None:
        assert self.builder is not None
        try:
            await self.store.add_event(JobEvent(job_id=job_id, kind="image-building",
                                                detail=f"building {', '.join(description.prologue)} into an image"))
            files = await asyncio.to_thread(self._prologue_files, job_id, description)
            image_id = await self.builder.image_for(job_id, files)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("image.failed", job_id=job_id, error=str(exc))
            await self.on_failed(job_id, str(exc))
        else:
            await self.store.mutate_job(job_id, lambda j: j.model_copy(update={"image_id": image_id}),
                                        JobEvent(job_id=job_id, kind="image-ready", detail=image_id))
            self.on_ready()
        finally:
            self._building.pop(job_id, None)

    def _prologue_files(self, job_id: str, description: jdl.JobDescription) -> list[tuple[str, bytes]]:
        with tempfile.TemporaryDirectory(prefix="cbas-prologue-") as scratch:
            archive = Path(scratch) / "prologue.tar.zst"
            self.blobs.get_file(f"jobs/{job_id}/prologue.tar.zst", archive)
            unpack(archive, Path(scratch) / "files")
            return [(Path(name).name, (Path(scratch) / "files" / Path(name).name).read_bytes())
                    for name in description.prologue]
