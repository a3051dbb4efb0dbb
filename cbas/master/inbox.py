"""What the master does with one delivered message, however it came (an HTTP push, a queue):
the gate, the duplicate filter, the handler, and the worker's acknowledgement.

A worker keeps each fact (cbas.messages.FACT_TYPES) and sends it again until it is acknowledged,
so the master acknowledges a fact once it has it for good: handled (and remembered), a
duplicate, or from an attempt that is over. Refused messages are not acknowledged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

import structlog

from cbas import authority
from cbas.backends import DeliveryError, MessageRejected
from cbas.master.gate import Gate
from cbas.master.handlers import registry
from cbas.master.service import Master
from cbas.messages import FACT_TYPES, MASTER, Ack, Envelope, MessageType, envelope

log = structlog.get_logger(__name__)

Outcome = Literal["handled", "duplicate", "ignored"]
ACK_AGAIN_AFTER = 2.0  # seconds: a fact sent again later than this (its ACK was lost) is acked again


class Inbox:
    def __init__(self, master: Master) -> None:
        self.master = master
        self.gate = Gate(master.keys, master.resources, master.store, registry)
        self._acks: set[asyncio.Task[None]] = set()
        self._acked_at: dict[str, float] = {}

    async def take(self, message: Envelope) -> tuple[Outcome, str | None]:
        """Handle one message addressed to the master. Raises gate.Refused (never to be
        accepted), gate.NotYet (try again later) or the handler's error (not handled: the
        sender or the queue delivers it again)."""
        master = self.master
        stale = await self.gate.admit(message)  # who sent it, and may it say this
        if stale is not None:
            master.metrics.ignored.labels(reason=stale.reason).inc()
            log.info("message.ignored", type=message.type, sender=message.sender, why=stale.why)
            self._acknowledge(message)
            return "ignored", stale.why
        window = master.settings.seen_message_window
        if await master.store.seen(message.id, window):
            self._acknowledge(message)
            return "duplicate", None
        began = time.perf_counter()
        await registry.dispatch(master, message)
        # remembered only once handled: a master that fails or dies while handling it gets it again
        # (handlers are idempotent, so two copies handled at once change nothing twice)
        await master.store.first_sighting(message.id, window)
        master.metrics.messages.labels(type=message.type.value).observe(time.perf_counter() - began)
        self._acknowledge(message)
        return "handled", None

    def _acknowledge(self, message: Envelope) -> None:
        """In the background, once: a lost ACK only means the fact comes again (and is acked again)."""
        if message.type not in FACT_TYPES or not message.sender.startswith("worker/"):
            return
        now = time.monotonic()
        if now - self._acked_at.get(message.id, -ACK_AGAIN_AFTER) < ACK_AGAIN_AFTER:
            return  # copies queued while the master was away come in a burst: one ACK answers them
        if len(self._acked_at) > 4096:
            self._acked_at = {k: t for k, t in self._acked_at.items() if now - t < ACK_AGAIN_AFTER}
        self._acked_at[message.id] = now
        ack = envelope(MessageType.ACK, Ack(message_ids=[message.id]), MASTER, message.sender)
        # signed with the key the gate verified the fact with: a machine the job has left (its
        # ledger entry closed) is still told, so it stops sending what no longer matters
        ack = authority.sign(ack, self.master.keys.credential(authority.claimed_ledger_id(message)))
        task = asyncio.create_task(self._send(ack))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    async def _send(self, ack: Envelope) -> None:
        try:
            await self.master.bus.send(ack)
        except (DeliveryError, MessageRejected) as exc:
            log.info("ack.undelivered", recipient=ack.recipient, error=str(exc))
