"""The master's HTTP face: POST /messages (signed deliveries, from workers only: see gate.py) and
the token-protected JSON API (jobs are created, submitted and cancelled only there)."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any, Awaitable, Callable

import structlog
from aiohttp import web

from cbas import __version__, jsonlimits
from cbas.backends import BlobNotFound, InvalidMessage, NotFound, StaleWrite
from cbas.jsonlimits import TooDeep
from cbas.master.dashboard import add_dashboard, dashboard_token
from cbas.master.gate import NotYet, Refused
from cbas.master.inbox import Inbox
from cbas.master.metrics import CONTENT_TYPE
from cbas.master.service import BadRequest, Master
from cbas.messages import MASTER, UnroutableMessage
from cbas.state import JobState

log = structlog.get_logger(__name__)

MASTER_KEY: web.AppKey[Master] = web.AppKey("master", Master)
TOKEN_KEY: web.AppKey[str] = web.AppKey("token", str)
INBOX_KEY: web.AppKey[Inbox] = web.AppKey("inbox", Inbox)
MAX_BODY = 256 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error becomes a JSON answer with the right status, in this one place."""
    try:
        return await handler(request)
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"body larger than {MAX_BODY} bytes")
    except web.HTTPException:
        raise
    except TooDeep as exc:
        return _error(400, f"body refused: {exc}")
    except Refused as exc:
        metrics = request.app[MASTER_KEY].metrics
        metrics.rejected.inc()
        metrics.refused.labels(reason=exc.reason).inc()
        log.warning("message.refused", reason=exc.reason, error=str(exc), peer=request.remote)
        return _error(403, f"message refused: {exc}")
    except NotYet as exc:
        return _error(503, str(exc))
    except InvalidMessage as exc:
        request.app[MASTER_KEY].metrics.rejected.inc()
        log.warning("message.rejected", reason=str(exc), peer=request.remote)
        return _error(403, f"message rejected: {exc}")
    except (UnroutableMessage, BadRequest) as exc:
        return _error(400, str(exc))
    except NotFound as exc:
        return _error(404, str(exc))
    except StaleWrite as exc:
        return _error(409, str(exc))


@web.middleware
async def token_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if (request.path.startswith("/api/") and request.path != "/api/health") or request.path == "/metrics":
        given = request.headers.get("Authorization", "")
        expected = "Bearer " + request.app[TOKEN_KEY]
        # the dashboard's pages read the API with their cookie (reads only: no cross-site writes)
        cookie = dashboard_token(request) if request.method == "GET" else None
        if not (hmac.compare_digest(given.encode(), expected.encode())
                or (cookie is not None and hmac.compare_digest(cookie.encode(), request.app[TOKEN_KEY].encode()))):
            return _error(401, "missing or wrong API token (see <CBAS_HOME>/api-token)")
    return await handler(request)


async def receive_message(request: web.Request) -> web.Response:
    master = request.app[MASTER_KEY]
    message = await master.bus.receive(await request.read())
    if message is None:
        return web.json_response({"ok": True, "control": True})
    if message.recipient != MASTER:
        raise BadRequest(f"message for {message.recipient!r} delivered to the master")
    structlog.contextvars.clear_contextvars()
    outcome, why = await request.app[INBOX_KEY].take(message)
    if outcome == "ignored":
        return web.json_response({"ok": True, "ignored": why})
    if outcome == "duplicate":
        return web.json_response({"ok": True, "duplicate": True})
    return web.json_response({"ok": True})


async def health(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "version": __version__})


async def create_job(request: web.Request) -> web.Response:
    payload = await _json(request)
    name = payload.get("name")
    if name is not None and not isinstance(name, str):
        raise BadRequest("name must be a string")
    job = await request.app[MASTER_KEY].create_job(name)
    return web.json_response({"job_id": job.id}, status=201)


async def submit_job(request: web.Request) -> web.Response:
    """The job's files are uploaded: queue it (what ADD_JOB on the bus did, now only here)."""
    payload = await _json(request)
    text = payload.get("jdl")
    if not isinstance(text, str):
        raise BadRequest("jdl must be the job's JDL text")
    master = request.app[MASTER_KEY]
    job_id = request.match_info["job_id"]
    await master.add_job(job_id, text)
    return web.json_response({"ok": True, "state": (await master.store.get_job(job_id)).state.value})


async def cancel_job(request: web.Request) -> web.Response:
    await _json(request)  # (no fields; a body, if any, must still be sound)
    master = request.app[MASTER_KEY]
    job_id = request.match_info["job_id"]
    await master.cancel_job(job_id)
    return web.json_response({"ok": True, "state": (await master.store.get_job(job_id)).state.value})


