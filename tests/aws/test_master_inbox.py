"""The master's inbox on AWS is durable: `cbas master` (the daemon itself, in this process, on
moto with its IAM on) reads its messages from the queue bootstrap made, so a worker's message
published while no master runs is handled when one starts, and a master's stop leaves the queue
and its subscription in place. (Before the queue, the master subscribed its HTTP endpoint at
start and unsubscribed it at stop: SNS dropped what came in between.)"""

from __future__ import annotations

import asyncio
import json
import threading
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import boto3
import pytest
from moto import mock_aws

from cbas.authority import Credential, sign
from cbas.aws.bootstrap import Bootstrap, master_policy, worker_policy
from cbas.aws.bus import SnsMessageBus
from cbas.aws.dynamodb import DynamoJobStore
from cbas.aws.sns import CertificateCache, SnsVerifier
from cbas.master.daemon import serve
from cbas.messages import MASTER, MessageType, WorkerStarted, envelope, worker_address
from cbas.settings import Settings
from cbas.state import JobState
from tests.aws.iam import ACCOUNT, ADMIN_POLICY, enforced, instance_role_keys, moto_view, session_of, user, user_arn
from tests.homes import reachable_tmp

REGION = "us-east-1"
CLUSTER = "durable"


def certificate_server() -> ThreadingHTTPServer:
    """Serves moto's SNS signing certificates by name (CBAS_AWS_SNS_CERTIFICATE_ENDPOINT): in
    decorator mode moto serves no URLs."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sns.models import sns_backends

    class Certificates(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            pem = sns_backends[DEFAULT_ACCOUNT_ID][REGION]._message_public_keys.get(self.path.lstrip("/"))
            self.send_response(200 if pem else 404)
            self.send_header("Content-Length", str(len(pem or b"")))
            self.end_headers()
            self.wfile.write(pem or b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Certificates)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Cluster:
    """A bootstrapped cluster, the master's settings, and the parties' AWS identities."""

    def __init__(self, home: Path, monkeypatch: pytest.MonkeyPatch, certificates: str) -> None:
        iam = boto3.client("iam", region_name=REGION)
        self.admin, _ = user(iam, "admin", ADMIN_POLICY, REGION)
        _, master_keys = user(self.admin.client("iam"), "cbas-master", moto_view(master_policy(
            f"cbas-{CLUSTER}-{ACCOUNT}-{REGION}", REGION, ACCOUNT, CLUSTER)), REGION)
        with enforced():
            made = Bootstrap(CLUSTER, REGION, self.admin, master_principal=user_arn("cbas-master")).up().settings
        self.topic = made["CBAS_AWS_TOPIC_ARN"]
        self.admin.client("iam").put_role_policy(RoleName=f"cbas-{CLUSTER}-worker", PolicyName="cbas-worker",
                                                 PolicyDocument=json.dumps(moto_view(worker_policy(self.topic, CLUSTER))))
        for name, value in master_keys.items():  # `cbas master` signs as the master's user
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
        monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # it keeps the credentials it first found
        (home / "cbas-0.0.0-py3-none-any.whl").write_bytes(b"PK")
        fields = {k.removeprefix("CBAS_").lower(): v for k, v in made.items() if k != "CBAS_AWS_SECURITY_GROUPS"}
        self.settings = Settings(
            home=home / "master", master_host="127.0.0.1", master_port=0, public_url="http://127.0.0.1:{port}",
            aws_image_id=self.admin.client("ec2").describe_images(Owners=["amazon"])["Images"][0]["ImageId"],
            aws_worker_wheel=home / "cbas-0.0.0-py3-none-any.whl", aws_security_groups=json.loads(
                made["CBAS_AWS_SECURITY_GROUPS"]), aws_sns_certificate_endpoint=certificates,
            default_instance_type="c5.large", batch_window=0.05,
            **fields)
        self.store = DynamoJobStore(made["CBAS_AWS_TABLE"], self.admin.resource("dynamodb"))
        self.sns = self.admin.client("sns")

    @asynccontextmanager
    async def master(self) -> AsyncIterator[str]:
        """`cbas master` running (its URL); stopped as at SIGTERM, its `finally` and all, on exit."""
        ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(serve(self.settings, on_ready=ready.set_result))
        try:
            done, _ = await asyncio.wait([ready, task], timeout=30, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                task.result()  # its error
            assert ready in done, "the master did not start"
            yield ready.result()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def job_on_a_machine(self, url: str) -> tuple[str, str]:
        """A job submitted as `cbas submit` does, placed on an EC2 machine: its id and the machine's."""
        token = (self.settings.home / "api-token").read_text()
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/api/jobs", json={"name": "durable"}, headers=headers) as response:
                job_id = (await response.json())["job_id"]
            async with session.post(f"{url}/api/jobs/{job_id}/submit", headers=headers,
                                    json={"jdl": 'Executable = "/bin/true";'}) as response:
                assert response.status == 200, await response.text()
        await self.wait_for(job_id, JobState.PROVISIONING)
        instance_id = (await self.store.get_job(job_id)).instance_id
        assert instance_id
        return job_id, instance_id

    async def wait_for(self, job_id: str, state: JobState, timeout: float = 20) -> None:
        for _ in range(int(timeout / 0.1)):
            if (await self.store.get_job(job_id)).state == state:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"job {job_id} never {state}: {[e.kind for e in await self.store.list_events(job_id)]}")

    async def worker_says_started(self, instance_id: str) -> None:
        """What the machine's worker sends first, signed with the machine's key, published with the
        instance role's credentials (the key is where the boot script fetches it)."""
        entry = next(e for e in await self.store.list_ledger(live_only=True) if e.instance_id == instance_id)
        bucket = self.settings.aws_bucket
        key = self.admin.client("s3").get_object(Bucket=bucket, Key=f"machines/{entry.id}/key")["Body"].read()
        message = sign(envelope(MessageType.WORKER_STARTED, WorkerStarted(instance_id=instance_id),
                                worker_address(instance_id), MASTER), Credential(entry.id, bytes.fromhex(key.decode())))
        machine = session_of(instance_role_keys(f"cbas-{CLUSTER}-worker", instance_id))
        bus = SnsMessageBus(self.topic, SnsVerifier(self.topic, CertificateCache(lambda url: b"")), machine.client("sns"))
        await bus.send(message)

    def subscriptions(self) -> list[dict[str, Any]]:
        found = []
        for subscription in self.sns.list_subscriptions_by_topic(TopicArn=self.topic)["Subscriptions"]:
            attributes = self.sns.get_subscription_attributes(SubscriptionArn=subscription["SubscriptionArn"])
            found.append({**subscription, "FilterPolicy": json.loads(attributes["Attributes"].get("FilterPolicy", "{}"))})
        return found


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[Cluster]:
    with mock_aws(), reachable_tmp() as home:
        certificates = certificate_server()
        try:
            made = Cluster(home, monkeypatch, f"http://127.0.0.1:{certificates.server_port}")
            with enforced():
                yield made
        finally:
            certificates.shutdown()
            certificates.server_close()


