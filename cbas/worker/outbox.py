"""Sends the worker's messages to the master, each signed with the machine's key.

A publish is retried with backoff when the bus cannot be reached at all. Facts (cbas.messages.
FACT_TYPES: started, checkpoint stored or failed, notice, finished) are also kept until the master
acknowledges them (ACK) and sent again on every ping: the bus, like SNS, gives up on a recipient
after a few retries, so a master that was away for minutes or hours still learns each of them.
The same envelope goes every time, so the master's duplicate filter sees one message. Pings are
best-effort: the next one says the same.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from cbas.backends import DeliveryError, MessageBus, MessageRejected
from cbas.messages import FACT_TYPES, Envelope

log = structlog.get_logger(__name__)

MAX_UNACKNOWLEDGED = 256  # a master that never answers must not make the worker grow without bound


class Outbox:
    def __init__(self, bus: MessageBus, sign: Callable[[Envelope], Envelope], budget_seconds: float = 3600.0) -> None:
        self.bus = bus
        self.sign = sign  # every message, the job's reports included, leaves signed
        self.budget = budget_seconds
        self.unacknowledged: OrderedDict[str, Envelope] = OrderedDict()

    async def deliver(self, message: Envelope) -> bool:
        """Publish, retried with backoff within the budget; a fact is kept until acknowledged.
        False if the bus refused it or could not be reached within the budget."""
        message = self.sign(message)
        if message.type in FACT_TYPES:
            self._keep(message)
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(DeliveryError),
                wait=wait_exponential(multiplier=0.2, max=5.0),
                stop=stop_after_delay(self.budget),
                reraise=True,
            ):
                with attempt:
                    await self.bus.send(message)
            return True
        except MessageRejected as exc:
            self.unacknowledged.pop(message.id, None)  # refused for good: sending it again changes nothing
            log.error("message.rejected", type=message.type, error=str(exc))
        except DeliveryError as exc:
            log.error("message.undeliverable", type=message.type, error=str(exc))
        return False

    async def try_once(self, message: Envelope) -> bool:
        try:
            await self.bus.send(self.sign(message))
            return True
        except (DeliveryError, MessageRejected) as exc:
            log.warning("message.not_sent", type=message.type, error=str(exc))
            return False

    def acknowledged(self, message_ids: list[str]) -> None:
        for message_id in message_ids:
            self.unacknowledged.pop(message_id, None)

    async def send_unacknowledged(self) -> int:
        """Every fact the master has not acknowledged yet, once more, oldest first; how many."""
        sent = 0
        for message in list(self.unacknowledged.values()):
            if message.id not in self.unacknowledged:
                continue  # acknowledged meanwhile
            try:
                await self.bus.send(message)
                sent += 1
            except MessageRejected as exc:
                self.unacknowledged.pop(message.id, None)
                log.error("message.rejected", type=message.type, error=str(exc))
            except DeliveryError as exc:  # the next ping tries again
                log.warning("message.not_sent", type=message.type, error=str(exc))
                break
        return sent

    def _keep(self, message: Envelope) -> None:
        self.unacknowledged[message.id] = message
        while len(self.unacknowledged) > MAX_UNACKNOWLEDGED:
            _, dropped = self.unacknowledged.popitem(last=False)
            log.error("message.given_up", type=dropped.type, id=dropped.id,
                      reason=f"more than {MAX_UNACKNOWLEDGED} facts unacknowledged")
