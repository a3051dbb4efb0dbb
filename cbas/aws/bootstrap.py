"""`cbas aws bootstrap` / `teardown`: the AWS resources one CBAS cluster needs, made idempotently.

Names derive from the cluster name and account, so running bootstrap again finds what exists and
creates only what is missing. Every policy is here, and docs/aws.md shows each (a test keeps them
equal): the workers' instance role (SNS for its messages, snapshots of the cluster's volumes,
describe calls; no S3 at all), the job-data role (jobs/* in the bucket; only the master's
principal may assume it, and it does so with a session policy naming one job's prefix:
cbas/aws/job_access.py), the master's queue's (only the topic may send to it), and the master's
and the frontend's policies, the operator's to attach.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import boto3
from botocore.exceptions import ClientError

from cbas.aws.dynamodb import DynamoJobStore
from cbas.aws.ec2 import WORKER_PORT
from cbas.aws.job_access import job_data_role_name
from cbas.aws.sqs_inbox import MAX_RECEIVES, RETENTION_SECONDS, VISIBILITY_SECONDS, WAIT_SECONDS
from cbas.messages import MASTER

MASTER_PRINCIPAL_ENV = "CBAS_AWS_MASTER_PRINCIPAL"  # whom the job-data role trusts (default: bootstrap's caller)
MASTER_FILTER = {"recipient": [MASTER]}  # what the topic delivers to the master's queue


@dataclass
class Report:
    created: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


NO_QUEUE = ("AWS.SimpleQueueService.NonExistentQueue", "QueueDoesNotExist")  # query and JSON protocols


def names(cluster: str, account: str, region: str) -> dict[str, str]:
    return {
        "bucket": f"cbas-{cluster}-{account}-{region}",
        "table": f"cbas-{cluster}",
        "topic": f"cbas-{cluster}",
        "inbox": inbox_queue_name(cluster),  # the master's messages wait here (cbas/aws/sqs_inbox.py)
        "inbox_dead": f"{inbox_queue_name(cluster)}-dead",  # those that failed MAX_RECEIVES times
        "role": f"cbas-{cluster}-worker",
        "job_data_role": job_data_role_name(cluster),
        "security_group": f"cbas-{cluster}-workers",
    }


def inbox_queue_name(cluster: str) -> str:
    return f"cbas-{cluster}-master-inbox"  # never under cbas-CLUSTER-image-, which the reaper removes


def inbox_queue_policy(queue_arn: str, topic_arn: str) -> dict[str, Any]:
    """The master's queue: SNS may send to it for our topic, and no one may send otherwise (so a
    genuine old notification cannot be put back in: the queue accepts them up to 14 days old)."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": "sns.amazonaws.com"}, "Action": "sqs:SendMessage",
         "Resource": queue_arn, "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}}},
        {"Effect": "Deny", "Principal": "*", "Action": "sqs:SendMessage",
         "Resource": queue_arn, "Condition": {"ArnNotEquals": {"aws:SourceArn": topic_arn}}},
    ]}


