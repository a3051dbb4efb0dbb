"""Only its job (and the worker) may talk to a job's DMTCP coordinator.

DMTCP's coordinator listens on every address (--coord-host does not change that) and obeys anyone
who connects: `dmtcp_command -k` from another job on the host, or from another host, would kill
the computation (and its launcher would then exit 0, as if the job had finished). So while the
job runs, its coordinator's port is closed, with iptables, to everything but connections over the
loopback from the job's uid and root's. Rules live in a chain of their own, each tagged with the
guard's name, so a worker that died leaves nothing another worker cannot remove.
"""

from __future__ import annotations

import shutil
import subprocess

import structlog

from cbas.untrusted import SYSTEM_ENV

log = structlog.get_logger(__name__)

INBOUND, OUTBOUND = "CBAS-COORD-IN", "CBAS-COORD-OUT"  # jumped to from INPUT and OUTPUT
_warned = False


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True, env=SYSTEM_ENV)


def _ensure_chains() -> None:
    for chain, hook in ((INBOUND, "INPUT"), (OUTBOUND, "OUTPUT")):
        if _iptables("-n", "-L", chain).returncode != 0:
            _iptables("-N", chain)
        if _iptables("-C", hook, "-p", "tcp", "-j", chain).returncode != 0:
            _iptables("-I", hook, "-p", "tcp", "-j", chain)


def _rules(name: str, port: int, uid: int) -> list[tuple[str, list[str]]]:
    tag = ["-m", "comment", "--comment", f"cbas:{name}"]
    to_port = ["-p", "tcp", "--dport", str(port)]
    return [  # each chain's first matching rule decides
        (INBOUND, ["!", "-i", "lo", *to_port, *tag, "-j", "DROP"]),  # nothing from other hosts
        (OUTBOUND, ["-o", "lo", *to_port, "-m", "owner", "--uid-owner", str(uid), *tag, "-j", "RETURN"]),
        (OUTBOUND, ["-o", "lo", *to_port, "-m", "owner", "--uid-owner", "0", *tag, "-j", "RETURN"]),
        # the kernel's own packets (ACKs and resets of a closing or restored connection) have no
        # socket owner; resetting them broke live connections of the job's (seen with DMTCP 5.0).
        # No process sends one without a connection its SYN opened, which the owner rules judged
        (OUTBOUND, ["-o", "lo", *to_port, "-m", "owner", "!", "--socket-exists", *tag, "-j", "RETURN"]),
        (OUTBOUND, ["-o", "lo", *to_port, *tag, "-j", "REJECT", "--reject-with", "tcp-reset"]),
    ]


def guard(name: str, port: int, uid: int) -> bool:
    """Close the port to all but uid and root; False (said once) where iptables cannot be used."""
    global _warned
    if shutil.which("iptables", path=SYSTEM_ENV["PATH"]) is None or _iptables("-n", "-L", "OUTPUT").returncode != 0:
        if not _warned:
            _warned = True
            log.warning("coordinator.unguarded", reason="iptables is missing or not usable by this worker",
                        consequence="other users of this host can send commands to a job's DMTCP coordinator")
        return False
    _ensure_chains()
    # inserted first in their chains (no stale rule shadows them), in order: the reject comes
    # last, so no instant exists where it stands without the rules letting the job through (a
    # job's DMTCP talks to its coordinator meanwhile: a reset killed it)
    position: dict[str, int] = {}
    for chain, rule in _rules(name, port, uid):
        position[chain] = position.get(chain, 0) + 1
        result = _iptables("-I", chain, str(position[chain]), *rule)
        if result.returncode != 0:
            log.warning("coordinator.guard_failed", port=port, error=result.stderr.strip())
            release(name)
            return False
    log.info("coordinator.guarded", port=port, uid=uid)
    return True


def release(name: str, prefix: bool = False) -> None:
    """Remove every rule of this guard, or (prefix) of every guard whose name starts so: a
    machine's, when the worker that made them was killed (safe to call when there are none)."""
    if shutil.which("iptables", path=SYSTEM_ENV["PATH"]) is None:
        return
    for chain in (INBOUND, OUTBOUND):
        listing = _iptables("-S", chain)
        for line in listing.stdout.splitlines() if listing.returncode == 0 else []:
            parts = line.split()
            tags = [part.strip('"')[len("cbas:"):] for part in parts if part.startswith('"cbas:')]
            if parts[:2] == ["-A", chain] and tags and (tags[0].startswith(name) if prefix else tags[0] == name):
                _iptables("-D", chain, *[part.strip('"') for part in parts[2:]])
