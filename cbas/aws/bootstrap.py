"""`cbas aws bootstrap` / `teardown`: the AWS resources one CBAS cluster needs, made idempotently.

Names derive from the cluster name and account, so running bootstrap again finds what exists and
creates only what is missing. The worker role gets the least privilege it needs: its job's
prefix in the bucket and publishing to (and subscribing its endpoint on) the cluster's topic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.exceptions import ClientError

from cbas.aws.dynamodb import DynamoJobStore
from cbas.aws.ec2 import WORKER_PORT



@dataclass
class Report:
    created: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def names(cluster: str, account: str, region: str) -> dict[str, str]:
    return {
        "bucket": f"cbas-{cluster}-{account}-{region}",
        "table": f"cbas-{cluster}",
        "topic": f"cbas-{cluster}",
        "role": f"cbas-{cluster}-worker",
        "security_group": f"cbas-{cluster}-workers",
    }


def worker_policy(bucket: str, topic_arn: str, cluster: str) -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
             "Resource": f"arn:aws:s3:::{bucket}/jobs/*"},
            {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}",
             "Condition": {"StringLike": {"s3:prefix": "jobs/*"}}},
            {"Effect": "Allow", "Action": ["sns:Publish", "sns:Subscribe", "sns:Unsubscribe", "sns:ConfirmSubscription"],
             "Resource": topic_arn},
            # the volume strategy: snapshot the cluster's own volumes, tagged for the cluster
            {"Effect": "Allow", "Action": "ec2:CreateSnapshot", "Resource": "arn:aws:ec2:*:*:volume/*",
             "Condition": {"StringEquals": {"aws:ResourceTag/cbas:cluster": cluster}}},
            {"Effect": "Allow", "Action": ["ec2:CreateSnapshot", "ec2:CreateTags"], "Resource": "arn:aws:ec2:*::snapshot/*",
             "Condition": {"StringEquals": {"aws:RequestTag/cbas:cluster": cluster}}},
            {"Effect": "Allow", "Action": ["ec2:DescribeInstances", "ec2:DescribeSnapshots"], "Resource": "*"},
        ],
    }


class Bootstrap:
    def __init__(self, cluster: str, region: str, session: Any | None = None) -> None:
        self.session = session or boto3.session.Session(region_name=region)
        self.region = region
        self.cluster = cluster
        account = self.session.client("sts").get_caller_identity()["Account"]
        self.names = names(cluster, account, region)

    def up(self) -> Report:
        report = Report()
        n = self.names
        s3 = self.session.client("s3")
        try:
            s3.head_bucket(Bucket=n["bucket"])
            report.found.append(f"bucket {n['bucket']}")
        except ClientError:
            kwargs: dict[str, Any] = {"Bucket": n["bucket"]}
            if self.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            s3.create_bucket(**kwargs)
            s3.put_public_access_block(Bucket=n["bucket"], PublicAccessBlockConfiguration={
                "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True, "RestrictPublicBuckets": True})
            s3.put_bucket_lifecycle_configuration(Bucket=n["bucket"], LifecycleConfiguration={"Rules": [{
                "ID": "cbas-abort-partial-uploads", "Status": "Enabled", "Filter": {"Prefix": "jobs/"},
                "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1}}]})
            report.created.append(f"bucket {n['bucket']}")

        dynamodb = self.session.resource("dynamodb")
        existed = n["table"] in dynamodb.meta.client.list_tables()["TableNames"]
        DynamoJobStore(n["table"], dynamodb)
        (report.found if existed else report.created).append(f"table {n['table']}")

        sns = self.session.client("sns")
        topics = [t["TopicArn"] for t in sns.list_topics()["Topics"]]
        topic_arn = next((t for t in topics if t.rsplit(":", 1)[1] == n["topic"]), None)
        if topic_arn:
            report.found.append(f"topic {topic_arn}")
        else:
            topic_arn = sns.create_topic(Name=n["topic"])["TopicArn"]
            report.created.append(f"topic {topic_arn}")
        # SHA256 signatures (SNS defaults to SHA1), also on a topic that existed already
        sns.set_topic_attributes(TopicArn=topic_arn, AttributeName="SignatureVersion", AttributeValue="2")

        iam = self.session.client("iam")
        try:
            iam.get_role(RoleName=n["role"])
            report.found.append(f"role {n['role']}")
        except ClientError as exc:
            if _code(exc) != "NoSuchEntity":
                raise
            trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                             "Principal": {"Service": "ec2.amazonaws.com"}}]}
            iam.create_role(RoleName=n["role"], AssumeRolePolicyDocument=json.dumps(trust),
                            Tags=[{"Key": "cbas:cluster", "Value": self.cluster}])
            iam.create_instance_profile(InstanceProfileName=n["role"])
            iam.add_role_to_instance_profile(InstanceProfileName=n["role"], RoleName=n["role"])
            report.created.append(f"role and instance profile {n['role']}")
        iam.put_role_policy(RoleName=n["role"], PolicyName="cbas-worker",
                            PolicyDocument=json.dumps(worker_policy(n["bucket"], topic_arn, self.cluster)))

        ec2 = self.session.client("ec2")
        groups = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [n["security_group"]]}])
        if groups["SecurityGroups"]:
            group_id = groups["SecurityGroups"][0]["GroupId"]
            report.found.append(f"security group {group_id}")
        else:
            group_id = ec2.create_security_group(GroupName=n["security_group"],
                                                 Description="CBAS workers: SNS delivers to their endpoint")["GroupId"]
            ec2.authorize_security_group_ingress(GroupId=group_id, IpPermissions=[{
                "IpProtocol": "tcp", "FromPort": WORKER_PORT, "ToPort": WORKER_PORT,
                "IpRanges": [{"CidrIp": "0.0.0.0/0", "Description": "SNS deliveries (every message is signature-checked)"}]}])
            report.created.append(f"security group {group_id}")

        report.settings = {
            "CBAS_BACKEND": "aws", "CBAS_CLUSTER": self.cluster, "CBAS_AWS_REGION": self.region,
            "CBAS_AWS_BUCKET": n["bucket"], "CBAS_AWS_TABLE": n["table"], "CBAS_AWS_TOPIC_ARN": topic_arn,
            "CBAS_AWS_INSTANCE_PROFILE": n["role"], "CBAS_AWS_SECURITY_GROUPS": json.dumps([group_id]),
        }
        return report

    def down(self) -> Report:
        """Delete what up() made; the bucket with everything in it."""
        report = Report()
        n = self.names
        s3 = self.session.resource("s3")
        try:
            bucket = s3.Bucket(n["bucket"])
            bucket.objects.all().delete()
            bucket.delete()
            report.created.append(f"deleted bucket {n['bucket']}")
        except ClientError as exc:
            if _code(exc) not in ("NoSuchBucket", "404"):
                raise
        client = self.session.client("dynamodb")
        if n["table"] in client.list_tables()["TableNames"]:
            client.delete_table(TableName=n["table"])
            report.created.append(f"deleted table {n['table']}")
        sns = self.session.client("sns")
        for topic in sns.list_topics()["Topics"]:
            if topic["TopicArn"].rsplit(":", 1)[1] == n["topic"]:
                sns.delete_topic(TopicArn=topic["TopicArn"])
                report.created.append(f"deleted topic {topic['TopicArn']}")
        iam = self.session.client("iam")
        try:
            iam.delete_role_policy(RoleName=n["role"], PolicyName="cbas-worker")
            iam.remove_role_from_instance_profile(InstanceProfileName=n["role"], RoleName=n["role"])
            iam.delete_instance_profile(InstanceProfileName=n["role"])
            iam.delete_role(RoleName=n["role"])
            report.created.append(f"deleted role {n['role']}")
        except ClientError as exc:
            if _code(exc) != "NoSuchEntity":
                raise
        ec2 = self.session.client("ec2")
        for group in ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [n["security_group"]]}])["SecurityGroups"]:
            ec2.delete_security_group(GroupId=group["GroupId"])
            report.created.append(f"deleted security group {group['GroupId']}")
        return report
