"""AWS least privilege, attacked (issue 12, item 6). A job is untrusted code on the worker's
machine; what it could reach there is what these tests try:

- instance metadata, where EC2 hands out the instance role's credentials: the boot script's own
  firewall lines, applied in a network namespace that holds 169.254.169.254, let root through
  and refuse `nobody`;
- with the instance role's credentials, any job's files or a machine's key (moto's IAM refuses);
- with the credentials its master sent it for job A, another job's files or the machines' keys:
  moto refuses what the job-data role's own policy forbids (`machines/*`, the wheel); moto does
  not apply session policies (nor `s3:prefix` conditions), so what keeps A from B is tested as
  data, with moto's own policy evaluator, and the gaps are pinned down so that a moto that starts
  enforcing them tells us.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
from typing import Any, Iterator

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from cbas.aws.bootstrap import Bootstrap, master_policy
from cbas.aws.ec2 import metadata_firewall, render_user_data
from cbas.aws.job_access import StsJobCredentials, job_session_policy
from tests.aws.iam import ACCOUNT, ADMIN_POLICY, enforced, instance_role_keys, moto_view, session_of, user, user_arn

REGION = "us-east-1"
BUCKET = f"cbas-lab-{ACCOUNT}-{REGION}"
FILES = ("jobs/A/input.tar.zst", "jobs/B/input.tar.zst", "jobs/B/ckpt/c-1/manifest.json", "machines/l-1/key",
         "dist/cbas-1.0-py3-none-any.whl")


# --- instance metadata is root's alone -----------------------------------------------------------

IMDS = "169.254.169.254"
SERVER = """
import http.server, sys
class IMDS(http.server.BaseHTTPRequestHandler):  # IMDSv2: a PUT for a token, then GETs with it
    def reply(self, code, body):
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_PUT(self):
        self.reply(200, b"tok") if self.path == "/latest/api/token" else self.reply(404, b"")
    def do_GET(self):
        ok = self.headers.get("X-aws-ec2-metadata-token") == "tok"
        self.reply(200, b"cbas-lab-worker") if ok else self.reply(401, b"")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("169.254.169.254", 80), IMDS)
print("ready", flush=True)
server.serve_forever()
"""
# From 127.0.0.1, as on EC2 a process speaks from the instance's own address: from the metadata
# address itself, REJECT's ICMP answer would go to that address and be rejected in turn
CLIENT = """
import http.client
def ask(method, path, headers):
    connection = http.client.HTTPConnection("169.254.169.254", 80, timeout=5, source_address=("127.0.0.1", 0))
    connection.request(method, path, headers=headers)
    return connection.getresponse().read().decode()
try:
    token = ask("PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": "60"})
    print("served", ask("GET", "/latest/meta-data/iam/security-credentials/", {"X-aws-ec2-metadata-token": token}))
except OSError as exc:
    print("refused", exc)
