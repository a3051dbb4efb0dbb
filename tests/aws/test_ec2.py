"""The EC2 cloud on moto: spot and on-demand launches, tags, idempotency, listing, offers."""

from __future__ import annotations

import base64

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws
from pydantic import SecretStr

from cbas.aws.ec2 import Ec2Cloud, render_user_data
from cbas.aws.volumes import EbsSnapshots, NoDataVolume
from cbas.backends import CapacityError, PriceTooLow
from cbas.models import LaunchSpec


@pytest.fixture
def ec2():
    with mock_aws():
        client = boto3.client("ec2", region_name="us-east-1")
        image = client.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        yield client, image


KEY = SecretStr("ab" * 32)
USER_DATA = render_user_data("https://bucket.s3.amazonaws.com/cbas.whl?X-Amz-Expires=300", "cbas-0.1.0-py3-none-any.whl",
                             {"CBAS_BACKEND": "aws", "CBAS_CLUSTER": "test"},
                             "https://bucket.s3.amazonaws.com/machines/l-1/key?X-Amz-Expires=900", "l-1")


async def test_spot_launch_is_tagged_idempotent_listed_and_terminated(ec2) -> None:  # type: ignore[no-untyped-def]
    client, image = ec2
    cloud = Ec2Cloud("test", image, USER_DATA, client)
    spec = LaunchSpec(machine_key=KEY, ledger_id="l-1", job_id="j1", instance_type="c5.large", zone="us-east-1a", market="spot",
                      max_price=0.05)
    machine = await cloud.launch(spec)
    assert machine.market == "spot" and machine.zone == "us-east-1a" and machine.tags["cbas:job"] == "j1"
    again = await cloud.launch(spec)  # the same ledger id: the same machine
    assert again.instance_id == machine.instance_id
    [instance] = client.describe_instances(InstanceIds=[machine.instance_id])["Reservations"][0]["Instances"]
    assert instance["InstanceLifecycle"] == "spot" and instance["InstanceType"] == "c5.large"
    volumes = client.describe_volumes(Filters=[{"Name": "tag:cbas:job", "Values": ["j1"]}])["Volumes"]
    assert volumes  # volumes are tagged too, so the reaper can find them
    data = client.describe_instance_attribute(InstanceId=machine.instance_id, Attribute="userData")["UserData"]["Value"]
    assert "cbas worker" in base64.b64decode(data).decode()
    assert [m.instance_id for m in await cloud.list_machines()] == [machine.instance_id]
    assert await Ec2Cloud("other-cluster", image, USER_DATA, client).list_machines() == []
    await cloud.terminate(machine.instance_id)
    await cloud.terminate(machine.instance_id)  # twice is fine
    assert await cloud.list_machines() == []


async def test_on_demand_and_offers(ec2) -> None:  # type: ignore[no-untyped-def]
    client, image = ec2
    cloud = Ec2Cloud("test", image, USER_DATA, client, instance_types=["c5.large"])
    machine = await cloud.launch(LaunchSpec(machine_key=KEY, ledger_id="l-2", job_id="j2", instance_type="c5.large", zone="us-east-1b",
                                            market="on-demand"))
    assert machine.market == "on-demand" and machine.price == 0.085
    offers = await cloud.offers()
    assert offers and all(o.instance_type == "c5.large" and o.ondemand_price == 0.085 for o in offers)


def test_user_data_carries_settings_but_never_credentials() -> None:
    assert "CBAS_CLUSTER=test" in USER_DATA and "169.254.169.254" in USER_DATA
    with pytest.raises(ValueError, match="CBAS_ settings only"):
        render_user_data("https://x", "w.whl", {"AWS_SECRET_ACCESS_KEY": "nope"}, "https://k", "l-1")
    assert "/var/lib/cbas/worker/machine.key 'https://bucket.s3.amazonaws.com/machines/l-1/key" in USER_DATA
    assert "echo 'l-1' > /var/lib/cbas/worker/ledger-id" in USER_DATA and KEY.get_secret_value() not in USER_DATA


