"""What each part of the Master (transitions, placement, worker events, restarts, recovery) may
use of it: the backends and helpers the Master (cbas.master.service) sets up in its constructor.
Declared here for type checkers only, once for all the parts."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cbas.backends import BlobStore, Cloud, JobCredentials, JobStore, MessageBus
    from cbas.master.credentials import MachineKeys
    from cbas.master.job_images import JobImages
    from cbas.master.metrics import Metrics
    from cbas.master.reaper import Reaper
    from cbas.master.resource_manager import ResourceManager
    from cbas.master.scheduler_adapter import SchedulerAdapter
    from cbas.master.timers import Deadlines
    from cbas.master.worker_manager import WorkerManager
    from cbas.messages import Envelope
    from cbas.settings import Settings


class MasterPart:
    if TYPE_CHECKING:  # provided by cbas.master.service.Master
        settings: Settings
        store: JobStore
        blobs: BlobStore
        bus: MessageBus
        cloud: Cloud
        images: JobImages
        metrics: Metrics
        keys: MachineKeys
        job_credentials: JobCredentials
        resources: ResourceManager
        reaper: Reaper
        workers: WorkerManager
        adapter: SchedulerAdapter
        moves: Deadlines  # restarts.py's: when moves under way time out

        def kick(self) -> None: ...
        async def send_quietly(self, message: Envelope) -> None: ...
        async def _signed(self, message: Envelope) -> Envelope: ...
        async def _release(self, job_id: str, instance_id: str, reason: str) -> None: ...
        async def ask_to_stop_for_move(self, job_id: str, instance_id: str, reason: str) -> None: ...
