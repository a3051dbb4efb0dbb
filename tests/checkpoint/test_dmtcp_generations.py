"""The real DMTCP through generations: checkpoint, kill, restart, checkpoint again, ... for the
kinds of program scientists run, each ending with the output of an uninterrupted run.

Through the worker's own JobRun (the dmtcp strategy, its hook, the chunked store). Needs the real
DMTCP on the PATH (marker `dmtcp`); the DMTCP line is whichever dmtcp_launch the PATH finds.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cbas.messages import MessageType
from tests.harness import Harness, wait_for_line
from tests.homes import reachable_tmp

pytestmark = [pytest.mark.dmtcp,
              pytest.mark.skipif(shutil.which("dmtcp_launch") is None, reason="the real DMTCP is not on the PATH")]

GENERATIONS = 4  # three restarts, each from the checkpoint the previous generation took
STEPS = 120

C_COUNTER = f"""
#include <stdio.h>
#include <unistd.h>
int main(void) {{  /* its state is only in memory */
    long sum = 0;
    for (int i = 0; i < {STEPS}; i++) {{ sum += (long)i * i; printf("%d %ld\\n", i, sum); fflush(stdout); usleep(40000); }}
    return 0;
}}
"""
C_THREADS = f"""
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
#define THREADS 4
static long partial[THREADS];
static int step;
static pthread_barrier_t start, done;
static void *work(void *arg) {{
    long k = (long)arg;
    for (;;) {{
        pthread_barrier_wait(&start);
        if (step < 0) return NULL;
        partial[k] += (long)step * (k + 1);
        pthread_barrier_wait(&done);
    }}
}}
int main(void) {{
    pthread_t threads[THREADS];
    pthread_barrier_init(&start, NULL, THREADS + 1);
    pthread_barrier_init(&done, NULL, THREADS + 1);
    for (long k = 0; k < THREADS; k++) pthread_create(&threads[k], NULL, work, (void *)k);
    for (step = 0; step < {STEPS}; step++) {{
        pthread_barrier_wait(&start);
        pthread_barrier_wait(&done);
        printf("%d %ld %ld %ld %ld\\n", step, partial[0], partial[1], partial[2], partial[3]);
        fflush(stdout);
        usleep(40000);
    }}
    step = -1;
    pthread_barrier_wait(&start);
    for (int k = 0; k < THREADS; k++) pthread_join(threads[k], NULL);
    return 0;
}}
"""
C_FORK_PIPE = f"""
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void) {{  /* a parent and a child that computes for it, talking over two pipes */
    int ask[2], answer[2];
    if (pipe(ask) || pipe(answer)) return 1;
    pid_t child = fork();
    if (child == 0) {{
        long n, total = 0;
        close(ask[1]); close(answer[0]);
        while (read(ask[0], &n, sizeof n) == sizeof n) {{ total += n * n; write(answer[1], &total, sizeof total); }}
        _exit(0);
    }}
    close(ask[0]); close(answer[1]);
    for (long i = 0; i < {STEPS}; i++) {{
        long total;
        write(ask[1], &i, sizeof i);
        if (read(answer[0], &total, sizeof total) != sizeof total) return 2;
        printf("%ld %ld\\n", i, total); fflush(stdout); usleep(40000);
    }}
    close(ask[1]);
    waitpid(child, NULL, 0);
    return 0;
}}
"""
C_FILES = f"""
#include <stdio.h>
#include <unistd.h>
int main(void) {{  /* appends to a file named in OutputSandbox; its position is in the open file */
    FILE *out = fopen("results.txt", "a");
    long value = 1;
    for (int i = 0; i < {STEPS}; i++) {{
        value = (value * 31 + i) % 1000003;
        fprintf(out, "%d %ld\\n", i, value); fflush(out);
        printf("%d\\n", i); fflush(stdout); usleep(40000);
    }}
    fclose(out);
    return 0;
}}
"""
PY_HEAP = f"""
import hashlib, random, time
heap = bytearray(random.Random(7).randbytes(200 << 20))  # 200 MB of state, only in memory
for i in range({STEPS}):
    at = (i * 7919 * 4096) % (len(heap) - 4096)
    heap[at:at + 4096] = hashlib.sha256(heap[at:at + 4096]).digest() * 128
    print(i, hashlib.sha256(heap[at:at + 4096]).hexdigest()[:16], flush=True)
    time.sleep(0.04)
