#!/usr/bin/env python3
"""A stand-in for DMTCP, installed as dmtcp_launch, dmtcp_restart and dmtcp_command, for tests on
machines without it. It cannot save memory: an "image" holds the launch's command line, environment
and settings and the files named in FAKE_DMTCP_STATE (relative to the working folder); a restart
puts the files back and runs the program again, which must resume from them (as
examples/counter/counter.sh does). FAKE_DMTCP_VERSION (default 4.2.0, the harsher) picks the version
it imitates; FAKE_DMTCP_NO_IMAGES=1 reports checkpoints without writing images.

Each behaviour below was seen on DMTCP 4.2.0 and the 5.0 head (as an unprivileged user) unless a
version is named; tests/contract/test_dmtcp_contract.py asserts it on them and on this fake:
- `--version`: "<tool> (DMTCP) <version>" first; dmtcp_command then exits 1, the others 0. Unknown
  options: launch and restart exit 99, command 1; dmtcp_restart refuses launch-only options.
- --port-file (the port, no newline) is written before the program starts.
- -s prints the status block (NUM_PEERS, RUNNING=no from a checkpoint request until the program
  runs again, and while a restart is held); -c, -bc, -k print nothing and exit 0; no coordinator:
  exit 2, "Coordinator not found. Please check port and host." on stderr. The coordinator ends with
  the program: checkpointing a program that has exited fails so.
- -bc returns at once on 4.2.0 (before the images exist); on 5.0 once the images are written and
  the plugin's RESUME call is made (not answered).
- images ckpt_<executable>_<id>.dmtcp (0600, written as .temp and renamed), gzip "max speed" unless
  --no-gzip or DMTCP_GZIP=0 at launch; the setting, like the signal, stays with the image (the
  restart's environment changes neither); a restart keeps the image's name.
- each checkpoint writes dmtcp_restart_script_<id>.sh (0744) and a symbolic link
  dmtcp_restart_script.sh to it in --ckptdir and, after a restart, in dmtcp_restart's working
  folder, where the restarted program also runs (not in the folder saved).
- the CBAS plugin (a --with-plugin library holding "checkpoint-written"; missing: ld.so's error, and
  the program runs): at RESUME (images written, program held) it calls $CBAS_HOOK_SOCKET and holds
  it until answered; at RESTART (before the program goes on) it calls the socket found by
  dmtcp_get_restart_env(), which sees only variables starting in the first 8 bytes of
  dmtcp_restart's environment, else ../hook/hook.sock if that exists, else the socket it had.
- the checkpoint signal: --ckpt-signal / DMTCP_SIGCKPT at launch, default 12. DMTCP keeps SIGUSR2
  from the program whatever it is, unless the CBAS plugin (cbas_dmtcp_hook.c settles it at INIT)
  makes that the checkpoint signal: a program catching the kept signal gets DMTCP's warning once
  on its stderr (DMTCP at sigaction, this fake at the next checkpoint, from SigCgt in /proc); a
  program holding a checkpoint signal not kept from it is never checkpointed (RUNNING=no for good).
- restarting a program launched as a session leader prints "Failed to restore this process as
  session leader" on its stderr; a process-group leader restarts quietly.
- dmtcp_launch/dmtcp_restart exit with the program's code, die of its signal, exit 0 after -k.
Not modelled: memory, open files, processes the program starts (they are stopped, not imaged), the
real coordinator listening on every address (this one: 127.0.0.1 only).
"""

import base64
import contextlib
import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

VERSION = os.environ.get("FAKE_DMTCP_VERSION", "4.2.0")
OLD = VERSION.startswith("4.")
SIGUSR2 = 12  # the signal DMTCP's sigaction wrapper keeps from programs, unless the plugin settles it
WRITE_SECONDS = 0.1  # suspending and writing take time even for a small program
COMMON = {"-h", "--coord-host", "-p", "--coord-port", "--port-file", "--ckptdir", "--tmpdir", "-i", "--interval"}
COMMON_FLAGS = {"--new-coordinator", "-j", "--join-coordinator", "--any-coordinator", "-q", "--quiet",
                "--no-strict-checking"}
LAUNCH = (COMMON | {"--with-plugin", "--ckpt-signal"}, COMMON_FLAGS | {"--no-gzip", "--gzip"})
RESTART = (COMMON, COMMON_FLAGS)
VERBS = {"-s": "status", "--status": "status", "-c": "checkpoint", "--checkpoint": "checkpoint",
         "-bc": "bcheckpoint", "--bcheckpoint": "bcheckpoint", "-k": "kill", "--kill": "kill"}


def stamp():
    return datetime.now().isoformat(timespec="milliseconds")


def signal_warning(number):
    if OLD:
        return (f"\x1b[0;33m[{stamp()}, 40000, 40000, Warning] at signalwrappers.cpp:158 in sigaction; "
                f"REASON='JWARNING(false) failed; (stopSignal = {number});Message: Application trying to use DMTCP's "
                "signal for it's own use.\n  You should employ a different signal by setting the\n  environment "
                "variable DMTCP_SIGCKPT to the number\n  of the signal that DMTCP should use for checkpointing.\n"
                "  (Further warnings will be suppressed.)\x1b[0m\n")
    return (f"WARNING at signalwrappers.cpp:160: false: application tried to use DMTCP's checkpoint signal: signal={number}. "
            "Set DMTCP_SIGCKPT to a different checkpoint signal number. Further warnings will be suppressed.\n")


def session_warning():
    sid = os.getsid(0)
    if OLD:
        return (f"\x1b[0;33m[{stamp()}, {sid}, {sid}, Warning] at dmtcprestartinternal.cpp:326 in createProcess; "
                f"REASON='JWARNING(setsid() != -1) failed; (getsid(0) = {sid}); ((strerror((*__errno_location ()))) = "
                "Operation not permitted);Message: Failed to restore this process as session leader.\x1b[0m\n")
    return ("WARNING at dmtcprestartinternal.cpp:347: dmtcpAssertExpected != dmtcpAssertActual: expected -1 != "
            f"setsid(), got -1 and -1; Failed to restore this process as session leader: current session id={sid}\n")


def parse(tool, args, valued, flags):
    options, index = {}, 0
    while index < len(args) and args[index].startswith("-"):
        arg = args[index]
        if arg == "--version":
            print(f"{tool} (DMTCP) {VERSION}\nLicense LGPLv3+: GNU LGPL version 3 or later\n"
                  "    <http://gnu.org/licenses/lgpl.html>.\nThis is the fake DMTCP of the CBAS tests.")
            sys.exit(1 if tool == "dmtcp_command" else 0)
        if arg in valued and index + 1 < len(args):
            options[arg] = args[index + 1]
            index += 2
        elif arg in flags:
            options[arg] = True
            index += 1
        else:
            print(f"Invalid Argument\nUsage: {tool} [OPTIONS] ... (fake DMTCP: {arg!r} is not accepted)", file=sys.stderr)
            sys.exit(99)
    return options, args[index:]


def family(root):
    """root and its descendants, parents first."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
    found = [root]
    for pid in found:  # grows as it goes
        found += [child for child, parent in parents.items() if parent == pid]
    return found


def send(pids, number):
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)


def stop(pids):
    send(pids, signal.SIGSTOP)
    for pid in pids:  # kill() returns before the stop: wait for it, so the files hold still
        for _ in range(200):
            with contextlib.suppress(OSError, IndexError):
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "TtZX":
                    time.sleep(0.005)
                    continue
            break


def caught(pid):
    """The signals the program has handlers for."""
    with contextlib.suppress(OSError, StopIteration):
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        mask = int(next(line for line in status if line.startswith("SigCgt:")).split()[1], 16)
        return {n for n in range(1, 65) if mask >> (n - 1) & 1}
    return set()


def call_hook(path, message, answered_later=None):
    """The plugin's call: connect, say it, block until a reply or EOF; a missing socket is silence."""
    if not path:
        return False
    with socket.socket(socket.AF_UNIX) as call:
        try:
            call.connect(path)
            call.sendall(message)
        except OSError:
            return False
        if answered_later:
            answered_later()
        with contextlib.suppress(OSError):
            call.recv(16)
    return True


class Coordinator:
    def __init__(self, options, image, restarted):
        self.image, self.restarted = image, restarted
        self.ckptdir = Path(options.get("--ckptdir") or image.get("ckptdir") or ".").absolute()
        self.image["ckptdir"] = str(self.ckptdir)
        self.child, self.running, self.killed, self.stuck = None, True, False, False
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", int(options.get("--coord-port") or options.get("-p") or 0)))
        self.port = self.server.getsockname()[1]
        if options.get("--port-file"):
            Path(options["--port-file"]).write_text(str(self.port))
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            connection, _ = self.server.accept()
            threading.Thread(target=self.answer, args=(connection,), daemon=True).start()

    def answer(self, connection):
        def done(text=""):
            connection.sendall(f"{text}\n".encode())
            connection.close()  # the command reads to the end: it returns now

        with connection:
            verb = connection.makefile().readline().strip()
            if verb == "status":
                done(f"Coordinator:\n  Host: localhost\n  Port: {self.port}\nStatus...\n  NUM_PEERS={int(self.child is not None)}\n"
                     f"  RUNNING={'yes' if self.running else 'no'}\n  CKPT_INTERVAL=0 (checkpoint manually)")
            elif verb in ("checkpoint", "bcheckpoint"):
                blocking = verb == "bcheckpoint" and not OLD  # 4.2.0's coordinator takes the "b" for nothing
                self.running = self.child is None  # suspended from the request on
                if not blocking:
                    done()
                if not self.checkpoint(done if blocking else None) and blocking:
                    threading.Event().wait()  # 5.0: -bc waits for a checkpoint that never comes
            elif verb == "kill":
                self.killed = True
                send(family(self.child.pid) if self.child else [], signal.SIGKILL)
                done()

    def checkpoint(self, answer):
        """Suspend, write, call the hook; False if the checkpoint never completes."""
        if self.stuck or self.child is None:
            return False
        with self.lock:
            self.running = False
            signals, banned = caught(self.child.pid), self.image["banned"]
            if banned in signals and not self.image.get("warned"):
                self.image["warned"] = True
                sys.stderr.write(signal_warning(banned))
                sys.stderr.flush()
            if self.image["signal"] != banned and self.image["signal"] in signals:
                self.stuck = True  # the program took DMTCP's signal: its checkpoint thread never hears it
                return False
            pids = family(self.child.pid)
            stop(pids)
            try:
                time.sleep(WRITE_SECONDS)
                if os.environ.get("FAKE_DMTCP_NO_IMAGES") != "1":
                    self.write_image(pids[0])
                for folder in {self.ckptdir, *([Path.cwd()] if self.restarted else [])}:
                    self.write_script(folder)
                called = call_hook(self.image.get("hook"), b"checkpoint-written\n", answer)
                if answer and not called:
                    answer()
            finally:
                send(reversed(pids), signal.SIGCONT)
                self.running = True
        return True

    def write_image(self, pid):
        if "name" not in self.image:
            try:
                program = Path(os.readlink(f"/proc/{pid}/exe")).name
            except OSError:
                program = Path(self.image["argv"][0]).name
            self.image["name"] = f"ckpt_{program}_fake-40000-{time.time_ns() // 1000:x}.dmtcp"
        state = dict(self.image["env"]).get("FAKE_DMTCP_STATE", "").split()
        files = {name: base64.b64encode(Path(name).read_bytes()).decode() for name in state if Path(name).is_file()}
        data = json.dumps({**self.image, "files": files}).encode()
        data = gzip.compress(data, compresslevel=1) if self.image["gzip"] else b"FAKE_DMTCP_IMAGE\n" + data
        target = self.ckptdir / self.image["name"]
        partial = target.with_name(target.name + ".temp")
        partial.write_bytes(data)
        partial.chmod(0o600)
        os.replace(partial, target)

    def write_script(self, folder):
        script = folder / f"dmtcp_restart_script_{self.image['script']}.sh"
        script.write_text(f"#!/bin/sh\n# written by the fake DMTCP\nexec dmtcp_restart {self.ckptdir / self.image.get('name', 'ckpt_*.dmtcp')}\n")
        script.chmod(0o744)
        (folder / "dmtcp_restart_script.sh").unlink(missing_ok=True)
        (folder / "dmtcp_restart_script.sh").symlink_to(script.name)

    def run(self, restored_env):
        if self.restarted:
            self.running = False  # memory restored, the program's threads not yet resumed
            if self.image.get("session_leader"):
                sys.stderr.write(session_warning())
                sys.stderr.flush()
            call_hook(self.image.get("hook"), b"restarted\n")
        self.child = subprocess.Popen(self.image["argv"], env=restored_env)
        self.running = True
        code = self.child.wait()
        self.child = None
        if code >= 0 or self.killed:
            sys.exit(0 if self.killed else code)
        with contextlib.suppress(OSError, ValueError):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)  # dies of the program's signal, as DMTCP's does
        sys.exit(128 - code)