def worker_policy(topic_arn: str, cluster: str) -> dict[str, Any]:
    """The instance role: anything that runs as root on the machine may use it, so it reaches no
    job's files (each job's come with the job: job_access.py), and never machines/*."""
    return {
        "Version": "2012-10-17",
        "Statement": [
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


def job_data_policy(bucket: str) -> dict[str, Any]:
    """The job-data role's own policy: the most any job's session may do (each session's policy
    narrows it to jobs/<id>/)."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
         "Resource": f"arn:aws:s3:::{bucket}/jobs/*"},
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}",
         "Condition": {"StringLike": {"s3:prefix": "jobs/*"}}},
    ]}


def job_data_trust(master_principal: str) -> dict[str, Any]:
    """Only the master's user or role may assume the job-data role."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": [master_principal]}, "Action": "sts:AssumeRole"}]}


def frontend_policy(bucket: str) -> dict[str, Any]:
    """`cbas submit`, `fetch` and `logs`: the rest goes through the master's API and its token."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": f"arn:aws:s3:::{bucket}/jobs/*"},
        # so that a file not there yet (an output being made) is a 404, not a 403
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}",
         "Condition": {"StringLike": {"s3:prefix": "jobs/*"}}},
    ]}


def master_policy(bucket: str, region: str, account: str, cluster: str) -> dict[str, Any]:
    """What the master needs, on the cluster's resources only (docs/aws.md shows it)."""
    table = f"arn:aws:dynamodb:{region}:{account}:table/cbas-{cluster}"
    tagged = {"StringEquals": {"aws:ResourceTag/cbas:cluster": cluster}}
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": ["dynamodb:GetItem", "dynamodb:BatchGetItem", "dynamodb:PutItem",
                                       "dynamodb:DeleteItem", "dynamodb:Query", "dynamodb:DescribeTable"],
         "Resource": [table, f"{table}/index/*"]},
        # jobs/* and machines/* (each launching machine's key, presigned for its boot, then deleted)
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject", "s3:ListBucket"],
         "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]},
        {"Effect": "Allow", "Action": ["sns:Publish", "sns:Subscribe", "sns:Unsubscribe", "sns:ConfirmSubscription",
                                       "sns:ListSubscriptionsByTopic", "sns:GetSubscriptionAttributes"],
         "Resource": f"arn:aws:sns:{region}:{account}:cbas-{cluster}"},
        {"Effect": "Allow", "Action": ["ec2:RunInstances", "ec2:CreateTags"], "Resource": "*",
         "Condition": {"StringEquals": {"aws:RequestTag/cbas:cluster": cluster}}},
        {"Effect": "Allow", "Action": "ec2:TerminateInstances", "Resource": "*", "Condition": tagged},
        {"Effect": "Allow", "Action": ["ec2:DeleteSnapshot", "ec2:DeleteVolume", "ec2:DeregisterImage"],
         "Resource": "*", "Condition": tagged},
        {"Effect": "Allow", "Action": ["ec2:CreateImage"], "Resource": "*"},
        {"Effect": "Allow", "Action": ["ec2:DescribeInstances", "ec2:DescribeSpotPriceHistory", "ec2:DescribeVolumes",
                                       "ec2:DescribeSnapshots", "ec2:DescribeImages", "ec2:DescribeInstanceAttribute",
                                       "ec2:GetConsoleOutput"], "Resource": "*"},
        # the master's inbox: read, settle and leave for later; never send, never purge
        {"Effect": "Allow", "Action": ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
                                       "sqs:GetQueueAttributes"],
         "Resource": f"arn:aws:sqs:{region}:{account}:{inbox_queue_name(cluster)}"},
        {"Effect": "Allow", "Action": ["sqs:CreateQueue", "sqs:DeleteQueue", "sqs:ReceiveMessage",
                                       "sqs:GetQueueAttributes", "sqs:SetQueueAttributes"],
         "Resource": f"arn:aws:sqs:{region}:{account}:cbas-{cluster}-image-*"},
        # listing queues is account-wide (names only); the reaper keeps to the cluster's prefix
        {"Effect": "Allow", "Action": "sqs:ListQueues", "Resource": "*"},
        {"Effect": "Allow", "Action": "iam:PassRole", "Resource": f"arn:aws:iam::{account}:role/cbas-{cluster}-worker"},
        # each job's file access, for the one machine that runs it (cbas/aws/job_access.py)
        {"Effect": "Allow", "Action": "sts:AssumeRole",
         "Resource": f"arn:aws:iam::{account}:role/{job_data_role_name(cluster)}"},
    ]}


def trusted_principal(caller_arn: str) -> str:
    """The principal a trust policy names for an identity: a role's session is its role."""
    parts = caller_arn.split(":")
    if len(parts) == 6 and parts[2] == "sts" and parts[5].startswith("assumed-role/"):
        return f"arn:{parts[1]}:iam::{parts[4]}:role/{parts[5].split('/')[1]}"
    return caller_arn


