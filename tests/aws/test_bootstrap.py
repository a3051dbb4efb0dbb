"""`cbas aws bootstrap` and `teardown` on moto: idempotent, least privilege, reversible."""

from __future__ import annotations

import json

import boto3
import pytest
from click.testing import CliRunner
from moto import mock_aws

from cbas.aws.bootstrap import Bootstrap, worker_policy
from cbas.cli import cli


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield


def test_bootstrap_twice_creates_once_and_teardown_removes_everything(aws) -> None:  # type: ignore[no-untyped-def]
    session = boto3.session.Session(region_name="us-east-1")
    asked: list[dict[str, str]] = []  # moto does not keep SignatureVersion: watch the request instead
    session.events.register("provide-client-params.sns.SetTopicAttributes", lambda params, **_: asked.append(dict(params)))
    first = Bootstrap("lab", "us-east-1", session).up()
    assert len(first.created) == 5 and first.found == []
    second = Bootstrap("lab", "us-east-1", session).up()
    assert second.created == [] and len(second.found) == 5
    assert first.settings == second.settings
    assert all(a["AttributeName"] == "SignatureVersion" and a["AttributeValue"] == "2" for a in asked) and len(asked) == 2
    policy = boto3.client("iam").get_role_policy(RoleName="cbas-lab-worker", PolicyName="cbas-worker")["PolicyDocument"]
    actions = {a for statement in policy["Statement"] for a in ([statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"])}
    assert not any(a.endswith("*") for a in actions)  # no wildcard actions
    Bootstrap("lab", "us-east-1").down()
    assert boto3.client("dynamodb").list_tables()["TableNames"] == []
    assert boto3.client("sns").list_topics()["Topics"] == []
    assert not [b for b in boto3.client("s3").list_buckets()["Buckets"] if b["Name"].startswith("cbas-lab")]


def test_the_worker_policy_is_scoped_to_the_job_prefix_and_topic() -> None:
    policy = worker_policy("bucket", "arn:aws:sns:us-east-1:1:cbas-lab", "lab")
    resources = [s["Resource"] for s in policy["Statement"]]
    assert resources[:3] == ["arn:aws:s3:::bucket/jobs/*", "arn:aws:s3:::bucket", "arn:aws:sns:us-east-1:1:cbas-lab"]
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
