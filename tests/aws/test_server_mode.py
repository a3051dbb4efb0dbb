"""CBAS on AWS as real processes against moto's server: `cbas aws bootstrap`, `cbas master`,
`cbas submit`, `cbas fetch` and `cbas worker` each run as their own process, and reach AWS only
at the moto server's address. Every message is an SNS delivery to an HTTP endpoint, verified
against the certificate moto serves. The test plays EC2's part: it "boots" each instance the
master launches by reading its user-data (downloading the worker wheel from the presigned URL in
it), starting a worker with the settings it carries and an instance metadata endpoint; it preempts
the first instance with a spot interruption notice and then terminates it through EC2.

moto's IAM is on from the start: `cbas aws bootstrap` runs as an administrator made in moto, the
master as a user with the master's policy, `cbas submit` and `cbas fetch` as a user with the
frontend's, and each worker with a session of the instance role, which reaches no S3: the job's
files only with the credentials its master sends it (tests/aws/iam.py says what moto checks)."""

from __future__ import annotations

import base64
import http.server
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest

from cbas.authority import Credential
from cbas.aws.bootstrap import frontend_policy, master_policy, worker_policy
from cbas.client import MasterClient
from cbas.settings import Settings
from tests.homes import reachable_tmp
from tests.integration.conftest import COUNTER, expected_counter
from cbas.worker.credential import write_credential
from tests.processes import kill_groups, wait_until_gone
from tests.aws.iam import (
    ACCOUNT, ADMIN_POLICY, enforced_server, instance_role_keys, moto_view, presigned_urls_pass, user, user_arn,
)

pytestmark = pytest.mark.integration
REGION = "us-east-1"
BUCKET = f"cbas-e2e-{ACCOUNT}-{REGION}"  # as bootstrap names it
FAST = {"CBAS_PING_INTERVAL": "0.5", "CBAS_SCHEDULE_INTERVAL": "0.3", "CBAS_BATCH_WINDOW": "0.1",
        "CBAS_NOTICE_POLL_INTERVAL": "0.2", "CBAS_LOG_UPLOAD_INTERVAL": "0.5", "CBAS_BOOT_TIMEOUT": "30",
        "CBAS_RESTART_OVERHEAD": "2", "CBAS_DEFAULT_INSTANCE_TYPE": "c5.large"}


def fetch(url: str) -> bytes:
    """GET a presigned URL as the boot script's curl does (moto's server speaks http)."""
    with urllib.request.urlopen(url.replace("https://", "http://", 1) if "127.0.0.1" in url else url,
                                timeout=10) as response:
        return bytes(response.read())


Keys = dict[str, str]


