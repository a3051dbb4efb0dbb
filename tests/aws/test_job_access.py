"""A job's file access on AWS (cbas/aws/job_access.py): sealed for one machine, renewed before it
runs out, swapped into the job's S3 client while an upload goes on; and the S3 store telling a
missing key from a refused one when S3 answers 403 for both."""

from __future__ import annotations

import asyncio
import os
import secrets
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from cbas import authority
from cbas.authority import Unauthorized
from cbas.aws.bootstrap import Bootstrap, master_policy
from cbas.aws.job_access import JobGrant, ScopedJobBlobs, StsJobCredentials, open_grant, seal_grant
from cbas.aws.s3 import S3BlobStore
from cbas.backends import AccessNotGranted, BlobNotFound
from cbas.master.service import Master
from cbas.messages import MessageType, Ping
from cbas.models import utcnow
from tests.aws.iam import ACCOUNT, ADMIN_POLICY, enforced, moto_view, user, user_arn

REGION = "us-east-1"
BUCKET = f"cbas-lab-{ACCOUNT}-{REGION}"


def grant(expires_in: float = 3600, key: str = "ASIAEXAMPLE") -> JobGrant:
    return JobGrant(access_key_id=key, secret_access_key="s" * 40, session_token="t" * 300,
                    expires_at=datetime.now(timezone.utc) + timedelta(seconds=expires_in))


def test_a_grant_opens_only_on_its_machine_for_its_job() -> None:
    machine, other = secrets.token_bytes(32), secrets.token_bytes(32)
    sealed = seal_grant(machine, "A", grant())
    assert open_grant(machine, "A", sealed).session_token.get_secret_value() == "t" * 300
    assert grant().secret_access_key.get_secret_value() not in sealed and "t" * 300 not in sealed
    with pytest.raises(Unauthorized, match="not sealed for this machine"):
        open_grant(other, "A", sealed)
    with pytest.raises(Unauthorized):  # bound to its job
        open_grant(machine, "B", sealed)
    # and kept apart from the job's checkpoint key, sealed for the same machine and job
    with pytest.raises(Unauthorized):
        open_grant(machine, "A", authority.seal_checkpoint_key(machine, "A", b"k" * 32))
    with pytest.raises(Unauthorized):
        authority.open_checkpoint_key(machine, "A", sealed)


def test_the_worker_keeps_the_newest_grant_and_says_when_it_ends() -> None:
    files, machine = ScopedJobBlobs("bucket", REGION), secrets.token_bytes(32)
    with pytest.raises(AccessNotGranted, match="brought no access"):
        files.blobs_for("A")
    assert files.expires_at("A") is None
    first = grant(900, "ASIAFIRST")
    files.accept(machine, "A", seal_grant(machine, "A", first))
    store = files.blobs_for("A")
    files.accept(machine, "A", seal_grant(machine, "A", grant(3600, "ASIASECOND")))
    files.accept(machine, "A", seal_grant(machine, "A", grant(60, "ASIALATE")))  # an old DATA_ACCESS, late
    assert files.blobs_for("A") is store  # the same client: renewed, not replaced
    assert files.expires_at("A") is not None and files.expires_at("A") > first.expires_at + timedelta(minutes=30)
    files.accept(machine, "B", seal_grant(machine, "B", grant()))  # the machine's next job
    with pytest.raises(AccessNotGranted):
        files.blobs_for("A")