async def list_jobs(request: web.Request) -> web.Response:
    master = request.app[MASTER_KEY]
    states = request.query.get("state")
    try:
        wanted = {JobState(s.upper()) for s in states.split(",")} if states else None
    except ValueError:
        raise BadRequest(f"unknown state in {states!r}; states are {', '.join(JobState)}") from None
    jobs = await master.store.list_jobs(wanted)
    ledger = await master.store.list_ledger(live_only=False)
    return web.json_response({"jobs": [master.job_view(job, ledger) for job in jobs]})


async def get_job(request: web.Request) -> web.Response:
    master = request.app[MASTER_KEY]
    job = await master.store.get_job(request.match_info["job_id"])
    ledger = await master.store.list_ledger(live_only=False)
    view = master.job_view(job, ledger)
    view["checkpoint_list"] = [c.model_dump(mode="json") for c in await master.store.list_checkpoints(job.id)]
    view["events"] = [e.model_dump(mode="json") for e in await master.store.list_events(job.id)]
    view["machines"] = [e.model_dump(mode="json") for e in ledger if e.job_id == job.id]
    return web.json_response(view)


async def metrics(request: web.Request) -> web.Response:
    master = request.app[MASTER_KEY]
    return web.Response(body=await master.metrics.render(master.store), headers={"Content-Type": CONTENT_TYPE})


async def collect_garbage(request: web.Request) -> web.Response:
    payload = await _json(request)
    dry_run = payload.get("dry_run", False)
    if not isinstance(dry_run, bool):
        raise BadRequest("dry_run must be true or false")
    report = await request.app[MASTER_KEY].collect_garbage(dry_run=dry_run)
    return web.json_response({"dry_run": report.dry_run, "removed": report.removed, "failed": report.failed})


async def job_log(request: web.Request) -> web.Response:
    master = request.app[MASTER_KEY]
    job = await master.store.get_job(request.match_info["job_id"])
    stream = request.match_info["stream"]
    if stream not in ("stdout", "stderr"):
        raise NotFound(f"no log {stream!r}: stdout or stderr")
    try:
        data = await asyncio.to_thread(master.blobs.get_bytes, f"jobs/{job.id}/logs/{stream}")
    except BlobNotFound:
        data = b""
    return web.Response(body=data, content_type="text/plain", charset="utf-8")


async def job_output(request: web.Request) -> web.StreamResponse:
    master = request.app[MASTER_KEY]
    job = await master.store.get_job(request.match_info["job_id"])
    try:
        data = await asyncio.to_thread(master.blobs.get_bytes, f"jobs/{job.id}/output.tar.zst")
    except BlobNotFound:
        raise NotFound(f"job {job.id} has no output (yet)") from None
    return web.Response(body=data, content_type="application/zstd", headers={
        "Content-Disposition": f'attachment; filename="{job.id}-output.tar.zst"'})


async def machines(request: web.Request) -> web.Response:
    master = request.app[MASTER_KEY]
    held = [e.model_dump(mode="json") for e in await master.store.list_ledger(live_only=True)]
    return web.json_response({"machines": held, "offers": [o.model_dump(mode="json") for o in master.offers]})


async def _json(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        payload = jsonlimits.loads(await request.read())
    except TooDeep:
        raise
    except ValueError:
        raise BadRequest("body is not JSON") from None
    if not isinstance(payload, dict):
        raise BadRequest("body must be a JSON object")
    return payload


def create_app(master: Master, token: str) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, token_middleware], client_max_size=MAX_BODY)
    app[MASTER_KEY] = master
    app[TOKEN_KEY] = token
    app[INBOX_KEY] = Inbox(master)
    app.router.add_post("/messages", receive_message)
    app.router.add_get("/api/health", health)
    app.router.add_post("/api/jobs", create_job)
    app.router.add_get("/api/jobs", list_jobs)
    app.router.add_get("/api/jobs/{job_id}", get_job)
    app.router.add_post("/api/jobs/{job_id}/submit", submit_job)
    app.router.add_post("/api/jobs/{job_id}/cancel", cancel_job)
    app.router.add_post("/api/gc", collect_garbage)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/jobs/{job_id}/logs/{stream}", job_log)
    app.router.add_get("/api/jobs/{job_id}/output", job_output)
    app.router.add_get("/api/machines", machines)
    add_dashboard(app)
    return app