class AwsCluster:
    def __init__(self, home: Path, endpoint: str, certificate_endpoint: str, identities: dict[str, Keys]) -> None:
        self.home, self.endpoint, self.identities = home, endpoint, identities
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("CBAS_", "AWS_"))}
        self.env.update(FAST, CBAS_HOME=str(home), AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION=REGION,
                        CBAS_AWS_SNS_CERTIFICATE_ENDPOINT=certificate_endpoint)
        self.groups: list[int] = []
        self.machines: dict[str, subprocess.Popen[bytes]] = {}
        self.ec2 = self.client("ec2")

    def client(self, service: str, who: str = "admin") -> Any:
        keys = self.identities[who]
        return boto3.client(service, region_name=REGION, endpoint_url=self.endpoint,
                            aws_access_key_id=keys["AWS_ACCESS_KEY_ID"], aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])

    def env_as(self, who: str) -> dict[str, str]:
        return {**self.env, **self.identities[who]}

    def cli(self, *args: str, who: str = "frontend", timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cbas", *args], env=self.env_as(who), capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def start(self, argv: list[str], env: dict[str, str], log_name: str) -> subprocess.Popen[bytes]:
        with open(self.home / log_name, "wb") as log:
            process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.groups.append(process.pid)
        return process

    def instances(self, states: tuple[str, ...] = ("pending", "running")) -> list[dict[str, Any]]:
        reservations = self.ec2.describe_instances(Filters=[
            {"Name": "tag:cbas:cluster", "Values": ["e2e"]}, {"Name": "instance-state-name", "Values": list(states)}])
        return [i for r in reservations["Reservations"] for i in r["Instances"]]

    def boot(self, instance: dict[str, Any], wheel: bytes) -> None:
        """What EC2 and the user-data script do: fetch the wheel, start the worker with the settings."""
        instance_id = instance["InstanceId"]
        data = self.ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
        script = base64.b64decode(data).decode()
        assert "AWS_SECRET" not in script  # no credentials in user-data
        assert not [keys for keys in self.identities.values() if keys["AWS_SECRET_ACCESS_KEY"] in script]
        wheel_url = re.search(r"curl -fsSL --retry 5 -o \S+ '([^']+)'", script).group(1)  # type: ignore[union-attr]
        assert fetch(wheel_url) == wheel  # the presigned URL works without credentials
        # the machine's own key, as the script fetches it: through its presigned URL, into a folder
        # of root's (0700, the file 0600), its ledger id beside it
        key_url = re.search(r"-o /var/lib/cbas/worker/machine.key '([^']+)'", script).group(1)  # type: ignore[union-attr]
        ledger_id = re.search(r"echo '([^']+)' > /var/lib/cbas/worker/ledger-id", script).group(1)  # type: ignore[union-attr]
        key = fetch(key_url).decode()
        assert key not in script and len(bytes.fromhex(key)) == 32
        settings = dict(line.split("=", 1) for line in script.split("<<'ENV'\n")[1].split("\nENV")[0].splitlines())
        assert settings["CBAS_WORKER_ADVERTISE_HOST"] == "metadata"
        disk = self.home / "machines" / instance_id
        (disk / "metadata").mkdir(parents=True)
        disk.chmod(0o711)
        (disk / "metadata" / "instance-id").write_text(instance_id)
        (disk / "metadata" / "public-ipv4").write_text("127.0.0.1")
        write_credential(disk / "worker", Credential(ledger_id, bytes.fromhex(key)))
        # the machine's AWS identity, as EC2 gives it: a session of the instance role (no S3 at all)
        env = {**self.env, **settings, **instance_role_keys("cbas-e2e-worker", instance_id),
               "CBAS_HOME": str(self.home / "worker-home"),
               "CBAS_WORKER_LISTEN_HOST": "127.0.0.1", "CBAS_WORKER_PORT": "0"}  # many machines share this host
        self.machines[instance_id] = self.start(
            [sys.executable, "-m", "cbas.local.machine", "--instance-id", instance_id, "--disk", str(disk)],
            env, f"machine-{instance_id}.log")

    def preempt(self, instance_id: str, notice_seconds: float = 3.0) -> None:
        action = {"action": "terminate", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + notice_seconds))}
        spot = self.home / "machines" / instance_id / "metadata" / "spot"
        spot.mkdir()
        (spot / "instance-action").write_text(json.dumps(action))

    def reclaim(self, instance_id: str) -> None:
        self.ec2.terminate_instances(InstanceIds=[instance_id])
        machine = self.machines.pop(instance_id)
        kill_groups([machine.pid] + self.job_groups(instance_id))

    def job_groups(self, instance_id: str) -> list[int]:
        pgids = self.home / "machines" / instance_id / "job-pgids"
        return [int(p) for p in pgids.read_text().split()] if pgids.exists() else []

    def close(self) -> None:
        groups = self.groups + [g for i in os.listdir(self.home / "machines") for g in self.job_groups(i)] \
            if (self.home / "machines").exists() else self.groups
        for pgid in groups:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        if wait_until_gone(groups, timeout=10):
            kill_groups(groups)
        assert wait_until_gone(groups) == []


