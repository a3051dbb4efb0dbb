"""Starting a job's process from a root worker: `python -I -m cbas.worker.launch ...`.

Started as root with an empty environment (nothing of the job's can run as root or before the
process is in its cgroup), it waits on its stdin until the worker has put it in the job's
cgroup, then, optionally, enters a mount namespace of its own where one folder is bound over
another (a validation restart sees a scratch copy where the live job's folder is), changes to
the job's folder, drops to the job's user, and becomes the program with the job's environment,
read from a memfd the worker passed (never on a command line, which any user may read). The
program keeps this process's pid, and its environment the order it was given.

    launch --uid U --gid G --cwd DIR --env-fd N [--bind SRC:DST] -- PROGRAM ARGS...
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
REFUSED = 111  # the worker went away before letting it go, or something could not be set up


def _libc_call(name: str, *args: object) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{name}: {os.strerror(error)}")


def _bind(source: str, target: str) -> None:
    _libc_call("unshare", CLONE_NEWNS)
    _libc_call("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)  # nothing leaks out
    _libc_call("mount", source.encode(), target.encode(), None, MS_BIND | MS_REC, None)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cbas.worker.launch")
    parser.add_argument("--uid", type=int, required=True)
    parser.add_argument("--gid", type=int, required=True)
    parser.add_argument("--cwd", required=True)
    parser.add_argument("--env-fd", type=int, required=True)
    parser.add_argument("--bind", default="")
    parser.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    try:
        with os.fdopen(args.env_fd, "rb") as source:
            env = dict(json.loads(source.read()))
        if sys.stdin.buffer.readline() != b"go\n":  # the worker died, or refused
            return REFUSED
        if args.bind:
            source_dir, _, target_dir = args.bind.partition(":")
            _bind(source_dir, target_dir)
        os.chdir(args.cwd)
        if args.uid != os.geteuid():
            os.setgroups([])
            os.setresgid(args.gid, args.gid, args.gid)
            os.setresuid(args.uid, args.uid, args.uid)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        os.execvpe(program[0], program, env)
    except OSError as exc:
        print(f"cbas: could not start {program[:1]}: {exc}", file=sys.stderr, flush=True)
    return REFUSED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
