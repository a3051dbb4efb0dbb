"""IAM as moto enforces it, for the AWS tests: principals made in moto with CBAS's own policies,
and moto's authorization turned on, so that a missing permission fails a test.

What moto 5.2.5 checks once on (observed; docs/aws.md, "What moto's IAM checks"): the SigV4
signature and access key of every call; the action against the caller's identity policies
(inline and attached, of a user, its groups, or an assumed role), an explicit Deny winning; the
resource only for S3 (arn:aws:s3:::bucket and bucket/key, "*" matching any run of characters),
SQS queues that exist, IAM calls naming a role, and sts:AssumeRole (the role ARN, whose trust
policy it checks against the caller's ARN, literally). Every other call is checked against the
resource "*", which a statement naming an ARN never matches: `moto_view` widens those statements
to "*", their actions unchanged (it keeps SQS statements made only of calls on a queue that
exists, such as the master's inbox's, as written). moto also takes SQS's batch calls for actions
of their own (sqs:DeleteMessageBatch...), and DynamoDB's TransactWriteItems, where AWS authorizes
them by each part's single call's action (sqs:DeleteMessage, dynamodb:PutItem): `moto_view` adds
the twin beside each. Conditions are not evaluated (only StringEquals on sts:ExternalId
of a trust policy), session policies of AssumeRole are stored and ignored, and credentials never
expire. A pass proves less than real IAM; a failure is real.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import urlparse

import boto3

ACCOUNT = "123456789012"  # moto's default account
KEPT_EXACT = ("s3:", "sts:", "iam:")  # services whose resources moto matches: their statements stay as written
# calls on an SQS queue that exists, which moto checks against the queue's ARN (CreateQueue and
# ListQueues are checked against "*")
SQS_ON_A_QUEUE = frozenset({"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
                            "sqs:GetQueueAttributes", "sqs:SendMessage"})
# calls moto authorizes as actions of their own, where AWS authorizes each part by its single call's action
MOTO_TWINS = {"sqs:DeleteMessage": "sqs:DeleteMessageBatch", "sqs:ChangeMessageVisibility": "sqs:ChangeMessageVisibilityBatch",
              "sqs:SendMessage": "sqs:SendMessageBatch", "dynamodb:PutItem": "dynamodb:TransactWriteItems"}
ADMIN_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


def _actions(statement: dict[str, Any]) -> list[str]:
    action = statement["Action"]
    return [action] if isinstance(action, str) else list(action)


def moto_view(policy: dict[str, Any]) -> dict[str, Any]:
    """The policy as moto can apply it: statements of services whose resources moto does not
    resolve (SNS, DynamoDB, EC2, SQS but for calls on a queue) get Resource "*"; S3, STS, IAM
    statements and those of SQS calls on a queue are unchanged."""
    view = copy.deepcopy(policy)
    for statement in view["Statement"]:
        actions = _actions(statement)
        if not (all(a.startswith(KEPT_EXACT) for a in actions) or set(actions) <= SQS_ON_A_QUEUE):
            statement["Resource"] = "*"
        twins = [MOTO_TWINS[a] for a in actions if a in MOTO_TWINS]
        if twins:
            statement["Action"] = actions + twins
    return view


def user(iam: Any, name: str, policy: dict[str, Any], region: str = "us-east-1",
         endpoint_url: str | None = None) -> tuple[boto3.session.Session, dict[str, str]]:
    """An IAM user with this one inline policy; a session signing as it, and its keys."""
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
    made = iam.create_access_key(UserName=name)["AccessKey"]
    keys = {"AWS_ACCESS_KEY_ID": made["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": made["SecretAccessKey"]}
    return session_of(keys, region), keys


def user_arn(name: str) -> str:
    return f"arn:aws:iam::{ACCOUNT}:user/{name}"


def session_of(keys: dict[str, str], region: str = "us-east-1") -> boto3.session.Session:
    return boto3.session.Session(aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                                 aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"],
                                 aws_session_token=keys.get("AWS_SESSION_TOKEN"), region_name=region)


def instance_role_keys(role_name: str, session_name: str, region: str = "us-east-1") -> dict[str, str]:
    """What EC2 gives an instance of this role (through its metadata): a session of the role. EC2
    needs no caller to assume it, so it is made in moto's STS directly (moto cannot evaluate a
    trust policy naming only a service principal)."""
    from moto.sts.models import sts_backends

    session = sts_backends[ACCOUNT]["aws"].assume_role(
        region_name=region, role_session_name=session_name, role_arn=f"arn:aws:iam::{ACCOUNT}:role/{role_name}",
        policy=None, duration=3600, external_id=None)  # type: ignore[arg-type]
    return {"AWS_ACCESS_KEY_ID": session.access_key_id, "AWS_SECRET_ACCESS_KEY": session.secret_access_key,
            "AWS_SESSION_TOKEN": session.session_token}


@contextmanager
def enforced() -> Iterator[None]:
    """moto's IAM authorization on for every call from here (decorator mode): as
    moto.core.set_initial_no_auth_action_count(0), for a block rather than a function."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    saved = settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count
    settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = 0, 0
    try:
        yield
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT, ActionAuthenticatorMixin.request_count = saved


@contextmanager
def enforced_server(endpoint: str) -> Iterator[None]:
    """The same for a moto server, through its reset-auth endpoint."""
    import urllib.request

    def reset(count: str) -> str:
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST",
                                         headers={"Content-Type": "text/plain"})  # not a form: moto reads the body
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(json.loads(response.read())["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"])

    before = reset("0")
    try:
        yield
    finally:
        reset(before)


@contextmanager
def presigned_urls_pass() -> Iterator[None]:
    """With IAM on, moto 5.2.5 fails every presigned URL (it looks for an Authorization header:
    KeyError, HTTP 500). Let requests that carry a presigned URL's signature through unchecked, as
    moto does with IAM off; every other request is still checked. Works in decorator mode and
    for a ThreadedMotoServer (same process)."""
    from moto.core.authorization import ActionAuthenticatorMixin

    original = ActionAuthenticatorMixin._authenticate_and_authorize_action

    def authorize(self: Any, iam_request_cls: type, resource: str = "*") -> None:
        query = urlparse(self.uri).query
        if "Authorization" not in self.headers and ("X-Amz-Signature=" in query or "Signature=" in query):
            return
        original(self, iam_request_cls, resource)

    ActionAuthenticatorMixin._authenticate_and_authorize_action = authorize  # type: ignore[method-assign]
    try:
        yield
    finally:
        ActionAuthenticatorMixin._authenticate_and_authorize_action = original  # type: ignore[method-assign]
