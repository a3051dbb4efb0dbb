import asyncio
import base64
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from aiohttp import web

from cbas.backends import DeliveryError, InvalidMessage, MessageRejected
from cbas.local.bus import LocalMessageBus, string_to_sign
from cbas.messages import MessageType, Ping, envelope


@pytest.fixture
async def bus(tmp_path: Path):
    bus = LocalMessageBus(tmp_path, tmp_path / "cbas.db")
    yield bus
    await bus.close()


def _message():
    return envelope(MessageType.PING, Ping(instance_id="i-1"), "worker/i-1", "master")


def test_a_signed_delivery_verifies_and_the_key_is_private(bus: LocalMessageBus, tmp_path: Path) -> None:
    message = _message()
    assert bus.parse_delivery(bus.sign(message)) == message
    assert (tmp_path / "bus.key").stat().st_mode & 0o777 == 0o600


def _tamper(raw: bytes, **changes: str) -> bytes:
    fields = json.loads(raw)
    fields.update(changes)
    return json.dumps(fields).encode()


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda raw: b"not json", "not JSON"),
        (lambda raw: b"[1, 2]", "notification object"),
        (lambda raw: _tamper(raw, Signature=base64.b64encode(b"x" * 32).decode()), "bad signature"),
        (lambda raw: _tamper(raw, Signature="%%%"), "not base64"),
        (lambda raw: _tamper(raw, SignatureVersion="1"), "unsupported SignatureVersion"),
        (lambda raw: _tamper(raw, Type="SubscriptionConfirmation"), "unexpected notification type"),
        (lambda raw: _tamper(raw, Message=json.loads(json.loads(raw)["Message"]) and "{}"), "bad signature"),
        (lambda raw: json.dumps({k: v for k, v in json.loads(raw).items() if k != "MessageId"}).encode(), "lacks MessageId"),
    ],
)
def test_forged_or_malformed_deliveries_are_rejected(bus: LocalMessageBus, mutate, reason: str) -> None:
    with pytest.raises(InvalidMessage, match=reason):
        bus.parse_delivery(mutate(bus.sign(_message())))


def test_another_homes_key_is_not_accepted(bus: LocalMessageBus, tmp_path: Path) -> None:
    stranger = LocalMessageBus(tmp_path / "other", tmp_path / "other.db")
    with pytest.raises(InvalidMessage, match="bad signature"):
        bus.parse_delivery(stranger.sign(_message()))


def test_stale_messages_are_rejected_even_when_correctly_signed(bus: LocalMessageBus) -> None:
    import hashlib
    import hmac

    fields = json.loads(bus.sign(_message()))
    fields["Timestamp"] = (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat()
    fields["Signature"] = base64.b64encode(hmac.new(bus._key, string_to_sign(fields), hashlib.sha256).digest()).decode()
    with pytest.raises(InvalidMessage, match="stale"):
        bus.parse_delivery(json.dumps(fields).encode())


async def test_sending_to_nobody_is_a_delivery_error_without_retries(bus: LocalMessageBus) -> None:
    bus.delivery_retries = 0
    with pytest.raises(DeliveryError, match="no endpoint subscribed for master"):
        await bus.send(_message())
    await bus.subscribe("master", "http://127.0.0.1:9/messages")  # port 9: nothing listens
    with pytest.raises(DeliveryError, match="cannot reach master"):
        await bus.send(_message())
    await bus.unsubscribe("master")
    assert await bus.endpoint("master") is None


async def test_stale_worker_endpoints_are_dropped(bus: LocalMessageBus) -> None:
    for recipient in ("master", "worker/i-alive", "worker/i-gone"):
        await bus.subscribe(recipient, f"http://127.0.0.1:9/{recipient}")
    assert await bus.unsubscribe_stale({"worker/i-alive"}) == ["worker/i-gone"]
    assert await bus.endpoint("master") and await bus.endpoint("worker/i-alive") and await bus.endpoint("worker/i-gone") is None


class _Recipient:
    """An endpoint on 127.0.0.1 (port 0) that takes deliveries as the master's would."""

    def __init__(self, bus: LocalMessageBus, status: int = 200) -> None:
        self.bus, self.status, self.got = bus, status, []

    async def __aenter__(self) -> str:
        async def take(request: web.Request) -> web.Response:
            self.got.append(self.bus.parse_delivery(await request.read()))
            return web.json_response({"ok": self.status < 400}, status=self.status)

        app = web.Application()
        app.router.add_post("/messages", take)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}/messages"  # type: ignore[union-attr]

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def _until(condition, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


async def test_like_sns_a_send_to_an_unreachable_recipient_succeeds_and_arrives_if_it_comes_back(
    bus: LocalMessageBus,
) -> None:
    bus.delivery_retries, bus.retry_seconds = 15, 0.2  # 3 s: a loaded machine subscribes within it
    message = _message()
    await bus.send(message)  # nobody subscribed yet: the publish itself succeeds
    recipient = _Recipient(bus)
    async with recipient as url:
        await bus.subscribe("master", url)
        await _until(lambda: recipient.got, timeout=10.0)
    assert recipient.got == [message]


async def test_like_sns_a_message_is_dropped_after_the_retries(bus: LocalMessageBus) -> None:
    bus.delivery_retries, bus.retry_seconds = 2, 0.05
    await bus.subscribe("master", "http://127.0.0.1:9/messages")  # port 9: nothing listens
    await bus.send(_message())
    await _until(lambda: not bus._retrying)  # tried twice more, then given up
    recipient = _Recipient(bus)
    async with recipient as url:
        await bus.subscribe("master", url)
        await asyncio.sleep(0.3)
    assert recipient.got == []


async def test_a_refusal_is_said_to_the_sender_at_once(bus: LocalMessageBus) -> None:
    recipient = _Recipient(bus, status=403)
    async with recipient as url:
        await bus.subscribe("master", url)
        with pytest.raises(MessageRejected, match="403"):
            await bus.send(_message())
    assert not bus._retrying
