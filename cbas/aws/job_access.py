"""A job's file access on AWS: short-lived S3 credentials that reach jobs/<id>/ and nothing else.

The master assumes the cluster's job-data role (`cbas aws bootstrap` makes it; only the master's
principal may assume it) with a session policy naming the job's prefix: a session may do only
what both the role's policy and the session policy allow. The credentials go to the job's machine
sealed with that machine's key, in START_JOB, and again (DATA_ACCESS) whenever the worker's PING
says they run out within ACCESS_REFRESH_BEFORE. The worker opens the job's blob store with an S3
client of its own whose credentials refresh from the newest ones received, so an upload under way
goes on across a renewal. The instance role itself reaches no job's files.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from datetime import datetime
from typing import Any

import boto3
import botocore.session
import structlog
from botocore.credentials import CredentialProvider, RefreshableCredentials
from botocore.exceptions import ClientError
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from cbas import authority
from cbas.authority import Unauthorized
from cbas.aws.retry import aws_retry
from cbas.aws.s3 import S3BlobStore
from cbas.backends import AccessNotGranted, BlobStore
from cbas.blob_retry import RetryingBlobStore

log = structlog.get_logger(__name__)

GRANT_SECONDS = 3600  # the most AWS allows for a role assumed with role credentials (role chaining)
_JOB_ID = re.compile(r"[A-Za-z0-9_.-]{1,48}")


def job_data_role_name(cluster: str) -> str:
    return f"cbas-{cluster}-job-data"


def job_prefix(job_id: str) -> str:
    # the id becomes part of a policy's resource: a "*" or "/" in it would reach other jobs
    if not _JOB_ID.fullmatch(job_id) or job_id in (".", ".."):
        raise ValueError(f"job id {job_id!r} cannot name an S3 prefix in a policy (1-48 of A-Z a-z 0-9 . _ -)")
    return f"jobs/{job_id}/"


def job_session_policy(bucket: str, job_id: str) -> dict[str, Any]:
    """The session policy of one job's credentials: its own prefix, nothing else."""
    prefix = job_prefix(job_id)
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
         "Resource": f"arn:aws:s3:::{bucket}/{prefix}*"},
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}",
         "Condition": {"StringLike": {"s3:prefix": f"{prefix}*"}}},
    ]}


class JobGrant(BaseModel):
    """Temporary credentials for one job's files."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    access_key_id: str
    secret_access_key: SecretStr
    session_token: SecretStr
    expires_at: datetime

    def secret(self) -> bytes:
        return json.dumps({"access_key_id": self.access_key_id,
                           "secret_access_key": self.secret_access_key.get_secret_value(),
                           "session_token": self.session_token.get_secret_value(),
                           "expires_at": self.expires_at.isoformat()}).encode()


def _context(job_id: str) -> str:
    # sealed for the same machine and job as the checkpoint key: another context keeps them apart
    return f"{job_id}/data-access"


def seal_grant(machine_key: bytes, job_id: str, grant: JobGrant) -> str:
    return authority.seal_checkpoint_key(machine_key, _context(job_id), grant.secret())


def open_grant(machine_key: bytes, job_id: str, sealed: str) -> JobGrant:
    try:
        return JobGrant.model_validate_json(authority.open_checkpoint_key(machine_key, _context(job_id), sealed))
    except Unauthorized:
        raise Unauthorized(f"job {job_id}'s data access was not sealed for this machine") from None
    except ValidationError as exc:
        raise Unauthorized(f"job {job_id}'s data access holds no credentials: {exc.errors()[0]['msg']}") from None


class StsJobCredentials:
    """The master's JobCredentials on AWS: sts:AssumeRole of the job-data role, one session per grant."""

    def __init__(self, sts: Any, cluster: str, bucket: str, seconds: int = GRANT_SECONDS,
                 role_arn: str | None = None) -> None:
        self.sts, self.cluster, self.bucket, self.seconds = sts, cluster, bucket, seconds
        self._role_arn = role_arn

    def role_arn(self) -> str:
        """The cluster's job-data role, in the master's own account and partition."""
        if self._role_arn is None:
            caller = str(aws_retry(self.sts.get_caller_identity)()["Arn"]).split(":")
            self._role_arn = f"arn:{caller[1]}:iam::{caller[4]}:role/{job_data_role_name(self.cluster)}"
        return self._role_arn

    def grant(self, job_id: str) -> JobGrant:
        policy = json.dumps(job_session_policy(self.bucket, job_id), separators=(",", ":"))
        role = self.role_arn()
        try:
            response = aws_retry(self.sts.assume_role)(RoleArn=role, RoleSessionName=f"cbas-job-{job_id}",
                                                       Policy=policy, DurationSeconds=self.seconds)
        except ClientError as exc:
            raise AccessNotGranted(f"job {job_id}: cannot assume {role} for its files: {exc}") from None
        made = response["Credentials"]
        log.info("job_access.granted", job_id=job_id, expires_at=made["Expiration"].isoformat())
        return JobGrant(access_key_id=made["AccessKeyId"], secret_access_key=made["SecretAccessKey"],
                        session_token=made["SessionToken"], expires_at=made["Expiration"])

    async def sealed_for(self, machine_key: bytes, job_id: str) -> str:
        return seal_grant(machine_key, job_id, await asyncio.to_thread(self.grant, job_id))


