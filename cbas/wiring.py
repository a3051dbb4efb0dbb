"""Builds the backend implementations that Settings chooses, and knows the home's file layout."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cbas.settings import Settings

if TYPE_CHECKING:  # the implementations are imported when asked for, not at start-up
    from cbas.aws.sqs_inbox import QueueInbox, Taker
    from cbas.backends import BlobStore, JobBlobs, MessageBus, VolumeSnapshots
    from cbas.master.metrics import Metrics
    from cbas.master.service import Backends


class BackendUnavailable(RuntimeError):
    pass


def db_path(settings: Settings) -> Path:
    return settings.home / "cbas.db"


def token_path(settings: Settings) -> Path:
    return settings.home / "api-token"


def master_file(settings: Settings) -> Path:
    return settings.home / "master.json"


def _require_aws(settings: Settings, *names: str) -> None:
    missing = [f"CBAS_{name.upper()}" for name in names if not getattr(settings, name)]
    if missing:
        raise BackendUnavailable(f"the aws backend needs {', '.join(missing)} (see `cbas aws bootstrap`)")


def open_blobs(settings: Settings) -> BlobStore:
    from cbas.blob_retry import RetryingBlobStore

    return RetryingBlobStore(_open_blobs(settings), budget_seconds=settings.blob_retry_seconds)


def _open_blobs(settings: Settings) -> BlobStore:
    if settings.backend == "aws":
        import boto3

        from cbas.aws.s3 import S3BlobStore

        _require_aws(settings, "aws_bucket")
        return S3BlobStore(settings.aws_bucket, boto3.client("s3", region_name=settings.aws_region))
    from cbas.local.blobs import FolderBlobStore

    return FolderBlobStore(settings.home / "blobs")


def open_job_blobs(settings: Settings, blobs: BlobStore) -> JobBlobs:
    """How the worker reaches a job's files: locally through its own store (`blobs`); on AWS with
    the job's own short-lived credentials, which the master sends (the instance role has none)."""
    if settings.backend == "aws":
        from cbas.aws.job_access import ScopedJobBlobs

        _require_aws(settings, "aws_bucket")
        return ScopedJobBlobs(settings.aws_bucket, settings.aws_region, retry_seconds=settings.blob_retry_seconds)
    from cbas.backends import SharedJobBlobs

    return SharedJobBlobs(blobs)


def open_bus(settings: Settings) -> MessageBus:
    if settings.backend == "aws":
        import boto3

        from cbas.aws.bus import SnsMessageBus
        from cbas.aws.sns import CertificateCache, SnsVerifier, fetch_through

        _require_aws(settings, "aws_topic_arn")
        endpoint = settings.aws_sns_certificate_endpoint
        certificates = CertificateCache(fetch_through(endpoint)) if endpoint else CertificateCache()
        return SnsMessageBus(settings.aws_topic_arn, SnsVerifier(settings.aws_topic_arn, certificates),
                             boto3.client("sns", region_name=settings.aws_region))
    from cbas.local.bus import LocalMessageBus

    return LocalMessageBus(settings.home, db_path(settings), delivery_retries=settings.bus_delivery_retries,
                           retry_seconds=settings.bus_retry_seconds)


def open_volumes(settings: Settings, instance_id: str, disk: Path) -> VolumeSnapshots:
    """The worker's snapshots of its job's data disk (the `volume` strategy)."""
    if settings.backend == "aws":
        import boto3

        from cbas.aws.volumes import EbsSnapshots

        return EbsSnapshots(boto3.client("ec2", region_name=settings.aws_region), instance_id, settings.cluster)
    from cbas.local.volumes import FolderSnapshots

    return FolderSnapshots(settings.home, disk / "job")


def open_master_backends(settings: Settings) -> Backends:
    from cbas.master.service import Backends

    if settings.backend == "aws":
        import boto3

        from cbas.aws.dynamodb import DynamoJobStore
        from cbas.aws.ec2 import Ec2Cloud, presigned_user_data, publish_worker_wheel, worker_environment
        from cbas.aws.images import ImageBuilder
        from cbas.aws.job_access import StsJobCredentials
        from cbas.local.cloud import settings_env

        _require_aws(settings, "aws_table", "aws_image_id", "aws_inbox_queue_url", "aws_worker_wheel")
        assert settings.aws_worker_wheel is not None
        blobs = open_blobs(settings)
        wheel_key = publish_worker_wheel(blobs, settings.aws_worker_wheel)
        user_data = presigned_user_data(blobs, wheel_key, worker_environment(settings_env(settings)))
        ec2 = boto3.client("ec2", region_name=settings.aws_region)
        sqs = boto3.client("sqs", region_name=settings.aws_region)
        return Backends(
            store=DynamoJobStore(settings.aws_table, boto3.resource("dynamodb", region_name=settings.aws_region)),
            blobs=blobs,
            bus=open_bus(settings),
            cloud=Ec2Cloud(settings.cluster, settings.aws_image_id, user_data=user_data, client=ec2,
                           instance_profile=settings.aws_instance_profile or None,
                           security_groups=settings.aws_security_groups, sqs=sqs),
            images=ImageBuilder(ec2, sqs, blobs, settings.cluster, settings.aws_image_id),
            job_credentials=StsJobCredentials(boto3.client("sts", region_name=settings.aws_region), settings.cluster,
                                              settings.aws_bucket),
        )
    from cbas.local.cloud import LocalCloud
    from cbas.local.store import SqliteJobStore

    return Backends(
        store=SqliteJobStore(db_path(settings)),
        blobs=open_blobs(settings),
        bus=open_bus(settings),
        cloud=LocalCloud(settings),
    )


def open_inbox_queue(settings: Settings, bus: MessageBus, inbox: Taker, metrics: Metrics) -> QueueInbox | None:
    """The master's queue on AWS (cbas.aws.sqs_inbox), read for the master's lifetime; None on the
    local backend, whose bus pushes to the master's /messages."""
    if settings.backend != "aws":
        return None
    import boto3

    from cbas.aws.bus import SnsMessageBus
    from cbas.aws.sqs_inbox import QueueInbox

    _require_aws(settings, "aws_inbox_queue_url")
    assert isinstance(bus, SnsMessageBus)
    return QueueInbox(settings.aws_inbox_queue_url, boto3.client("sqs", region_name=settings.aws_region), bus, inbox,
                      metrics, ping_max_age=settings.dead_after())