"""


def _tools() -> dict[str, str]:
    found = {name: shutil.which(name) or "" for name in ("ip", "iptables", "setpriv")}
    found["python"] = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else ""
    return found


@pytest.fixture
def namespace() -> Iterator[str]:
    """A network namespace whose loopback holds the metadata address (root only)."""
    tools = _tools()
    if os.geteuid() != 0 or not all(tools.values()):
        pytest.skip(f"needs root and {', '.join(n for n, path in tools.items() if not path) or 'root'}")
    name = f"cbas-imds-{secrets.token_hex(3)}"
    if subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode != 0:
        pytest.skip("cannot create a network namespace here")
    try:
        for command in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{IMDS}/32", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", name, *command], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_only_root_reaches_instance_metadata(namespace: str) -> None:
    inside = ["ip", "netns", "exec", namespace]
    script = render_user_data("https://bucket.s3.amazonaws.com/dist/cbas.whl?sig", "cbas.whl", {"CBAS_BACKEND": "aws"},
                              "https://bucket.s3.amazonaws.com/machines/l-1/key?sig", "l-1")
    firewall = metadata_firewall(script)
    assert script.index(firewall) < script.index("curl")  # before anything else runs
    server = subprocess.Popen([*inside, "/usr/bin/python3", "-c", SERVER], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True, text=True)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"

        def ask(*as_user: str) -> str:
            return subprocess.run([*inside, *as_user, "/usr/bin/python3", "-c", CLIENT], capture_output=True,
                                  text=True, timeout=30).stdout.strip()

        assert ask("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups") == "served cbas-lab-worker"
        for _ in range(2):  # the boot script's own lines, twice: a reboot runs them again
            applied = subprocess.run([*inside, "bash", "-euo", "pipefail", "-c", firewall], capture_output=True,
                                     text=True, timeout=60)
            assert applied.returncode == 0, applied.stderr
        rules = subprocess.run([*inside, "iptables", "-S", "OUTPUT"], capture_output=True, text=True).stdout
        assert [r for r in rules.splitlines() if IMDS in r] == [
            f"-A OUTPUT -d {IMDS}/32 -m owner ! --uid-owner 0 -j REJECT --reject-with icmp-port-unreachable"]
        assert ask() == "served cbas-lab-worker"  # root: the worker
        refused = ask("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")  # the job's user
        assert refused.startswith("refused") and "Connection refused" in refused, refused
    finally:
        try:
            os.killpg(server.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        server.wait(timeout=10)


def test_launches_do_not_lean_on_the_hop_limit_alone() -> None:
    script = render_user_data("https://w", "w.whl", {}, "https://k", "l-1")
    lines = metadata_firewall(script).splitlines()
    assert any(line.startswith("iptables -C OUTPUT -d 169.254.169.254 -m owner ! --uid-owner 0 -j REJECT") for line in lines)
    assert any("ip6tables -I OUTPUT 1 -d fd00:ec2::254 -m owner ! --uid-owner 0 -j REJECT" in line for line in lines)


# --- S3 with moto's IAM on ---------------------------------------------------------------------------

@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A bootstrapped cluster with two jobs' files and a machine's key; IAM on."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    with mock_aws():
        admin, _ = user(boto3.client("iam"), "admin", ADMIN_POLICY)
        master, _ = user(admin.client("iam"), "cbas-master", moto_view(master_policy(BUCKET, REGION, ACCOUNT, "lab")))
        intruder, _ = user(admin.client("iam"), "intruder", {"Version": "2012-10-17", "Statement": [
            {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": "*"}]})
        with enforced():
            Bootstrap("lab", REGION, admin, master_principal=user_arn("cbas-master")).up()
            for key in FILES:
                admin.client("s3").put_object(Bucket=BUCKET, Key=key, Body=f"secret of {key}".encode())
            yield {"admin": admin, "master": master, "intruder": intruder,
                   "machine": session_of(instance_role_keys("cbas-lab-worker", "i-0a"))}


def refused(call: Any, **params: Any) -> bool:
    try:
        call(Bucket=BUCKET, **params)
    except ClientError as exc:
        return exc.response["Error"]["Code"] in ("AccessDenied", "403")
    return False


def job_session(cluster: dict[str, Any], job_id: str) -> boto3.session.Session:
    made = StsJobCredentials(cluster["master"].client("sts"), "lab", BUCKET).grant(job_id)
    return session_of({"AWS_ACCESS_KEY_ID": made.access_key_id,
                       "AWS_SECRET_ACCESS_KEY": made.secret_access_key.get_secret_value(),
                       "AWS_SESSION_TOKEN": made.session_token.get_secret_value()})


def test_the_instance_role_alone_reaches_no_jobs_files_and_no_machines_key(cluster: dict[str, Any]) -> None:
    s3 = cluster["machine"].client("s3")
    for key in FILES:
        assert refused(s3.get_object, Key=key), key
        assert refused(s3.head_object, Key=key), key
        assert refused(s3.delete_object, Key=key), key
    assert refused(s3.put_object, Key="jobs/B/ckpt/c-2/manifest.json", Body=b"forged")
    for prefix in ("jobs/", "jobs/B/", ""):
        assert refused(s3.list_objects_v2, Prefix=prefix), prefix


def test_no_one_but_the_master_takes_the_job_data_role(cluster: dict[str, Any]) -> None:
    role = f"arn:aws:iam::{ACCOUNT}:role/cbas-lab-job-data"
    for who in ("machine", "intruder"):  # the instance role has no sts:AssumeRole; the intruder is not trusted
        with pytest.raises(ClientError, match="AccessDenied"):
            cluster[who].client("sts").assume_role(RoleArn=role, RoleSessionName="cbas-job-B")
    assert cluster["master"].client("sts").assume_role(RoleArn=role, RoleSessionName="cbas-job-B")["Credentials"]


def test_a_jobs_credentials_reach_its_files_and_never_a_machines_key(cluster: dict[str, Any]) -> None:
    s3 = job_session(cluster, "A").client("s3")
    assert s3.get_object(Bucket=BUCKET, Key="jobs/A/input.tar.zst")["Body"].read() == b"secret of jobs/A/input.tar.zst"
    s3.put_object(Bucket=BUCKET, Key="jobs/A/output.tar.zst", Body=b"out")
    assert [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="jobs/A/")["Contents"]] == [
        "jobs/A/input.tar.zst", "jobs/A/output.tar.zst"]
    s3.delete_object(Bucket=BUCKET, Key="jobs/A/output.tar.zst")
    # the job-data role's own policy is jobs/* (moto applies it): the rest of the bucket is closed
    for key in ("machines/l-1/key", "dist/cbas-1.0-py3-none-any.whl"):
        assert refused(s3.get_object, Key=key), key
        assert refused(s3.put_object, Key=key, Body=b"forged"), key
        assert refused(s3.delete_object, Key=key), key


def test_the_session_policy_for_job_a_names_jobs_a_and_nothing_else() -> None:
    """What keeps job A from job B on AWS (moto does not apply session policies): the policy itself."""
    from moto.iam.access_control import IAMPolicy, PermissionResult

    policy = job_session_policy(BUCKET, "A")
    text = json.dumps(policy)
    resources = [s["Resource"] for s in policy["Statement"]]
    assert resources == [f"arn:aws:s3:::{BUCKET}/jobs/A/*", f"arn:aws:s3:::{BUCKET}"]
    assert [s.get("Condition") for s in policy["Statement"]] == [None, {"StringLike": {"s3:prefix": "jobs/A/*"}}]
    assert {s["Effect"] for s in policy["Statement"]} == {"Allow"} and "NotResource" not in text and "NotAction" not in text
    assert text.count("jobs/") == 2 and "machines/" not in text and '"*"' not in text
    evaluate = IAMPolicy(text)  # moto's own evaluator, given the session policy moto would ignore
    for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
        assert evaluate.is_action_permitted(action, f"arn:aws:s3:::{BUCKET}/jobs/A/ckpt/c-1/manifest.json") \
            == PermissionResult.PERMITTED
        for other in ("jobs/B/input.tar.zst", "jobs/AB/x", "jobs/A", "machines/l-1/key", "dist/cbas.whl", "x"):
            assert evaluate.is_action_permitted(action, f"arn:aws:s3:::{BUCKET}/{other}") == PermissionResult.NEUTRAL, other
        assert evaluate.is_action_permitted(action, "arn:aws:s3:::other-bucket/jobs/A/x") == PermissionResult.NEUTRAL
    assert evaluate.is_action_permitted("s3:PutBucketPolicy", f"arn:aws:s3:::{BUCKET}") == PermissionResult.NEUTRAL


@pytest.mark.parametrize("job_id", ["*", "A*", "A/B", "../machines", "", "..", "a" * 49, "A B", "A?"])
def test_a_job_id_that_could_widen_the_policy_is_refused(job_id: str) -> None:
    with pytest.raises(ValueError, match="cannot name an S3 prefix"):
        job_session_policy(BUCKET, job_id)


def test_moto_gaps_session_policies_and_prefix_conditions_are_not_enforced(cluster: dict[str, Any]) -> None:
    """Pinned: with moto, job A's credentials still read and list job B's files (AWS refuses
    both, by the session policy above). If this fails, moto enforces them now: make the hostile
    test above a real request."""
    s3 = job_session(cluster, "A").client("s3")
    assert s3.get_object(Bucket=BUCKET, Key="jobs/B/input.tar.zst")["Body"].read()  # session policy ignored
    assert s3.list_objects_v2(Bucket=BUCKET, Prefix="jobs/B/")["KeyCount"] == 2  # s3:prefix condition ignored


# --- the master's queue -------------------------------------------------------------------------------

def sqs_refused(call: Any, **params: Any) -> bool:
    try:
        call(**params)
    except ClientError as exc:
        return "AccessDenied" in exc.response["Error"]["Code"] or exc.response["Error"]["Code"] == "403"
    return False


def test_only_the_master_reads_its_queue_and_no_one_sends_to_it_by_hand(cluster: dict[str, Any]) -> None:
    """moto checks SQS calls on a queue against the queue's ARN: the master's statement is applied
    as written (tests/aws/iam.py). The queue policy's Deny of anyone but SNS is tested as data."""
    admin = cluster["admin"].client("sqs")
    inbox = admin.get_queue_url(QueueName="cbas-lab-master-inbox")["QueueUrl"]
    dead = admin.get_queue_url(QueueName="cbas-lab-master-inbox-dead")["QueueUrl"]
    admin.send_message(QueueUrl=inbox, MessageBody="x")  # (moto evaluates no queue policy)
    master = cluster["master"].client("sqs")
    got = master.receive_message(QueueUrl=inbox, WaitTimeSeconds=1, AttributeNames=["ApproximateReceiveCount"])
    [message] = got["Messages"]
    master.change_message_visibility_batch(QueueUrl=inbox, Entries=[
        {"Id": "0", "ReceiptHandle": message["ReceiptHandle"], "VisibilityTimeout": 0}])
    again = master.receive_message(QueueUrl=inbox, WaitTimeSeconds=1)["Messages"][0]
    assert master.delete_message_batch(QueueUrl=inbox, Entries=[
        {"Id": "0", "ReceiptHandle": again["ReceiptHandle"]}])["Successful"]
    assert master.get_queue_attributes(QueueUrl=inbox, AttributeNames=["ApproximateNumberOfMessages"])
    assert sqs_refused(master.send_message, QueueUrl=inbox, MessageBody="forged")  # the master never sends
    assert sqs_refused(master.purge_queue, QueueUrl=inbox)
    # the statement names that one queue, not its neighbours (the master's whole policy, as moto
    # can apply it, also has the image builders' queue statement widened to "*": this alone)
    statement = [s for s in master_policy(BUCKET, REGION, ACCOUNT, "lab")["Statement"] if "sqs:DeleteMessage" in s["Action"]]
    reader, _ = user(cluster["admin"].client("iam"), "inbox-reader",
                     moto_view({"Version": "2012-10-17", "Statement": statement}))
    assert "Messages" not in reader.client("sqs").receive_message(QueueUrl=inbox, WaitTimeSeconds=0)
    assert sqs_refused(reader.client("sqs").receive_message, QueueUrl=dead)
    machine = cluster["machine"].client("sqs")  # a job's machine: nothing in SQS
    for call, params in ((machine.receive_message, {}), (machine.send_message, {"MessageBody": "forged"}),
                         (machine.get_queue_attributes, {"AttributeNames": ["All"]})):
        assert sqs_refused(call, QueueUrl=inbox, **params), call
