"""The ledger under concurrent handlers: a spot notice recorded while the machine is let go (a
notice and the final checkpoint after it are handled at once) must both land; the store's
conditional write refuses the second of two writes made from the same read."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cbas.local.store import SqliteJobStore
from cbas.master.credentials import MachineKeys
from cbas.master.resource_manager import ResourceManager
from cbas.models import LedgerState, from_epoch
from cbas.scheduler.placement import Placement
from tests.faults.test_message_chaos import INSTANCE, MemoryCloud


@pytest.mark.parametrize("notice_first", [True, False])
async def test_a_notice_recorded_while_the_machine_is_let_go_loses_neither(tmp_path: Path, notice_first: bool) -> None:
    store = SqliteJobStore(tmp_path / "cbas.db")
    resources = ResourceManager(store, MemoryCloud(), "default", MachineKeys(b"k" * 32))
    try:
        await resources.reconcile()  # as at the master's start: the live index is filled
        await resources.launch("j1", Placement(zone="z1", instance_type="c5.large", market="spot", price=0.03), None)
        notice = resources.record_notice(INSTANCE, from_epoch(2e9))
        release = resources.terminate(INSTANCE, reason="spot interruption notice (checkpointed)")
        await asyncio.gather(*((notice, release) if notice_first else (release, notice)))
        [entry] = await store.list_ledger(live_only=False)
        assert entry.state == LedgerState.TERMINATED and entry.reason == "spot interruption notice (checkpointed)"
        if notice_first:  # (a machine already let go needs no notice)
            assert entry.notice_ends_at == from_epoch(2e9)
    finally:
        await store.close()


async def test_two_releases_of_one_machine_at_once_close_it_once(tmp_path: Path) -> None:
    """A handler and the periodic pass over unneeded machines may let the same machine go at once."""
    store = SqliteJobStore(tmp_path / "cbas.db")
    resources = ResourceManager(store, MemoryCloud(), "default", MachineKeys(b"k" * 32))
    try:
        await resources.reconcile()
        await resources.launch("j1", Placement(zone="z1", instance_type="c5.large", market="spot", price=0.03), None)
        closed = await asyncio.gather(resources.terminate(INSTANCE, reason="job completed"),
                                      resources.terminate(INSTANCE, reason="job completed"))
        assert sum(entry is not None for entry in closed) == 1
        assert [e.state for e in await store.list_ledger(live_only=False)] == [LedgerState.TERMINATED]
    finally:
        await store.close()
