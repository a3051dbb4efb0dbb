"""The DMTCP contract: what the product (cbas/checkpoint/dmtcp.py) relies on, asserted the same way
on the fake DMTCP (tests/fakedmtcp, as 4.2.0 and as 5.0) and on the real one found on the PATH
(marker `dmtcp`; skipped without it), so the fake cannot drift from the real thing again.

Every test drives dmtcp_launch / dmtcp_command / dmtcp_restart directly. The program is a small C
counter: the real DMTCP resumes it from memory, the fake from its state file (FAKE_DMTCP_STATE);
either way it goes on from the checkpointed count. When the tests run as root the programs run as
`nobody`. Each process is started in its own process group and killed by it, pass or fail. The
hook is the product's plugin (cbas_dmtcp_hook.c) built by the product's build_hook.

Run it on a real build with that build first on the PATH, e.g.
    PATH=/opt/dmtcp-4.2.0/bin:$PATH python -m pytest tests/contract/test_dmtcp_contract.py
Where 4.2.0 and 5.0 differ (the -bc blocking, the messages), the `each_version` tests run the fake
as both. Every assertion here was first seen on DMTCP 4.2.0 and the 5.0 head.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import textwrap
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from cbas.checkpoint.dmtcp import build_hook
from tests.fakedmtcp.fixtures import install
from tests.homes import reachable_tmp

REAL = shutil.which("dmtcp_launch")
USER = (pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid) if os.geteuid() == 0 else None
AS_USER = {"user": USER[0], "group": USER[1], "extra_groups": []} if USER else {}  # DMTCP's tools never as root
FREE_SIGNAL = 62  # the product's choice (CHECKPOINT_SIGNAL)
SIGNAL_WARNING = {"4.2.0": "(stopSignal = {n});Message: Application trying to use DMTCP's signal for it's own use",
                  "5.0": "application tried to use DMTCP's checkpoint signal: signal={n}."}
ANY_SIGNAL_WARNING = re.compile(r"[Aa]pplication (tried|trying) to use DMTCP's (checkpoint )?signal")
SESSION_WARNING = "Failed to restore this process as session leader"
COUNTER = textwrap.dedent("""\
    #include <signal.h>
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <unistd.h>
    static void caught(int s) { (void)s; }
    int main(int argc, char **argv) {  /* counts from counter.state (the fake's state) or 0 */
        long i = 0;
        FILE *f = fopen("counter.state", "r");
        if (f) { if (fscanf(f, "%ld", &i) != 1) i = 0; fclose(f); }
        for (int a = 1; a + 1 < argc; a += 2) {
            if (!strcmp(argv[a], "--catch")) {
                struct sigaction sa; memset(&sa, 0, sizeof sa); sa.sa_handler = caught;
                sigaction(atoi(argv[a + 1]), &sa, NULL);
            } else if (!strcmp(argv[a], "--check")) {
                printf("port-file %s\\n", access(argv[a + 1], F_OK) == 0 ? "present" : "absent");
            } else if (!strcmp(argv[a], "--exit")) {
                return atoi(argv[a + 1]);
            } else if (!strcmp(argv[a], "--die")) {
                raise(atoi(argv[a + 1]));
            }
        }
        for (;; i++) {
            printf("%ld\\n", i); fflush(stdout);
            FILE *s = fopen("counter.state.tmp", "w");
            fprintf(s, "%ld\\n", i + 1); fclose(s); rename("counter.state.tmp", "counter.state");
            usleep(20000);
        }
    }
    """)


@dataclass
class Dmtcp:
    kind: str
    bin: Path
    version: str  # what it should say it is
    env: dict[str, str]
    counter: Path
    cache: Path


def header_version(include: Path) -> str:
    for header in (include / "version.h", include / "dmtcp" / "version.h"):
        if header.exists():
            found = re.search(r'#define DMTCP_PACKAGE_VERSION "([^"]+)"', header.read_text())
            if found:
                return found.group(1)
    return "unknown"


@contextmanager
def implementation(kind: str) -> Iterator[Dmtcp]:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler for the test program and the hook")
    if kind == "real" and REAL is None:
        pytest.skip("the real DMTCP (dmtcp_launch) is not on the PATH")
    with reachable_tmp("cbas-contract-") as root:
        (root / "counter.c").write_text(COUNTER)
        subprocess.run(["cc", "-O2", "-o", str(root / "counter"), str(root / "counter.c")], check=True)
        if kind == "real":
            tools = Path(REAL).resolve().parent  # type: ignore[arg-type]
            yield Dmtcp("real", tools, header_version(tools.parent / "include"), {}, root / "counter", root / "cache")
        elif kind == "fake":
            yield Dmtcp("fake", install(root), "4.2.0", {}, root / "counter", root / "cache")  # its default
        else:
            yield Dmtcp("fake", install(root), "5.0", {"FAKE_DMTCP_VERSION": "5.0"}, root / "counter", root / "cache")


REAL_PARAM = pytest.param("real", marks=pytest.mark.dmtcp)


@pytest.fixture(scope="module", params=["fake", REAL_PARAM])
def dmtcp(request: pytest.FixtureRequest) -> Iterator[Dmtcp]:
    """The fake (as 4.2.0, its default) and the real DMTCP on the PATH."""
    with implementation(request.param) as found:
        yield found


@pytest.fixture(scope="module", params=["fake", "fake-5.0", REAL_PARAM])
def each_version(request: pytest.FixtureRequest) -> Iterator[Dmtcp]:
    """For what differs between 4.2.0 and 5.0: the fake as each of them, and the real one."""
    with implementation(request.param) as found:
        yield found


@pytest.fixture(scope="module")
def hook_library(dmtcp: Dmtcp) -> Path:
    """The CBAS plugin, built by the product's own build_hook against this DMTCP's header."""
    library = build_hook(dmtcp.cache, dmtcp.bin)
    assert library is not None, "the hook did not build against this DMTCP's header"
    return library


class Hook:
    """The worker's end of the CBAS plugin: records each call and holds it until answered."""

    def __init__(self, path: Path, snapshot: Callable[[], dict], hold: bool = True) -> None:
        self.path, self.snapshot, self.hold = path, snapshot, hold
        self.calls: list[dict] = []
        self._arrived = threading.Condition()
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(path))
        if USER:
            os.chown(path, *USER)
        self._server.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._server.accept()
            except OSError:
                return
            message = connection.makefile("rb").readline().decode().strip()
            call = {"message": message, "at": time.monotonic(), **self.snapshot(), "answer": threading.Event()}
            with self._arrived:
                self.calls.append(call)
                self._arrived.notify_all()
            threading.Thread(target=self._reply, args=(connection, call), daemon=True).start()

    def _reply(self, connection: socket.socket, call: dict) -> None:
        if self.hold:
            call["answer"].wait(30)
        with connection:
            try:
                connection.sendall(b"ok\n")
            except OSError:
                pass

    def wait_call(self, count: int = 1, timeout: float = 30) -> dict:
        with self._arrived:
            assert self._arrived.wait_for(lambda: len(self.calls) >= count, timeout), f"no call {count} on {self.path}"
            return self.calls[count - 1]

    def close(self) -> None:
        for call in self.calls:
            call["answer"].set()
        self._server.close()


