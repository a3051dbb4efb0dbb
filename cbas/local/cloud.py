"""The local Cloud: machines are process groups on this computer, priced by a simulated market.

Its state (like a cloud provider's) lives in <home>/cloud, outside the master, so a restarted
master finds the machines it left running. While a master runs, the market loop gives each spot
machine whose capacity disappears the interruption notice (through its metadata endpoint), waits
the notice period, and then kills the machine's process groups.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import structlog
from pydantic import BaseModel

from cbas.authority import Credential
from cbas.backends import CapacityError, Leftover, NotFound, PriceTooLow
from cbas.local.market import BuiltinMarket, MarketModel, TraceMarket
from cbas.local.volumes import delete_snapshot, list_snapshots, restore_volume
from cbas.models import LaunchSpec, Machine, Offer
from cbas.scheduler.traces import load_trace
from cbas.checkpoint import coordinator_guard
from cbas.untrusted import remove_tree
from cbas.worker.cgroups import kill_cgroup
from cbas.worker.credential import key_file, write_credential
from cbas.settings import Settings

log = structlog.get_logger(__name__)


class MachineRecord(BaseModel):
    machine: Machine
    disk: str
    pgid: int | None = None
    max_price: float | None = None
    notice_at: float | None = None  # wall time of the interruption notice
    kill_at: float | None = None
    ended_reason: str | None = None


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as CBAS_* variables, so a machine's worker sees the same configuration."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"CBAS_{name.upper()}"] = str(value)
    return env


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def make_market(settings: Settings, seed: int) -> MarketModel:
    if settings.market_trace is not None:
        return TraceMarket(load_trace(settings.market_trace), settings.market_trace_offset_hours * 3600.0)
    return BuiltinMarket(seed=seed)


class LocalCloud:
    def __init__(self, settings: Settings, tick: float = 0.2) -> None:
        self.settings = settings
        self.root = settings.home / "cloud"
        self.records_dir = self.root / "machines"
        self.records_dir.mkdir(parents=True, exist_ok=True)
        self._tick = tick
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._changing = threading.RLock()  # a record's read-change-write, on the loop's threads or the market's
        self._task: asyncio.Task[None] | None = None
        market_file = self.root / "market.json"
        if market_file.exists():
            state = json.loads(market_file.read_text())
        else:
            seed = settings.market_seed if settings.market_seed is not None else random.randrange(1 << 30)
            state = {"opened_at": time.time(), "seed": seed}
            market_file.write_text(json.dumps(state))
        self.opened_at: float = state["opened_at"]
        self.market = make_market(settings, state["seed"])

    # --- time ---------------------------------------------------------------------------
    def sim_time(self, wall: float | None = None) -> float:
        return ((wall if wall is not None else time.time()) - self.opened_at) * self.settings.market_time_scale

    # --- records ------------------------------------------------------------------------
    def _record_path(self, instance_id: str) -> Path:
        return self.records_dir / f"{instance_id}.json"

    def _save(self, record: MachineRecord) -> None:
        path = self._record_path(record.machine.instance_id)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(record.model_dump_json())
        os.replace(tmp, path)

    def _records(self) -> list[MachineRecord]:
        records = []
        for path in sorted(self.records_dir.glob("i-*.json")):
            try:
                records.append(MachineRecord.model_validate_json(path.read_text()))
            except (OSError, ValueError):
                continue
        return records

    def record(self, instance_id: str) -> MachineRecord:
        try:
            return MachineRecord.model_validate_json(self._record_path(instance_id).read_text())
        except FileNotFoundError:
            raise NotFound(f"machine {instance_id}") from None

    # --- Cloud interface ------------------------------------------------------------------
    async def start(self) -> None:
        machines_root = self.settings.machines_root()
        if os.geteuid() == 0 and machines_root.resolve().is_relative_to(self.settings.home.resolve()):
            raise RuntimeError(f"CBAS_MACHINES_DIR ({machines_root}) must be outside CBAS_HOME: jobs run as "
                               f"users of their own, who cannot enter the master's private home")
        if self._task is None:
            self._task = asyncio.create_task(self._market_loop(), name="local-market")

    async def offers(self) -> list[Offer]:
        """Prices, as EC2's price history and price list give them; never capacity, which EC2 does
        not tell: every market is offered, and only a launch finds out (CapacityError)."""
        t = self.sim_time()
        return [
            Offer(
                zone=zone,
                instance_type=kind,
                spot_price=self.market.spot_price(zone, kind, t),
                ondemand_price=self.market.ondemand_price(kind),
                available=True,
            )
            for zone in self.market.zones()
            for kind in self.market.instance_types()
        ]

    async def launch(self, spec: LaunchSpec) -> Machine:
        # every record read, a disk made, a process started: on a thread, never the master's loop
        return await asyncio.to_thread(self._launch, spec)

    def _launch(self, spec: LaunchSpec) -> Machine:
        for existing in self._records():  # the ledger id makes launches idempotent
            if existing.machine.tags.get("cbas:ledger") == spec.ledger_id and existing.machine.state != "terminated":
                return existing.machine
        if spec.instance_type not in self.market.instance_types() or spec.zone not in self.market.zones():
            raise CapacityError(f"no such market: {spec.instance_type} in {spec.zone}")
        t = self.sim_time()
        if spec.market == "spot":
            if not self.market.available(spec.zone, spec.instance_type, t):
                raise CapacityError(f"no spot capacity for {spec.instance_type} in {spec.zone} "
                                    f"(InsufficientInstanceCapacity)")
            price = self.market.spot_price(spec.zone, spec.instance_type, t)
            if spec.max_price is not None and price > spec.max_price:
                raise PriceTooLow(f"the spot price of {spec.instance_type} in {spec.zone}, ${price:.4f}/h, is above "
                                  f"MaxPrice ${spec.max_price:.4f}/h (SpotMaxPriceTooLow)")
        else:
            price = self.market.ondemand_price(spec.instance_type)
        instance_id = "i-" + secrets.token_hex(8)
        machines_root = self.settings.machines_root()
        machines_root.mkdir(parents=True, exist_ok=True)
        machines_root.chmod(0o711)  # the job user must reach its own directory below
        disk = machines_root / instance_id
        disk.mkdir(mode=0o711)
        (disk / "metadata" / "placement").mkdir(parents=True)
        meta = disk / "metadata"
        (meta / "instance-id").write_text(instance_id)
        (meta / "instance-type").write_text(spec.instance_type)
        (meta / "instance-life-cycle").write_text(spec.market)
        (meta / "placement" / "availability-zone").write_text(spec.zone)
        if spec.data_snapshot:  # the volume strategy's disk, made from the job's last snapshot
            restore_volume(self.settings.home, spec.data_snapshot, disk / "job")
        # the machine's own key, where only its worker (this user) reads it: never in its environment
        write_credential(key_file(disk).parent,
                         Credential(spec.ledger_id, bytes.fromhex(spec.machine_key.get_secret_value())))
        machine = Machine(
            instance_id=instance_id,
            zone=spec.zone,
            instance_type=spec.instance_type,
            market=spec.market,
            price=price,
            state="pending",
            tags={**spec.tags, "cbas:cluster": self.settings.cluster, "cbas:ledger": spec.ledger_id, "cbas:job": spec.job_id},
        )
        record = MachineRecord(machine=machine, disk=str(disk), max_price=spec.max_price)
        self._save(record)  # before the process exists, so a crash cannot leave it unknown
        env = {**os.environ, **settings_env(self.settings)}
        with open(disk / "console.log", "wb") as console:
            child = subprocess.Popen(
                [sys.executable, "-m", "cbas.local.machine", "--instance-id", instance_id, "--disk", str(disk)],
                stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )
        self._children[instance_id] = child
        with self._changing:  # read again: the market may have given it a notice meanwhile
            record = self.record(instance_id)
            record.pgid = child.pid
            record.machine.state = "running"
            self._save(record)
        log.info("machine.launched", instance_id=instance_id, job_id=spec.job_id, zone=spec.zone,
                 market=spec.market, price=price)
        return record.machine

    async def terminate(self, instance_id: str, reason: str = "terminated") -> None:
        await asyncio.to_thread(self._terminate, instance_id, reason)

    def _terminate(self, instance_id: str, reason: str) -> None:
        with self._changing:  # against the market's thread: read, kill, write as one step
            try:
                record = self.record(instance_id)
            except NotFound:
                return
            if record.machine.state == "terminated":
                return
            self._kill(record)  # waits for the machine's processes to die
            record.machine.state = "terminated"
            record.ended_reason = reason
            self._save(record)
        log.info("machine.terminated", instance_id=instance_id, reason=reason)

    def _kill(self, record: MachineRecord) -> None:
        disk = Path(record.disk)
        if record.pgid is not None:
            kill_group(record.pgid)
        # the job's cgroups and process groups the worker recorded; read after the kill so none
        # is missed (a cgroup holds what left its process group, too)
        for name in _read_lines(disk / "job-cgroups"):
            if name.strip():
                kill_cgroup(name.strip())
        coordinator_guard.release(f"{record.machine.instance_id}-", prefix=True)  # its jobs' firewall rules
        for line in _read_lines(disk / "job-pgids"):
            if line.strip().isdigit():
                kill_group(int(line))
        child = self._children.pop(record.machine.instance_id, None)
        if child is not None:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:  # like EC2's, the console output outlives the machine
            (self.root / "consoles").mkdir(exist_ok=True)
            shutil.move(disk / "console.log", self._console_copy(record.machine.instance_id))
        except OSError:
            pass
        remove_tree(disk)  # a terminated machine's disk is gone (at any depth a job made it)

    def _console_copy(self, instance_id: str) -> Path:
        return self.root / "consoles" / f"{instance_id}.log"

    async def console_output(self, instance_id: str) -> bytes | None:
        def read() -> bytes | None:
            try:
                record = self.record(instance_id)
            except NotFound:
                return None
            for path in (Path(record.disk) / "console.log", self._console_copy(instance_id)):
                try:
                    return path.read_bytes()[-1 << 20:]
                except OSError:
                    continue
            return None

        return await asyncio.to_thread(read)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await asyncio.to_thread(delete_snapshot, self.settings.home, snapshot_id)

    async def leftovers(self) -> list[Leftover]:
        found = [Leftover(kind="machine", id=m.instance_id, job_id=m.tags.get("cbas:job"),
                          ledger_id=m.tags.get("cbas:ledger"), created_at=m.launched_at)
                 for m in await self.list_machines()]
        return found + await asyncio.to_thread(list_snapshots, self.settings.home)

    async def remove(self, leftover: Leftover) -> None:
        if leftover.kind == "machine":
            await self.terminate(leftover.id, reason="reaped: no live ledger entry")
        elif leftover.kind == "snapshot":
            await self.delete_snapshot(leftover.id)
        else:
            raise ValueError(f"the local cloud has no {leftover.kind}s")

    async def list_machines(self) -> list[Machine]:
        machines = []
        for record in await asyncio.to_thread(self._records):
            if record.machine.state == "terminated":
                continue
            if record.pgid is not None and not self._alive(record):
                await self.terminate(record.machine.instance_id, reason="machine process died")
                continue
            machines.append(record.machine)
        return machines

    def _alive(self, record: MachineRecord) -> bool:
        child = self._children.get(record.machine.instance_id)
        if child is not None:
            return child.poll() is None
        return record.pgid is not None and group_alive(record.pgid)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    # --- the market -----------------------------------------------------------------------
    async def _market_loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.market_step, time.time())
            except Exception:  # the loop must survive one bad record
                log.exception("market.step_failed")
            await asyncio.sleep(self._tick)

    def market_step(self, now: float) -> None:
        t = self.sim_time(now)
        for listed in self._records():
            if listed.machine.state == "terminated" or listed.machine.market != "spot":
                continue
            with self._changing:  # read again: a termination may have written it meanwhile
                try:
                    record = self.record(listed.machine.instance_id)
                except NotFound:
                    continue
                machine = record.machine
                if machine.state == "terminated":
                    continue
                if record.notice_at is None:
                    if not self.market.available(machine.zone, machine.instance_type, t, record.max_price):
                        self._give_notice(record, now)
                elif record.kill_at is not None and now >= record.kill_at:
                    self._kill(record)
                    record.machine.state = "terminated"
                    record.ended_reason = "spot capacity reclaimed"
                    self._save(record)
                    log.info("machine.reclaimed", instance_id=machine.instance_id, zone=machine.zone)

    def _give_notice(self, record: MachineRecord, now: float) -> None:
        kill_at = now + self.settings.notice_seconds()
        action_time = datetime.fromtimestamp(kill_at, timezone.utc).isoformat().replace("+00:00", "Z")
        spot_dir = Path(record.disk) / "metadata" / "spot"
        spot_dir.mkdir(parents=True, exist_ok=True)
        (spot_dir / "instance-action").write_text(json.dumps({"action": "terminate", "time": action_time}))
        record.notice_at, record.kill_at = now, kill_at
        self._save(record)
        log.info("machine.spot_notice", instance_id=record.machine.instance_id, zone=record.machine.zone,
                 kill_in=round(kill_at - now, 2))


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []
