"""Bad input through the real command line: a clear error, the documented exit code, no change."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.integration.conftest import CALM, Cluster, expected_counter

pytestmark = pytest.mark.integration


def test_a_broken_jdl_names_file_line_and_column(cluster: Cluster) -> None:
    bad = cluster.home / "bad.jdl"
    bad.write_text('Executable = "x";\nInputSandbx = {"a"};\n')
    result = cluster.cli("submit", str(bad))
    assert result.returncode == 2
    assert f"{bad}:2:1: unknown key 'InputSandbx'; did you mean InputSandbox?" in result.stderr


def test_no_master_is_exit_code_3_with_a_hint(cluster: Cluster) -> None:
    for args in (["status"], ["submit", str(cluster.job_dir("x", n=1))], ["logs", "abc"]):
        result = cluster.cli(*args)
        assert result.returncode == 3, (args, result.stderr)
        assert "no master is running" in result.stderr and "cbas master" in result.stderr


def test_missing_files_stop_the_submission_before_anything_happens(cluster: Cluster) -> None:
    cluster.market(CALM)
    cluster.start_master()
    jdl_path = cluster.job_dir("missing", n=5)
    (jdl_path.parent / "input.txt").unlink()
    (jdl_path.parent / "job.jdl").write_text(jdl_path.read_text() + 'Prologue = {"setup.sh"};\n')
    result = cluster.cli("submit", str(jdl_path))
    assert result.returncode == 2
    assert "InputSandbox file 'input.txt' not found" in result.stderr
    assert "Prologue file 'setup.sh' not found" in result.stderr  # every missing file at once
    assert json.loads(cluster.cli("status", "--json").stdout) == []
    assert not (cluster.home / "blobs" / "jobs").exists() or not any((cluster.home / "blobs" / "jobs").iterdir())


@pytest.mark.parametrize("command", ["status", "logs", "cancel", "fetch"])
def test_unknown_job_ids_are_a_clear_error(cluster: Cluster, command: str) -> None:
    cluster.market(CALM)
    cluster.start_master()
    result = cluster.cli(command, "nosuchjob")
    assert result.returncode == 2
    assert "no job with id 'nosuchjob'" in result.stderr


def test_one_master_per_home(cluster: Cluster) -> None:
    cluster.market(CALM)
    master = cluster.start_master()
    second = cluster.cli("master", timeout=30)
    assert second.returncode == 3
    assert f"a master is already running for {cluster.home} (pid {master.pid}" in second.stderr


def test_fetching_an_unfinished_job_says_so(cluster: Cluster) -> None:
    cluster.market(CALM)
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir("slow", n=1000, delay=0.1))
    result = cluster.cli("fetch", job_id)
    assert result.returncode == 1 and "can be fetched once it has finished" in result.stderr
    cluster.cli("cancel", job_id)
    cluster.wait(job_id)


@pytest.mark.parametrize("command", ["submit", "status", "logs", "cancel", "fetch", "master", "demo", "bench"])
def test_every_command_explains_itself_with_an_example(command: str) -> None:
    result = subprocess.run([sys.executable, "-m", "cbas", command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "Example" in result.stdout


def test_logs_follow_prints_until_the_job_ends(cluster: Cluster) -> None:
    cluster.market(CALM)
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir("chatty", n=40, delay=0.05))
    followed = cluster.cli("logs", job_id, "-f", timeout=60)
    assert followed.returncode == 0
    assert followed.stdout.startswith("starting: counting to 40")
    assert followed.stdout.rstrip().endswith("done: counted to 40")
    assert cluster.job(job_id)["state"] == "COMPLETED"


def test_submit_wait_follows_the_job_and_fetches_its_output(cluster: Cluster) -> None:
    cluster.market(CALM)
    cluster.start_master()
    out = cluster.home / "results"
    done = cluster.cli("submit", "-q", "--wait", "-o", str(out), str(cluster.job_dir("waited", n=20, delay=0.02)))
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[0]
    assert cluster.job(job_id)["state"] == "COMPLETED"
    assert (out / "output.txt").read_text() == expected_counter(20)
    assert "queued" in done.stderr and "completed" in done.stderr  # the events as they came
    failing = cluster.job_dir("failing", n=5, delay=0.01).read_text().replace('"5 input.txt"', '"5 missing.txt"')
    (cluster.home / "failing.jdl").write_text(failing)
    shutil.copy(cluster.home / "jobs-src" / "failing" / "counter.sh", cluster.home)
    shutil.copy(cluster.home / "jobs-src" / "failing" / "input.txt", cluster.home)
    failed = cluster.cli("submit", "-q", "--wait", "-o", str(cluster.home / "failed"), str(cluster.home / "failing.jdl"))
    assert failed.returncode == 1 and "failed" in failed.stderr  # scripts can rely on it
    assert (cluster.home / "failed" / "stderr").exists()  # what it said is fetched too


def test_shell_completion_completes_commands() -> None:
    script = subprocess.run([sys.executable, "-m", "cbas", "completion", "bash"], capture_output=True, text=True)
    assert script.returncode == 0 and "_CBAS_COMPLETE=bash_complete" in script.stdout
    env = {"_CBAS_COMPLETE": "bash_complete", "COMP_WORDS": "cbas sub", "COMP_CWORD": "1", "PATH": "/usr/bin:/bin"}
    completed = subprocess.run([sys.executable, "-c", "from cbas.cli import cli; cli(prog_name='cbas')"],
                               capture_output=True, text=True, env=env)
    assert "plain,submit" in completed.stdout.splitlines()


def test_bench_runs_a_benchmark_script(tmp_path) -> None:
    from tests.tracefiles import write_trace

    write_trace(tmp_path / "t.csv", {("z1", "c5.large"): (0.03, 0.085, [(0.0, True), (30000.0, False)])},
                span=400000)
    out = tmp_path / "s.json"
    result = subprocess.run([sys.executable, "-m", "cbas", "bench", "scheduler", "--traces", str(tmp_path),
                             "--starts", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "cbas" in result.stdout and json.loads(out.read_text())["policies"]["cbas"]["runs"] == 18