class Bootstrap:
    def __init__(self, cluster: str, region: str, session: Any | None = None,
                 master_principal: str | None = None) -> None:
        self.session = session or boto3.session.Session(region_name=region)
        self.region = region
        self.cluster = cluster
        caller = self.session.client("sts").get_caller_identity()
        self.names = names(cluster, caller["Account"], region)
        # who may assume the job-data role: the master's user or role (by default whoever bootstraps)
        self.master_principal = (master_principal or os.environ.get(MASTER_PRINCIPAL_ENV)
                                 or trusted_principal(str(caller["Arn"])))

    def _role(self, iam: Any, report: Report, name: str, trust: dict[str, Any], what: str) -> bool:
        """Create the role if it is missing (True); else give it this trust policy (False)."""
        try:
            iam.get_role(RoleName=name)
        except ClientError as exc:
            if _code(exc) != "NoSuchEntity":
                raise
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust),
                            Tags=[{"Key": "cbas:cluster", "Value": self.cluster}])
            report.created.append(f"{what} {name}")
            return True
        iam.update_assume_role_policy(RoleName=name, PolicyDocument=json.dumps(trust))
        report.found.append(f"{what} {name}")
        return False

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
        inbox_url = self._inbox(self.session.client("sqs"), sns, topic_arn, report)

        iam = self.session.client("iam")
        ec2_trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                             "Principal": {"Service": "ec2.amazonaws.com"}}]}
        if self._role(iam, report, n["role"], ec2_trust, "role and instance profile"):
            iam.create_instance_profile(InstanceProfileName=n["role"])
            iam.add_role_to_instance_profile(InstanceProfileName=n["role"], RoleName=n["role"])
        iam.put_role_policy(RoleName=n["role"], PolicyName="cbas-worker",
                            PolicyDocument=json.dumps(worker_policy(topic_arn, self.cluster)))
        self._role(iam, report, n["job_data_role"], job_data_trust(self.master_principal),
                   f"job-data role (only {self.master_principal} may assume it)")
        iam.put_role_policy(RoleName=n["job_data_role"], PolicyName="cbas-job-data",
                            PolicyDocument=json.dumps(job_data_policy(n["bucket"])))

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
            "CBAS_AWS_INBOX_QUEUE_URL": inbox_url,
            "CBAS_AWS_INSTANCE_PROFILE": n["role"], "CBAS_AWS_SECURITY_GROUPS": json.dumps([group_id]),
        }
        return report

    def _queue(self, sqs: Any, report: Report, name: str, attributes: dict[str, str], what: str) -> tuple[str, str]:
        """The queue's URL and ARN, made if missing; its attributes set either way."""
        try:
            url = str(sqs.get_queue_url(QueueName=name)["QueueUrl"])
        except ClientError as exc:
            if _code(exc) not in NO_QUEUE:
                raise
            url = str(sqs.create_queue(QueueName=name, Attributes=attributes,
                                       tags={"cbas:cluster": self.cluster})["QueueUrl"])
            report.created.append(f"{what} {name}")
        else:
            sqs.set_queue_attributes(QueueUrl=url, Attributes=attributes)
            report.found.append(f"{what} {name}")
        arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        return url, str(arn)

    def _inbox(self, sqs: Any, sns: Any, topic_arn: str, report: Report) -> str:
        """The master's queue, subscribed to the topic for the master's messages; its URL."""
        n = self.names
        kept = {"MessageRetentionPeriod": str(RETENTION_SECONDS), "SqsManagedSseEnabled": "true"}
        _, dead_arn = self._queue(sqs, report, n["inbox_dead"], kept, "dead-letter queue")
        url, arn = self._queue(sqs, report, n["inbox"], {
            **kept, "VisibilityTimeout": str(VISIBILITY_SECONDS), "ReceiveMessageWaitTimeSeconds": str(WAIT_SECONDS),
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": dead_arn, "maxReceiveCount": str(MAX_RECEIVES)})},
            "master's queue")
        # the policy in a call of its own: the queue's ARN is known only once it exists
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"Policy": json.dumps(inbox_queue_policy(arn, topic_arn))})
        # not raw: the queue holds SNS's notification, signature and all, which the master verifies
        wanted = {"FilterPolicy": json.dumps(MASTER_FILTER), "RawMessageDelivery": "false"}
        subscriptions = [s for page in sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn)
                         for s in page["Subscriptions"]]
        ours = [s for s in subscriptions if s["Protocol"] == "sqs" and s["Endpoint"] == arn]
        if ours:
            for name, value in wanted.items():
                sns.set_subscription_attributes(SubscriptionArn=ours[0]["SubscriptionArn"], AttributeName=name,
                                                AttributeValue=value)
            report.found.append(f"subscription of {n['inbox']} to the topic")
        else:
            sns.subscribe(TopicArn=topic_arn, Protocol="sqs", Endpoint=arn, Attributes=wanted,
                          ReturnSubscriptionArn=True)
            report.created.append(f"subscription of {n['inbox']} to the topic")
        # an HTTP endpoint of a master from before the queue (one that died before unsubscribing)
        for subscription in subscriptions:
            if subscription["Protocol"] in ("http", "https") and subscription["SubscriptionArn"].startswith("arn:"):
                attributes = sns.get_subscription_attributes(SubscriptionArn=subscription["SubscriptionArn"])["Attributes"]
                if json.loads(attributes.get("FilterPolicy") or "{}") == MASTER_FILTER:
                    sns.unsubscribe(SubscriptionArn=subscription["SubscriptionArn"])
                    report.created.append(f"removed the master's HTTP subscription {subscription['Endpoint']}")
        return url

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
        sqs = self.session.client("sqs")
        for queue in (n["inbox"], n["inbox_dead"]):  # (deleting the topic removed the subscription)
            try:
                sqs.delete_queue(QueueUrl=sqs.get_queue_url(QueueName=queue)["QueueUrl"])
                report.created.append(f"deleted queue {queue}")
            except ClientError as exc:
                if _code(exc) not in NO_QUEUE:
                    raise
        iam = self.session.client("iam")
        try:
            iam.delete_role_policy(RoleName=n["job_data_role"], PolicyName="cbas-job-data")
            iam.delete_role(RoleName=n["job_data_role"])
            report.created.append(f"deleted role {n['job_data_role']}")
        except ClientError as exc:
            if _code(exc) != "NoSuchEntity":
                raise
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