@dataclass
class Box:
    """A work folder the program's user can reach, and every process started in it."""

    dmtcp: Dmtcp
    root: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    hooks: list[Hook] = field(default_factory=list)

    def __post_init__(self) -> None:
        for folder in (self.work, self.images, self.tmp):
            folder.mkdir(mode=0o755)
            if USER:
                os.chown(folder, *USER)

    work = property(lambda self: self.root / "work")
    images = property(lambda self: self.root / "work" / ".dmtcp")
    tmp = property(lambda self: self.root / "tmp")
    port_file = property(lambda self: self.root / "tmp" / "port")

    def env(self, first: dict[str, str] | None = None, **more: str) -> dict[str, str]:
        return {**(first or {}), "PATH": f"{self.dmtcp.bin}:/usr/bin:/bin", "HOME": "/", "LANG": "C",
                "FAKE_DMTCP_STATE": "counter.state", **self.dmtcp.env, **more}

    def common(self) -> list[str]:
        return ["--new-coordinator", "--coord-port", "0", "--port-file", str(self.port_file),
                "--ckptdir", str(self.images), "--tmpdir", str(self.tmp)]

    def start(self, argv: list[str], name: str, env: dict[str, str], setsid: bool = False) -> subprocess.Popen:
        self.port_file.unlink(missing_ok=True)
        with open(self.root / f"{name}.out", "wb") as out, open(self.root / f"{name}.err", "wb") as err:
            process = subprocess.Popen(
                argv, cwd=self.work, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=setsid, process_group=None if setsid else 0, **AS_USER)
        self.processes.append(process)
        return process

    def launch(self, *options: str, program: tuple[str, ...] = (), name: str = "gen1",
               env: dict[str, str] | None = None, setsid: bool = False) -> subprocess.Popen:
        argv = [str(self.dmtcp.bin / "dmtcp_launch"), *self.common(), *options, str(self.dmtcp.counter), *program]
        return self.start(argv, name, env or self.env(), setsid)

    def restart(self, name: str = "gen2", env: dict[str, str] | None = None) -> subprocess.Popen:
        argv = [str(self.dmtcp.bin / "dmtcp_restart"), *self.common(), *map(str, sorted(self.images.glob("ckpt_*.dmtcp")))]
        return self.start(argv, name, env or self.env())

    def port(self, process: subprocess.Popen, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.port_file.read_text().strip() if self.port_file.exists() else ""
            if text.isdigit():
                return int(text)
            assert process.poll() is None, f"DMTCP exited with {process.returncode}: {self.text('gen1.err')[-500:]}"
            time.sleep(0.01)
        raise AssertionError("no port file")

    def command(self, port: int, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.dmtcp.bin / "dmtcp_command"), "--coord-port", str(port), *args],
                              env=self.env(), capture_output=True, text=True, timeout=timeout, **AS_USER)

    def running(self, port: int) -> str:
        found = re.search(r"RUNNING=(\w+)", self.command(port, "--status").stdout)
        return found.group(1) if found else "?"

    def text(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def lines(self, name: str) -> list[str]:
        return [line for line in self.text(name).splitlines() if line.isdigit()]

    def wait_lines(self, name: str, count: int, timeout: float = 20) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.lines(name)) < count:
            assert time.monotonic() < deadline, f"{name}: {self.text(name)[-300:]!r} {self.text(name[:-4] + '.err')[-500:]!r}"
            time.sleep(0.02)
        return self.lines(name)

    def image_files(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in self.images.glob("ckpt_*.dmtcp")}

    def image_versions(self) -> set[tuple[str, int, int]]:
        return {(p.name, p.stat().st_ino, p.stat().st_mtime_ns) for p in self.images.glob("ckpt_*.dmtcp")}

    def checkpoint(self, port: int, timeout: float = 30) -> None:
        """-bc, then until fresh images are there and the program runs again (4.2.0's -bc returns at once)."""
        before = self.image_versions()
        assert self.command(port, "--bcheckpoint").returncode == 0
        deadline = time.monotonic() + timeout
        while not (self.image_versions() - before and self.running(port) == "yes"):
            assert time.monotonic() < deadline, "the checkpoint never completed"
            time.sleep(0.05)

    def stop(self, process: subprocess.Popen) -> int:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return process.wait(10)

    def hook(self, name: str, out: str, hold: bool = True) -> Hook:
        hook = Hook(self.root / name, lambda: {"lines": self.lines(out), "images": self.image_files()}, hold)
        self.hooks.append(hook)
        return hook


