#!/usr/bin/env python3
"""A stand-in for DMTCP that honours its command-line contract, for tests on machines without it.

It cannot save a process's memory: an "image" holds the program's command line and the files
named in FAKE_DMTCP_STATE (relative to its working directory); a restart puts those files back
and runs the program again, so the program must resume from them (as examples/counter does).
Like DMTCP with the CBAS plugin loaded, it calls CBAS_HOOK_SOCKET after writing the images and
keeps the program stopped until the hook is answered. FAKE_DMTCP_NO_IMAGES=1 makes it report
checkpoints without writing images. Installed as dmtcp_launch, dmtcp_command and dmtcp_restart.
"""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

VALUED = {"--coord-port", "-p", "--port-file", "--ckptdir", "--tmpdir", "--with-plugin", "-i", "--interval"}
FLAGS = {"--new-coordinator", "--no-gzip", "-q", "--quiet", "-bc", "--bcheckpoint", "-s", "--status",
         "-k", "--kill", "-c", "--checkpoint", "-q", "--quit"}


def parse(args):
    options, index = {}, 0
    while index < len(args) and args[index].startswith("-"):
        arg = args[index]
        if arg in VALUED:
            options[arg] = args[index + 1]
            index += 2
        elif arg in FLAGS:
            options[arg] = True
            index += 1
        else:
            sys.exit(f"fake dmtcp: unknown option {arg}")
    return options, args[index:]


class Coordinator:
    def __init__(self, options, argv, plugin):
        self.ckptdir = Path(options["--ckptdir"])
        self.argv, self.plugin, self.child = argv, plugin, None
        self.server = socket.create_server(("127.0.0.1", 0))
        port = self.server.getsockname()[1]
        Path(options["--port-file"]).write_text(str(port))
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            connection, _ = self.server.accept()
            with connection:
                command = connection.makefile().readline().strip()
                if command == "bcheckpoint":
                    self.checkpoint(connection)
                elif command == "status":
                    connection.sendall(b"RUNNING=yes\n")
                elif command == "kill" and self.child:
                    self.child.kill()
                    connection.sendall(b"killed\n")

    def checkpoint(self, connection):
        os.kill(self.child.pid, signal.SIGSTOP)
        try:
            if os.environ.get("FAKE_DMTCP_NO_IMAGES") != "1":
                files = {}
                for name in os.environ.get("FAKE_DMTCP_STATE", "").split():
                    path = Path(name)
                    if path.exists():
                        files[name] = base64.b64encode(path.read_bytes()).decode()
                image = {"argv": self.argv, "plugin": self.plugin, "files": files}
                target = self.ckptdir / f"ckpt_{Path(self.argv[0]).name}_fake-{os.getpid()}.dmtcp"
                partial = target.with_suffix(".part")
                partial.write_text(json.dumps(image))
                os.replace(partial, target)
            connection.sendall(b"done\n")  # like DMTCP: -bc returns while the program is still held
            hook = os.environ.get("CBAS_HOOK_SOCKET")
            if self.plugin and hook:
                with socket.socket(socket.AF_UNIX) as call:
                    call.connect(hook)
                    call.sendall(b"checkpoint-written\n")
                    call.recv(16)
        finally:
            os.kill(self.child.pid, signal.SIGCONT)

    def run(self):
        self.child = subprocess.Popen(self.argv)
        code = self.child.wait()
        sys.exit(code if code >= 0 else 128 - code)


def launch(args):
    options, argv = parse(args)
    Coordinator(options, argv, plugin=options.get("--with-plugin")).run()


def restart(args):
    options, images = parse(args)
    if len(images) != 1:
        sys.exit("fake dmtcp_restart: exactly one image is supported")
    image = json.loads(Path(images[0]).read_text())
    for name, data in image["files"].items():
        Path(name).write_bytes(base64.b64decode(data))
    Coordinator(options, image["argv"], plugin=image["plugin"]).run()


def command(args):
    options, _ = parse(args)
    port = int(options.get("--coord-port") or options.get("-p") or 0)
    verb = "bcheckpoint" if ("-bc" in options or "--bcheckpoint" in options) else "status" if ("-s" in options or "--status" in options) else "kill"
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
            connection.sendall(verb.encode() + b"\n")
            connection.settimeout(60)
            print(connection.makefile().readline().strip())
    except OSError:
        print("Coordinator not found. Please check port and host.")
        sys.exit(2)


if __name__ == "__main__":
    tool = Path(sys.argv[0]).name
    {"dmtcp_launch": launch, "dmtcp_restart": restart, "dmtcp_command": command}[tool](sys.argv[1:])
