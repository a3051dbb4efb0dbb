"""The SNS message bus on moto: filter policies route by recipient, deliveries are verified,
confirmations for our topic are confirmed."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import boto3
import pytest
from moto import mock_aws

from cbas.aws.bus import SnsMessageBus
from cbas.aws.sns import CertificateCache, SnsVerifier
from cbas.backends import InvalidMessage
from cbas.messages import MessageType, Ping, envelope
from tests.aws.test_sns import CERT_URL, PEM, notification, signed


def capture_server() -> tuple[HTTPServer, list[bytes]]:
    bodies: list[bytes] = []

    class Capture(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, bodies


@pytest.fixture
def aws():
    with mock_aws():
        yield boto3.client("sns", region_name="us-east-1")


def moto_certificates() -> CertificateCache:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sns.models import sns_backends

    keys = sns_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]._message_public_keys
    return CertificateCache(lambda url: keys[url.rsplit("/", 1)[1]])


async def test_messages_reach_only_their_recipient_and_verify(aws) -> None:  # type: ignore[no-untyped-def]
    topic = aws.create_topic(Name="cbas", Attributes={"SignatureVersion": "2"})["TopicArn"]
    master_server, master_bodies = capture_server()
    worker_server, worker_bodies = capture_server()
    try:
        bus = SnsMessageBus(topic, SnsVerifier(topic, moto_certificates()), aws)
        await bus.subscribe("master", f"http://127.0.0.1:{master_server.server_port}/messages")
        await bus.subscribe("worker/i-1", f"http://127.0.0.1:{worker_server.server_port}/messages")
        to_master = envelope(MessageType.PING, Ping(instance_id="i-1"), "worker/i-1", "master")
        await bus.send(to_master)
        await asyncio.sleep(0.1)
        assert len(master_bodies) == 1 and worker_bodies == []  # the filter policy routed it
        assert bus.parse_delivery(master_bodies[0]) == to_master
        forged = json.loads(master_bodies[0])
        forged["Message"] = forged["Message"].replace("i-1", "i-2")
        with pytest.raises(InvalidMessage, match="bad signature"):
            bus.parse_delivery(json.dumps(forged).encode())
        await bus.close()
        assert aws.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"] == []  # unsubscribed on close
    finally:
        master_server.shutdown()
        worker_server.shutdown()


def test_a_confirmation_for_our_topic_is_confirmed_and_others_refused(aws) -> None:  # type: ignore[no-untyped-def]
    topic = aws.create_topic(Name="cbas")["TopicArn"]
    confirmed: list[dict[str, str]] = []

    class Recording:
        def confirm_subscription(self, **kwargs: str) -> None:
            confirmed.append(kwargs)

    bus = SnsMessageBus(topic, SnsVerifier(topic, CertificateCache(lambda url: PEM)), Recording())
    fields = notification(Type="SubscriptionConfirmation", Token="tok", TopicArn=topic,
                          SubscribeURL="https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription")
    assert bus.parse_delivery(json.dumps(signed(fields)).encode()) is None
    assert confirmed == [{"TopicArn": topic, "Token": "tok"}]
    other = dict(fields, TopicArn="arn:aws:sns:us-east-1:123456789012:not-ours")
    with pytest.raises(InvalidMessage, match="is not ours"):
        bus.parse_delivery(json.dumps(signed(other)).encode())
    assert len(confirmed) == 1 and CERT_URL


async def test_stale_worker_endpoints_are_unsubscribed(aws) -> None:  # type: ignore[no-untyped-def]
    topic = aws.create_topic(Name="cbas")["TopicArn"]
    bus = SnsMessageBus(topic, SnsVerifier(topic, CertificateCache(lambda url: b"")), aws)
    for recipient in ("master", "worker/i-alive", "worker/i-gone"):
        await bus.subscribe(recipient, f"http://127.0.0.1:9/{recipient}")
    assert await bus.unsubscribe_stale({"worker/i-alive"}) == ["worker/i-gone"]
    left = aws.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
    policies = [json.loads(aws.get_subscription_attributes(SubscriptionArn=s["SubscriptionArn"])["Attributes"]["FilterPolicy"])
                for s in left]
    assert sorted(p["recipient"][0] for p in policies) == ["master", "worker/i-alive"]  # the master is never pruned
