"""An IMDSv2-style metadata endpoint for one local machine, serving files from its disk.

PUT /latest/api/token gives a token; GET /latest/meta-data/<path> with that token answers the
content of <disk>/metadata/<path>, or 404. The local cloud writes spot/instance-action there
when the market takes the machine's capacity away.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from aiohttp import web

TOKEN_HEADER = "X-aws-ec2-metadata-token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"


def metadata_app(root: Path) -> web.Application:
    tokens: set[str] = set()

    async def token(request: web.Request) -> web.Response:
        ttl = request.headers.get(TTL_HEADER, "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= 21600:
            return web.Response(status=400, text=f"{TTL_HEADER} must be 1..21600")
        value = secrets.token_urlsafe(24)
        tokens.add(value)
        return web.Response(text=value)

    async def meta(request: web.Request) -> web.Response:
        if request.headers.get(TOKEN_HEADER) not in tokens:
            return web.Response(status=401, text="missing or invalid token")
        relative = request.match_info["path"]
        if any(part in ("", "..") for part in relative.split("/")):
            return web.Response(status=404)
        path = root / relative
        if not path.is_file():
            return web.Response(status=404, text="Not Found")
        return web.Response(text=path.read_text())

    app = web.Application()
    app.router.add_put("/latest/api/token", token)
    app.router.add_get("/latest/meta-data/{path:.+}", meta)
    return app
