"""The Cloud on EC2: spot and on-demand instances for jobs, found again by their tags."""

from __future__ import annotations

import asyncio
import base64
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import boto3
import structlog
from botocore.exceptions import ClientError

from cbas.authority import key_drop
from cbas.aws.retry import aws_retry
from cbas.backends import CapacityError, Leftover, PriceTooLow
from cbas.models import LaunchSpec, Machine, Offer

log = structlog.get_logger(__name__)

USER_DATA_TEMPLATE = Path(__file__).resolve().parents[2] / "scripts" / "user-data.sh.tmpl"
CAPACITY_CODES = frozenset({"InsufficientInstanceCapacity", "MaxSpotInstanceCountExceeded",
                            "InsufficientCapacity", "UnfulfillableCapacity"})
PRICE_CODES = frozenset({"SpotMaxPriceTooLow"})
# us-east-1 Linux on-demand USD/hour of the types CBAS offers by default
ONDEMAND_PRICES = {"m5.large": 0.096, "c5.large": 0.085, "c5.xlarge": 0.17, "r5.large": 0.126, "p3.2xlarge": 3.06}
LIVE_STATES = ["pending", "running", "stopping", "stopped"]
WORKER_PORT = 8080  # the workers' message endpoint; bootstrap's security group opens it
DATA_DEVICE = "/dev/sdf"  # the job's data disk (volume strategy); user-data mounts it as the worker's disk


def _tag(resource: dict[str, Any], key: str) -> str | None:
    return next((t["Value"] for t in resource.get("Tags", []) if t["Key"] == key), None)


def _parse_time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


FIREWALL_START, FIREWALL_END = "# >>> metadata firewall", "# <<< metadata firewall"


def metadata_firewall(script: str) -> str:
    """The lines of a rendered boot script that make instance metadata root's alone."""
    if FIREWALL_START not in script or FIREWALL_END not in script:
        raise ValueError("the boot script has no metadata firewall")
    return script.split(FIREWALL_START, 1)[1].split(FIREWALL_END, 1)[0].split("\n", 1)[1]


def render_user_data(wheel_url: str, wheel_name: str, environment: dict[str, str], key_url: str, ledger_id: str,
                     template: Path = USER_DATA_TEMPLATE) -> str:
    """The boot script; `environment` is settings only (CBAS_*), never credentials. The machine's
    key is not in it either: only `key_url`, a presigned URL that expires in minutes."""
    for name, value in environment.items():
        if not name.startswith("CBAS_") or "\n" in value:
            raise ValueError(f"user-data may carry CBAS_ settings only, one line each: {name}")
    for name, value in (("key_url", key_url), ("ledger_id", ledger_id)):
        if "'" in value or "\n" in value:
            raise ValueError(f"user-data {name} must be one line without quotes: {value!r}")
    lines = "\n".join(f"{name}={value}" for name, value in sorted(environment.items()))
    text = template.read_text()
    for name, value in (("wheel_url", wheel_url), ("wheel_name", wheel_name), ("environment", lines),
                        ("key_url", key_url), ("ledger_id", ledger_id)):
        text = text.replace("{{" + name + "}}", value)
    if "{{" in text:  # the template names something we do not fill in
        raise ValueError(f"unfilled placeholder in {template.name}: {text[text.index('{{'):][:40]}")
    return text


UserData = Callable[[LaunchSpec], str]  # rendered at each launch: its presigned URL is fresh


def worker_environment(settings_env: dict[str, str]) -> dict[str, str]:
    """The settings a worker needs, from the master's: no API token, no local paths."""
    wanted = ("CBAS_BACKEND", "CBAS_CLUSTER", "CBAS_AWS_REGION", "CBAS_AWS_BUCKET", "CBAS_AWS_TOPIC_ARN",
              "CBAS_JOB_USER", "CBAS_PING_INTERVAL", "CBAS_NOTICE_POLL_INTERVAL", "CBAS_LOG_UPLOAD_INTERVAL")
    return {name: settings_env[name] for name in wanted if name in settings_env} | {
        # SNS delivers to the machine's public address, on the port the security group opens
        "CBAS_WORKER_LISTEN_HOST": "0.0.0.0", "CBAS_WORKER_PORT": str(WORKER_PORT),
        "CBAS_WORKER_ADVERTISE_HOST": "metadata",
    }