@pytest.fixture
def certificate_endpoint(moto_endpoint: str) -> Iterator[str]:
    """Where the master fetches SNS certificates: moto's server serves them only to a request it
    can tell is for SNS (by a credential scope), which this relay adds, as a VPC endpoint for SNS
    would answer for the SNS host."""

    class Relay(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            request = urllib.request.Request(moto_endpoint + self.path, headers={
                "Authorization": f"AWS4-HMAC-SHA256 Credential=x/20260101/{REGION}/sns/aws4_request"})
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    status, body = response.status, response.read()
            except urllib.error.HTTPError as exc:
                status, body = exc.code, b""
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    relay = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Relay)
    thread = threading.Thread(target=relay.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{relay.server_port}"
    finally:
        relay.shutdown()
        relay.server_close()
        thread.join()


@pytest.fixture
def identities(moto_endpoint: str) -> dict[str, Keys]:
    """Who signs what, made in moto before its IAM is on: an administrator (bootstrap, and the
    test playing EC2), the master and the frontend with their policies as moto can apply them."""
    iam = boto3.client("iam", region_name=REGION, endpoint_url=moto_endpoint)
    return {"admin": user(iam, "admin", ADMIN_POLICY)[1],
            "master": user(iam, "cbas-master", moto_view(master_policy(BUCKET, REGION, ACCOUNT, "e2e")))[1],
            "frontend": user(iam, "cbas-frontend", moto_view(frontend_policy(BUCKET)))[1]}


def test_a_job_on_aws_processes_survives_a_preemption(moto_endpoint: str, certificate_endpoint: str,
                                                      identities: dict[str, Keys]) -> None:
    with reachable_tmp() as home, enforced_server(moto_endpoint), presigned_urls_pass():
        (home / "machines").mkdir(mode=0o711)
        cluster = AwsCluster(home, moto_endpoint, certificate_endpoint, identities)
        try:
            run(cluster)
        except BaseException:
            for log in sorted(home.glob("*.log")):  # what the processes said, for the failure report
                print(f"==> {log.name}\n{log.read_text()[-4000:]}")
            raise
        finally:
            cluster.close()


def run(cluster: AwsCluster) -> None:
    home = cluster.home
    # the job-data role trusts the master's user (by default it would trust bootstrap's caller)
    cluster.env["CBAS_AWS_MASTER_PRINCIPAL"] = user_arn("cbas-master")
    made = cluster.cli("aws", "bootstrap", "--cluster", "e2e", "--region", REGION, who="admin")
    assert made.returncode == 0, made.stderr
    settings = dict(line.split("=", 1) for line in made.stdout.splitlines() if line.startswith("CBAS_"))
    assert settings["CBAS_AWS_BUCKET"] == BUCKET
    # moto checks SNS and EC2 calls against "*" only: the instance role's policy as moto can apply it
    cluster.client("iam").put_role_policy(RoleName="cbas-e2e-worker", PolicyName="cbas-worker", PolicyDocument=json.dumps(
        moto_view(worker_policy(settings["CBAS_AWS_TOPIC_ARN"], "e2e"))))
    wheel = home / "cbas-0.0.0-py3-none-any.whl"
    wheel.write_bytes(b"PK\x05\x06" + bytes(18))  # installed by the real boot script only; here it is fetched
    image = cluster.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    cluster.env.update(settings, CBAS_AWS_IMAGE_ID=image, CBAS_AWS_WORKER_WHEEL=str(wheel),
                       CBAS_MASTER_HOST="127.0.0.1", CBAS_MASTER_PORT="0", CBAS_PUBLIC_URL="http://127.0.0.1:{port}")

    master = cluster.start([sys.executable, "-m", "cbas", "master"], cluster.env_as("master"), "master.log")
    for _ in range(300):
        if (home / "master.json").exists() or master.poll() is not None:
            break
        time.sleep(0.05)
    assert (home / "master.json").exists(), (home / "master.log").read_text()[-3000:]
    client = MasterClient(Settings(home=home))

    job_dir = home / "job"
    job_dir.mkdir()
    (job_dir / "counter.sh").write_bytes((COUNTER / "counter.sh").read_bytes())
    (job_dir / "input.txt").write_text("3\n")
    (job_dir / "job.jdl").write_text(
        'Executable = "counter.sh"; Arguments = "60 input.txt"; InputSandbox = {"input.txt", "counter.sh"};\n'
        'OutputSandbox = {"output.txt"}; CheckpointInterval = 1; Environment = {COUNTER_DELAY = "0.1"};\n')
    submitted = cluster.cli("submit", "-q", str(job_dir / "job.jdl"))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    booted: set[str] = set()
    preempted: str | None = None
    deadline = time.monotonic() + 120
    while True:
        assert time.monotonic() < deadline, f"job stuck: {client.job(job_id)['events']}"
        for instance in cluster.instances():
            if instance["InstanceId"] not in booted:
                booted.add(instance["InstanceId"])
                cluster.boot(instance, wheel.read_bytes())
        job = client.job(job_id)
        if job["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
            break
        if preempted is None and job["state"] == "RUNNING" and job["checkpoints"] >= 2:
            preempted = job["instance_id"]
            cluster.preempt(preempted)
        if preempted in cluster.machines and any(e["kind"] == "preempted" for e in job["events"]):
            cluster.reclaim(preempted)  # the notice ran out: EC2 takes the machine
        time.sleep(0.2)

    assert job["state"] == "COMPLETED", job["events"]
    assert job["preemptions"] == 1 and job["restarts"] == 1 and len(booted) == 2
    fetched = cluster.cli("fetch", job_id, "-o", str(home / "out"))
    assert fetched.returncode == 0, fetched.stderr
    assert (home / "out" / "output.txt").read_text() == expected_counter(60)
    resumed = [int(n) for n in re.findall(r"resuming at (\d+)", (home / "out" / "stdout").read_text())]
    assert len(resumed) == 1 and 0 < resumed[0] < 60
    for _ in range(100):  # the master lets the last machine go just after the job completes
        if not cluster.instances(("pending", "running", "stopping", "stopped")):
            break
        time.sleep(0.1)
    assert cluster.instances(("pending", "running", "stopping", "stopped")) == []
    log = (home / "master.log").read_text()
    assert '"message.rejected"' not in log and "InvalidSignature" not in log and '"message.refused"' not in log
    s3 = cluster.client("s3")
    left = s3.list_objects_v2(Bucket=settings["CBAS_AWS_BUCKET"], Prefix="machines/").get("Contents", [])
    assert left == []  # each machine's key was deleted once its worker had announced itself
