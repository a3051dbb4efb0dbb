"""One contract for every BlobStore: the local folder and S3 (on moto)."""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest
import requests
from moto import mock_aws

from cbas.aws.s3 import S3BlobStore
from cbas.backends import BlobNotFound
from cbas.local.blobs import FolderBlobStore


@pytest.fixture(params=["folder", "s3"])
def blobs(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "folder":
        yield FolderBlobStore(tmp_path / "blobs")
        return
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="cbas-test")
        yield S3BlobStore("cbas-test", client)


def test_round_trips_lists_and_deletes(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    blobs.put_bytes("jobs/a/jdl", b"Executable")
    blobs.put_bytes("jobs/b/jdl", b"other")
    assert blobs.get_bytes("jobs/a/jdl") == b"Executable"
    assert blobs.list("jobs/a/") == ["jobs/a/jdl"]
    assert blobs.size("jobs/b/jdl") == 5 and blobs.exists("jobs/b/jdl")
    blobs.delete("jobs/a/jdl")
    assert not blobs.exists("jobs/a/jdl")
    for missing in (lambda: blobs.get_bytes("jobs/a/jdl"), lambda: blobs.size("nope"),
                    lambda: blobs.get_file("nope", tmp_path / "x")):
        with pytest.raises(BlobNotFound):
            missing()
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.part").exists()


def test_big_files_move_with_progress(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(40 * 1024 * 1024))  # over the multipart threshold
    up: list[int] = []
    blobs.put_file("jobs/a/input.tar.zst", source, progress=up.append)
    assert sum(up) == source.stat().st_size
    down: list[int] = []
    target = tmp_path / "out" / "big.bin"
    blobs.get_file("jobs/a/input.tar.zst", target, progress=down.append)
    assert sum(down) == source.stat().st_size
    assert target.read_bytes() == source.read_bytes()


def test_presigned_urls_are_short_lived_and_work() -> None:
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
        client.create_bucket(Bucket="cbas-test")
        store = S3BlobStore("cbas-test", client)
        put = store.presigned_put("jobs/a/prologue.sh")
        assert "Expires=" in put or "X-Amz-Expires=300" in put
        assert requests.put(put, data=b"#!/bin/sh\n", timeout=10).status_code == 200
        assert requests.get(store.presigned_get("jobs/a/prologue.sh"), timeout=10).content == b"#!/bin/sh\n"
