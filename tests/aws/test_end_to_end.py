"""A job through the AWS backends on moto: master and worker talk only through SNS (every
delivery signature-checked), state in DynamoDB, files in S3, the machine an EC2 instance. The
instance is "booted" by starting the worker here with that instance's id."""

from __future__ import annotations

import asyncio

import boto3
from aiohttp import web
from moto import mock_aws

from cbas import jdl
from cbas.archive import Member, pack
from cbas.aws.bus import SnsMessageBus
from cbas.aws.dynamodb import DynamoJobStore
from cbas.aws.ec2 import Ec2Cloud
from cbas.aws.s3 import S3BlobStore
from cbas.aws.sns import SnsVerifier
from cbas.local.metadata import metadata_app
from cbas.master.app import create_app
from cbas.master.service import Backends, Master
from cbas.messages import MASTER, AddJob, MessageType, envelope
from cbas.settings import Settings
from cbas.state import JobState
from cbas.worker.daemon import Worker
from cbas.worker.imds import MetadataClient
from tests.aws.test_bus import moto_certificates
from tests.homes import reachable_tmp

REGION = "us-east-1"


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]


async def wait_for(master: Master, job_id: str, states: set[JobState], timeout: float = 60) -> None:
    for _ in range(int(timeout / 0.1)):
        if (await master.store.get_job(job_id)).state in states:
            return
        await asyncio.sleep(0.1)
    job = await master.store.get_job(job_id)
    raise AssertionError(f"job still {job.state}: {await master.store.list_events(job_id)}")


async def test_a_job_runs_on_the_aws_backends() -> None:
    with mock_aws(), reachable_tmp() as home:
        s3, sns, ec2 = (boto3.client(n, region_name=REGION) for n in ("s3", "sns", "ec2"))
        s3.create_bucket(Bucket="cbas-e2e")
        topic = sns.create_topic(Name="cbas-e2e")["TopicArn"]
        image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        settings = Settings(home=home, backend="aws", cluster="e2e", ping_interval=0.5, schedule_interval=0.3,
                            batch_window=0.05, notice_poll_interval=0.2, log_upload_interval=0.3,
                            default_instance_type="c5.large")
        verifier = SnsVerifier(topic, moto_certificates())
        blobs = S3BlobStore("cbas-e2e", s3)
        store = DynamoJobStore("cbas-e2e", boto3.resource("dynamodb", region_name=REGION))
        cloud = Ec2Cloud("e2e", image, "#!/bin/true", ec2, instance_types=["c5.large"])
        master = Master(settings, Backends(store, blobs, SnsMessageBus(topic, verifier, sns), cloud))
        master_runner, master_url = await serve(create_app(master, "token"))
        await master.bus.subscribe(MASTER, f"{master_url}/messages")
        await master.start()
        worker_task = None
        metadata_runner = None
        try:
            job = await master.create_job("hello")
            (home / "in").mkdir()
            (home / "in" / "input.txt").write_text("from S3\n")
            pack([Member(home / "in" / "input.txt", "input.txt")], home / "input.tar.zst")
            blobs.put_file(f"jobs/{job.id}/input.tar.zst", home / "input.tar.zst")
            text = jdl.write(jdl.JobDescription(
                executable="/bin/sh", arguments="-c 'cat input.txt > out.txt; echo done'",
                input_sandbox=("input.txt",), output_sandbox=("out.txt",)))
            await master.bus.send(envelope(MessageType.ADD_JOB, AddJob(job_id=job.id, jdl=text), "cli", MASTER))
            await wait_for(master, job.id, {JobState.PROVISIONING})
            instance_id = (await store.get_job(job.id)).instance_id
            assert instance_id and instance_id.startswith("i-")
            described = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
            assert described["InstanceLifecycle"] == "spot"

            disk = home / "machines" / instance_id  # the instance boots: its worker starts
            (disk / "metadata").mkdir(parents=True)
            disk.chmod(0o711)
            (home / "machines").chmod(0o711)
            (disk / "metadata" / "instance-id").write_text(instance_id)
            metadata_runner, metadata_url = await serve(metadata_app(disk / "metadata"))
            worker = Worker(settings, instance_id, disk, MetadataClient(metadata_url), blobs,
                            SnsMessageBus(topic, verifier, sns))
            worker_task = asyncio.create_task(worker.run(install_signals=False))

            await wait_for(master, job.id, {JobState.COMPLETED, JobState.FAILED})
            finished = await store.get_job(job.id)
            assert finished.state == JobState.COMPLETED, await store.list_events(job.id)
            assert blobs.exists(f"jobs/{job.id}/output.tar.zst")
            assert b"done" in blobs.get_bytes(f"jobs/{job.id}/logs/stdout")
            state = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]
            assert state == "terminated"  # the master let the machine go
            for _ in range(50):  # the master closes the ledger entry just after terminating the machine
                ledger = await store.list_ledger(live_only=False)
                if [e.state.value for e in ledger] == ["TERMINATED"]:
                    break
                await asyncio.sleep(0.1)
            assert [e.state.value for e in ledger] == ["TERMINATED"], [e.model_dump() for e in ledger]
            kinds = [e.kind for e in await store.list_events(job.id)]
            assert kinds[:3] == ["queued", "provisioning", "starting"] and kinds[-1] == "completed"
            assert (await store.list_ledger(live_only=False))[0].price > 0  # the spot price it was placed at
        finally:
            if worker_task is not None:
                worker_task.cancel()
                await asyncio.gather(worker_task, return_exceptions=True)
            await master.stop()
            await master.bus.close()
            await master_runner.cleanup()
            if metadata_runner is not None:
                await metadata_runner.cleanup()
