"""BlobStore on S3: one bucket, keys as given (jobs/<id>/...); multipart for big files."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError

from cbas.aws.retry import aws_retry
from cbas.backends import BlobNotFound, Progress

TRANSFER = TransferConfig(multipart_threshold=16 * 1024 * 1024, multipart_chunksize=16 * 1024 * 1024, max_concurrency=8)
PRESIGNED_SECONDS = 300  # presigned URLs live minutes, not hours


def _missing(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound")


def _refused(error: ClientError) -> bool:
    return error.response.get("Error", {}).get("Code") in ("AccessDenied", "403", "Forbidden")


class S3BlobStore:
    def __init__(self, bucket: str, client: Any | None = None) -> None:
        self.bucket = bucket
        self.client = client or boto3.client("s3")

    def _absent(self, key: str, error: ClientError) -> bool:
        """Whether a failed read means the key is not there. S3 answers 403, not 404, for a missing
        key unless the caller's ListBucket applies to the read, which a ListBucket limited to a
        prefix (a job's own credentials) does not: then a listing of that key, which it may do,
        tells. A key that is listed but cannot be read is a real refusal."""
        if _missing(error):
            return True
        if not _refused(error):
            return False
        try:
            listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1).get("Contents", [])
        except ClientError:
            return False  # may not list it either: the refusal stands
        return not any(item["Key"] == key for item in listed)

    @aws_retry
    def put_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        self.client.upload_file(str(path), self.bucket, key, Config=TRANSFER, Callback=progress)

    @aws_retry
    def put_bytes(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)

    @aws_retry
    def get_file(self, key: str, path: Path, progress: Progress | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".part")
        try:
            self.client.download_file(self.bucket, key, str(partial), Config=TRANSFER, Callback=progress)
        except ClientError as exc:
            partial.unlink(missing_ok=True)
            if self._absent(key, exc):
                raise BlobNotFound(key) from None
            raise
        os.replace(partial, path)

    @aws_retry
    def get_bytes(self, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if self._absent(key, exc):
                raise BlobNotFound(key) from None
            raise

    @aws_retry
    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if self._absent(key, exc):
                raise BlobNotFound(key) from None
            raise

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
            return True
        except BlobNotFound:
            return False

    def list(self, prefix: str) -> list[str]:
        return sorted(self.list_modified(prefix))

    @aws_retry
    def list_modified(self, prefix: str) -> dict[str, float]:
        """One listing gives each object's LastModified: no HEAD per key."""
        modified: dict[str, float] = {}
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            modified.update((item["Key"], item["LastModified"].timestamp()) for item in page.get("Contents", []))
        return modified

    @aws_retry
    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)

    def presigned_get(self, key: str, seconds: int = PRESIGNED_SECONDS) -> str:
        return str(self.client.generate_presigned_url("get_object", Params={"Bucket": self.bucket, "Key": key},
                                                      ExpiresIn=seconds))

    def presigned_put(self, key: str, seconds: int = PRESIGNED_SECONDS) -> str:
        return str(self.client.generate_presigned_url("put_object", Params={"Bucket": self.bucket, "Key": key},
                                                      ExpiresIn=seconds))
