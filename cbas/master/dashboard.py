"""The web dashboard: plain HTML pages whose JavaScript reads the master's JSON API. The same
token as the API protects it; a browser presents it once (POST /login) and keeps it in an
HttpOnly, SameSite=Strict cookie, which the API accepts for reads only."""

from __future__ import annotations

import hmac
from html import escape
from pathlib import Path

from aiohttp import web

COOKIE = "cbas_token"
STATIC = Path(__file__).with_name("static")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/static/dashboard.css"></head>
<body data-page="{page}" data-job="{job}">
<header><a href="/" class="brand">CBAS</a><span id="updated"></span></header>
<main>{body}</main>
<script src="/static/dashboard.js"></script></body></html>"""

JOBS = """<h1>Jobs</h1><table id="jobs"><thead><tr><th>Job</th><th>Name</th><th>State</th><th>Progress</th>
<th>Restarts</th><th>Preemptions</th><th>Checkpoints</th><th>Cost</th><th>On demand</th><th>Deadline</th></tr></thead>
<tbody></tbody></table>
<h2>Machines</h2><table id="machines"><thead><tr><th>Machine</th><th>Job</th><th>Market</th><th>Zone</th>
<th>Type</th><th>Price $/h</th><th>Since</th></tr></thead><tbody></tbody></table>
<h2>Spot prices</h2><table id="offers"><thead><tr><th>Zone</th><th>Type</th><th>Spot $/h</th><th>On demand $/h</th>
<th>Capacity</th></tr></thead><tbody></tbody></table>"""

JOB = """<h1>Job <span id="job-id"></span> <span id="job-state" class="state"></span></h1>
<p id="summary"></p>
<p class="links"><a id="stdout">stdout</a> · <a id="stderr">stderr</a> · <a id="output">output</a></p>
<h2>Timeline</h2><div id="timeline"></div>
<h2>Checkpoints</h2><table id="checkpoints"><thead><tr><th>Checkpoint</th><th>Reason</th><th>Size</th>
<th>New</th><th>Pause</th><th>Upload</th><th>At</th></tr></thead><tbody></tbody></table>
<h2>Events</h2><table id="events"><thead><tr><th>At</th><th>Event</th><th>Detail</th></tr></thead><tbody></tbody></table>"""

LOGIN = """<h1>Sign in</h1><form method="post" action="/login">
<p>Paste the master's API token (the file <code>api-token</code> in its CBAS home).</p>
<input type="password" name="token" id="token" autocomplete="off" size="48" required>
<button type="submit">Open the dashboard</button></form>{error}"""


def dashboard_token(request: web.Request) -> str | None:
    return request.cookies.get(COOKIE)


def _signed_in(request: web.Request) -> bool:
    from cbas.master.app import TOKEN_KEY

    given = dashboard_token(request)
    return given is not None and hmac.compare_digest(given.encode(), request.app[TOKEN_KEY].encode())


def _page(title: str, page: str, body: str, job: str = "", status: int = 200) -> web.Response:
    html = PAGE.format(title=escape(title), page=page, job=escape(job), body=body)
    return web.Response(text=html, content_type="text/html", status=status,
                        headers={"Content-Security-Policy": "default-src 'self'; style-src 'self'",
                                 "X-Frame-Options": "DENY", "Cache-Control": "no-store"})


async def jobs_page(request: web.Request) -> web.Response:
    if not _signed_in(request):
        return _page("CBAS: sign in", "login", LOGIN.format(error=""), status=401)
    return _page("CBAS jobs", "jobs", JOBS)


async def job_page(request: web.Request) -> web.Response:
    if not _signed_in(request):
        return _page("CBAS: sign in", "login", LOGIN.format(error=""), status=401)
    job_id = request.match_info["job_id"]
    return _page(f"CBAS job {job_id}", "job", JOB, job=job_id)


async def login(request: web.Request) -> web.Response:
    from cbas.master.app import TOKEN_KEY

    form = await request.post()
    token = str(form.get("token", "")).strip()
    if not hmac.compare_digest(token.encode(), request.app[TOKEN_KEY].encode()):
        return _page("CBAS: sign in", "login", LOGIN.format(error='<p class="error">That is not the token.</p>'),
                     status=401)
    response = web.HTTPSeeOther("/")
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/",
                        secure=request.secure)
    raise response


def add_dashboard(app: web.Application) -> None:
    app.router.add_get("/", jobs_page)
    app.router.add_get("/jobs/{job_id}", job_page)
    app.router.add_post("/login", login)
    app.router.add_static("/static/", STATIC)