async def test_a_message_sent_while_no_master_runs_is_handled_when_one_starts(cluster: Cluster) -> None:
    async with cluster.master() as url:
        job_id, instance_id = await cluster.job_on_a_machine(url)
    # the master is gone (restarting, upgraded, down for hours): the machine boots and says so
    await cluster.worker_says_started(instance_id)
    await asyncio.sleep(1)  # longer than anything SNS would push it for in moto (one synchronous try)
    async with cluster.master():
        await cluster.wait_for(job_id, JobState.STARTING)
        events = [e.kind for e in await cluster.store.list_events(job_id)]  # written with the state, in one write
    assert events[-1] == "starting" and events.count("starting") == 1, events


async def test_the_masters_stop_leaves_its_queue_and_subscription_in_place(cluster: Cluster) -> None:
    before = cluster.subscriptions()
    queue = [s for s in before if s["Protocol"] == "sqs"]
    assert len(queue) == 1 and queue[0]["FilterPolicy"] == {"recipient": ["master"]}
    async with cluster.master():
        assert cluster.subscriptions() == before  # the master subscribes nothing: it reads the queue
        # not at once: a stop just as the scheduler's wake-up fires can be lost (asyncio.wait_for
        # of Python 3.11 swallows that cancellation; Master._loop, the lead's, uses it)
        await asyncio.sleep(0.5)
    assert cluster.subscriptions() == before
    sqs = cluster.admin.client("sqs")
    assert sqs.get_queue_url(QueueName=f"cbas-{CLUSTER}-master-inbox")["QueueUrl"] == cluster.settings.aws_inbox_queue_url
