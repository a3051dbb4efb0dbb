"""A machine's credential on its disk: <disk>/worker/machine.key (its key, hex) and ledger-id beside
it, in a folder only the worker's user enters (0700; the file 0600). The local cloud writes them
at launch; on EC2 the boot script fetches the key through a URL that expires in minutes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cbas.authority import Credential

KEY_FILE = "machine.key"
LEDGER_FILE = "ledger-id"


def key_file(disk: Path) -> Path:
    return disk / "worker" / KEY_FILE


def write_credential(folder: Path, credential: Credential) -> None:
    """Create the folder (0700) and the two files (0600), owned by this process's user."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise PermissionError(f"{folder} is not a folder of this user's: the machine key is not written there")
    os.chmod(folder, 0o700)
    for name, text in ((KEY_FILE, credential.key.hex()), (LEDGER_FILE, credential.ledger_id)):
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text + "\n")


def read_credential(path: Path) -> Credential:
    """The credential at `path` (the key file; the ledger id beside it). A key file others could
    read is refused: the machine's messages would no longer be its own."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd) as handle:
        info = os.fstat(handle.fileno())
        if stat.S_IMODE(info.st_mode) & 0o077 or info.st_uid != os.geteuid():
            raise PermissionError(f"{path} is readable by others or not this user's (mode "
                                  f"{stat.S_IMODE(info.st_mode):o}, uid {info.st_uid}): it must be 0600 and the worker's")
        text = handle.read().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path} does not hold a hex key") from None
    ledger_id = (path.parent / LEDGER_FILE).read_text().strip()
    if len(key) != 32 or not ledger_id:
        raise ValueError(f"{path} (and {LEDGER_FILE} beside it) do not hold a machine credential")
    return Credential(ledger_id, key)
