"""Job images (the original AMICreator): a job's prologue run once into an AMI, reused by hash.

A builder instance runs the prologue scripts from presigned URLs and reports on a temporary SQS
queue whose policy lets only the builder's address send to it (the builder holds no credentials:
it calls SendMessage unsigned); the master then makes the image, and the builder, the queue and
the URLs go away whatever happened. Images are tagged with
the hash of the prologue files, so the same prologue is never built twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shlex
import time
from typing import Any, Callable

import structlog

from cbas.aws.retry import aws_retry

log = structlog.get_logger(__name__)
URL_SECONDS = 900


class ImageBuildFailed(RuntimeError):
    pass


def prologue_hash(files: list[tuple[str, bytes]]) -> str:
    digest = hashlib.sha256()
    for name, content in files:
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()


def send_command(queue_url: str, body: str) -> str:
    """An unsigned SendMessage on the query API; the queue's policy decides who may call it."""
    return f"curl -fsS -X POST --data 'Action=SendMessage&MessageBody={body}' {shlex.quote(queue_url)} >/dev/null"


def queue_policy(queue_arn: str, source_ip: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Principal": "*", "Action": "sqs:SendMessage", "Resource": queue_arn,
        "Condition": {"IpAddress": {"aws:SourceIp": f"{source_ip}/32"}}}]})


def builder_script(prologues: list[tuple[str, str]], queue_url: str) -> str:
    """User-data of the builder: fetch and run each prologue in order, then say how it went."""
    lines = ["#!/bin/bash", "set -euo pipefail",
             f"trap {shlex.quote(send_command(queue_url, 'failed'))} ERR",
             "install -d -m 0700 /var/lib/cbas-prologue", "cd /var/lib/cbas-prologue"]
    for name, url in prologues:
        lines += [f"curl -fsSL --retry 5 -o {shlex.quote(name)} {shlex.quote(url)}",
                  f"chmod +x {shlex.quote(name)}", f"./{shlex.quote(name)}"]
    lines += ["sync", send_command(queue_url, "ok")]
    return "\n".join(lines) + "\n"


class ImageBuilder:
    def __init__(self, ec2: Any, sqs: Any, blobs: Any, cluster: str, base_image: str,
                 instance_type: str = "c5.large", timeout: float = 3600.0, poll: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ec2, self.sqs, self.blobs = ec2, sqs, blobs
        self.cluster, self.base_image, self.instance_type = cluster, base_image, instance_type
        self.timeout, self.poll, self.clock = timeout, poll, clock

    def find(self, digest: str) -> str | None:
        images = aws_retry(self.ec2.describe_images)(Owners=["self"], Filters=[
            {"Name": "tag:cbas:prologue-hash", "Values": [digest]}, {"Name": "state", "Values": ["available"]}])["Images"]
        return images[0]["ImageId"] if images else None

    async def image_for(self, job_id: str, prologue: list[tuple[str, bytes]]) -> str:
        return await asyncio.to_thread(self.build, prologue)

    def build(self, files: list[tuple[str, bytes]]) -> str:
        """The image for these prologue files (name, content), in order: found by hash, or built now
        (blocking: run in a thread)."""
        digest = prologue_hash(files)
        cached = self.find(digest)
        if cached:
            log.info("image.cached", image_id=cached, prologue_hash=digest[:12])
            return cached
        prologue_keys = [f"images/{digest}/{index:02d}-{name}" for index, (name, _) in enumerate(files)]
        for key, (_, content) in zip(prologue_keys, files):
            self.blobs.put_bytes(key, content)
        queue_url = aws_retry(self.sqs.create_queue)(QueueName=f"cbas-{self.cluster}-image-{digest[:16]}")["QueueUrl"]
        instance_id = None
        try:
            script = builder_script([(name, self.blobs.presigned_get(key, URL_SECONDS)) for (name, _), key
                                     in zip(files, prologue_keys)], queue_url)
            tags = [{"Key": "cbas:cluster", "Value": self.cluster}, {"Key": "cbas:role", "Value": "image-builder"},
                    {"Key": "cbas:prologue-hash", "Value": digest}]
            instance_id = aws_retry(self.ec2.run_instances)(
                ImageId=self.base_image, InstanceType=self.instance_type, MinCount=1, MaxCount=1, UserData=script,
                MetadataOptions={"HttpTokens": "required", "HttpEndpoint": "enabled"},
                TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])["Instances"][0]["InstanceId"]
            self._let_builder_send(queue_url, instance_id)
            log.info("image.building", builder=instance_id, prologue_hash=digest[:12])
            self._wait_for_builder(queue_url)
            image_id = aws_retry(self.ec2.create_image)(
                InstanceId=instance_id, Name=f"cbas-{self.cluster}-{digest[:16]}",
                TagSpecifications=[{"ResourceType": "image", "Tags": tags}])["ImageId"]
            log.info("image.ready", image_id=image_id, prologue_hash=digest[:12])
            return str(image_id)
        finally:  # the builder and its queue go, whatever happened
            if instance_id:
                aws_retry(self.ec2.terminate_instances)(InstanceIds=[instance_id])
            aws_retry(self.sqs.delete_queue)(QueueUrl=queue_url)
            for key in prologue_keys:
                self.blobs.delete(key)

    def _let_builder_send(self, queue_url: str, instance_id: str) -> None:
        address = None
        for _ in range(60):  # a public address comes with the instance, soon after launch
            instance = aws_retry(self.ec2.describe_instances)(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
            address = instance.get("PublicIpAddress")
            if address:
                break
            time.sleep(self.poll)
        if not address:
            raise ImageBuildFailed("the image builder got no public address to report from")
        arn = self.sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        aws_retry(self.sqs.set_queue_attributes)(QueueUrl=queue_url, Attributes={"Policy": queue_policy(arn, address)})

    def _wait_for_builder(self, queue_url: str) -> None:
        deadline = self.clock() + self.timeout
        while self.clock() < deadline:
            wait = int(min(self.poll, 20))  # long polling; whole seconds only
            messages = self.sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=wait,
                                                MaxNumberOfMessages=1).get("Messages", [])
            if not messages and wait == 0:
                time.sleep(self.poll)
            for message in messages:
                if message["Body"] == "ok":
                    return
                raise ImageBuildFailed("a prologue script failed on the image builder (see its console output)")
        raise ImageBuildFailed(f"the image builder did not finish within {self.timeout:.0f}s")
