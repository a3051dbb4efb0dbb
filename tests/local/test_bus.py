import base64
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cbas.backends import DeliveryError, InvalidMessage
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


async def test_sending_to_nobody_is_a_delivery_error(bus: LocalMessageBus) -> None:
    with pytest.raises(DeliveryError, match="no endpoint subscribed for master"):
        await bus.send(_message())
    await bus.subscribe("master", "http://127.0.0.1:9/messages")  # port 9: nothing listens
    with pytest.raises(DeliveryError, match="cannot reach master"):
        await bus.send(_message())
    await bus.unsubscribe("master")
    assert bus.endpoint("master") is None


async def test_stale_worker_endpoints_are_dropped(bus: LocalMessageBus) -> None:
    for recipient in ("master", "worker/i-alive", "worker/i-gone"):
        await bus.subscribe(recipient, f"http://127.0.0.1:9/{recipient}")
    assert await bus.unsubscribe_stale({"worker/i-alive"}) == ["worker/i-gone"]
    assert bus.endpoint("master") and bus.endpoint("worker/i-alive") and bus.endpoint("worker/i-gone") is None