@contextmanager
def open_box(dmtcp: Dmtcp) -> Iterator[Box]:
    with reachable_tmp("cbas-contract-box-") as root:
        box = Box(dmtcp, root)
        try:
            yield box
        finally:
            for hook in box.hooks:
                hook.close()
            for process in box.processes:
                box.stop(process)


@pytest.fixture
def box(dmtcp: Dmtcp) -> Iterator[Box]:
    with open_box(dmtcp) as box:
        yield box


def started(box: Box, *options: str, program: tuple[str, ...] = (), **kwargs) -> tuple[subprocess.Popen, int]:
    process = box.launch(*options, program=program, **kwargs)
    port = box.port(process)
    box.wait_lines(kwargs.get("name", "gen1") + ".out", 3)
    return process, port


# --- the tools --------------------------------------------------------------------------------

@pytest.mark.parametrize("tool", ["dmtcp_launch", "dmtcp_restart", "dmtcp_command"])
def test_version_is_the_first_line(each_version: Dmtcp, tool: str) -> None:
    result = subprocess.run([str(each_version.bin / tool), "--version"], env={**os.environ, **each_version.env},
                            capture_output=True, text=True, timeout=10, **AS_USER)
    assert result.returncode == (1 if tool == "dmtcp_command" else 0)  # so it is, on 4.2.0 and 5.0
    assert result.stdout.splitlines()[0] == f"{tool} (DMTCP) {each_version.version}"


