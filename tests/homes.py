"""Folders the job user can reach: when tests run as root, jobs run as 'nobody', and pytest's
own temporary folders (mode 0700 under /tmp/pytest-of-root) are closed to it."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def reachable_tmp(prefix: str = "cbas-test-") -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
