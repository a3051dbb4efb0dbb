"""The master's queue on moto: SNS delivers the master's messages (filter recipient=master) into
the queue bootstrap made, as signed notifications; the poller verifies each and settles it by
what the inbox says (handled or refused: deleted; not yet, or failed: back after a backoff);
forged, unreadable and stale bodies are deleted unhandled."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from typing import Any, Iterator

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from cbas.aws.bootstrap import Bootstrap
from cbas.aws.bus import SnsMessageBus
from cbas.aws.sns import CertificateCache, SnsVerifier
from cbas.aws.sqs_inbox import InboxUnavailable, QueueInbox, retry_delay
from cbas.backends import InvalidMessage
from cbas.master.gate import NotYet, Refused
from cbas.master.metrics import Metrics
from cbas.messages import MASTER, Envelope, MessageType, Ping, StopJob, envelope
from cbas.models import utcnow
from tests.aws.test_bus import moto_certificates

REGION = "us-east-1"


class FakeInbox:
    """Inbox.take's contract: each call is recorded; `raises[id]` is raised (a list: one per call);
    a message whose id is in `hangs` is never done with."""

    def __init__(self) -> None:
        self.taken: list[Envelope] = []
        self.raises: dict[str, list[BaseException]] = {}
        self.hangs: set[str] = set()

    async def take(self, message: Envelope) -> tuple[str, str | None]:
        self.taken.append(message)
        if message.id in self.hangs:
            await asyncio.Event().wait()
        pending = self.raises.get(message.id)
        if pending:
            raise pending.pop(0)
        return "handled", None


class Cluster:
    def __init__(self) -> None:
        made = Bootstrap("q", REGION, boto3.session.Session(region_name=REGION)).up().settings
        self.topic, self.queue_url = made["CBAS_AWS_TOPIC_ARN"], made["CBAS_AWS_INBOX_QUEUE_URL"]
        self.sns = boto3.client("sns", region_name=REGION)
        self.sqs = boto3.client("sqs", region_name=REGION)
        self.bus = SnsMessageBus(self.topic, SnsVerifier(self.topic, moto_certificates()), self.sns)
        self.inbox = FakeInbox()
        self.metrics = Metrics()

    def poller(self, **kwargs: Any) -> QueueInbox:
        options: dict[str, Any] = {"ping_max_age": 120.0, "wait_seconds": 1, "delay": lambda receives: 0}
        return QueueInbox(self.queue_url, kwargs.pop("sqs", self.sqs), kwargs.pop("bus", self.bus), self.inbox,
                          self.metrics, **{**options, **kwargs})

    async def send(self, kind: MessageType = MessageType.PING, **body: Any) -> Envelope:
        message = envelope(kind, Ping(instance_id="i-1", **body), "worker/i-1", MASTER)
        await self.bus.send(message)
        return message

    def counts(self) -> tuple[int, int]:
        """Messages waiting, and received but not settled."""
        attributes = self.sqs.get_queue_attributes(QueueUrl=self.queue_url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attributes["ApproximateNumberOfMessages"]), int(attributes["ApproximateNumberOfMessagesNotVisible"])

    def raw(self) -> str:
        """The one body waiting, as SNS left it, taken out of the queue."""
        got = self.sqs.receive_message(QueueUrl=self.queue_url, WaitTimeSeconds=1)["Messages"][0]
        self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=got["ReceiptHandle"])
        return str(got["Body"])

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    with mock_aws():
        yield Cluster()


async def test_only_the_masters_messages_reach_its_queue_as_signed_notifications(cluster: Cluster) -> None:
    sent = await cluster.send()
    await cluster.bus.send(envelope(MessageType.STOP_JOB, StopJob(job_id="j", reason="x"), MASTER, "worker/i-1"))
    body = json.loads(cluster.raw())
    assert body["Type"] == "Notification" and body["Signature"] and body["TopicArn"] == cluster.topic
    assert cluster.bus.parse_delivery(json.dumps(body).encode()) == sent  # verifies as an HTTP delivery would
    assert cluster.counts() == (0, 0)  # the worker's message never came


@pytest.mark.parametrize("error, kept", [
    (Refused("sender", "a machine speaks only for itself"), False),
    (NotYet("the launch of machine l-1 is not recorded yet"), True),
    (RuntimeError("DynamoDB is away"), True),
])
async def test_refused_messages_are_deleted_and_not_yet_or_failed_ones_come_back(
        cluster: Cluster, error: Exception, kept: bool) -> None:
    message = await cluster.send()
    cluster.inbox.raises[message.id] = [error]
    poller = cluster.poller()
    assert await poller.poll_once() == 1
    assert cluster.inbox.taken == [message]
    if kept:  # visible again at once (the test's backoff is 0 s), and handled then
        assert await poller.poll_once() == 1
        assert cluster.inbox.taken == [message, message]
    else:
        assert cluster.metric("cbas_messages_refused_total", reason="sender") == 1
    assert await poller.poll_once() == 0
    assert cluster.counts() == (0, 0)  # deleted, once handled or refused


async def test_a_handler_that_hangs_is_given_up_and_its_message_comes_back(cluster: Cluster) -> None:
    message = await cluster.send()
    cluster.inbox.hangs.add(message.id)
    poller = cluster.poller(handle_seconds=0.1)  # (by default 50 s: before the visibility timeout ends)
    assert await poller.poll_once() == 1
    cluster.inbox.hangs.clear()
    assert await poller.poll_once() == 1
    assert cluster.inbox.taken == [message, message] and cluster.counts() == (0, 0)


async def test_a_message_left_for_later_is_hidden_for_a_growing_backoff(cluster: Cluster) -> None:
    message = await cluster.send()
    cluster.inbox.raises[message.id] = [NotYet("not recorded yet")]
    await cluster.poller(delay=retry_delay).poll_once()
    assert cluster.counts() == (0, 1)  # received, left, hidden for 2 s (not the 60 s visibility timeout)
    assert [retry_delay(n) for n in (1, 2, 3, 10, 11, 100)] == [2, 4, 8, 900, 900, 900]


async def test_forged_unreadable_and_foreign_bodies_are_deleted_and_never_handled(cluster: Cluster) -> None:
    await cluster.send()
    genuine = json.loads(cluster.raw())
    forged = dict(genuine, Message=genuine["Message"].replace("i-1", "i-2"))  # the signature no longer fits
    other_topic = dict(genuine, TopicArn=cluster.topic + "-other")
    for body in (json.dumps(forged), "not json at all", json.dumps(other_topic), json.dumps({"Type": "Notification"})):
        cluster.sqs.send_message(QueueUrl=cluster.queue_url, MessageBody=body)
    poller = cluster.poller()
    while await poller.poll_once():
        pass
    assert cluster.inbox.taken == []
    assert cluster.counts() == (0, 0)
    assert cluster.metric("cbas_messages_rejected_total") == 4


async def test_a_ping_older_than_the_dead_worker_time_is_dropped_and_a_fresh_one_handled(cluster: Cluster) -> None:
    old = envelope(MessageType.PING, Ping(instance_id="i-1"), "worker/i-1", MASTER).model_copy(
        update={"sent_at": utcnow() - timedelta(minutes=10)})
    await cluster.bus.send(old)
    fresh = await cluster.send()
    poller = cluster.poller()
    while await poller.poll_once():
        pass
    assert cluster.inbox.taken == [fresh]
    assert cluster.metric("cbas_messages_ignored_total", reason="old-ping") == 1
    assert cluster.counts() == (0, 0)


async def test_a_notification_hours_old_is_still_read_from_the_queue(cluster: Cluster) -> None:
    """The HTTP verifier refuses a notification over an hour old; the queue's accepts it: it may
    have waited there (up to 14 days) for the master to come back."""
    sent = await cluster.send()
    body = cluster.raw()
    later = time.time() + 5 * 3600
    bus = SnsMessageBus(cluster.topic, SnsVerifier(cluster.topic, moto_certificates(), clock=lambda: later),
                        cluster.sns)
    with pytest.raises(InvalidMessage, match="stale"):
        bus.parse_delivery(body.encode())
    cluster.sqs.send_message(QueueUrl=cluster.queue_url, MessageBody=body)  # put back as SNS left it
    await cluster.poller(bus=bus).poll_once()
    assert cluster.inbox.taken == [sent]


async def test_without_its_signing_certificate_a_message_is_kept(cluster: Cluster) -> None:
    sent = await cluster.send()

    def unreachable(url: str) -> bytes:
        raise OSError("no route to sns.us-east-1.amazonaws.com")

    blind = SnsMessageBus(cluster.topic, SnsVerifier(cluster.topic, CertificateCache(unreachable)), cluster.sns)
    await cluster.poller(bus=blind).poll_once()
    assert cluster.inbox.taken == [] and cluster.metric("cbas_messages_rejected_total") == 0
    await cluster.poller().poll_once()  # the certificate is reachable again
    assert cluster.inbox.taken == [sent]


class Flaky:
    """The SQS client, failing its first `failures` receives."""

    def __init__(self, sqs: Any, failures: int) -> None:
        self.sqs, self.failures = sqs, failures

    def receive_message(self, **kwargs: Any) -> Any:
        if self.failures:
            self.failures -= 1
            raise ClientError({"Error": {"Code": "ServiceUnavailable", "Message": "try later"}}, "ReceiveMessage")
        return self.sqs.receive_message(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sqs, name)


async def test_queue_errors_are_waited_out_and_a_cancel_stops_even_a_long_poll(cluster: Cluster) -> None:
    sent = await cluster.send()
    task = asyncio.create_task(cluster.poller(sqs=Flaky(cluster.sqs, 3), error_backoff=0.01, wait_seconds=20).run())
    for _ in range(100):
        if cluster.inbox.taken:
            break
        await asyncio.sleep(0.05)
    assert cluster.inbox.taken == [sent] and not task.done()
    await asyncio.sleep(0.2)  # now in a 20-second long poll of an empty queue
    began = time.monotonic()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled() and time.monotonic() - began < 1.0


async def test_a_missing_queue_says_to_run_bootstrap(cluster: Cluster) -> None:
    await cluster.poller().open()
    gone = cluster.poller()
    gone.queue_url = cluster.queue_url + "-gone"
    with pytest.raises(InboxUnavailable, match="cbas aws bootstrap"):
        await gone.open()