def publish_worker_wheel(blobs: Any, wheel: Path) -> str:
    """Put the worker wheel where launches can presign it; returns its key."""
    key = f"dist/{wheel.name}"
    if not blobs.exists(key):
        blobs.put_file(key, wheel)
    return key


KEY_URL_SECONDS = 900  # the machine fetches its key at once; the URL dies in 15 minutes


def presigned_user_data(blobs: Any, wheel_key: str, environment: dict[str, str]) -> UserData:
    """Renders each launch's user-data. The machine's key goes to the bucket (machines/<ledger id>/key,
    which the workers' role cannot read), and the script gets a presigned URL to it; the master
    deletes the object once the worker has announced itself (or the machine is let go)."""
    def render(spec: LaunchSpec) -> str:
        drop = key_drop(spec.ledger_id)
        blobs.put_bytes(drop, spec.machine_key.get_secret_value().encode())
        return render_user_data(blobs.presigned_get(wheel_key, 900), wheel_key.rsplit("/", 1)[1], environment,
                                blobs.presigned_get(drop, KEY_URL_SECONDS), spec.ledger_id)

    return render


class Ec2Cloud:
    def __init__(self, cluster: str, image_id: str, user_data: UserData | str, client: Any | None = None,
                 instance_profile: str | None = None, security_groups: list[str] | None = None,
                 instance_types: list[str] | None = None, sqs: Any | None = None) -> None:
        self.cluster = cluster
        self.sqs = sqs  # to find image builder queues left behind
        self.image_id = image_id
        self.user_data = user_data
        self.client = client or boto3.client("ec2")
        self.instance_profile = instance_profile
        self.security_groups = security_groups or []
        self.instance_types = instance_types or list(ONDEMAND_PRICES)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _machine(self, instance: dict[str, Any], price: float = 0.0) -> Machine:
        tags = {tag["Key"]: tag["Value"] for tag in instance.get("Tags", [])}
        state = instance["State"]["Name"]
        return Machine(
            instance_id=instance["InstanceId"], zone=instance["Placement"]["AvailabilityZone"],
            instance_type=instance["InstanceType"],
            market="spot" if instance.get("InstanceLifecycle") == "spot" else "on-demand",
            price=price or float(tags.get("cbas:price", 0.0)),
            state="terminated" if state in ("shutting-down", "terminated") else ("pending" if state == "pending" else "running"),
            tags=tags, launched_at=instance["LaunchTime"],
        )

    def _find(self, filters: list[dict[str, Any]]) -> list[dict[str, Any]]:
        instances = []
        for page in self.client.get_paginator("describe_instances").paginate(Filters=filters):
            for reservation in page["Reservations"]:
                instances += reservation["Instances"]
        return instances

    async def launch(self, spec: LaunchSpec) -> Machine:
        def run() -> Machine:
            existing = self._find([{"Name": "tag:cbas:ledger", "Values": [spec.ledger_id]},
                                   {"Name": "instance-state-name", "Values": LIVE_STATES}])
            if existing:  # a launch retried after a crash: the ledger id names it
                return self._machine(existing[0])
            price = ONDEMAND_PRICES.get(spec.instance_type, 0.0) if spec.market == "on-demand" else (spec.max_price or 0.0)
            tags = [{"Key": k, "Value": v} for k, v in {
                **spec.tags, "cbas:cluster": self.cluster, "cbas:job": spec.job_id, "cbas:ledger": spec.ledger_id,
                "cbas:price": str(price),
            }.items()]
            params: dict[str, Any] = {
                "ImageId": spec.image_id or self.image_id, "InstanceType": spec.instance_type, "MinCount": 1, "MaxCount": 1,
                "ClientToken": spec.ledger_id,
                "UserData": self.user_data(spec) if callable(self.user_data) else self.user_data,
                "Placement": {"AvailabilityZone": spec.zone},
                "TagSpecifications": [{"ResourceType": kind, "Tags": tags} for kind in ("instance", "volume")],
                # IMDSv2 only, over IPv4 only. A hop limit of 1 keeps the token from a container
                # with its own network; the job is no container: the user-data's firewall guards it
                "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1,
                                    "HttpProtocolIpv6": "disabled"},
            }
            if spec.data_volume_gib:  # the `volume` strategy's disk: new, or made from the last snapshot
                ebs: dict[str, Any] = {"VolumeType": "gp3", "DeleteOnTermination": True, "Encrypted": True}
                ebs.update({"SnapshotId": spec.data_snapshot} if spec.data_snapshot else {"VolumeSize": spec.data_volume_gib})
                params["BlockDeviceMappings"] = [{"DeviceName": DATA_DEVICE, "Ebs": ebs}]
            if self.instance_profile:
                params["IamInstanceProfile"] = {"Name": self.instance_profile}
            if self.security_groups:
                params["SecurityGroupIds"] = self.security_groups
            if spec.market == "spot":
                options: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
                if spec.max_price is not None:
                    options["MaxPrice"] = f"{spec.max_price:.4f}"
                params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": options}
            try:
                instance = aws_retry(self.client.run_instances)(**params)["Instances"][0]
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code in PRICE_CODES:
                    raise PriceTooLow(f"{spec.market} {spec.instance_type} in {spec.zone}: {exc}") from None
                if code in CAPACITY_CODES:
                    raise CapacityError(f"{spec.market} {spec.instance_type} in {spec.zone}: {exc}") from None
                raise
            return self._machine(instance, price)

        machine = await asyncio.to_thread(run)
        log.info("machine.launched", instance_id=machine.instance_id, job_id=spec.job_id, zone=spec.zone, market=spec.market)
        return machine

    async def terminate(self, instance_id: str) -> None:
        def end() -> None:
            try:
                aws_retry(self.client.terminate_instances)(InstanceIds=[instance_id])
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "InvalidInstanceID.NotFound":
                    raise

        await asyncio.to_thread(end)

    async def console_output(self, instance_id: str) -> bytes | None:
        def read() -> bytes | None:
            try:
                output = aws_retry(self.client.get_console_output)(InstanceId=instance_id).get("Output")
            except ClientError:
                return None
            if not output:
                return None
            try:
                return base64.b64decode(output)
            except ValueError:
                return output.encode()

        return await asyncio.to_thread(read)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        def delete() -> None:
            try:
                aws_retry(self.client.delete_snapshot)(SnapshotId=snapshot_id)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") != "InvalidSnapshot.NotFound":
                    raise

        await asyncio.to_thread(delete)

    async def leftovers(self) -> list[Leftover]:
        def gather() -> list[Leftover]:
            cluster = [{"Name": "tag:cbas:cluster", "Values": [self.cluster]}]
            found = [Leftover(kind="machine", id=i["InstanceId"], job_id=_tag(i, "cbas:job"),
                              ledger_id=_tag(i, "cbas:ledger"), created_at=i["LaunchTime"])
                     for i in self._find(cluster + [{"Name": "instance-state-name", "Values": LIVE_STATES}])
                     if _tag(i, "cbas:role") != "image-builder"]  # a builder belongs to its build
            volumes = aws_retry(self.client.describe_volumes)(
                Filters=cluster + [{"Name": "status", "Values": ["available"]}])["Volumes"]  # attached ones go with their machine
            found += [Leftover(kind="volume", id=v["VolumeId"], job_id=_tag(v, "cbas:job"), created_at=v["CreateTime"])
                      for v in volumes]
            snapshots = aws_retry(self.client.describe_snapshots)(OwnerIds=["self"], Filters=cluster)["Snapshots"]
            found += [Leftover(kind="snapshot", id=x["SnapshotId"], job_id=_tag(x, "cbas:job"), created_at=x["StartTime"])
                      for x in snapshots]
            images = aws_retry(self.client.describe_images)(Owners=["self"], Filters=cluster)["Images"]
            found += [Leftover(kind="image", id=i["ImageId"], created_at=_parse_time(i.get("CreationDate")))
                      for i in images]
            if self.sqs is not None:
                prefix = f"cbas-{self.cluster}-image-"
                # an image builder's name exactly (ImageBuilder.build): not the queues of a cluster
                # whose name only starts like it ("lab-image-x", whose inbox is cbas-lab-image-x-master-inbox)
                builder = re.compile(re.escape(prefix) + r"[0-9a-f]{16}$")
                for url in aws_retry(self.sqs.list_queues)(QueueNamePrefix=prefix).get("QueueUrls", []):
                    if not builder.match(url.rsplit("/", 1)[-1]):
                        continue
                    stamp = aws_retry(self.sqs.get_queue_attributes)(
                        QueueUrl=url, AttributeNames=["CreatedTimestamp"])["Attributes"]["CreatedTimestamp"]
                    found.append(Leftover(kind="queue", id=url, created_at=datetime.fromtimestamp(float(stamp), timezone.utc)))
            return found

        return await asyncio.to_thread(gather)

    async def remove(self, leftover: Leftover) -> None:
        if leftover.kind == "machine":
            await self.terminate(leftover.id)
        elif leftover.kind == "snapshot":
            await self.delete_snapshot(leftover.id)
        elif leftover.kind == "volume":
            await asyncio.to_thread(aws_retry(self.client.delete_volume), VolumeId=leftover.id)
        elif leftover.kind == "image":
            def deregister() -> None:
                image = aws_retry(self.client.describe_images)(ImageIds=[leftover.id])["Images"]
                aws_retry(self.client.deregister_image)(ImageId=leftover.id)
                for mapping in image[0].get("BlockDeviceMappings", []) if image else []:  # its snapshots too
                    if "Ebs" in mapping and mapping["Ebs"].get("SnapshotId"):
                        aws_retry(self.client.delete_snapshot)(SnapshotId=mapping["Ebs"]["SnapshotId"])

            await asyncio.to_thread(deregister)
        elif leftover.kind == "queue" and self.sqs is not None:
            await asyncio.to_thread(aws_retry(self.sqs.delete_queue), QueueUrl=leftover.id)
        else:
            raise ValueError(f"cannot remove a {leftover.kind}")

    async def list_machines(self) -> list[Machine]:
        instances = await asyncio.to_thread(aws_retry(self._find), [
            {"Name": "tag:cbas:cluster", "Values": [self.cluster]},
            {"Name": "instance-state-name", "Values": LIVE_STATES},
        ])
        return [self._machine(i) for i in instances]

    async def offers(self) -> list[Offer]:
        """The latest spot price per zone and type (capacity is learned at launch: EC2 does not say)."""
        def history() -> list[dict[str, Any]]:
            rows: list[dict[str, Any]] = []
            pages = self.client.get_paginator("describe_spot_price_history").paginate(
                InstanceTypes=self.instance_types, ProductDescriptions=["Linux/UNIX"],
                StartTime=datetime.now(timezone.utc) - timedelta(hours=3))
            for page in pages:
                rows += page["SpotPriceHistory"]
            return rows

        latest: dict[tuple[str, str], tuple[datetime, float]] = {}
        for row in await asyncio.to_thread(aws_retry(history)):
            key = (row["AvailabilityZone"], row["InstanceType"])
            if key not in latest or row["Timestamp"] > latest[key][0]:
                latest[key] = (row["Timestamp"], float(row["SpotPrice"]))
        return [
            Offer(zone=zone, instance_type=kind, spot_price=price,
                  ondemand_price=ONDEMAND_PRICES.get(kind, price * 3), available=True)
            for (zone, kind), (_, price) in sorted(latest.items())
        ]
