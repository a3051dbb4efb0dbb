"""The original system's VM strategy on EC2 (moto): a dmtcp job with `CheckpointStorage = "volume"`.
Its DMTCP hook holds the program while its images and the data disk are snapshotted as one
checkpoint (an EBS snapshot, tagged), and the next machine's data disk is made from that snapshot.
(The restart on that disk, dmtcp_restart included, runs end to end on the local backend:
tests/integration/test_dmtcp_local.py.)"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import boto3
import pytest
from moto import mock_aws
from pydantic import SecretStr

from cbas import jdl
from cbas.aws.ec2 import Ec2Cloud
from cbas.aws.volumes import EbsSnapshots
from cbas.master.views import describe
from cbas.messages import MessageType
from cbas.models import CheckpointRecord, LaunchSpec
from tests.aws.test_ec2 import USER_DATA
from tests.harness import Harness, wait_for_line
from tests.homes import reachable_tmp
from tests.master.test_restart_loop import cluster  # noqa: F401, F811  (a master on the local backends)
from tests.security.conftest import Cluster

TEXT = ('Executable = "count.sh"; CheckpointStrategy = "dmtcp"; CheckpointStorage = "volume"; VolumeSize = 20;'
        'CheckpointInterval = 3600; Environment = {FAKE_DMTCP_STATE = "n.txt"};')
COUNT = b"#!/bin/sh\ni=$(cat n.txt 2>/dev/null || echo 0)\nwhile [ $i -lt 1000 ]; do echo $i; i=$((i+1)); echo $i > n.txt; sleep 0.02; done\n"


class WatchedSnapshots(EbsSnapshots):
    """moto's EBS snapshots, noting whether the program moved while the disk was snapshotted."""

    def __init__(self, *args: object, stdout: Path, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.stdout = stdout
        self.moved: list[bool] = []

    def snapshot(self, job_id: str, checkpoint_id: str) -> str:
        before = self.stdout.read_bytes()
        time.sleep(0.3)
        self.moved.append(self.stdout.read_bytes() != before)
        return super().snapshot(job_id, checkpoint_id)


@pytest.mark.skipif(os.geteuid() != 0, reason="DMTCP jobs run as users of their own")
async def test_images_and_disk_are_one_ebs_snapshot_and_the_next_disk_is_made_from_it(fake_dmtcp: Path) -> None:
    with mock_aws(), reachable_tmp() as root:
        client = boto3.client("ec2", region_name="us-east-1")
        image = client.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        cloud = Ec2Cloud("test", image, USER_DATA, client)
        key = SecretStr("ab" * 32)
        first = await cloud.launch(LaunchSpec(machine_key=key, ledger_id="l-1", job_id="v1", instance_type="c5.large",
                                              zone="us-east-1a", market="spot", data_volume_gib=20))
        harness = Harness(root)
        harness.upload_inputs("v1", {"count.sh": COUNT})
        run = harness.run("v1", TEXT)
        run.volumes = WatchedSnapshots(client, first.instance_id, "test", waiter_delay=1, stdout=run.layout.stdout)
        task = asyncio.create_task(run.run())
        await wait_for_line(run.layout.stdout, "\n20\n")
        assert await run.checkpoint("notice", final=True), harness.sent
        await asyncio.wait_for(task, 20)
        [done] = harness.of_type(MessageType.CHECKPOINT_DONE)
        snapshot = done.body["snapshot_id"]
        assert run.volumes.moved == [False]  # the hook held the program while the disk was taken
        [described] = client.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"]
        assert {t["Key"]: t["Value"] for t in described["Tags"]}["cbas:checkpoint"] == done.body["checkpoint_id"]
        assert (run.layout.root / ".cbas-checkpoint").read_text() == done.body["checkpoint_id"]  # on that disk
        assert list((run.layout.work / ".dmtcp").glob("ckpt_*.dmtcp"))  # the images are on it too
        second = await cloud.launch(LaunchSpec(machine_key=key, ledger_id="l-2", job_id="v1", instance_type="c5.large",
                                               zone="us-east-1b", market="spot", data_volume_gib=20, data_snapshot=snapshot))
        restored = EbsSnapshots(client, second.instance_id, "test").volume_id()
        assert client.describe_volumes(VolumeIds=[restored])["Volumes"][0]["SnapshotId"] == snapshot


async def test_the_master_gives_a_dmtcp_volume_job_a_disk_from_its_newest_good_snapshot(cluster: Cluster) -> None:  # noqa: F811
    master = cluster.master
    job = await master.create_job("vm")
    await master.add_job(job.id, TEXT)
    for number, bad in ((1, False), (2, False), (3, True)):
        await master.store.add_checkpoint(CheckpointRecord(
            job_id=job.id, id=f"a0001-n{number:05d}", attempt=1, manifest_key="", size_bytes=1, pause_seconds=0,
            upload_seconds=0, reason="interval", snapshot_id=f"snap-{number}", bad=bad))
    await master.store.mark_checkpoint_bad(job.id, "a0001-n00003")
    disk = await master._disk_for(await master.store.get_job(job.id), describe(TEXT))
    assert disk.data_volume_gib == 20 and disk.data_snapshot == "snap-2"
    assert jdl.parse(TEXT).checkpoints_on_volume()
