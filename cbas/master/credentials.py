"""The master's secret key and what it derives: each machine's credential, each job's checkpoint key.

The key is created once in <home>/master.key (0600, the home 0700). Nothing per machine is
stored: a machine's key is derived again from the ledger id whenever it is needed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cbas import authority
from cbas.authority import Credential
from cbas.local.bus import load_or_create_secret

MASTER_KEY_FILE = "master.key"


class KeyFileExposed(RuntimeError):
    """The master's key file can be read by others: every machine's credential derives from it."""


def load_master_key(home: Path) -> bytes:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home / MASTER_KEY_FILE
    key = load_or_create_secret(path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise KeyFileExposed(f"{path} is readable by others (mode {mode:o}): chmod 600 it, and since anyone "
                             f"may have read it, stop the master, delete it and let every running job restart")
    return key


class MachineKeys:
    def __init__(self, master_key: bytes) -> None:
        self._master = master_key

    def __repr__(self) -> str:
        return "MachineKeys(<secret>)"

    def credential(self, ledger_id: str) -> Credential:
        return Credential(ledger_id, authority.machine_key(self._master, ledger_id))

    def checkpoint_key(self, job_id: str) -> bytes:
        return authority.checkpoint_key(self._master, job_id)

    def sealed_checkpoint_key(self, ledger_id: str, job_id: str) -> str:
        """The job's checkpoint key as START_JOB carries it: only that machine's worker opens it."""
        return authority.seal_checkpoint_key(self.credential(ledger_id).key, job_id, self.checkpoint_key(job_id))
