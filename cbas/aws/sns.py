"""Verifying SNS deliveries: every message an HTTP endpoint receives is checked before use.

`verify_message(message, certificate_pem)` is pure and offline: SignatureVersion 1 (RSA
PKCS#1 v1.5 with SHA1) or 2 (with SHA256) over SNS's string to sign. Fetching certificates is
separate (`CertificateCache`, with an injectable fetcher), and only from https URLs on an
`sns.<region>.amazonaws.com` host. `SnsVerifier` adds what a message must be to be ours: our
topic, a fresh timestamp, a known type.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
import urllib.request
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import urlparse

from cryptography import x509
from cryptography.exceptions import InvalidSignature as _CryptoInvalid
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from cbas import jsonlimits
from cbas.jsonlimits import TooDeep

NOTIFICATION_KEYS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")
CONFIRMATION_KEYS = ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type")
MESSAGE_TYPES = ("Notification", "SubscriptionConfirmation", "UnsubscribeConfirmation")
_SNS_HOST = re.compile(r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$")
MAX_AGE_SECONDS = 3600.0


class InvalidSignature(ValueError):
    """The message is not a genuine SNS message for us; the text says why."""


class CertificateUnavailable(InvalidSignature):
    """The signing certificate could not be fetched: the message may be genuine (a queue keeps it
    to try again; an HTTP delivery is refused and SNS sends it again)."""


def string_to_sign(message: dict[str, Any]) -> bytes:
    keys = NOTIFICATION_KEYS if message.get("Type") == "Notification" else CONFIRMATION_KEYS
    return "".join(f"{key}\n{message[key]}\n" for key in keys if key in message).encode()


def verify_message(message: dict[str, Any], certificate_pem: bytes) -> None:
    """Raise InvalidSignature unless the message is signed by the certificate's key."""
    version = message.get("SignatureVersion")
    algorithm: hashes.HashAlgorithm
    if version == "1":
        algorithm = hashes.SHA1()
    elif version == "2":
        algorithm = hashes.SHA256()
    else:
        raise InvalidSignature(f"unsupported SignatureVersion {version!r}")
    try:
        signature = base64.b64decode(str(message.get("Signature", "")), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSignature("Signature is not base64") from None
    try:
        certificate = x509.load_pem_x509_certificate(certificate_pem)
    except ValueError:
        raise InvalidSignature("the signing certificate cannot be read") from None
    now = datetime.now(timezone.utc)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise InvalidSignature("the signing certificate is not valid now")
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidSignature("the signing certificate's key is not RSA")
    try:
        key.verify(signature, string_to_sign(message), padding.PKCS1v15(), algorithm)
    except _CryptoInvalid:
        raise InvalidSignature("bad signature") from None


def check_sns_url(url: str, what: str) -> None:
    """SNS's URLs (certificates, subscription confirmations) are https on an SNS host."""
    parsed = urlparse(url)
    if parsed.scheme != "https" or not _SNS_HOST.match(parsed.hostname or ""):
        raise InvalidSignature(f"{what} {url!r} is not https on an sns.<region>.amazonaws.com host")


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (checked by check_sns_url)
        return response.read()


def fetch_through(endpoint: str) -> Callable[[str], bytes]:
    """Fetch certificates through another endpoint (a VPC endpoint, an AWS emulator) that answers
    for the SNS host: the certificate URL is checked as usual, only the connection goes elsewhere."""

    def fetch(url: str) -> bytes:
        parsed = urlparse(url)
        request = urllib.request.Request(endpoint.rstrip("/") + parsed.path, headers={"Host": parsed.netloc})
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (an operator's setting)
            return response.read()

    return fetch


class CertificateCache:
    """Signing certificates by URL, fetched once each (the fetcher is injectable for tests)."""

    def __init__(self, fetch: Callable[[str], bytes] = _download, size: int = 64) -> None:
        self._fetch = fetch
        self._cache: dict[str, bytes] = {}  # insertion order: the oldest goes first
        self._size = size

    def get(self, url: str) -> bytes:
        check_sns_url(url, "SigningCertURL")
        if url not in self._cache:
            if not url.endswith(".pem"):
                raise InvalidSignature(f"SigningCertURL {url!r} does not name a .pem certificate")
            try:
                certificate = self._fetch(url)
            except OSError as exc:
                raise CertificateUnavailable(f"cannot fetch the signing certificate: {exc}") from None
            if len(self._cache) >= self._size:
                del self._cache[next(iter(self._cache))]
            self._cache[url] = certificate
        return self._cache[url]


class SnsVerifier:
    """Checks a raw delivery (SNS POSTs JSON as text/plain) and returns its fields."""

    def __init__(self, topic_arn: str, certificates: CertificateCache, max_age: float = MAX_AGE_SECONDS,
                 clock: Callable[[], float] = time.time) -> None:
        self.topic_arn = topic_arn
        self.certificates = certificates
        self.max_age = max_age
        self.clock = clock

    def verify(self, body: bytes) -> dict[str, Any]:
        try:
            message = jsonlimits.loads(body)
        except TooDeep:
            raise
        except (ValueError, UnicodeDecodeError):
            raise InvalidSignature("body is not JSON") from None
        if not isinstance(message, dict):
            raise InvalidSignature("body is not a JSON object")
        kind = message.get("Type")
        if kind not in MESSAGE_TYPES:
            raise InvalidSignature(f"unknown message Type {kind!r}")
        required = NOTIFICATION_KEYS if kind == "Notification" else CONFIRMATION_KEYS
        missing = [k for k in (*required, "Signature", "SignatureVersion", "SigningCertURL")
                   if k not in message and k != "Subject"]
        if missing:
            raise InvalidSignature(f"{kind} lacks {', '.join(missing)}")
        if not all(isinstance(message[k], str) for k in required if k in message):
            raise InvalidSignature("message fields must be strings")
        if message["TopicArn"] != self.topic_arn:
            raise InvalidSignature(f"TopicArn {message['TopicArn']!r} is not ours")
        try:
            stamp = datetime.fromisoformat(message["Timestamp"].replace("Z", "+00:00"))
        except ValueError:
            raise InvalidSignature("Timestamp is not an ISO time") from None
        if stamp.tzinfo is None or abs(self.clock() - stamp.timestamp()) > self.max_age:
            raise InvalidSignature("stale or undated Timestamp")
        verify_message(message, self.certificates.get(str(message["SigningCertURL"])))
        if kind == "SubscriptionConfirmation":
            check_sns_url(message["SubscribeURL"], "SubscribeURL")
        return message
