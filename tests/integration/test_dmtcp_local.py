"""DMTCP jobs the way a user runs them: `cbas submit`, the master, the local cloud's machines, the
market reclaiming them, and the output fetched with `cbas fetch`.

With the real DMTCP on the PATH (marker `dmtcp`), a program that keeps its state only in memory;
otherwise, the truthful fake (tests/fakedmtcp) with a program that keeps its state in files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from tests.integration.conftest import Cluster

REAL = shutil.which("dmtcp_launch") is not None
pytestmark = [pytest.mark.integration, *([pytest.mark.dmtcp] if REAL else []),
              pytest.mark.skipif(os.geteuid() != 0, reason="DMTCP jobs run as users of their own: needs root")]
STEPS = 200
PROGRAM = textwrap.dedent(f"""\
    #include <stdio.h>
    #include <unistd.h>
    int main(void) {{  /* its state only in memory; results.txt is appended through an open file */
        FILE *out = fopen("results.txt", "a");
        long sum = 0;
        for (int i = 0; i < {STEPS}; i++) {{
            sum += (long)i * i;
            fprintf(out, "%d %ld\\n", i, sum); fflush(out);
            printf("%d\\n", i); fflush(stdout);
            usleep(100000);
        }}
        return 0;
    }}
    """)
FAKE_PROGRAM = textwrap.dedent(f"""\
    #!/bin/sh
    # for the fake DMTCP, which restores files, not memory: the state ("i sum") is in state.txt,
    # replaced whole; results.txt is cut back to it (a stop can fall between the two)
    set -eu
    i=0; sum=0
    [ -f state.txt ] && read -r i sum < state.txt
    touch results.txt; head -n "$i" results.txt > results.tmp; mv results.tmp results.txt
    while [ $i -lt {STEPS} ]; do
      sum=$((sum + i * i)); echo "$i $sum" >> results.txt; echo $i
      i=$((i + 1)); echo "$i $sum" > state.tmp; mv state.tmp state.txt
      sleep 0.1
    done
    """)


def expected() -> str:
    total, lines = 0, []
    for i in range(STEPS):
        total += i * i
        lines.append(f"{i} {total}\n")
    return "".join(lines)


def dmtcp_job(cluster: Cluster, name: str, storage: str, fake_bin: Path | None) -> Path:
    folder = cluster.home / "jobs-src" / name
    folder.mkdir(parents=True)
    if fake_bin is None:
        (folder / "prog.c").write_text(PROGRAM)
        subprocess.run(["cc", "-O2", "-o", str(folder / "prog"), str(folder / "prog.c")], check=True)
        executable, env = "prog", ""
    else:
        (folder / "prog").write_text(FAKE_PROGRAM)
        (folder / "prog").chmod(0o755)
        executable, env = "prog", 'Environment = {FAKE_DMTCP_STATE = "state.txt results.txt"};'
    (folder / "job.jdl").write_text(
        f'Name = "{name}"; Executable = "{executable}"; OutputSandbox = {{"results.txt"}};\n'
        f'CheckpointStrategy = "dmtcp"; CheckpointStorage = "{storage}"; CheckpointInterval = 2; {env}\n')
    return folder / "job.jdl"


@pytest.fixture
def tools(cluster: Cluster, request: pytest.FixtureRequest) -> Path | None:
    """The real DMTCP's folder is already on the PATH; else the fake's goes first on the cluster's."""
    if REAL:
        return None
    fake = request.getfixturevalue("fake_dmtcp")
    cluster.env["PATH"] = f"{fake / 'bin'}:{cluster.env['PATH']}"
    return fake / "bin"


@pytest.mark.parametrize("storage", ["chunks", "volume"])
def test_a_dmtcp_job_preempted_resumes_to_the_uninterrupted_output(cluster: Cluster, tools: Path | None,
                                                                   storage: str) -> None:
    cluster.market({
        ("z1", "c5.large"): (0.020, 0.085, [(0.0, True), (8.0, False)]),
        ("z2", "c5.large"): (0.025, 0.085, [(0.0, True), (16.0, False)]),
        ("z3", "c5.large"): (0.040, 0.085, [(0.0, True)]),
    })
    cluster.start_master()
    job_id = cluster.submit(dmtcp_job(cluster, f"dmtcp-{storage}", storage, tools))
    job = cluster.wait(job_id, timeout=150)
    assert job["state"] == "COMPLETED", job["events"]
    assert job["preemptions"] == 2 and job["restarts"] == 2
    assert not [e for e in job["events"] if e["kind"] == "checkpoint-failed"], job["events"]
    restored = [e["detail"] for e in job["events"] if e["kind"] == "running" and "restored from" in e["detail"]]
    assert len(restored) == 2 and restored[0] != restored[1]  # each restart from a newer checkpoint
    if storage == "volume":
        assert all("disk snapshot" in e["detail"] for e in job["events"] if e["kind"] == "checkpoint")
    out = cluster.fetch(job_id)
    assert (out / "results.txt").read_text() == expected()
    printed = [line for line in (out / "stdout").read_text().splitlines() if line.isdigit()]
    if REAL:  # the memory and the logs at one instant (the fake keeps files: a line may repeat)
        assert printed == [str(i) for i in range(STEPS)]  # every line once: resumed, never rerun
    assert printed[0] == "0" and printed[-1] == str(STEPS - 1) and len(printed) < STEPS + 5
    assert "session leader" not in (out / "stderr").read_text()
    consoles = sorted((out / "machine-consoles").iterdir())  # kept though the machines are gone
    assert len(consoles) == 3 and all(b"worker.started" in c.read_bytes() for c in consoles)
    cluster.assert_nothing_left()
