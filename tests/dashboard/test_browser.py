"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright): sign in
with the token, see the job in the list, open its page, read its timeline and logs. Skipped where
no Chromium is installed. Screenshots go to test-artifacts/dashboard/."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.integration.conftest import Cluster

pytestmark = pytest.mark.integration
CHROMIUM = os.environ.get("CBAS_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "dashboard"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_the_dashboard_shows_jobs_timeline_and_logs(cluster: Cluster, tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    cluster.market({
        ("z1", "c5.large"): (0.020, 0.085, [(0.0, True), (8.0, False)]),
        ("z2", "c5.large"): (0.040, 0.085, [(0.0, True)]),
    })
    cluster.start_master()
    job_id = cluster.submit(cluster.job_dir("shown", n=120, delay=0.1, interval=1,
                                            extra='Deadline = "2h";\n'))
    job = cluster.wait(job_id, timeout=120)
    assert job["state"] == "COMPLETED" and job["preemptions"] == 1
    url = json.loads((cluster.home / "master.json").read_text())["url"]
    token = (cluster.home / "api-token").read_text().strip()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS,
                                             env={**os.environ, "HOME": str(tmp_path)})
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            response = page.goto(url + "/")
            assert response is not None and response.status == 401  # nothing without the token
            page.fill("#token", "wrong")
            page.click("button[type=submit]")
            assert "not the token" in page.content()
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_selector("body[data-ready=true]")
            row = page.locator("#jobs tbody tr", has_text=job_id)
            assert "COMPLETED" in row.inner_text()
            assert row.locator("progress").get_attribute("value") == "1"
            assert page.locator("#offers tbody tr").count() == 2  # the market's zones and prices
            page.screenshot(path=str(ARTIFACTS / "jobs.png"), full_page=True)

            row.locator(f"a[href='/jobs/{job_id}']").click()
            page.wait_for_selector("#timeline svg rect.segment")
            assert page.inner_text("#job-state") == "COMPLETED"
            states = page.eval_on_selector_all("#timeline rect.segment", "rs => rs.map(r => r.classList[1])")
            assert states[0] == "QUEUED" and "PREEMPTED" in states and states[-1] == "COMPLETED"
            assert page.locator("#timeline rect.machine").count() == 2  # two machines, one per zone
            assert page.locator("#timeline rect.checkpoint").count() == job["checkpoints"]
            assert page.locator("#checkpoints tbody tr").count() == job["checkpoints"]
            assert "deadline" in page.inner_text("#summary")
            page.screenshot(path=str(ARTIFACTS / "job.png"), full_page=True)

            page.click("#stdout")
            assert "done: counted to 120" in page.inner_text("body")
        finally:
            browser.close()
    assert (ARTIFACTS / "job.png").stat().st_size > 10_000