"""
JAVA = f"""
public class Counter {{
    public static void main(String[] args) throws Exception {{
        long sum = 0;
        for (int i = 0; i < {STEPS}; i++) {{
            sum += (long) i * i;
            System.out.println(i + " " + sum);
            System.out.flush();
            Thread.sleep(40);
        }}
    }}
}}
"""


@pytest.fixture
def harness():
    with reachable_tmp("cbas-gen-") as root:
        yield Harness(root)


def build(harness: Harness, kind: str) -> tuple[dict[str, object], str, Path]:
    """Inputs, JDL and the uninterrupted run's output file of one kind of program."""
    src = harness.root / "src"
    src.mkdir(exist_ok=True)
    if kind == "python-heap":
        (src / "heap.py").write_text(PY_HEAP)
        expected = subprocess.run([sys.executable, str(src / "heap.py")], capture_output=True, text=True,
                                  check=True).stdout
        return {"heap.py": src / "heap.py"}, 'Executable = "/usr/bin/python3"; Arguments = "heap.py";', _save(src, expected)
    if kind == "java":
        if shutil.which("javac") is None:
            pytest.skip("no JDK (Debian's default-jdk-headless)")
        (src / "Counter.java").write_text(JAVA)
        subprocess.run(["javac", "-d", str(src), str(src / "Counter.java")], check=True)
        expected = subprocess.run(["java", "-cp", str(src), "Counter"], capture_output=True, text=True, check=True).stdout
        java = Path(shutil.which("java") or "java").resolve()
        return ({"Counter.class": src / "Counter.class"},
                f'Executable = "{java}"; Arguments = "-Xmx256m -cp . Counter";', _save(src, expected))
    source = {"c-counter": C_COUNTER, "c-threads": C_THREADS, "c-fork-pipe": C_FORK_PIPE, "c-files": C_FILES}[kind]
    (src / "prog.c").write_text(textwrap.dedent(source))
    subprocess.run(["cc", "-O2", "-pthread", "-o", str(src / "prog"), str(src / "prog.c")], check=True)
    workdir = harness.root / "plain"
    workdir.mkdir()
    expected = subprocess.run([str(src / "prog")], capture_output=True, text=True, check=True, cwd=workdir).stdout
    if kind == "c-files":
        return ({"prog": src / "prog"}, 'Executable = "prog"; OutputSandbox = {"results.txt"};',
                _save(src, (workdir / "results.txt").read_text(), stdout=expected))
    return {"prog": src / "prog"}, 'Executable = "prog";', _save(src, expected)


def _save(src: Path, expected: str, stdout: str | None = None) -> Path:
    (src / "expected.txt").write_text(expected)
    (src / "expected-stdout.txt").write_text(stdout if stdout is not None else expected)
    return src / "expected.txt"


@pytest.mark.parametrize("kind", ["c-counter", "c-threads", "c-fork-pipe", "c-files", "python-heap", "java"])
async def test_a_program_resumes_through_every_generation_to_the_uninterrupted_output(harness: Harness, kind: str) -> None:
    inputs, head, expected = build(harness, kind)
    harness.upload_inputs("g1", inputs)  # type: ignore[arg-type]
    text = f'{head} CheckpointStrategy = "dmtcp"; CheckpointInterval = 3600;'
    checkpoints: list[str] = []
    progress: list[int] = []
    for generation in range(GENERATIONS):
        run = harness.run("g1", text, checkpoints=checkpoints[-1:])
        task = asyncio.create_task(run.run())
        if generation == GENERATIONS - 1:
            await asyncio.wait_for(task, 120)
            break
        target = (generation + 1) * STEPS // (GENERATIONS + 1)
        await wait_for_line(run.layout.stdout, f"\n{target}", timeout=90)
        sent = len(harness.of_type(MessageType.CHECKPOINT_DONE))
        assert await run.checkpoint("notice", final=True), [m.body for m in harness.of_type(MessageType.CHECKPOINT_FAILED)]
        await asyncio.wait_for(task, 30)
        # the machine is gone, its disk with it (DMTCP would reopen files at their old paths else)
        shutil.rmtree(run.layout.disk)
        done = harness.of_type(MessageType.CHECKPOINT_DONE)
        assert len(done) == sent + 1  # every generation checkpoints, not only the first
        checkpoints.append(done[-1].body["checkpoint_id"])
        assert run.restored_from == (checkpoints[-2] if generation else None)
        progress.append(_last_step(stdout_of(harness, run)))
    assert run.restored_from == checkpoints[-1]
    assert harness.of_type(MessageType.JOB_DONE), [m.body for m in harness.sent if m.type != MessageType.CHECKPOINT_DONE]
    assert not harness.of_type(MessageType.CHECKPOINT_FAILED)
    assert progress == sorted(progress) and len(set(progress)) == len(progress)  # each resumed further on
    stdout = run.layout.stdout.read_text()
    assert _program_lines(stdout) == (expected.parent / "expected-stdout.txt").read_text()
    if kind == "c-files":
        assert (run.layout.work / "results.txt").read_text() == expected.read_text()
    stderr = run.layout.stderr.read_text()
    assert "session leader" not in stderr, stderr  # no noise from the restarts
    assert "checkpoint signal" not in stderr, stderr


def stdout_of(harness: Harness, run) -> str:  # type: ignore[no-untyped-def]
    """What the attempt's stdout held when its last checkpoint was taken (its disk is gone)."""
    return harness.blobs.get_bytes(f"jobs/{run.job_id}/logs/stdout").decode()


def _program_lines(stdout: str) -> str:
    return "".join(line + "\n" for line in stdout.splitlines() if re.fullmatch(r"[0-9][0-9a-f ]*", line))


def _last_step(stdout: str) -> int:
    return int(_program_lines(stdout).splitlines()[-1].split()[0])