def test_no_coordinator_exits_2(box: Box) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = box.command(port, "--status")
    assert result.returncode == 2
    assert "Coordinator not found. Please check port and host." in result.stderr


def test_restart_refuses_launch_only_options(box: Box) -> None:
    result = subprocess.run([str(box.dmtcp.bin / "dmtcp_restart"), "--no-gzip", str(box.images / "ckpt_x.dmtcp")],
                            env=box.env(), capture_output=True, text=True, timeout=10, **AS_USER)
    assert result.returncode == 99


def test_port_file_is_written_before_the_program_starts(box: Box) -> None:
    process = box.launch(program=("--check", str(box.port_file)))
    box.port(process)
    box.wait_lines("gen1.out", 1)
    assert box.text("gen1.out").splitlines()[0] == "port-file present"
    assert box.port_file.read_text().isdigit()  # the port alone, no newline


def test_a_missing_plugin_is_reported_and_the_program_runs(box: Box) -> None:
    started(box, "--with-plugin", str(box.root / "missing.so"))
    assert "cannot be preloaded (cannot open shared object file): ignored." in box.text("gen1.err")


def test_status_kill_and_exit_code_after_kill(box: Box) -> None:
    process, port = started(box)
    status = box.command(port, "--status")
    assert status.returncode == 0 and "NUM_PEERS=1" in status.stdout and "RUNNING=yes" in status.stdout
    killed = box.command(port, "--kill")
    assert (killed.returncode, killed.stdout) == (0, "")
    assert process.wait(10) == 0  # dmtcp_launch exits 0 when the coordinator kills the program


@pytest.mark.parametrize(("program", "code"), [(("--exit", "3"), 3), (("--die", "9"), -signal.SIGKILL)])
def test_launch_exits_as_the_program_does(box: Box, program: tuple[str, ...], code: int) -> None:
    process = box.launch(program=program)
    assert process.wait(20) == code


def test_checkpoint_of_a_program_that_has_exited_fails(box: Box) -> None:
    process = box.launch(program=("--exit", "0"))
    port = box.port(process)
    assert process.wait(20) == 0
    assert box.command(port, "--bcheckpoint").returncode == 2  # the coordinator went with it


# --- checkpoints ------------------------------------------------------------------------------

