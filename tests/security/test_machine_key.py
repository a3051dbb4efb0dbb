"""Each machine's own key: the local cloud leaves it where only the worker (the machine's user)
reads it, never in an environment; on AWS the user-data carries only a URL that expires."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from pydantic import SecretStr

from cbas import authority
from cbas.local.cloud import LocalCloud
from cbas.models import LaunchSpec
from cbas.settings import Settings
from cbas.worker.credential import read_credential
from tests.homes import reachable_tmp
from tests.processes import kill_groups, wait_until_gone

KEY = authority.machine_key(b"master key of this test", "l-test")


def spec(zone: str = "z1", instance_type: str = "c5.large") -> LaunchSpec:
    return LaunchSpec(ledger_id="l-test", job_id="j1", instance_type=instance_type, zone=zone, market="on-demand",
                      machine_key=SecretStr(KEY.hex()))


def test_the_launch_spec_never_shows_the_key() -> None:
    launch = spec()
    for shown in (repr(launch), str(launch), launch.model_dump_json(), str(launch.model_dump())):
        assert KEY.hex() not in shown


async def test_a_local_machine_gets_its_key_readable_by_its_worker_only() -> None:
    with reachable_tmp() as root:
        settings = Settings(home=root / "home", machines_dir=root / "machines", market_seed=1)
        cloud = LocalCloud(settings)
        machine = await cloud.launch(spec(cloud.market.zones()[0], cloud.market.instance_types()[0]))
        record = cloud.record(machine.instance_id)
        try:
            folder = Path(record.disk) / "worker"
            key_file = folder / "machine.key"
            assert oct(folder.stat().st_mode & 0o777) == "0o700" and folder.stat().st_uid == os.geteuid()
            assert oct(key_file.stat().st_mode & 0o777) == "0o600" and key_file.stat().st_uid == os.geteuid()
            assert read_credential(key_file) == authority.Credential("l-test", KEY)
            assert record.pgid is not None
            environment = Path(f"/proc/{record.pgid}/environ").read_bytes()
            assert KEY.hex().encode() not in environment and KEY.hex().encode() not in str(settings).encode()
            if os.geteuid() == 0:  # another user (a job's) can read neither the file nor the folder
                for argv in (["cat", str(key_file)], ["ls", str(folder)]):
                    seen = subprocess.run(argv, user="nobody", capture_output=True, text=True)
                    assert seen.returncode != 0 and "Permission denied" in seen.stderr, seen
        finally:
            await cloud.terminate(machine.instance_id)
            kill_groups(wait_until_gone([record.pgid] if record.pgid else []))


def test_a_key_file_the_worker_did_not_write_alone_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "worker"
    folder.mkdir(mode=0o700)
    (folder / "ledger-id").write_text("l-test\n")
    key_file = folder / "machine.key"
    key_file.write_text(KEY.hex())
    key_file.chmod(0o644)
    with pytest.raises(PermissionError, match="readable by others"):
        read_credential(key_file)
