"""Sends the worker's messages to the master, each signed with the machine's key. Reports that
matter are retried until delivered (the master may be restarting); pings are best-effort. A retry
resends the same envelope, so the master's duplicate filter sees one message."""

from __future__ import annotations

from typing import Callable

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

from cbas.backends import DeliveryError, MessageBus, MessageRejected
from cbas.messages import Envelope

log = structlog.get_logger(__name__)


class Outbox:
    def __init__(self, bus: MessageBus, sign: Callable[[Envelope], Envelope], budget_seconds: float = 3600.0) -> None:
        self.bus = bus
        self.sign = sign  # every message, the job's reports included, leaves signed
        self.budget = budget_seconds

    async def deliver(self, message: Envelope) -> bool:
        """Retry with backoff within the budget; False if it could not be delivered."""
        message = self.sign(message)
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
