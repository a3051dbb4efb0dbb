"""Settings choose the backends; the aws backend says what it still needs."""

from __future__ import annotations

from pathlib import Path

import pytest
from moto import mock_aws

from cbas.aws.bus import SnsMessageBus
from cbas.aws.s3 import S3BlobStore
from cbas.local.blobs import FolderBlobStore
from cbas.settings import Settings
from cbas.wiring import BackendUnavailable, open_blobs, open_bus, open_inbox_queue, open_master_backends


def test_local_is_the_default(tmp_path: Path) -> None:
    assert isinstance(open_blobs(Settings(home=tmp_path)).inner, FolderBlobStore)  # type: ignore[attr-defined]


def test_aws_needs_its_resources_named(tmp_path: Path) -> None:
    with pytest.raises(BackendUnavailable, match="CBAS_AWS_BUCKET"):
        open_blobs(Settings(home=tmp_path, backend="aws"))
    with pytest.raises(BackendUnavailable, match="CBAS_AWS_TABLE, CBAS_AWS_IMAGE_ID, CBAS_AWS_INBOX_QUEUE_URL, "
                                                 "CBAS_AWS_WORKER_WHEEL"):
        open_master_backends(Settings(home=tmp_path, backend="aws", aws_bucket="b", aws_topic_arn="arn:t"))


def test_aws_backends_from_settings(tmp_path: Path) -> None:
    with mock_aws():
        import boto3

        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="cbas-bucket")
        wheel = tmp_path / "cbas-0.1.0-py3-none-any.whl"
        wheel.write_bytes(b"PK wheel")
        settings = Settings(home=tmp_path, backend="aws", aws_bucket="cbas-bucket",
                            aws_topic_arn="arn:aws:sns:us-east-1:1:t", aws_table="cbas", aws_image_id="ami-1",
                            aws_inbox_queue_url="https://sqs.us-east-1.amazonaws.com/1/cbas-default-master-inbox",
                            aws_worker_wheel=wheel, job_user="cbas-job")
        assert isinstance(open_blobs(settings).inner, S3BlobStore)  # type: ignore[attr-defined]
        assert isinstance(open_bus(settings), SnsMessageBus)
        backends = open_master_backends(settings)
        from cbas.aws.sqs_inbox import QueueInbox
        from cbas.master.metrics import Metrics

        queue = open_inbox_queue(settings, backends.bus, object(), Metrics())  # type: ignore[arg-type]
        assert isinstance(queue, QueueInbox) and queue.queue_url == settings.aws_inbox_queue_url
        assert queue.ping_max_age.total_seconds() == settings.dead_after()
        assert open_inbox_queue(Settings(home=tmp_path), backends.bus, object(), Metrics()) is None  # type: ignore[arg-type]
        assert backends.store.table_name == "cbas"  # type: ignore[attr-defined]
        assert backends.blobs.exists("dist/cbas-0.1.0-py3-none-any.whl")  # published for the workers
        from pydantic import SecretStr

        from cbas.models import LaunchSpec

        key = "cd" * 32
        script = backends.cloud.user_data(LaunchSpec(ledger_id="l", job_id="j", instance_type="c5.large",  # type: ignore[attr-defined]
                                                     zone="us-east-1a", market="spot", machine_key=SecretStr(key)))
        assert "dist/cbas-0.1.0-py3-none-any.whl" in script and "Expires" in script
        assert key not in script and "machines/l/key" in script  # only a URL that expires
        assert backends.blobs.get_bytes("machines/l/key").decode() == key  # where the URL points
        assert "CBAS_JOB_USER=cbas-job" in script and "CBAS_AWS_BUCKET=cbas-bucket" in script
        assert "api-token" not in script and "CBAS_HOME" not in script
