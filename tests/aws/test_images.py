"""The image builder on moto: the test plays the builder instance by calling its presigned
SQS URL, as the instance's user-data would with curl."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
import time

import boto3
import pytest
import requests
from moto import mock_aws

from cbas import jdl
from cbas.archive import Member, pack
from cbas.aws.ec2 import Ec2Cloud
from cbas.aws.images import ImageBuildFailed, ImageBuilder, prologue_hash
from cbas.aws.s3 import S3BlobStore
from cbas.local.bus import LocalMessageBus
from cbas.local.store import SqliteJobStore
from cbas.master.service import Backends, Master
from cbas.models import Job
from cbas.settings import Settings
from cbas.state import JobState

PROLOGUE = [("install.sh", b"#!/bin/sh\napt-get install -y octave\n")]


@pytest.fixture
def aws():
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        sqs = boto3.client("sqs", region_name="us-east-1")
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="cbas-images")
        blobs = S3BlobStore("cbas-images", s3)
        base = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        yield ec2, sqs, blobs, ImageBuilder(ec2, sqs, blobs, "lab", base, poll=0.1, timeout=10)


def play_builder(ec2, outcome: str) -> threading.Thread:  # type: ignore[no-untyped-def]
    sqs_client = boto3.client("sqs", region_name="us-east-1")
    """Wait for the builder instance, read its user-data, and call the URL it would call."""
    def run() -> None:
        for _ in range(600):  # up to 30 s: the master may take a moment to start the build
            reservations = ec2.describe_instances(Filters=[{"Name": "tag:cbas:role", "Values": ["image-builder"]},
                                                           {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"]
            if reservations:
                instance = reservations[0]["Instances"][0]["InstanceId"]
                data = ec2.describe_instance_attribute(InstanceId=instance, Attribute="userData")["UserData"]["Value"]
                script = base64.b64decode(data).decode()
                queue = sqs_client.list_queues()["QueueUrls"][0]
                policy = sqs_client.get_queue_attributes(QueueUrl=queue, AttributeNames=["Policy"]).get("Attributes", {})
                if "Policy" not in policy:
                    time.sleep(0.05)  # the builder retries until the master lets it send
                    continue
                thread.sent_policy = json.loads(policy["Policy"])  # type: ignore[attr-defined]
                prologue_url = re.findall(r"curl -fsSL --retry 5 -o install.sh '?(\S+?)'?$", script, re.M)[0]
                thread.fetched_prologue = requests.get(prologue_url, timeout=10).content  # type: ignore[attr-defined]
                url = re.findall(r"--data 'Action=SendMessage&MessageBody=ok' (https://sqs\S+)", script)[-1]
                assert "MessageBody=failed" in script.splitlines()[2]  # the ERR trap reports a failure
                assert "Signature" not in script.split("/var/lib/cbas-prologue")[-1].split("curl -fsSL")[0]
                assert "X-Amz" not in url  # the builder reports without credentials
                data = f"Action=SendMessage&MessageBody={outcome}"
                assert requests.post(url, data=data, timeout=10,
                                     headers={"Content-Type": "application/x-www-form-urlencoded"}).status_code == 200
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_prologue_is_built_into_an_image_once_and_everything_temporary_goes(aws) -> None:  # type: ignore[no-untyped-def]
    ec2, sqs, blobs, builder = aws
    player = play_builder(ec2, "ok")
    image = builder.build(PROLOGUE)
    player.join()
    assert player.fetched_prologue == PROLOGUE[0][1]  # the builder got the script from its presigned URL
    tags = {t["Key"]: t["Value"] for t in ec2.describe_images(ImageIds=[image])["Images"][0]["Tags"]}
    assert tags["cbas:prologue-hash"] == prologue_hash(PROLOGUE)
    assert blobs.list("images/") == []  # the prologue copies are gone with the builder
    assert sqs.list_queues().get("QueueUrls", []) == []  # the queue is gone
    states = [i["State"]["Name"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
              if any(t["Value"] == "image-builder" for t in i.get("Tags", []))]
    assert states == ["terminated"]
    assert builder.build(PROLOGUE) == image  # the same prologue: the cached image
    assert player.sent_policy["Statement"][0]["Condition"]["IpAddress"]["aws:SourceIp"].endswith("/32")


def test_a_failing_prologue_fails_clearly_and_cleans_up(aws) -> None:  # type: ignore[no-untyped-def]
    ec2, sqs, _, builder = aws
    player = play_builder(ec2, "failed")
    with pytest.raises(ImageBuildFailed, match="prologue script failed"):
        builder.build(PROLOGUE)
    player.join()
    assert sqs.list_queues().get("QueueUrls", []) == []
    assert ec2.describe_images(Owners=["self"])["Images"] == []


def test_a_silent_builder_times_out(aws) -> None:  # type: ignore[no-untyped-def]
    _, sqs, _, builder = aws
    builder.timeout = 0.3
    with pytest.raises(ImageBuildFailed, match="did not finish within"):
        builder.build(PROLOGUE)
    assert sqs.list_queues().get("QueueUrls", []) == []


async def test_a_build_image_job_waits_for_its_image_and_boots_from_it(aws, tmp_path) -> None:  # type: ignore[no-untyped-def]
    ec2, _, blobs, builder = aws
    settings = Settings(home=tmp_path, schedule_interval=0.1, batch_window=0.01, default_instance_type="c5.large")
    base = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    master = Master(settings, Backends(SqliteJobStore(tmp_path / "cbas.db"), blobs,
                                       LocalMessageBus(tmp_path, tmp_path / "cbas.db"),
                                       Ec2Cloud("lab", base, "#!/bin/true", ec2, instance_types=["c5.large"]), builder))
    (tmp_path / "install.sh").write_bytes(PROLOGUE[0][1])
    text = jdl.write(jdl.JobDescription(executable="/bin/true", prologue=("install.sh",), build_image=True))

    async def submit() -> str:
        job = await master.create_job("imaged")
        pack([Member(tmp_path / "install.sh", "install.sh")], tmp_path / "prologue.tar.zst")
        blobs.put_file(f"jobs/{job.id}/prologue.tar.zst", tmp_path / "prologue.tar.zst")
        await master.add_job(job.id, text)
        return job.id

    async def settled(job_id: str) -> Job:
        for _ in range(300):
            job = await master.store.get_job(job_id)
            if job.state in (JobState.PROVISIONING, JobState.FAILED):
                return job
            await asyncio.sleep(0.05)
        raise AssertionError(await master.store.list_events(job_id))

    player = play_builder(ec2, "ok")
    await master.start()
    try:
        first = await settled(await submit())
        await asyncio.to_thread(player.join)
        assert first.state == JobState.PROVISIONING and first.image_id
        [instance] = ec2.describe_instances(InstanceIds=[first.instance_id])["Reservations"][0]["Instances"]
        assert instance["ImageId"] == first.image_id != base  # the job's machine boots from its image
        kinds = [e.kind for e in await master.store.list_events(first.id)]
        assert kinds[:3] == ["queued", "image-building", "image-ready"]
        second = await settled(await submit())  # the same prologue: the cached image, no second builder
        assert second.image_id == first.image_id
        builders = ec2.describe_instances(Filters=[{"Name": "tag:cbas:role", "Values": ["image-builder"]}])["Reservations"]
        assert len(builders) == 1
        (tmp_path / "install.sh").write_bytes(b"#!/bin/sh\nexit 3\n")
        failing = play_builder(ec2, "failed")
        third = await settled(await submit())
        await asyncio.to_thread(failing.join)
        assert third.state == JobState.FAILED and "a prologue script failed" in (third.error or "")
    finally:
        await master.stop()
        await master.bus.close()
