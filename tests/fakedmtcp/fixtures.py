"""Installing the fake DMTCP: `install` for any test, the `fake_dmtcp` fixture for tests that want
it first on the PATH."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from tests.fakedmtcp.stub_header import STUB_HEADER
from tests.homes import reachable_tmp

FAKE = Path(__file__).resolve().parent / "fake_dmtcp.py"
TOOLS = ("dmtcp_launch", "dmtcp_command", "dmtcp_restart")


def install(root: Path) -> Path:
    """The fake tools in root/bin and its header in root/include (where the product looks for
    DMTCP's, next to the tools); root must be reachable by the job user. Returns root/bin."""
    (root / "bin").mkdir(mode=0o755)
    for tool in TOOLS:
        shutil.copy(FAKE, root / "bin" / tool)
        (root / "bin" / tool).chmod(0o755)
    (root / "include").mkdir(mode=0o755)
    (root / "include" / "dmtcp.h").write_text(STUB_HEADER)
    return root / "bin"


@pytest.fixture
def fake_dmtcp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The fake tools in a folder the job user can reach, first on the PATH."""
    with reachable_tmp("cbas-fakedmtcp-") as root:
        monkeypatch.setenv("PATH", f"{install(root)}:{os.environ['PATH']}")
        yield root