def test_checkpoint_writes_a_restart_script_and_a_link_in_the_ckptdir_only(box: Box) -> None:
    _, port = started(box)
    box.checkpoint(port)
    link = box.images / "dmtcp_restart_script.sh"
    assert link.is_symlink()
    target = box.images / os.readlink(link)
    assert re.fullmatch(r"dmtcp_restart_script_.+\.sh", target.name) and target.parent == box.images
    assert target.stat().st_mode & 0o777 == 0o744
    assert not list(box.work.glob("dmtcp_restart_script*"))
    assert [name for name in box.image_files() if re.fullmatch(r"ckpt_counter_.+\.dmtcp", name)]


@pytest.mark.parametrize("how", ["default", "--no-gzip", "DMTCP_GZIP=0"])
def test_images_are_gzipped_unless_turned_off(box: Box, how: str) -> None:
    options = ("--no-gzip",) if how == "--no-gzip" else ()
    env = box.env(DMTCP_GZIP="0") if how == "DMTCP_GZIP=0" else None
    _, port = started(box, *options, env=env)
    box.checkpoint(port)
    [image] = box.images.glob("ckpt_*.dmtcp")
    head = image.read_bytes()[:10]
    if how == "default":
        assert head[:2] == b"\x1f\x8b" and head[8] == 4  # gzip, "max speed"
    else:
        assert head[:2] != b"\x1f\x8b"


def test_bcheckpoint_blocks_only_after_4_2(each_version: Dmtcp) -> None:
    """4.2.0: -bc returns before the images exist; later: once they are written and the plugin has
    called (before it is answered)."""
    library = build_hook(each_version.cache, each_version.bin)
    assert library is not None
    with open_box(each_version) as box:
        hook = box.hook("hook.sock", "gen1.out")
        _, port = started(box, "--no-gzip", "--with-plugin", str(library),
                          env=box.env(first={"CBAS_HOOK_SOCKET": str(hook.path)}))
        assert box.command(port, "--bcheckpoint").returncode == 0
        called, images = len(hook.calls), box.image_files()
        if each_version.version.startswith("4."):
            assert (called, images) == (0, {})
            assert box.running(port) == "no"
        else:
            assert called == 1 and images
        hook.wait_call()["answer"].set()


def signal_warned(version: str, stderr: str, number: int) -> bool:
    """DMTCP's warning that it keeps signal `number` from the program (its words for each version)."""
    expected = SIGNAL_WARNING.get(version)
    if expected is None:
        return bool(ANY_SIGNAL_WARNING.search(stderr)) and str(number) in stderr
    return expected.format(n=number) in stderr


@pytest.mark.parametrize("options", [(), ("--ckpt-signal", str(FREE_SIGNAL))], ids=["default-signal", "signal-62"])
def test_without_the_plugin_sigusr2_is_kept_from_the_program_whatever_the_checkpoint_signal(
    each_version: Dmtcp, options: tuple[str, ...],
) -> None:
    with open_box(each_version) as box:
        _, port = started(box, *options, program=("--catch", "12"))
        box.checkpoint(port)
        assert signal_warned(each_version.version, box.text("gen1.err"), 12), box.text("gen1.err")


@pytest.mark.parametrize("caught", [12, FREE_SIGNAL])
def test_with_the_plugin_the_checkpoint_signal_is_kept_instead(each_version: Dmtcp, caught: int) -> None:
    """The CBAS plugin settles DMTCP's choice at INIT (cbas_dmtcp_hook.c): SIGUSR2 is the program's."""
    library = build_hook(each_version.cache, each_version.bin)
    assert library is not None
    with open_box(each_version) as box:
        _, port = started(box, "--ckpt-signal", str(FREE_SIGNAL), "--with-plugin", str(library),
                          program=("--catch", str(caught)))
        box.checkpoint(port)
        warned = box.text("gen1.err")
        assert signal_warned(each_version.version, warned, FREE_SIGNAL) == (caught == FREE_SIGNAL), warned
        assert not signal_warned(each_version.version, warned, 12), warned


