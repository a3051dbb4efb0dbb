"""The worker's outbox: facts are kept and sent again until the master acknowledges them."""

from __future__ import annotations

import pytest

from cbas.backends import DeliveryError, MessageRejected
from cbas.messages import JobDone, MessageType, Ping, envelope
from cbas.worker import outbox as outbox_module
from cbas.worker.outbox import Outbox


class RecordingBus:
    def __init__(self) -> None:
        self.sent: list = []
        self.fail: Exception | None = None

    async def send(self, message) -> None:
        if self.fail is not None:
            raise self.fail
        self.sent.append(message)


def _signed(message):
    return message.model_copy(update={"auth": "v1:test:sig"})


def _done(attempt: int = 1):
    return envelope(MessageType.JOB_DONE, JobDone(job_id="j", attempt=attempt, exit_code=0), "worker/i-1", "master")


def _ping():
    return envelope(MessageType.PING, Ping(instance_id="i-1"), "worker/i-1", "master")


async def test_a_fact_is_sent_again_on_every_round_until_acknowledged() -> None:
    bus = RecordingBus()
    box = Outbox(bus, _signed)
    fact = _done()
    assert await box.deliver(fact)
    assert await box.send_unacknowledged() == 1
    assert await box.send_unacknowledged() == 1
    assert [m.id for m in bus.sent] == [fact.id] * 3  # the same envelope: the master's filter sees one
    assert all(m.auth == "v1:test:sig" for m in bus.sent)
    box.acknowledged([fact.id])
    assert await box.send_unacknowledged() == 0
    assert len(bus.sent) == 3


async def test_pings_are_not_kept() -> None:
    bus = RecordingBus()
    box = Outbox(bus, _signed)
    assert await box.try_once(_ping())
    assert await box.deliver(_ping())
    assert await box.send_unacknowledged() == 0


async def test_a_refused_fact_is_not_sent_again() -> None:
    bus = RecordingBus()
    bus.fail = MessageRejected("403")
    box = Outbox(bus, _signed)
    assert not await box.deliver(_done())
    bus.fail = None
    assert await box.send_unacknowledged() == 0


async def test_an_unreachable_bus_keeps_the_fact_for_the_next_round() -> None:
    bus = RecordingBus()
    bus.fail = DeliveryError("down")
    box = Outbox(bus, _signed, budget_seconds=0.05)
    fact = _done()
    assert not await box.deliver(fact)
    assert await box.send_unacknowledged() == 0
    bus.fail = None
    assert await box.send_unacknowledged() == 1
    assert bus.sent[-1].id == fact.id


async def test_the_facts_kept_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox_module, "MAX_UNACKNOWLEDGED", 3)
    box = Outbox(RecordingBus(), _signed)
    facts = [_done(attempt) for attempt in range(1, 6)]
    for fact in facts:
        await box.deliver(fact)
    assert list(box.unacknowledged) == [f.id for f in facts[-3:]]  # the oldest given up, said in the log
