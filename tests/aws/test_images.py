"""The image builder on moto: the test plays the builder instance by calling its presigned
SQS URL, as the instance's user-data would with curl."""

from __future__ import annotations

import base64
import json
import re
import threading
import time

import boto3
import pytest
import requests
from moto import mock_aws

from cbas.aws.images import ImageBuildFailed, ImageBuilder, prologue_hash
from cbas.aws.s3 import S3BlobStore


@pytest.fixture
def aws():
    with mock_aws():
        ec2 = boto3.client("ec2", region_name="us-east-1")
        sqs = boto3.client("sqs", region_name="us-east-1")
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="cbas-images")
        blobs = S3BlobStore("cbas-images", s3)
        blobs.put_bytes("jobs/j1/prologue/install.sh", b"#!/bin/sh\napt-get install -y octave\n")
        base = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        yield ec2, sqs, blobs, ImageBuilder(ec2, sqs, blobs, "lab", base, poll=0.1, timeout=10)


def play_builder(ec2, outcome: str) -> threading.Thread:  # type: ignore[no-untyped-def]
    sqs_client = boto3.client("sqs", region_name="us-east-1")
    """Wait for the builder instance, read its user-data, and call the URL it would call."""
    def run() -> None:
        for _ in range(100):
            reservations = ec2.describe_instances(Filters=[{"Name": "tag:cbas:role", "Values": ["image-builder"]},
                                                           {"Name": "instance-state-name", "Values": ["pending", "running"]}])["Reservations"]
            if reservations:
                instance = reservations[0]["Instances"][0]["InstanceId"]
                data = ec2.describe_instance_attribute(InstanceId=instance, Attribute="userData")["UserData"]["Value"]
                script = base64.b64decode(data).decode()
                queue = sqs_client.list_queues()["QueueUrls"][0]
                policy = sqs_client.get_queue_attributes(QueueUrl=queue, AttributeNames=["Policy"])["Attributes"].get("Policy")
                thread.sent_policy = json.loads(policy) if policy else {}  # type: ignore[attr-defined]
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
    image = builder.build(["jobs/j1/prologue/install.sh"])
    player.join()
    tags = {t["Key"]: t["Value"] for t in ec2.describe_images(ImageIds=[image])["Images"][0]["Tags"]}
    assert tags["cbas:prologue-hash"] == prologue_hash([("install.sh", blobs.get_bytes("jobs/j1/prologue/install.sh"))])
    assert sqs.list_queues().get("QueueUrls", []) == []  # the queue is gone
    states = [i["State"]["Name"] for r in ec2.describe_instances()["Reservations"] for i in r["Instances"]
              if any(t["Value"] == "image-builder" for t in i.get("Tags", []))]
    assert states == ["terminated"]
    assert builder.build(["jobs/j1/prologue/install.sh"]) == image  # the same prologue: the cached image
    assert player.sent_policy["Statement"][0]["Condition"]["IpAddress"]["aws:SourceIp"].endswith("/32")


def test_a_failing_prologue_fails_clearly_and_cleans_up(aws) -> None:  # type: ignore[no-untyped-def]
    ec2, sqs, _, builder = aws
    player = play_builder(ec2, "failed")
    with pytest.raises(ImageBuildFailed, match="prologue script failed"):
        builder.build(["jobs/j1/prologue/install.sh"])
    player.join()
    assert sqs.list_queues().get("QueueUrls", []) == []
    assert ec2.describe_images(Owners=["self"])["Images"] == []


def test_a_silent_builder_times_out(aws) -> None:  # type: ignore[no-untyped-def]
    _, sqs, _, builder = aws
    builder.timeout = 0.3
    with pytest.raises(ImageBuildFailed, match="did not finish within"):
        builder.build(["jobs/j1/prologue/install.sh"])
    assert sqs.list_queues().get("QueueUrls", []) == []
