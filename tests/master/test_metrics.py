"""GET /metrics: Prometheus text, behind the API token, with jobs by state read from the store."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cbas.local.bus import LocalMessageBus
from cbas.messages import MessageType, Ping, envelope
from tests.master.test_app import AUTH, setup  # noqa: F401 (the fixture)


async def test_metrics_need_the_token_and_count_jobs_and_messages(setup) -> None:  # noqa: F811
    master, client = setup
    assert (await client.get("/metrics")).status == 401
    await (await client.post("/api/jobs", json={"name": "a"}, headers=AUTH)).json()
    bus = master.bus
    assert isinstance(bus, LocalMessageBus)
    ping = envelope(MessageType.PING, Ping(instance_id="i-1"), "worker/i-1", "master")
    assert (await client.post("/messages", data=bus.sign(ping))).status == 200
    assert (await client.post("/messages", data=b"{}")).status == 403
    response = await client.get("/metrics", headers=AUTH)
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(await response.text()) for s in family.samples}
    assert samples[("cbas_jobs", (("state", "SUBMITTING"),))] == 1
    assert samples[("cbas_jobs", (("state", "RUNNING"),))] == 0
    assert samples[("cbas_message_seconds_count", (("type", "PING"),))] == 1
    assert samples[("cbas_messages_rejected_total", ())] == 1
    assert samples[("cbas_machines", (("market", "spot"),))] == 0
    assert ("cbas_checkpoint_seconds_count", ()) in samples and ("cbas_preemptions_total", ()) in samples
