"""A job through the AWS backends on moto: master and worker talk only through SNS (every
delivery signature-checked; the master's wait in its SQS queue, which it reads as `cbas master`
does), state in DynamoDB, files in S3, the machine an EC2 instance. The
instance is "booted" by starting the worker here with that instance's id. moto's IAM is on: the
cluster comes from `Bootstrap` run by an administrator, the master signs as a user with the
master's policy, the worker as a session of the instance role (which reaches no S3), and the
worker reaches the job's files only with the credentials the master sends it."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from pathlib import Path

import aiohttp
import boto3
from aiohttp import web
from moto import mock_aws

from cbas import jdl
from cbas.archive import Member, pack
from cbas.authority import Credential
from cbas.aws.bootstrap import Bootstrap, master_policy, worker_policy
from cbas.aws.bus import SnsMessageBus
from cbas.aws.dynamodb import DynamoJobStore
from cbas.aws.ec2 import Ec2Cloud, presigned_user_data, publish_worker_wheel
from cbas.aws.job_access import ScopedJobBlobs, StsJobCredentials
from cbas.aws.s3 import S3BlobStore
from cbas.aws.sns import SnsVerifier
from cbas.aws.sqs_inbox import QueueInbox
from cbas.local.metadata import metadata_app
from cbas.master.app import INBOX_KEY, create_app
from cbas.master.service import Backends, Master
from cbas.settings import Settings
from cbas.state import JobState
from cbas.worker.credential import key_file, read_credential, write_credential
from cbas.worker.daemon import Worker
from cbas.worker.imds import MetadataClient
from tests.aws.iam import ACCOUNT, ADMIN_POLICY, enforced, instance_role_keys, moto_view, session_of, user, user_arn
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
        admin, _ = user(boto3.client("iam", region_name=REGION), "admin", ADMIN_POLICY)
        master_aws, _ = user(admin.client("iam"), "cbas-master", moto_view(master_policy(
            f"cbas-e2e-{ACCOUNT}-{REGION}", REGION, ACCOUNT, "e2e")), REGION)
        with enforced():
            await run_job(home, admin, master_aws)


async def run_job(home: Path, admin: boto3.session.Session, master_aws: boto3.session.Session) -> None:
    made = Bootstrap("e2e", REGION, admin, master_principal=user_arn("cbas-master")).up().settings
    bucket, topic = made["CBAS_AWS_BUCKET"], made["CBAS_AWS_TOPIC_ARN"]
    # moto checks SNS and EC2 calls against "*" only: the instance role's policy as moto can apply it
    admin.client("iam").put_role_policy(RoleName="cbas-e2e-worker", PolicyName="cbas-worker",
                                        PolicyDocument=json.dumps(moto_view(worker_policy(topic, "e2e"))))
    s3, sns, ec2 = (master_aws.client(n) for n in ("s3", "sns", "ec2"))
    image = admin.client("ec2").describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    settings = Settings(home=home, backend="aws", cluster="e2e", ping_interval=0.5, schedule_interval=0.3,
                        batch_window=0.05, notice_poll_interval=0.2, log_upload_interval=0.3,
                        default_instance_type="c5.large", aws_bucket=bucket, aws_region=REGION)
    verifier = SnsVerifier(topic, moto_certificates())
    blobs = S3BlobStore(bucket, s3)
    store = DynamoJobStore(made["CBAS_AWS_TABLE"], master_aws.resource("dynamodb"))
    (home / "cbas-0.0.0-py3-none-any.whl").write_bytes(b"PK")
    wheel_key = publish_worker_wheel(blobs, home / "cbas-0.0.0-py3-none-any.whl")
    user_data = presigned_user_data(blobs, wheel_key, {"CBAS_BACKEND": "aws"})
    cloud = Ec2Cloud("e2e", image, user_data, ec2, instance_types=["c5.large"])
    # 15-minute credentials: each ping asks for fresh ones (within 20 minutes of their end)
    credentials = StsJobCredentials(master_aws.client("sts"), "e2e", bucket, seconds=900)
    master = Master(settings, Backends(store, blobs, SnsMessageBus(topic, verifier, sns), cloud,
                                       job_credentials=credentials))
    app = create_app(master, "token")
    master_runner, master_url = await serve(app)
    assert isinstance(master.bus, SnsMessageBus)
    queue = QueueInbox(made["CBAS_AWS_INBOX_QUEUE_URL"], master_aws.client("sqs"), master.bus, app[INBOX_KEY],
                       master.metrics, ping_max_age=settings.dead_after(), wait_seconds=1)
    await queue.open()
    await master.start()
    reading = asyncio.create_task(queue.run())
    worker_task = None
    metadata_runner = None
    try:
        job = await master.create_job("hello")
        (home / "in").mkdir()
        (home / "in" / "input.txt").write_text("from S3\n")
        pack([Member(home / "in" / "input.txt", "input.txt")], home / "input.tar.zst")
        blobs.put_file(f"jobs/{job.id}/input.tar.zst", home / "input.tar.zst")
        text = jdl.write(jdl.JobDescription(
            executable="/bin/sh", arguments="-c 'cat input.txt > out.txt; sleep 1; echo done'",
            input_sandbox=("input.txt",), output_sandbox=("out.txt",)))
        async with aiohttp.ClientSession() as session:  # as `cbas submit` does, with the API token
            async with session.post(f"{master_url}/api/jobs/{job.id}/submit", json={"jdl": text},
                                    headers={"Authorization": "Bearer token"}) as response:
                assert response.status == 200, await response.text()
        await wait_for(master, job.id, {JobState.PROVISIONING})
        instance_id = (await store.get_job(job.id)).instance_id
        assert instance_id and instance_id.startswith("i-")
        described = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        assert described["InstanceLifecycle"] == "spot"
        assert described["MetadataOptions"]["HttpPutResponseHopLimit"] == 1

        disk = home / "machines" / instance_id  # the instance boots: its worker starts
        (disk / "metadata").mkdir(parents=True)
        disk.chmod(0o711)
        # its user-data names its key's object (the real boot script fetches it through the
        # presigned URL; moto's decorator mode serves no URLs, so the test reads the object)
        script = base64.b64decode(ec2.describe_instance_attribute(
            InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]).decode()
        ledger_id = re.search(r"echo '([^']+)' > /var/lib/cbas/worker/ledger-id", script).group(1)  # type: ignore[union-attr]
        drop = f"machines/{ledger_id}/key"
        assert drop in script and blobs.get_bytes(drop).decode() not in script
        write_credential(key_file(disk).parent, Credential(ledger_id, bytes.fromhex(blobs.get_bytes(drop).decode())))
        (home / "machines").chmod(0o711)
        (disk / "metadata" / "instance-id").write_text(instance_id)
        metadata_runner, metadata_url = await serve(metadata_app(disk / "metadata"))
        # the machine's own AWS identity: a session of the instance role, which reaches no S3
        machine_aws = session_of(instance_role_keys("cbas-e2e-worker", instance_id))
        files = ScopedJobBlobs(bucket, REGION)
        accepted: list[str] = []
        accept = files.accept
        files.accept = lambda key, job_id, sealed: (accepted.append(job_id), accept(key, job_id, sealed))[1]  # type: ignore[method-assign]
        worker = Worker(settings, instance_id, disk, MetadataClient(metadata_url), S3BlobStore(bucket, machine_aws.client("s3")),
                        SnsMessageBus(topic, verifier, machine_aws.client("sns")), credential=read_credential(key_file(disk)),
                        job_blobs=files)
        worker_task = asyncio.create_task(worker.run(install_signals=False))

        await wait_for(master, job.id, {JobState.COMPLETED, JobState.FAILED})
        finished = await store.get_job(job.id)
        assert finished.state == JobState.COMPLETED, await store.list_events(job.id)
        assert accepted[0] == job.id and len(accepted) >= 2  # START_JOB's access, then at least one DATA_ACCESS
        assert not blobs.exists(drop)  # deleted once the worker announced itself
        assert blobs.exists(f"jobs/{job.id}/output.tar.zst")
        assert b"done" in blobs.get_bytes(f"jobs/{job.id}/logs/stdout")
        for _ in range(50):  # the master lets the machine go just after recording the job's end
            state = ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]["State"]["Name"]
            if state == "terminated":
                break
            await asyncio.sleep(0.1)
        assert state == "terminated"
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
        for task in (worker_task, reading):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await master.stop()
        await master.bus.close()
        await master_runner.cleanup()
        if metadata_runner is not None:
            await metadata_runner.cleanup()