def test_renewed_credentials_are_used_by_an_upload_under_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        admin, _ = user(boto3.client("iam"), "admin", ADMIN_POLICY)
        master, _ = user(admin.client("iam"), "cbas-master", moto_view(master_policy(BUCKET, REGION, ACCOUNT, "lab")))
        with enforced():
            Bootstrap("lab", REGION, admin, master_principal=user_arn("cbas-master")).up()
            issuer = StsJobCredentials(master.client("sts"), "lab", BUCKET, seconds=900)
            machine = secrets.token_bytes(32)
            files = ScopedJobBlobs(BUCKET, REGION)
            files.accept(machine, "A", seal_grant(machine, "A", issuer.grant("A")))
            store = files.blobs_for("A")
            signed_with: list[str] = []
            client = store.inner.client  # type: ignore[attr-defined]
            client.meta.events.register("before-send.s3", lambda request, **_: signed_with.append(
                request.headers["Authorization"].decode().split("Credential=")[1].split("/")[0]))
            renewed: list[str] = []
            once = threading.Lock()

            def progress(_: int) -> None:  # the renewal comes while the parts go up (from their threads)
                with once:
                    if not renewed:
                        fresh = issuer.grant("A")
                        files.accept(machine, "A", seal_grant(machine, "A", fresh))
                        renewed.append(fresh.access_key_id)

            big = tmp_path / "ckpt.bin"
            big.write_bytes(os.urandom(1024) * (40 * 1024))  # 40 MiB: a multipart upload of 3 parts
            store.put_file("jobs/A/chunks/big", big, progress=progress)
            assert admin.client("s3").head_object(Bucket=BUCKET, Key="jobs/A/chunks/big")["ContentLength"] == big.stat().st_size
            assert renewed and signed_with[0] != renewed[0] and signed_with[-1] == renewed[0]
            assert len(signed_with) >= 5  # create, 3 parts, complete: one upload across the renewal


def test_the_master_renews_only_access_that_ends_within_twenty_minutes() -> None:
    sent: list[Any] = []

    async def data_access(ledger_id: str, job_id: str) -> str:
        return f"sealed-for-{ledger_id}-{job_id}"

    async def send(message: Any) -> None:
        sent.append(message)

    master = SimpleNamespace(_data_access=data_access, send_quietly=send)
    entry = SimpleNamespace(id="l-1")

    def renew(expires: datetime | None) -> None:
        ping = Ping(instance_id="i-1", job_id="A", attempt=2, phase="running", data_access_expires=expires)
        asyncio.run(Master._renew_access(master, ping, entry))  # type: ignore[arg-type]

    renew(None)  # local: nothing to renew
    renew(utcnow() + timedelta(minutes=40))
    assert sent == []
    renew(utcnow() + timedelta(minutes=19))
    assert [(m.type, m.recipient, m.body) for m in sent] == [
        (MessageType.DATA_ACCESS, "worker/i-1", {"job_id": "A", "attempt": 2, "sealed": "sealed-for-l-1-A"})]


class Refusing:
    """An S3 client answering as S3 does a caller whose ListBucket does not apply to reads: 403
    for a key that is missing, as for one it may not read."""

    def __init__(self, present: set[str], may_list: bool = True) -> None:
        self.present, self.may_list = present, may_list

    def get_object(self, **_: Any) -> Any:
        raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "GetObject")

    def head_object(self, **_: Any) -> Any:
        raise ClientError({"Error": {"Code": "403", "Message": "Forbidden"}}, "HeadObject")

    def list_objects_v2(self, Prefix: str, **_: Any) -> Any:
        if not self.may_list:
            raise ClientError({"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}, "ListObjectsV2")
        return {"Contents": [{"Key": k} for k in sorted(self.present) if k.startswith(Prefix)][:1]}


def test_a_403_on_a_missing_key_is_a_missing_blob_and_a_real_refusal_stays_one() -> None:
    store = S3BlobStore("bucket", Refusing({"jobs/A/there"}))
    with pytest.raises(BlobNotFound):
        store.get_bytes("jobs/A/missing")
    assert store.exists("jobs/A/missing") is False
    with pytest.raises(ClientError):  # listed, yet not readable: refused
        store.get_bytes("jobs/A/there")
    with pytest.raises(ClientError):  # may not even list it: refused
        S3BlobStore("bucket", Refusing(set(), may_list=False)).size("jobs/B/x")
