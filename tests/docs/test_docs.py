"""Every `sh` block in docs/ is run, page by page, in order, as one bash script with `set -e`:
in a fresh folder, with CBAS_HOME inside it, AWS calls going to a moto server, and every process
it starts ended by its process group. A page whose commands stop working fails here."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cbas.jdl.parser import KEYS
from tests.homes import reachable_tmp
from tests.integration.conftest import FAST
from tests.processes import kill_groups, wait_until_gone

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
BLOCK = re.compile(r"^```sh\n(.*?)^```", re.M | re.S)
PAGES = sorted(page.name for page in DOCS.glob("*.md") if BLOCK.search(page.read_text()))


@pytest.mark.parametrize("page", PAGES)
def test_the_commands_of_a_page_work(page: str, moto_endpoint: str) -> None:
    script = "\n".join(BLOCK.findall((DOCS / page).read_text()))
    with reachable_tmp() as root:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("CBAS_", "AWS_"))}
        (root / "scripts").symlink_to(REPO / "scripts")  # as in a checkout
        env.update(FAST, CBAS_HOME=str(root / "home"), CBAS_MACHINES_DIR=str(root / "machines"),
                   CBAS_INSTALL_ROOT=str(root / "server"),  # the service installer stages, never touches /
                   PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}",
                   AWS_ENDPOINT_URL=moto_endpoint, AWS_ACCESS_KEY_ID="docs", AWS_SECRET_ACCESS_KEY="docs",
                   CBAS_MARKET_TIME_SCALE="1")
        process = subprocess.Popen(["bash", "-euo", "pipefail", "-c", script], cwd=root, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True, text=True)
        try:
            output, _ = process.communicate(timeout=150)
        finally:
            groups = [process.pid] + master_groups(root / "home")
            for pgid in groups:
                try:
                    os.killpg(pgid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
            kill_groups(wait_until_gone(groups, timeout=10))
        assert process.returncode == 0, f"{page} failed:\n{output[-4000:]}"
        if page == "operations.md":  # what the service installer staged works
            server = root / "server"
            assert (server / "etc/cbas/master.env").stat().st_mode & 0o777 == 0o640
            assert (server / "etc/systemd/system/multi-user.target.wants/cbas-master.service").is_symlink()
            version = subprocess.run([str(server / "opt/cbas/venv/bin/cbas"), "--version"], capture_output=True,
                                     text=True, env={"PATH": "/usr/bin:/bin"})
            assert version.returncode == 0 and "cbas, version" in version.stdout


def master_groups(home: Path) -> list[int]:
    """A master a page started with --detach is in a session of its own, and its machines too."""
    groups = []
    for path in [home / "master.json", *home.glob("cloud/machines/i-*.json")]:
        try:
            text = path.read_text()
        except OSError:
            continue
        groups += [int(n) for n in re.findall(r'"(?:pid|pgid)": (\d+)', text)]
    return groups


def test_the_jdl_reference_names_every_key() -> None:
    reference = (DOCS / "jdl.md").read_text()
    missing = [key for key in KEYS if f"`{key}`" not in reference]
    assert missing == [], f"docs/jdl.md does not describe {missing}"