def test_no_signal_warning_for_other_signals(box: Box) -> None:
    _, port = started(box, "--ckpt-signal", str(FREE_SIGNAL), program=("--catch", "10"))
    box.checkpoint(port)
    assert not ANY_SIGNAL_WARNING.search(box.text("gen1.err"))


def test_without_the_plugin_a_program_holding_the_checkpoint_signal_is_never_checkpointed(box: Box) -> None:
    _, port = started(box, "--ckpt-signal", str(FREE_SIGNAL), program=("--catch", str(FREE_SIGNAL)))
    assert box.command(port, "--checkpoint").returncode == 0  # -c: 5.0's -bc would wait for ever
    time.sleep(1)
    assert box.running(port) == "no" and not box.image_files()  # (the program runs on, or blocks in DMTCP)
    assert not ANY_SIGNAL_WARNING.search(box.text("gen1.err"))


# --- restarts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("setsid", [True, False], ids=["session-leader", "group-leader"])
def test_session_leader_warning_on_restart(box: Box, setsid: bool) -> None:
    first, port = started(box, "--no-gzip", setsid=setsid)
    box.checkpoint(port)
    box.stop(first)
    second = box.restart()
    box.port(second)
    box.wait_lines("gen2.out", 3)
    assert (SESSION_WARNING in box.text("gen2.err")) == setsid, box.text("gen2.err")


@dataclass
class Restarts:
    """One launch with the hook, a held checkpoint, restarts: what was seen at each step."""

    box: Box
    seen: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def restarts(dmtcp: Dmtcp, hook_library: Path) -> Iterator[Restarts]:
    with open_box(dmtcp) as box:
        yield Restarts(box, scenario(box, hook_library))


def scenario(box: Box, hook_library: Path) -> dict:
    seen: dict = {}
    a, b, c = box.hook("a.sock", "gen1.out"), box.hook("b.sock", "gen2.out"), box.hook("c.sock", "gen3.out")
    first, port = started(box, "--no-gzip", "--with-plugin", str(hook_library),
                          env=box.env(first={"CBAS_HOOK_SOCKET": str(a.path)}))
    box.command(port, "--bcheckpoint")
    call = a.wait_call()
    time.sleep(0.3)
    seen["resume"] = {**call, "status": box.running(port), "later_lines": box.lines("gen1.out"),
                      "later_images": box.image_files()}
    call["answer"].set()
    time.sleep(0.3)
    seen["after_resume"] = {"status": box.running(port), "lines": box.lines("gen1.out")}
    seen["image_names"] = [sorted(box.image_files())]
    box.stop(first)

    # restart 1: the new socket first in dmtcp_restart's environment (the worker's way)
    second = box.restart("gen2", env=box.env(first={"CBAS_HOOK_SOCKET": str(b.path)}, DMTCP_GZIP="1"))
    port = box.port(second)
    call = b.wait_call()
    time.sleep(0.3)
    seen["restart"] = {**call, "status": box.running(port), "later_lines": box.lines("gen2.out"),
                       "calls_a": len(a.calls)}
    call["answer"].set()
    box.wait_lines("gen2.out", 3)
    seen["cwd_before_checkpoint"] = sorted(p.name for p in box.work.glob("dmtcp_restart_script*"))
    b.hold = False
    box.checkpoint(port)
    seen["resume_after_restart"] = ([x["message"] for x in a.calls], [x["message"] for x in b.calls])
    seen["image_names"].append(sorted(box.image_files()))
    seen["gzip"] = [p.read_bytes()[:2] == b"\x1f\x8b" for p in box.images.glob("ckpt_*.dmtcp")]
    seen["cwd"] = {p.name: (p.is_symlink() and os.readlink(p)) for p in box.work.glob("dmtcp_restart_script*")}
    box.stop(second)

    # more restarts of that image (its plugin remembers b): which socket gets the RESTART call?
    a.hold = c.hold = False
    hooks = {"a": a, "b": b, "c": c}

    def called_on_restart(env: dict[str, str]) -> list[str]:
        before = {name: len(hook.calls) for name, hook in hooks.items()}
        process = box.restart("gen3", env=env)
        box.port(process)
        box.wait_lines("gen3.out", 3)
        box.stop(process)
        return [name for name, hook in hooks.items() for call in hook.calls[before[name]:] if call["message"] == "restarted"]

    socket_c = {"CBAS_HOOK_SOCKET": str(c.path)}
    seen["after_a_short_first"] = called_on_restart(box.env(first={"A": "1", **socket_c}))  # starts at byte 4
    seen["after_a_long_first"] = called_on_restart(box.env(first={"DMTCP_GZIP": "0", **socket_c}))  # at byte 13
    (box.root / "hook").mkdir(mode=0o755)
    hooks["beside"] = box.hook("hook/hook.sock", "gen3.out", hold=False)
    seen["after_a_long_first_with_one_beside"] = called_on_restart(box.env(first={"DMTCP_GZIP": "0", **socket_c}))
    return seen


