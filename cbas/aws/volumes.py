"""The `volume` strategy on EC2: snapshot the job's EBS data disk from the worker (its role may
create snapshots tagged for the cluster); the master launches the next machine with a volume
made from the newest snapshot."""

from __future__ import annotations

from typing import Any

from cbas.aws.ec2 import DATA_DEVICE
from cbas.aws.retry import aws_retry


class NoDataVolume(RuntimeError):
    pass


class EbsSnapshots:
    def __init__(self, ec2: Any, instance_id: str, cluster: str, device: str = DATA_DEVICE,
                 waiter_delay: int = 5, waiter_attempts: int = 120) -> None:
        self.ec2, self.instance_id, self.cluster, self.device = ec2, instance_id, cluster, device
        self.waiter_config = {"Delay": waiter_delay, "MaxAttempts": waiter_attempts}

    def volume_id(self) -> str:
        reservations = aws_retry(self.ec2.describe_instances)(InstanceIds=[self.instance_id])["Reservations"]
        for mapping in reservations[0]["Instances"][0].get("BlockDeviceMappings", []):
            if mapping["DeviceName"] == self.device:
                return str(mapping["Ebs"]["VolumeId"])
        raise NoDataVolume(f"the volume strategy needs a data disk at {self.device}; {self.instance_id} has none")

    def snapshot(self, job_id: str, checkpoint_id: str) -> str:
        tags = {"cbas:cluster": self.cluster, "cbas:job": job_id, "cbas:checkpoint": checkpoint_id}
        snapshot = aws_retry(self.ec2.create_snapshot)(
            VolumeId=self.volume_id(), Description=f"CBAS job {job_id} checkpoint {checkpoint_id}",
            TagSpecifications=[{"ResourceType": "snapshot", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
        return str(snapshot["SnapshotId"])

    def wait(self, snapshot_id: str) -> None:
        self.ec2.get_waiter("snapshot_completed").wait(SnapshotIds=[snapshot_id], WaiterConfig=self.waiter_config)