class _Newest:
    """The newest grant received for a job; botocore asks it for credentials as the old ones near
    their end (15 minutes before), so a renewal needs no new client."""

    def __init__(self, grant: JobGrant) -> None:
        self._grant = grant
        self._lock = threading.Lock()

    @property
    def grant(self) -> JobGrant:
        with self._lock:
            return self._grant

    def offer(self, grant: JobGrant) -> bool:
        with self._lock:
            if grant.expires_at <= self._grant.expires_at:
                return False  # a late or repeated DATA_ACCESS
            self._grant = grant
            return True

    def metadata(self) -> dict[str, str]:
        grant = self.grant
        return {"access_key": grant.access_key_id, "secret_key": grant.secret_access_key.get_secret_value(),
                "token": grant.session_token.get_secret_value(), "expiry_time": grant.expires_at.isoformat()}


class _NewestProvider(CredentialProvider):
    METHOD = "cbas-job-access"

    def __init__(self, newest: _Newest) -> None:
        super().__init__()
        self.newest = newest

    def load(self) -> RefreshableCredentials:
        return RefreshableCredentials.create_from_metadata(self.newest.metadata(), refresh_using=self.newest.metadata,
                                                           method=self.METHOD)


def job_s3_client(newest: _Newest, region: str) -> Any:
    """An S3 client of the job's own: never the instance role's credentials, nor the environment's."""
    session = botocore.session.Session()
    session.get_component("credential_provider").insert_before("env", _NewestProvider(newest))
    return boto3.session.Session(botocore_session=session, region_name=region).client("s3")


class ScopedJobBlobs:
    """The worker's JobBlobs on AWS: a job's blob store signs with that job's newest grant."""

    def __init__(self, bucket: str, region: str, retry_seconds: float = 120.0) -> None:
        self.bucket, self.region, self.retry_seconds = bucket, region, retry_seconds
        self._jobs: dict[str, tuple[_Newest, BlobStore]] = {}
        self._lock = threading.Lock()

    def accept(self, machine_key: bytes, job_id: str, sealed: str) -> None:
        grant = open_grant(machine_key, job_id, sealed)
        with self._lock:
            known = self._jobs.get(job_id)
            if known is not None:
                renewed = known[0].offer(grant)
            else:
                newest = _Newest(grant)
                store = RetryingBlobStore(S3BlobStore(self.bucket, job_s3_client(newest, self.region)),
                                          budget_seconds=self.retry_seconds)
                self._jobs = {job_id: (newest, store)}  # one job per machine: an earlier job's access goes
                renewed = True
        log.info("job_access.received", job_id=job_id, expires_at=grant.expires_at.isoformat(), used=renewed)

    def blobs_for(self, job_id: str) -> BlobStore:
        with self._lock:
            known = self._jobs.get(job_id)
        if known is None:
            raise AccessNotGranted(f"job {job_id}: its START_JOB brought no access to its files")
        return known[1]

    def expires_at(self, job_id: str) -> datetime | None:
        with self._lock:
            known = self._jobs.get(job_id)
        return known[0].grant.expires_at if known else None