def plugin_hook(plugin):
    """The socket the CBAS plugin would call, or None: loaded only if the library exists."""
    if not plugin:
        return None
    try:
        library = Path(plugin).read_bytes()
    except OSError:
        print(f"ERROR: ld.so: object '{plugin}' from LD_PRELOAD cannot be preloaded (cannot open shared object file): ignored.",
              file=sys.stderr)
        return None
    return os.environ.get("CBAS_HOOK_SOCKET", "") if b"checkpoint-written" in library else None


def restart_env(name):
    """dmtcp_get_restart_env(): it scans only entries that start in the first 8 bytes (sizeof a
    pointer) of dmtcp_restart's environment: the first, or the next after one shorter than that."""
    offset = 0
    for key, value in os.environ.items():
        if offset >= 8:
            break
        entry = f"{key}={value}"
        if entry.startswith(name):
            return entry.split("=", 1)[1]
        offset += len(os.fsencode(entry)) + 1
    return None


def launch(args):
    options, argv = parse("dmtcp_launch", args, *LAUNCH)
    number = int(options.get("--ckpt-signal") or os.environ.get("DMTCP_SIGCKPT") or SIGUSR2)
    image = {
        "argv": argv, "env": list(os.environ.items()), "hook": plugin_hook(options.get("--with-plugin")),
        "gzip": not options.get("--no-gzip") and bool(options.get("--gzip") or os.environ.get("DMTCP_GZIP", "1") != "0"),
        "session_leader": os.getsid(0) == os.getpid(), "script": f"fake-40000-{time.time_ns() // 1000:x}",
        "signal": number,
    }
    image["banned"] = number if image["hook"] is not None else SIGUSR2  # the plugin settles it at INIT
    Coordinator(options, image, restarted=False).run(dict(os.environ))


def restart(args):
    options, images = parse("dmtcp_restart", args, *RESTART)
    if len(images) != 1:
        sys.exit("fake dmtcp_restart: exactly one image is supported")
    data = Path(images[0]).read_bytes()
    data = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data.split(b"\n", 1)[1]
    image = json.loads(data)
    for name, content in image.pop("files").items():
        Path(name).write_bytes(base64.b64decode(content))
    if image.get("hook") is not None:  # the plugin's RESTART: dmtcp_restart's variable, else the one beside
        beside = Path("../hook/hook.sock")
        image["hook"] = restart_env("CBAS_HOOK_SOCKET") or (str(beside.resolve()) if beside.exists() else image["hook"])
    Coordinator(options, image, restarted=True).run(dict(image["env"]))  # the program's own environment


def command(args):
    options, rest, verbs = {}, list(args), []
    while rest:
        arg = rest.pop(0)
        if arg == "--version":
            parse("dmtcp_command", [arg], set(), set())
        elif arg in ("-p", "--coord-port", "-h", "--coord-host", "-i", "--interval") and rest:
            options[arg] = rest.pop(0)
        elif arg in VERBS:
            verbs.append(VERBS[arg])
        else:
            verbs = []
            break
    if not verbs:
        print("Usage:  dmtcp_command [OPTIONS] COMMAND [COMMAND...]", file=sys.stderr)
        sys.exit(1)
    port = int(options.get("--coord-port") or options.get("-p") or os.environ.get("DMTCP_COORD_PORT") or 7779)
    for verb in verbs:
        try:
            with socket.create_connection(("127.0.0.1", port)) as connection:
                connection.sendall(verb.encode() + b"\n")
                reply = connection.makefile().read().rstrip("\n")
        except OSError:
            print("Coordinator not found. Please check port and host.", file=sys.stderr)
            sys.exit(2)
        if reply:
            print(reply)


if __name__ == "__main__":
    tool = Path(sys.argv[0]).name
    {"dmtcp_launch": launch, "dmtcp_restart": restart, "dmtcp_command": command}[tool](sys.argv[1:])