def test_hook_resume_comes_after_the_images_and_holds_the_program(restarts: Restarts) -> None:
    resume = restarts.seen["resume"]
    assert resume["message"] == "checkpoint-written"
    assert resume["images"] and resume["images"] == resume["later_images"]  # complete when it called
    assert resume["lines"] == resume["later_lines"]  # held: nothing printed for 0.5 s
    assert resume["status"] == "no"
    after = restarts.seen["after_resume"]
    assert after["status"] == "yes" and len(after["lines"]) > len(resume["lines"])


def test_hook_restart_holds_the_program_before_it_prints(restarts: Restarts) -> None:
    restart = restarts.seen["restart"]
    assert restart["message"] == "restarted"
    assert restart["lines"] == [] and restart["later_lines"] == []
    assert restart["status"] == "no"
    assert restart["calls_a"] == 1  # the old socket got no restart call


def test_restart_resumes_from_the_checkpoint(restarts: Restarts) -> None:
    last = int(restarts.seen["resume"]["lines"][-1])
    assert restarts.box.lines("gen2.out")[0] == str(last + 1)


def test_restart_keeps_the_image_name_and_the_launch_gzip_setting(restarts: Restarts) -> None:
    first, second = restarts.seen["image_names"]
    assert len(first) == 1 and first == second
    assert restarts.seen["gzip"] == [False]  # launched --no-gzip; DMTCP_GZIP=1 at restart changes nothing


def test_restart_writes_the_script_and_link_in_its_working_folder_at_checkpoints(restarts: Restarts) -> None:
    assert restarts.seen["cwd_before_checkpoint"] == []
    cwd = restarts.seen["cwd"]
    assert cwd.get("dmtcp_restart_script.sh") and cwd[cwd["dmtcp_restart_script.sh"]] is False
    assert (restarts.box.images / "dmtcp_restart_script.sh").is_symlink()


def test_hook_resume_after_a_restart_calls_the_socket_the_restart_gave(restarts: Restarts) -> None:
    assert restarts.seen["resume_after_restart"] == (["checkpoint-written"], ["restarted", "checkpoint-written"])


def test_hook_restart_finds_only_a_variable_in_the_first_8_bytes_of_the_environment(restarts: Restarts) -> None:
    """dmtcp_get_restart_env() scans the first sizeof(char *) bytes of dmtcp_restart's environment."""
    assert restarts.seen["after_a_short_first"] == ["c"]
    assert restarts.seen["after_a_long_first"] == ["b"]  # not found: the socket the image remembers


def test_hook_restart_not_finding_it_calls_the_socket_beside_the_working_folder(restarts: Restarts) -> None:
    """cbas_dmtcp_hook.c's fallback: ../hook/hook.sock from the folder dmtcp_restart runs in."""
    assert restarts.seen["after_a_long_first_with_one_beside"] == ["beside"]
