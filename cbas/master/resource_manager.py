"""Launches and terminates machines through the Cloud, keeping a ledger so none ever leaks.

The ledger entry is written before the cloud call (LAUNCHING) and completed after it, and the
cloud launch is idempotent on the entry id, so a crash at any point is found by reconcile().
"""

from __future__ import annotations

import secrets
import asyncio
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

import structlog
from pydantic import SecretStr

from cbas.backends import Cloud, JobStore
from cbas.faults import crash_point
from cbas.master.credentials import MachineKeys
from cbas.models import DiskSpec, LaunchSpec, LedgerEntry, LedgerState, Machine, utcnow
from cbas.scheduler.placement import Placement

log = structlog.get_logger(__name__)


@dataclass
class Reconciliation:
    adopted: list[LedgerEntry] = field(default_factory=list)  # launched before a crash, now known
    vanished: list[LedgerEntry] = field(default_factory=list)  # the ledger's machine is gone
    strays_terminated: list[str] = field(default_factory=list)  # tagged machines with no entry


def closing(entry: LedgerEntry, reason: str) -> dict[str, Any]:
    """The fields that close an entry now, with what its machine cost."""
    now = utcnow()
    return {"state": LedgerState.TERMINATED, "terminated_at": now, "cost": entry.cost_until(now), "reason": reason}


class ResourceManager:
    def __init__(self, store: JobStore, cloud: Cloud, cluster: str, keys: MachineKeys) -> None:
        self.store = store
        self.cloud = cloud
        self.cluster = cluster
        self.keys = keys  # each launch carries its machine's key, derived from the entry's id
        # live entries by machine, for the ping path; every ledger write of this master goes
        # through _put, so once reconcile() has filled it the index is the ledger's truth
        self._live: dict[str, LedgerEntry] | None = None
        # a change to an entry is read and written as one step: two handlers at once (a notice
        # recorded while the machine is let go) would otherwise write from the same read, and the
        # store's conditional write refuses the second
        self._changing = asyncio.Lock()

    async def _put(self, entry: LedgerEntry) -> LedgerEntry:
        stored = await self.store.put_ledger(entry)
        if self._live is not None and stored.instance_id:
            if stored.state == LedgerState.TERMINATED:
                self._live.pop(stored.instance_id, None)
            else:
                self._live[stored.instance_id] = stored
        return stored

    async def launch(self, job_id: str, placement: Placement, max_price: float | None,
                     disk: DiskSpec | None = None) -> LedgerEntry:
        entry = await self._put(
            LedgerEntry(
                id="l-" + secrets.token_hex(8), job_id=job_id, market=placement.market,
                zone=placement.zone, instance_type=placement.instance_type, price=placement.price,
            )
        )
        spec = LaunchSpec(
            ledger_id=entry.id, job_id=job_id, instance_type=placement.instance_type,
            zone=placement.zone, market=placement.market,
            max_price=max_price if placement.market == "spot" else None,
            machine_key=SecretStr(self.keys.credential(entry.id).key.hex()),
            **(disk.model_dump() if disk else {}),
        )
        crash_point("launch-ledger-written")
        try:
            machine = await self.cloud.launch(spec)
        except Exception as exc:
            await self._close(entry, reason=f"launch failed: {exc}")
            raise
        crash_point("launch-machine-started")
        return await self._adopt(entry, machine)

    async def _change(self, entry: LedgerEntry, fields: Callable[[LedgerEntry], dict[str, Any]]) -> LedgerEntry:
        """The entry with `fields` (computed from its newest version) written."""
        async with self._changing:
            newest = self._live.get(entry.instance_id or "") if self._live is not None else None
            current = newest if newest is not None and newest.id == entry.id else entry
            return await self._put(current.model_copy(update=fields(current)))

    async def _adopt(self, entry: LedgerEntry, machine: Machine) -> LedgerEntry:
        return await self._change(entry, lambda current: {
            "state": LedgerState.RUNNING, "instance_id": machine.instance_id,
            # EC2 does not say what a spot machine costs at launch: keep the placement's price
            "launched_at": machine.launched_at, "price": machine.price or current.price,
        })

    async def _close(self, entry: LedgerEntry, reason: str) -> LedgerEntry:
        return await self._change(entry, lambda current: closing(current, reason))

    async def entry_by_id(self, ledger_id: str) -> LedgerEntry | None:
        """The ledger entry with this id, live or not (a machine's messages name it)."""
        if self._live is not None:
            for entry in self._live.values():
                if entry.id == ledger_id:
                    return entry
        for live_only in (True, False):  # a launch under way, then (rarely) a machine let go
            for entry in await self.store.list_ledger(live_only=live_only):
                if entry.id == ledger_id:
                    return entry
        return None

    async def entry_for(self, instance_id: str) -> LedgerEntry | None:
        if self._live is not None:
            return self._live.get(instance_id)
        for entry in await self.store.list_ledger(live_only=True):
            if entry.instance_id == instance_id:
                return entry
        return None

    async def record_notice(self, instance_id: str, ends_at: datetime) -> bool:
        """A spot notice for the machine, kept in its entry (a restarted master still knows the
        machine's loss is a preemption). False if it was known already, or the machine is not ours."""
        async with self._changing:  # read under the lock: a machine let go meanwhile needs none
            entry = await self.entry_for(instance_id)
            if entry is None or entry.notice_ends_at is not None:
                return False
            await self._put(entry.model_copy(update={"notice_ends_at": ends_at}))
            return True

    async def terminate(self, instance_id: str, reason: str) -> LedgerEntry | None:
        """Terminate the machine and close its ledger entry; returns the closed entry (with cost)."""
        await self.cloud.terminate(instance_id)
        async with self._changing:  # read under the lock: of two releases at once, one closes it
            entry = await self.entry_for(instance_id)
            if entry is None:
                return None
            closed = await self._put(entry.model_copy(update=closing(entry, reason)))
        log.info("ledger.closed", instance_id=instance_id, job_id=entry.job_id, reason=reason, cost=round(closed.cost, 6))
        return closed

    async def reconcile(self) -> Reconciliation:
        """Make the ledger and the cloud agree; run at every master start."""
        result = Reconciliation()
        machines = await self.cloud.list_machines()
        ours = [m for m in machines if m.tags.get("cbas:cluster") == self.cluster]
        by_ledger = {m.tags.get("cbas:ledger"): m for m in ours}
        claimed: set[str] = set()
        for entry in await self.store.list_ledger(live_only=True):
            machine = by_ledger.get(entry.id)
            if machine is None:
                result.vanished.append(await self._close(entry, reason="machine not found at reconcile"))
                continue
            claimed.add(machine.instance_id)
            if entry.state == LedgerState.LAUNCHING:
                result.adopted.append(await self._adopt(entry, machine))
        for machine in ours:
            if machine.instance_id not in claimed:
                await self.cloud.terminate(machine.instance_id)
                result.strays_terminated.append(machine.instance_id)
                log.warning("machine.stray_terminated", instance_id=machine.instance_id)
        self._live = {e.instance_id: e for e in await self.store.list_ledger(live_only=True) if e.instance_id}
        return result
