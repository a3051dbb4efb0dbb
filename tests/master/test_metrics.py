"""GET /metrics: Prometheus text, behind the API token, with jobs by state read from the store."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from cbas.local.bus import LocalMessageBus
from cbas.messages import JobDone, MessageType, Ping, envelope
from tests.master.test_app import AUTH, from_worker, machine_for, setup  # noqa: F401 (the fixture)


async def test_metrics_need_the_token_and_count_jobs_and_messages(setup) -> None:  # noqa: F811
    master, client = setup
    assert (await client.get("/metrics")).status == 401
    job_id = (await (await client.post("/api/jobs", json={"name": "a"}, headers=AUTH)).json())["job_id"]
    bus = master.bus
    assert isinstance(bus, LocalMessageBus)
    credential = await machine_for(master, job_id)
    ping = from_worker(credential, "i-1", MessageType.PING, Ping(instance_id="i-1"))
    assert (await client.post("/messages", data=bus.sign(ping))).status == 200
    assert (await client.post("/messages", data=b"{}")).status == 403
    unsigned = envelope(MessageType.PING, Ping(instance_id="i-1"), "worker/i-1", "master")
    assert (await client.post("/messages", data=bus.sign(unsigned))).status == 403
    stale = from_worker(credential, "i-1", MessageType.JOB_DONE, JobDone(job_id=job_id, attempt=7))
    assert "ignored" in await (await client.post("/messages", data=bus.sign(stale))).json()
    response = await client.get("/metrics", headers=AUTH)
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(await response.text()) for s in family.samples}
    assert samples[("cbas_jobs", (("state", "SUBMITTING"),))] == 1
    assert samples[("cbas_jobs", (("state", "RUNNING"),))] == 0
    assert samples[("cbas_message_seconds_count", (("type", "PING"),))] == 1
    assert samples[("cbas_messages_rejected_total", ())] == 2
    assert samples[("cbas_messages_refused_total", (("reason", "auth"),))] == 1
    assert samples[("cbas_messages_ignored_total", (("reason", "attempt"),))] == 1
    assert samples[("cbas_machines", (("market", "spot"),))] == 1  # the job's machine
    assert ("cbas_checkpoint_seconds_count", ()) in samples and ("cbas_preemptions_total", ()) in samples
