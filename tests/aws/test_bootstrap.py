"""`cbas aws bootstrap` and `teardown` on moto: idempotent, least privilege, reversible; with moto's
IAM on, run as an administrator created in moto, and every policy equal to the one docs/aws.md shows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError
from click.testing import CliRunner
from moto import mock_aws

from cbas.aws.bootstrap import (
    Bootstrap, frontend_policy, inbox_queue_policy, job_data_policy, job_data_trust, master_policy, trusted_principal,
    worker_policy,
)
from cbas.aws.job_access import job_session_policy
from cbas.cli import cli
from tests.aws.iam import ADMIN_POLICY, enforced, user, user_arn

PAGE = Path(__file__).resolve().parents[2] / "docs" / "aws.md"
TOPIC = "arn:aws:sns:REGION:ACCOUNT:cbas-CLUSTER"
INBOX = "arn:aws:sqs:REGION:ACCOUNT:cbas-CLUSTER-master-inbox"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield


def actions(policy: dict[str, Any]) -> set[str]:
    return {a for s in policy["Statement"] for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}


def resources(statements: list[dict[str, Any]]) -> set[str]:
    return {r for s in statements for r in ([s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"])}


def documented(name: str) -> Any:
    """The JSON block docs/aws.md shows after `<!-- policy: name -->`."""
    return json.loads(PAGE.read_text().split(f"<!-- policy: {name} -->")[1].split("```json\n")[1].split("```")[0])


def test_bootstrap_twice_creates_once_and_teardown_removes_everything(aws) -> None:  # type: ignore[no-untyped-def]
    admin, _ = user(boto3.client("iam"), "admin", ADMIN_POLICY)
    asked: list[dict[str, str]] = []  # moto does not keep SignatureVersion: watch the request instead
    admin.events.register("provide-client-params.sns.SetTopicAttributes", lambda params, **_: asked.append(dict(params)))
    with enforced():
        first = Bootstrap("lab", "us-east-1", admin, master_principal=user_arn("cbas-master")).up()
        assert len(first.created) == 9 and first.found == []
        second = Bootstrap("lab", "us-east-1", admin, master_principal=user_arn("cbas-master")).up()
        assert second.created == [] and len(second.found) == 9
        assert first.settings == second.settings
        assert all(a["AttributeName"] == "SignatureVersion" and a["AttributeValue"] == "2" for a in asked) and len(asked) == 2
        iam = admin.client("iam")
        worker = iam.get_role_policy(RoleName="cbas-lab-worker", PolicyName="cbas-worker")["PolicyDocument"]
        assert not any(a.endswith("*") for a in actions(worker))  # no wildcard actions
        assert not any(a.startswith("s3:") for a in actions(worker))  # the instance role reaches no job's files
        data = iam.get_role(RoleName="cbas-lab-job-data")["Role"]["AssumeRolePolicyDocument"]
        assert data == job_data_trust(user_arn("cbas-master"))
        account = admin.client("sts").get_caller_identity()["Account"]
        bucket = f"cbas-lab-{account}-us-east-1"
        assert iam.get_role_policy(RoleName="cbas-lab-job-data", PolicyName="cbas-job-data")["PolicyDocument"] == \
            job_data_policy(bucket)
        Bootstrap("lab", "us-east-1", admin).down()
        assert admin.client("sqs").list_queues().get("QueueUrls", []) == []
        assert admin.client("dynamodb").list_tables()["TableNames"] == []
        assert admin.client("sns").list_topics()["Topics"] == []
        assert not [b for b in admin.client("s3").list_buckets()["Buckets"] if b["Name"].startswith("cbas-lab")]
        assert [r["RoleName"] for r in iam.list_roles()["Roles"] if r["RoleName"].startswith("cbas-lab")] == []


def test_bootstrap_makes_the_masters_queue_on_the_topic(aws) -> None:  # type: ignore[no-untyped-def]
    admin, _ = user(boto3.client("iam"), "admin", ADMIN_POLICY)
    sns = admin.client("sns")
    with enforced():
        made = Bootstrap("lab", "us-east-1", admin).up().settings
        topic, url = made["CBAS_AWS_TOPIC_ARN"], made["CBAS_AWS_INBOX_QUEUE_URL"]
        sqs = admin.client("sqs")
        attributes = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
        assert attributes["QueueArn"].endswith(":cbas-lab-master-inbox")
        assert (attributes["MessageRetentionPeriod"], attributes["VisibilityTimeout"]) == ("1209600", "60")
        assert attributes["ReceiveMessageWaitTimeSeconds"] == "20" and attributes["SqsManagedSseEnabled"] == "true"
        assert json.loads(attributes["Policy"]) == inbox_queue_policy(attributes["QueueArn"], topic)
        redrive = json.loads(attributes["RedrivePolicy"])
        assert redrive["deadLetterTargetArn"].endswith(":cbas-lab-master-inbox-dead") and int(redrive["maxReceiveCount"]) == 100
        dead = sqs.get_queue_attributes(QueueUrl=sqs.get_queue_url(QueueName="cbas-lab-master-inbox-dead")["QueueUrl"],
                                        AttributeNames=["MessageRetentionPeriod"])["Attributes"]
        assert dead["MessageRetentionPeriod"] == "1209600"
        [subscription] = sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
        assert (subscription["Protocol"], subscription["Endpoint"]) == ("sqs", attributes["QueueArn"])
        wanted = sns.get_subscription_attributes(SubscriptionArn=subscription["SubscriptionArn"])["Attributes"]
        assert json.loads(wanted["FilterPolicy"]) == {"recipient": ["master"]} and wanted["RawMessageDelivery"] == "false"
        # a master from before the queue left its HTTP endpoint: bootstrap removes it, and only it
        for recipient in ("master", "worker/i-1"):
            sns.subscribe(TopicArn=topic, Protocol="http", Endpoint=f"http://127.0.0.1:9/{recipient}",
                          Attributes={"FilterPolicy": json.dumps({"recipient": [recipient]})})
        again = Bootstrap("lab", "us-east-1", admin).up()
        assert again.settings == made and again.created == ["removed the master's HTTP subscription http://127.0.0.1:9/master"]
        left = sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
        assert sorted(s["Endpoint"] for s in left) == sorted([attributes["QueueArn"], "http://127.0.0.1:9/worker/i-1"])


def test_bootstrap_trusts_its_caller_by_default_and_a_role_as_itself(aws) -> None:  # type: ignore[no-untyped-def]
    admin, _ = user(boto3.client("iam"), "ops", ADMIN_POLICY)
    with enforced():
        Bootstrap("lab", "us-east-1", admin).up()
        trust = admin.client("iam").get_role(RoleName="cbas-lab-job-data")["Role"]["AssumeRolePolicyDocument"]
    assert trust["Statement"][0]["Principal"] == {"AWS": [user_arn("ops")]}
    assert trusted_principal("arn:aws:sts::1:assumed-role/cbas-master/i-0abc") == "arn:aws:iam::1:role/cbas-master"
    assert trusted_principal("arn:aws-cn:iam::1:user/x") == "arn:aws-cn:iam::1:user/x"


def test_the_worker_policy_reaches_the_topic_and_snapshots_only() -> None:
    policy = worker_policy("arn:aws:sns:us-east-1:1:cbas-lab", "lab")
    assert resources(policy["Statement"][:1]) == {"arn:aws:sns:us-east-1:1:cbas-lab"}
    assert not [s for s in policy["Statement"] if any(a.startswith(("s3:", "sts:", "iam:", "sqs:")) for a in actions(
        {"Statement": [s]}))]  # no S3 (no job's files, no machine's key), no other role, not the master's queue
    writes = [s for s in policy["Statement"] if "ec2:CreateSnapshot" in s["Action"]]
    assert writes and all(s["Condition"]["StringEquals"] in ({"aws:ResourceTag/cbas:cluster": "lab"},
                                                             {"aws:RequestTag/cbas:cluster": "lab"}) for s in writes)


def test_cli_prints_settings_and_teardown_asks_first(aws) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(cli, ["aws", "bootstrap", "--cluster", "lab"], obj={})
    assert result.exit_code == 0, result.output
    assert "CBAS_AWS_BUCKET=cbas-lab-" in result.stdout
    refused = CliRunner().invoke(cli, ["aws", "teardown", "--cluster", "lab"], obj={})
    assert refused.exit_code == 2
    assert CliRunner().invoke(cli, ["aws", "teardown", "--cluster", "lab", "--yes"], obj={}).exit_code == 0
    json.dumps(result.stdout)


def test_only_the_job_data_role_reaches_job_files_and_nothing_reaches_machine_keys() -> None:
    data = job_data_policy("bucket")
    assert resources(data["Statement"]) == {"arn:aws:s3:::bucket/jobs/*", "arn:aws:s3:::bucket"}  # never machines/*
    listing = [s for s in data["Statement"] if s["Action"] == "s3:ListBucket"]
    assert listing and all(s["Condition"] == {"StringLike": {"s3:prefix": "jobs/*"}} for s in listing)
    front = frontend_policy("bucket")
    assert resources(front["Statement"]) == {"arn:aws:s3:::bucket/jobs/*", "arn:aws:s3:::bucket"}
    assert "s3:DeleteObject" not in actions(front)


def test_every_documented_policy_is_the_one_the_code_makes() -> None:
    assert documented("worker") == worker_policy(TOPIC, "CLUSTER")
    assert documented("job-data") == job_data_policy("BUCKET")
    assert documented("job-data-trust") == job_data_trust("MASTER_PRINCIPAL")
    assert documented("job-session") == job_session_policy("BUCKET", "JOB")
    assert documented("frontend") == frontend_policy("BUCKET")
    assert documented("inbox-queue") == inbox_queue_policy(INBOX, TOPIC)
    policy = master_policy("BUCKET", "REGION", "ACCOUNT", "CLUSTER")
    assert documented("master") == policy
    # every DynamoDB call the store makes, the machines' keys (machines/*, in BUCKET/*), stale
    # endpoints, and each job's file access
    assert {"dynamodb:BatchGetItem", "dynamodb:Query", "dynamodb:GetItem", "dynamodb:PutItem"} <= actions(policy)
    assert {"s3:PutObject", "s3:GetObject", "s3:DeleteObject"} <= actions(policy)
    assert {"sns:ListSubscriptionsByTopic", "sns:GetSubscriptionAttributes", "ec2:GetConsoleOutput"} <= actions(policy)
    assumed = [s for s in policy["Statement"] if s["Action"] == "sts:AssumeRole"]
    assert resources(assumed) == {"arn:aws:iam::ACCOUNT:role/cbas-CLUSTER-job-data"}
    inbox = [s for s in policy["Statement"] if "sqs:DeleteMessage" in s["Action"]]
    assert resources(inbox) == {INBOX}  # that queue alone (the image builders' are another statement)
    assert actions({"Statement": inbox}) == {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
                                             "sqs:GetQueueAttributes"}
    sending = inbox_queue_policy(INBOX, TOPIC)["Statement"]
    assert [(s["Effect"], s["Action"], s["Condition"]) for s in sending] == [
        ("Allow", "sqs:SendMessage", {"ArnEquals": {"aws:SourceArn": TOPIC}}),
        ("Deny", "sqs:SendMessage", {"ArnNotEquals": {"aws:SourceArn": TOPIC}})]  # only SNS, for our topic


def test_teardown_of_nothing_is_quiet(aws) -> None:  # type: ignore[no-untyped-def]
    admin, _ = user(boto3.client("iam"), "admin", ADMIN_POLICY)
    with enforced():
        report = Bootstrap("none", "us-east-1", admin).down()
    assert report.created == []
    with pytest.raises(ClientError):  # enforcement is on: moto's default keys are no IAM user's
        with enforced():
            boto3.client("s3").list_buckets()
