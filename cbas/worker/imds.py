"""A small IMDSv2 client: the same code reads EC2's endpoint and a local machine's."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

TOKEN_TTL = 21600


class MetadataClient:
    def __init__(self, base_url: str, timeout: float = 2.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._token: str | None = None

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _fetch_token(self) -> str:
        session = await self._client()
        async with session.put(
            f"{self.base_url}/latest/api/token", headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL)}
        ) as resp:
            resp.raise_for_status()
            return await resp.text()

    async def get(self, path: str) -> str | None:
        """The value at meta-data/<path>, or None when it does not exist (404)."""
        session = await self._client()
        for _ in range(2):
            if self._token is None:
                self._token = await self._fetch_token()
            async with session.get(
                f"{self.base_url}/latest/meta-data/{path}", headers={"X-aws-ec2-metadata-token": self._token}
            ) as resp:
                if resp.status == 401:  # token expired: get a new one once
                    self._token = None
                    continue
                if resp.status == 404:
                    return None
                resp.raise_for_status()
                return await resp.text()
        raise PermissionError("metadata endpoint refused a fresh token")

    async def get_json(self, path: str) -> dict[str, Any] | None:
        text = await self.get(path)
        return json.loads(text) if text else None

    async def spot_action(self) -> dict[str, Any] | None:
        """{"action": "terminate", "time": "...Z"} once the machine is to be reclaimed."""
        return await self.get_json("spot/instance-action")

    async def rebalance(self) -> dict[str, Any] | None:
        return await self.get_json("events/recommendations/rebalance")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
