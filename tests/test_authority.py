"""The pure authority functions: key derivation, envelope signatures, sealed checkpoint keys."""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest

from cbas import authority
from cbas.authority import Credential, Unauthorized
from cbas.messages import MASTER, CheckpointDone, Envelope, MessageType, Ping, envelope

MASTER_KEY = b"k" * 64


def credential(ledger_id: str = "l-1") -> Credential:
    return Credential(ledger_id, authority.machine_key(MASTER_KEY, ledger_id))


def test_keys_are_hmacs_of_the_master_key_and_differ_by_purpose() -> None:
    assert authority.machine_key(MASTER_KEY, "l-1") == hmac.new(MASTER_KEY, b"machine:l-1", hashlib.sha256).digest()
    assert authority.checkpoint_key(MASTER_KEY, "j1") == hmac.new(MASTER_KEY, b"checkpoint:j1", hashlib.sha256).digest()
    keys = {authority.machine_key(MASTER_KEY, "l-1"), authority.machine_key(MASTER_KEY, "l-2"),
            authority.checkpoint_key(MASTER_KEY, "l-1"), authority.machine_key(b"other", "l-1")}
    assert len(keys) == 4


def test_a_credential_never_shows_its_key() -> None:
    mine = credential()
    assert mine.key.hex() not in repr(mine) and "l-1" in repr(mine)


def test_a_signed_envelope_verifies_after_a_trip_through_json() -> None:
    body = CheckpointDone(job_id="j1", attempt=2, checkpoint_id="a0002-n00001", manifest_key="m", size_bytes=10**15,
                          pause_seconds=0.1, upload_seconds=1e-7, reason="notice", deadline_margin_seconds=None)
    signed = authority.sign(envelope(MessageType.CHECKPOINT_DONE, body, "worker/i-1", MASTER), credential())
    assert signed.auth is not None and signed.auth.startswith("v1:l-1:")
    arrived = Envelope.model_validate(json.loads(signed.model_dump_json()))
    authority.verify(arrived, credential())
    assert authority.claimed_ledger_id(arrived) == "l-1"
    assert authority.sign(arrived, credential()).auth == signed.auth  # signing again changes nothing


@pytest.mark.parametrize("change", [
    {"sender": "worker/i-2"}, {"recipient": "worker/i-1"}, {"type": MessageType.JOB_DONE}, {"id": "another-id-1"},
    {"body": {"instance_id": "i-2"}},
])
def test_any_change_breaks_the_signature(change: dict) -> None:  # type: ignore[type-arg]
    signed = authority.sign(envelope(MessageType.PING, Ping(instance_id="i-1"), "worker/i-1", MASTER), credential())
    with pytest.raises(Unauthorized, match="bad auth signature"):
        authority.verify(signed.model_copy(update=change), credential())


@pytest.mark.parametrize(("auth", "fragment"), [
    (None, "carries no auth"), ("", "carries no auth"), ("v2:l-1:" + "0" * 64, "is not v1"),
    ("v1::" + "0" * 64, "is not v1"), ("v1:l-1:abc", "is not v1"),
])
def test_missing_or_malformed_auth_is_refused(auth: str | None, fragment: str) -> None:
    message = envelope(MessageType.PING, Ping(instance_id="i-1"), "worker/i-1", MASTER).model_copy(update={"auth": auth})
    with pytest.raises(Unauthorized, match=fragment):
        authority.verify(message, credential())


def test_a_signature_made_with_another_machines_key_is_refused() -> None:
    signed = authority.sign(envelope(MessageType.PING, Ping(instance_id="i-1"), "worker/i-1", MASTER), credential("l-2"))
    with pytest.raises(Unauthorized, match="signed for machine 'l-2'"):
        authority.verify(signed, credential("l-1"))
    forged = Credential("l-1", credential("l-2").key)  # names l-1, made with l-2's key
    with pytest.raises(Unauthorized, match="bad auth signature"):
        authority.verify(authority.sign(signed, forged), credential("l-1"))


def test_a_checkpoint_key_opens_only_on_its_machine_for_its_job() -> None:
    secret = authority.checkpoint_key(MASTER_KEY, "j1")
    sealed = authority.seal_checkpoint_key(credential().key, "j1", secret)
    assert secret.hex() not in sealed and sealed.startswith("v1:")
    assert authority.open_checkpoint_key(credential().key, "j1", sealed) == secret
    assert authority.seal_checkpoint_key(credential().key, "j1", secret) != sealed  # a fresh nonce each time
    for key, job_id, text in [(credential("l-2").key, "j1", sealed), (credential().key, "j2", sealed),
                              (credential().key, "j1", sealed[:-4] + "AAAA"), (credential().key, "j1", ""),
                              (credential().key, "j1", "v1:not base64!")]:
        with pytest.raises(Unauthorized, match="checkpoint key"):
            authority.open_checkpoint_key(key, job_id, text)


def test_constant_time_compare_and_key_drops() -> None:
    assert authority.constant_time_equal("abc", b"abc") and not authority.constant_time_equal("abc", "abd")
    assert authority.key_drop("l-1") == "machines/l-1/key"
