"""Who may say what, in pure functions (no I/O): the keys derived from the master's, the signature
an envelope carries, and a job's checkpoint key sealed for the one machine that runs the job.

    machine key     HMAC-SHA256(master key, "machine:" + ledger id)    one per launch, never stored
    checkpoint key  HMAC-SHA256(master key, "checkpoint:" + job id)    seals the job's manifests
    auth            "v1:<ledger id>:<hex HMAC-SHA256(machine key, canonical envelope)>"

The canonical envelope is its JSON without `auth`, keys sorted, no spaces: what the receiver
parses it back into gives the same bytes, so a signature survives the bus.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from cbas.messages import Envelope

AUTH_VERSION = "v1"
SEAL_VERSION = "v1"
KEY_DROPS = "machines/"  # blob prefix where the AWS master leaves each machine its key, for minutes


class Unauthorized(ValueError):
    """An envelope whose auth is missing, malformed, or not made with the key it claims."""


@dataclass(frozen=True)
class Credential:
    """A machine's identity: the ledger entry it was launched for, and the key derived from it."""

    ledger_id: str
    key: bytes = field(repr=False)


def _derive(key: bytes, purpose: str) -> bytes:
    return hmac.new(key, purpose.encode(), hashlib.sha256).digest()


def machine_key(master_key: bytes, ledger_id: str) -> bytes:
    return _derive(master_key, "machine:" + ledger_id)


def checkpoint_key(master_key: bytes, job_id: str) -> bytes:
    return _derive(master_key, "checkpoint:" + job_id)


def key_drop(ledger_id: str) -> str:
    """The blob a launching AWS machine fetches its key from (through a presigned URL)."""
    return f"{KEY_DROPS}{ledger_id}/key"


def constant_time_equal(a: bytes | str, b: bytes | str) -> bool:
    left = a.encode() if isinstance(a, str) else a
    right = b.encode() if isinstance(b, str) else b
    return hmac.compare_digest(left, right)


# --- envelopes ----------------------------------------------------------------------------------
def canonical(message: Envelope) -> bytes:
    fields = message.model_dump(mode="json", exclude={"auth"})
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _mac(key: bytes, message: Envelope) -> str:
    return hmac.new(key, canonical(message), hashlib.sha256).hexdigest()


def sign(message: Envelope, credential: Credential) -> Envelope:
    """The envelope with its auth: made with the machine's key, naming the machine's ledger entry."""
    auth = f"{AUTH_VERSION}:{credential.ledger_id}:{_mac(credential.key, message)}"
    return message.model_copy(update={"auth": auth})


def claimed_ledger_id(message: Envelope) -> str:
    """The ledger entry whose key the auth claims to be made with (not yet checked)."""
    if not message.auth:
        raise Unauthorized(f"{message.type} from {message.sender!r} carries no auth")
    version, _, rest = message.auth.partition(":")
    ledger_id, _, mac = rest.rpartition(":")
    if version != AUTH_VERSION or not ledger_id or len(mac) != 64:
        raise Unauthorized(f"{message.type} from {message.sender!r}: auth is not {AUTH_VERSION}:<ledger id>:<hmac>")
    return ledger_id


def verify(message: Envelope, credential: Credential) -> None:
    """Raise Unauthorized unless the envelope was signed with this credential, unchanged since."""
    ledger_id = claimed_ledger_id(message)
    if not constant_time_equal(ledger_id, credential.ledger_id):
        raise Unauthorized(f"{message.type} is signed for machine {ledger_id!r}, not {credential.ledger_id!r}")
    given = (message.auth or "").rsplit(":", 1)[1]
    if not constant_time_equal(given, _mac(credential.key, message)):
        raise Unauthorized(f"{message.type} from {message.sender!r}: bad auth signature for machine {ledger_id!r}")


# --- a job's checkpoint key, sealed for its machine -----------------------------------------------
def _wrapping_key(machine: bytes) -> bytes:
    # a subkey: the machine's MAC key itself never encrypts anything
    return _derive(machine, "seal:checkpoint-key")


def _associated(job_id: str) -> bytes:
    return ("checkpoint-key:" + job_id).encode()


def seal_checkpoint_key(machine: bytes, job_id: str, secret: bytes) -> str:
    """AES-GCM under a subkey of the machine key, bound to the job: for START_JOB."""
    nonce = secrets.token_bytes(12)
    sealed = AESGCM(_wrapping_key(machine)).encrypt(nonce, secret, _associated(job_id))
    return f"{SEAL_VERSION}:" + base64.b64encode(nonce + sealed).decode()


def open_checkpoint_key(machine: bytes, job_id: str, sealed: str) -> bytes:
    version, _, text = sealed.partition(":")
    try:
        raw = base64.b64decode(text, validate=True) if version == SEAL_VERSION else b""
    except ValueError:
        raw = b""
    if len(raw) < 12 + 16:
        raise Unauthorized(f"job {job_id}'s checkpoint key is not a sealed {SEAL_VERSION} key")
    try:
        return AESGCM(_wrapping_key(machine)).decrypt(raw[:12], raw[12:], _associated(job_id))
    except InvalidTag:
        raise Unauthorized(f"job {job_id}'s checkpoint key was not sealed for this machine") from None