async def test_a_volume_job_gets_a_data_disk_snapshotted_by_its_worker_and_restored(ec2) -> None:  # type: ignore[no-untyped-def]
    client, image = ec2
    cloud = Ec2Cloud("test", image, USER_DATA, client)
    first = await cloud.launch(LaunchSpec(machine_key=KEY, ledger_id="l-3", job_id="j3", instance_type="c5.large", zone="us-east-1a",
                                          market="spot", data_volume_gib=20))
    snapshots = EbsSnapshots(client, first.instance_id, "test", waiter_delay=1)
    volume = snapshots.volume_id()
    assert client.describe_volumes(VolumeIds=[volume])["Volumes"][0]["Size"] == 20
    snapshot = snapshots.snapshot("j3", "a0001-n00001")
    snapshots.wait(snapshot)
    [described] = client.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"]
    assert described["VolumeId"] == volume
    assert {t["Key"]: t["Value"] for t in described["Tags"]} == {
        "cbas:cluster": "test", "cbas:job": "j3", "cbas:checkpoint": "a0001-n00001"}
    second = await cloud.launch(LaunchSpec(machine_key=KEY, ledger_id="l-4", job_id="j3", instance_type="c5.large", zone="us-east-1b",
                                           market="spot", data_volume_gib=20, data_snapshot=snapshot))
    restored = EbsSnapshots(client, second.instance_id, "test").volume_id()
    assert client.describe_volumes(VolumeIds=[restored])["Volumes"][0]["SnapshotId"] == snapshot
    await cloud.delete_snapshot(snapshot)
    await cloud.delete_snapshot(snapshot)  # twice is fine
    assert client.describe_snapshots(Filters=[{"Name": "tag:cbas:job", "Values": ["j3"]}])["Snapshots"] == []
    plain = await cloud.launch(LaunchSpec(machine_key=KEY, ledger_id="l-5", job_id="j4", instance_type="c5.large", zone="us-east-1a",
                                          market="spot"))
    with pytest.raises(NoDataVolume, match="needs a data disk at /dev/sdf"):
        EbsSnapshots(client, plain.instance_id, "test").volume_id()


async def test_a_job_image_replaces_the_cluster_image(ec2) -> None:  # type: ignore[no-untyped-def]
    client, image = ec2
    other = client.describe_images(Owners=["amazon"])["Images"][1]["ImageId"]
    machine = await Ec2Cloud("test", image, USER_DATA, client).launch(LaunchSpec(
        machine_key=KEY, ledger_id="l-6", job_id="j5", instance_type="c5.large", zone="us-east-1a", market="spot", image_id=other))
    [instance] = client.describe_instances(InstanceIds=[machine.instance_id])["Reservations"][0]["Instances"]
    assert instance["ImageId"] == other != image


async def test_the_clusters_leftovers_are_found_and_removed(ec2) -> None:  # type: ignore[no-untyped-def]
    client, image = ec2
    sqs = boto3.client("sqs", region_name="us-east-1")
    cloud = Ec2Cloud("test", image, USER_DATA, client, sqs=sqs)
    machine = await cloud.launch(LaunchSpec(machine_key=KEY, ledger_id="l-7", job_id="j7", instance_type="c5.large", zone="us-east-1a",
                                            market="spot", data_volume_gib=10))
    snapshot = EbsSnapshots(client, machine.instance_id, "test").snapshot("j7", "a0001-n00001")
    tags = [{"ResourceType": "volume", "Tags": [{"Key": "cbas:cluster", "Value": "test"}, {"Key": "cbas:job", "Value": "j7"}]}]
    loose = client.create_volume(AvailabilityZone="us-east-1a", Size=1, TagSpecifications=tags)["VolumeId"]
    built = client.create_image(InstanceId=machine.instance_id, Name="cbas-test-x", TagSpecifications=[
        {"ResourceType": "image", "Tags": [{"Key": "cbas:cluster", "Value": "test"}]}])["ImageId"]
    queue = sqs.create_queue(QueueName="cbas-test-image-0123456789abcdef")["QueueUrl"]
    sqs.create_queue(QueueName="someone-elses-queue")
    sqs.create_queue(QueueName="cbas-test-image-x-master-inbox")  # cluster "test-image-x"'s master's queue
    found = {(item.kind, item.id) for item in await cloud.leftovers()}
    assert found >= {("machine", machine.instance_id), ("snapshot", snapshot), ("volume", loose), ("image", built),
                     ("queue", queue)}
    assert not any("someone-elses" in id_ or "inbox" in id_ for _, id_ in found)
    for item in await cloud.leftovers():
        await cloud.remove(item)
    assert {(item.kind, item.id) for item in await cloud.leftovers()} == set()
    assert client.describe_images(ImageIds=[built])["Images"] == [] or \
        client.describe_images(ImageIds=[built])["Images"][0]["State"] == "deregistered"


@pytest.mark.parametrize(("code", "refusal"), [("InsufficientInstanceCapacity", CapacityError),
                                               ("SpotMaxPriceTooLow", PriceTooLow)])
async def test_ec2_refusals_are_told_apart(ec2, code: str, refusal: type) -> None:  # type: ignore[no-untyped-def]
    """moto never refuses a launch; EC2 does, with these codes (its answer is the part mocked)."""
    client, image = ec2
    cloud = Ec2Cloud("test", image, USER_DATA, client)

    def refuse(**params):  # type: ignore[no-untyped-def]
        raise ClientError({"Error": {"Code": code, "Message": "refused"}}, "RunInstances")

    client.run_instances = refuse
    with pytest.raises(refusal, match=code) as raised:
        await cloud.launch(LaunchSpec(machine_key=KEY, ledger_id="l-9", job_id="j9", instance_type="c5.large",
                                      zone="us-east-1a", market="spot", max_price=0.01))
    assert isinstance(raised.value, PriceTooLow) == (refusal is PriceTooLow)
