"""The dashboard's pages and sign-in, without a browser (tests/dashboard drives a real one)."""

from __future__ import annotations

from tests.master.test_app import AUTH, TOKEN, setup  # noqa: F401 (the fixture)


async def test_sign_in_sets_a_strict_cookie_that_reads_but_never_writes(setup) -> None:  # noqa: F811
    _, client = setup
    page = await client.get("/")
    assert page.status == 401 and 'name="token"' in await page.text()
    wrong = await client.post("/login", data={"token": "nope"}, allow_redirects=False)
    assert wrong.status == 401 and "not the token" in await wrong.text()
    signed = await client.post("/login", data={"token": TOKEN}, allow_redirects=False)
    assert signed.status == 303
    cookie = signed.cookies["cbas_token"]
    assert cookie["httponly"] and cookie["samesite"] == "Strict"
    jobs_page = await client.get("/")
    assert jobs_page.status == 200 and 'data-page="jobs"' in await jobs_page.text()
    assert "default-src 'self'" in jobs_page.headers["Content-Security-Policy"]
    assert (await client.get("/api/jobs")).status == 200  # reads with the cookie
    assert (await client.post("/api/jobs", json={"name": "x"})).status == 401  # no writes with it
    assert (await client.post("/api/jobs", json={"name": "x"}, headers=AUTH)).status == 201
    assert (await client.get("/static/dashboard.js")).status == 200
    job_page = await client.get("/jobs/abc<script>")
    assert 'data-job="abc&lt;script&gt;"' in await job_page.text()  # a job id from the URL is escaped
