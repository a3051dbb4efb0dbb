import pytest

from cbas.messages import (
    AddJob, Envelope, MessageRegistry, MessageType, Ping, UnroutableMessage, envelope,
)


async def test_dispatch_routes_by_type_with_a_validated_body() -> None:
    registry: MessageRegistry[list] = MessageRegistry()
    seen: list = []

    @registry.handler(MessageType.PING)
    async def on_ping(ctx: list, message: Envelope, body: Ping) -> None:
        ctx.append(body)

    await registry.dispatch(seen, envelope(MessageType.PING, Ping(instance_id="i-1", phase="running"), "w", "master"))
    assert seen == [Ping(instance_id="i-1", phase="running")]


async def test_unhandled_type_and_bad_body_are_unroutable() -> None:
    registry: MessageRegistry[None] = MessageRegistry()

    @registry.handler(MessageType.ADD_JOB)
    async def on_add(ctx: None, message: Envelope, body: AddJob) -> None:
        raise AssertionError("must not run")

    with pytest.raises(UnroutableMessage, match="does not handle PING"):
        await registry.dispatch(None, Envelope(type=MessageType.PING, sender="a", recipient="b"))
    with pytest.raises(UnroutableMessage, match="body is invalid at jdl"):
        await registry.dispatch(None, Envelope(type=MessageType.ADD_JOB, sender="a", recipient="b", body={"job_id": "x"}))
    with pytest.raises(UnroutableMessage, match="body is invalid"):
        await registry.dispatch(None, Envelope(type=MessageType.ADD_JOB, sender="a", recipient="b",
                                               body={"job_id": "x", "jdl": "y", "extra": 1}))


def test_one_handler_per_type() -> None:
    registry: MessageRegistry[None] = MessageRegistry()

    @registry.handler(MessageType.PING)
    async def first(ctx: None, message: Envelope, body: Ping) -> None: ...

    with pytest.raises(ValueError, match="two handlers"):
        registry.handler(MessageType.PING)(first)


def test_envelope_ids_are_unique() -> None:
    ids = {envelope(MessageType.PING, Ping(instance_id="i"), "a", "b").id for _ in range(1000)}
    assert len(ids) == 1000
