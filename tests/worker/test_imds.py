import json
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from cbas.local.metadata import metadata_app
from cbas.worker.imds import MetadataClient


@pytest.fixture
async def served(tmp_path: Path):
    (tmp_path / "instance-id").write_text("i-123")
    server = TestServer(metadata_app(tmp_path), host="127.0.0.1")
    await server.start_server()
    client = MetadataClient(str(server.make_url("")))
    yield tmp_path, client, server
    await client.close()
    await server.close()


async def test_token_then_values_and_404_as_none(served) -> None:
    root, client, _ = served
    assert await client.get("instance-id") == "i-123"
    assert await client.spot_action() is None
    (root / "spot").mkdir()
    (root / "spot" / "instance-action").write_text(json.dumps({"action": "terminate", "time": "2026-01-01T00:00:00Z"}))
    assert await client.spot_action() == {"action": "terminate", "time": "2026-01-01T00:00:00Z"}


async def test_requests_without_a_token_or_with_a_bad_ttl_are_refused(served) -> None:
    _, client, server = served
    session = await client._client()
    async with session.get(server.make_url("/latest/meta-data/instance-id")) as resp:
        assert resp.status == 401
    async with session.put(server.make_url("/latest/api/token"), headers={"X-aws-ec2-metadata-token-ttl-seconds": "0"}) as resp:
        assert resp.status == 400


async def test_an_expired_token_is_renewed(served) -> None:
    _, client, _ = served
    client._token = "expired"
    assert await client.get("instance-id") == "i-123"


async def test_rebalance_recommendation_is_read(served) -> None:
    root, client, _ = served
    assert await client.rebalance() is None
    (root / "events" / "recommendations").mkdir(parents=True)
    (root / "events" / "recommendations" / "rebalance").write_text('{"noticeTime": "2026-01-01T00:00:00Z"}')
    assert await client.rebalance() == {"noticeTime": "2026-01-01T00:00:00Z"}
