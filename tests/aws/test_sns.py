"""SNS message verification: offline with certificates made here, and on moto's real deliveries."""

from __future__ import annotations

import base64
import json
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer

import boto3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID
from moto import mock_aws

from cbas.aws.sns import (
    CertificateCache, InvalidSignature, SnsVerifier, check_sns_url, string_to_sign, verify_message,
)

TOPIC = "arn:aws:sns:us-east-1:123456789012:cbas"
CERT_URL = "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-abc.pem"


def make_certificate(key=None, days: int = 30, valid_from_days: int = -1):  # type: ignore[no-untyped-def]
    key = key or rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.now(timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now + timedelta(days=valid_from_days)).not_valid_after(now + timedelta(days=days))
                   .sign(key, hashes.SHA256()))
    return key, certificate.public_bytes(serialization.Encoding.PEM)


KEY, PEM = make_certificate()


def signed(fields: dict[str, str], version: str = "2", key=KEY) -> dict[str, str]:  # type: ignore[no-untyped-def]
    message = {"SignatureVersion": version, "SigningCertURL": CERT_URL, **fields}
    algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
    message["Signature"] = base64.b64encode(key.sign(string_to_sign(message), padding.PKCS1v15(), algorithm)).decode()
    return message


def notification(**extra: str) -> dict[str, str]:
    return {"Type": "Notification", "MessageId": "m-1", "TopicArn": TOPIC, "Message": '{"hello": 1}',
            "Timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"), **extra}


@pytest.mark.parametrize("version", ["1", "2"])
@pytest.mark.parametrize("subject", [None, "a subject"])
def test_genuine_notifications_verify(version: str, subject: str | None) -> None:
    verify_message(signed(notification(**({"Subject": subject} if subject else {})), version), PEM)


def test_confirmations_sign_their_own_fields() -> None:
    fields = notification(Type="SubscriptionConfirmation", Token="tok",
                          SubscribeURL="https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription")
    verify_message(signed(fields), PEM)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: {**m, "Message": m["Message"] + " "}, "bad signature"),
        (lambda m: {**m, "Subject": "added later"}, "bad signature"),
        (lambda m: {**m, "SignatureVersion": "3"}, "unsupported SignatureVersion"),
        (lambda m: {**m, "Signature": "%%%"}, "not base64"),
        (lambda m: {**m, "SignatureVersion": "1"}, "bad signature"),  # signed with SHA256, claims SHA1
    ],
)
def test_tampered_messages_are_refused(change, reason: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidSignature, match=reason):
        verify_message(change(signed(notification())), PEM)


def test_another_key_or_a_bad_certificate_is_refused() -> None:
    other, _ = make_certificate()
    with pytest.raises(InvalidSignature, match="bad signature"):
        verify_message(signed(notification(), key=other), PEM)
    _, expired = make_certificate(KEY, days=-1, valid_from_days=-10)
    with pytest.raises(InvalidSignature, match="not valid now"):
        verify_message(signed(notification()), expired)
    _, elliptic = make_certificate(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(InvalidSignature, match="not RSA"):
        verify_message(signed(notification()), elliptic)
    with pytest.raises(InvalidSignature, match="cannot be read"):
        verify_message(signed(notification()), b"not a certificate")


@pytest.mark.parametrize("url", [
    "http://sns.us-east-1.amazonaws.com/x.pem",
    "https://sns.us-east-1.amazonaws.com.evil.example/x.pem",
    "https://evil.example/sns.us-east-1.amazonaws.com/x.pem",
    "https://s3.amazonaws.com/x.pem",
])
def test_certificates_come_only_from_sns_hosts_over_https(url: str) -> None:
    fetched: list[str] = []
    cache = CertificateCache(lambda u: fetched.append(u) or PEM)  # type: ignore[func-returns-value]
    with pytest.raises(InvalidSignature, match="not https on an sns"):
        cache.get(url)
    assert fetched == []  # refused before any request
    check_sns_url("https://sns.cn-north-1.amazonaws.com.cn/x.pem", "ok")


def test_the_verifier_checks_topic_age_type_and_caches_certificates() -> None:
    fetched: list[str] = []
    verifier = SnsVerifier(TOPIC, CertificateCache(lambda u: fetched.append(u) or PEM))  # type: ignore[func-returns-value]
    assert verifier.verify(json.dumps(signed(notification())).encode())["Message"] == '{"hello": 1}'
    verifier.verify(json.dumps(signed(notification(MessageId="m-2"))).encode())
    assert fetched == [CERT_URL]
    cases = [
        (b"not json", "not JSON"),
        (json.dumps(signed(notification(TopicArn="arn:aws:sns:us-east-1:1:other"))).encode(), "is not ours"),
        (json.dumps(signed(notification(Timestamp="2020-01-01T00:00:00Z"))).encode(), "stale"),
        (json.dumps(signed(notification(Type="Surprise"))).encode(), "unknown message Type"),
        (json.dumps({"Type": "Notification"}).encode(), "lacks"),
        (json.dumps(signed(notification(Type="SubscriptionConfirmation", Token="t",
                                        SubscribeURL="https://evil.example/confirm"))).encode(), "SubscribeURL"),
    ]
    for body, reason in cases:
        with pytest.raises(InvalidSignature, match=reason):
            verifier.verify(body)


class _Capture(BaseHTTPRequestHandler):
    bodies: list[bytes] = []

    def do_POST(self) -> None:  # noqa: N802
        self.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_moto_deliveries_over_http_verify() -> None:
    server = HTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with mock_aws():
            sns = boto3.client("sns", region_name="us-east-1")
            topic = sns.create_topic(Name="cbas", Attributes={"SignatureVersion": "2"})["TopicArn"]
            sns.subscribe(TopicArn=topic, Protocol="http", Endpoint=f"http://127.0.0.1:{server.server_port}/messages")
            sns.publish(TopicArn=topic, Message='{"type": "PING"}',
                        MessageAttributes={"recipient": {"DataType": "String", "StringValue": "master"}})
            from moto.core import DEFAULT_ACCOUNT_ID
            from moto.sns.models import sns_backends

            keys = sns_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]._message_public_keys
            verifier = SnsVerifier(topic, CertificateCache(lambda url: keys[url.rsplit("/", 1)[1]]))
            [body] = _Capture.bodies
            assert verifier.verify(body)["Message"] == '{"type": "PING"}'
            forged = json.loads(body)
            forged["Message"] = '{"type": "JOB_DONE"}'
            with pytest.raises(InvalidSignature, match="bad signature"):
                verifier.verify(json.dumps(forged).encode())
    finally:
        server.shutdown()
