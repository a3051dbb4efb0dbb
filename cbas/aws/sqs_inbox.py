"""The master's inbox on AWS: an SQS queue subscribed to the topic (filter `recipient=["master"]`),
long-polled for the master's lifetime.

SNS pushing to an HTTP endpoint retries for about a minute and then drops the message; the queue
keeps it for 14 days, so what workers say while the master is away (restarted, upgraded, down
for hours) is read when it is back. `cbas aws bootstrap` makes the queue, its policy (only the
topic may send), the subscription and a dead-letter queue.

Each body is the SNS notification itself (RawMessageDelivery false), verified as an HTTP delivery
is (cbas.aws.sns), except that its age may be up to the queue's retention. Then, per message:

    handled, a duplicate, or stale (Inbox.take returned)       deleted
    refused by the gate (gate.Refused)                          deleted, logged, counted
    not genuine, unreadable, not for the master, a control one  deleted, logged, counted
    a ping older than `ping_max_age` (a newer one says more)    deleted, counted as ignored
    gate.NotYet, the handler failed, no signing certificate     left: visible again after a
        backoff that grows with its receives (2 s, 4 s, ... 15 min); after MAX_RECEIVES
        receives SQS moves it to the dead-letter queue (about a day of tries)

A message is deleted only once settled, so a master that dies mid-batch gets the batch again
after the visibility timeout; the duplicate filter (by envelope id) and idempotent handlers make
that harmless.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from typing import Any, Callable, Protocol

import structlog
from botocore.exceptions import BotoCoreError, ClientError

from cbas.aws.bus import SnsMessageBus
from cbas.aws.retry import aws_retry
from cbas.aws.sns import CertificateUnavailable, InvalidSignature, SnsVerifier
from cbas.backends import InvalidMessage
from cbas.jsonlimits import TooDeep
from cbas.master.gate import NotYet, Refused
from cbas.master.metrics import Metrics
from cbas.messages import MASTER, Envelope, MessageType, UnroutableMessage
from cbas.models import utcnow

log = structlog.get_logger(__name__)

RETENTION_SECONDS = 14 * 24 * 3600  # the most SQS keeps a message
VISIBILITY_SECONDS = 60  # a received message is hidden this long unless settled sooner
MAX_RECEIVES = 100  # then SQS moves it to the dead-letter queue
WAIT_SECONDS = 20  # long polling: the most SQS allows
BATCH = 10  # the most one ReceiveMessage returns
MAX_RETRY_SECONDS = 900
HANDLE_SECONDS = VISIBILITY_SECONDS - 10  # a message handled longer would be received again meanwhile


class Taker(Protocol):
    """cbas.master.inbox.Inbox: what the master does with one message, however it came."""

    async def take(self, message: Envelope) -> tuple[str, str | None]: ...


class InboxUnavailable(RuntimeError):
    """The master's queue cannot be used (missing, or not ours to read)."""


def retry_delay(receives: int) -> int:
    """Seconds until a message left for later is visible again: doubling, capped at 15 minutes."""
    return min(2 ** max(receives, 1), MAX_RETRY_SECONDS)


def queue_verifier(verifier: SnsVerifier) -> SnsVerifier:
    """The HTTP verifier's checks (signature, certificate host, our topic, a known type) with a
    message's age allowed up to the queue's retention: a replay needs sqs:SendMessage, which the
    queue's policy grants SNS alone, for our topic alone."""
    return SnsVerifier(verifier.topic_arn, verifier.certificates, max_age=RETENTION_SECONDS + 3600,
                       clock=verifier.clock)


class QueueInbox:
    def __init__(self, queue_url: str, sqs: Any, bus: SnsMessageBus, inbox: Taker, metrics: Metrics, *,
                 ping_max_age: float, wait_seconds: int = WAIT_SECONDS,
                 delay: Callable[[int], int] = retry_delay, error_backoff: float = 1.0,
                 max_error_backoff: float = 60.0, handle_seconds: float = HANDLE_SECONDS) -> None:
        self.queue_url = queue_url
        self.sqs = sqs
        self.bus = bus
        self.verifier = queue_verifier(bus.verifier)
        self.inbox = inbox
        self.metrics = metrics
        self.ping_max_age = timedelta(seconds=ping_max_age)
        self.wait_seconds = wait_seconds
        self.delay = delay
        self.error_backoff = error_backoff
        self.max_error_backoff = max_error_backoff
        self.handle_seconds = handle_seconds
        self._stopped = threading.Event()  # set once a receive is abandoned: the inbox is stopping

    async def open(self) -> int:
        """Check the queue is there and readable; how many messages wait in it."""
        try:
            attributes = (await asyncio.to_thread(aws_retry(self.sqs.get_queue_attributes), QueueUrl=self.queue_url,
                                                  AttributeNames=["ApproximateNumberOfMessages"]))["Attributes"]
        except ClientError as exc:
            raise InboxUnavailable(f"the master's queue {self.queue_url} cannot be read ({exc}): run "
                                   f"`cbas aws bootstrap` again for this cluster") from None
        waiting = int(attributes.get("ApproximateNumberOfMessages", 0))
        log.info("inbox.opened", queue=self.queue_url, waiting=waiting)
        return waiting

    async def run(self) -> None:
        """Receive and settle messages until cancelled; errors are logged and waited out."""
        failures = 0
        while True:
            try:
                messages = await self._receive()
            except Exception as exc:  # noqa: BLE001 (SQS unreachable, throttled, refused: waited out)
                failures += 1
                wait = min(self.error_backoff * 2 ** (failures - 1), self.max_error_backoff)
                log.warning("inbox.receive_failed", error=str(exc), kind=type(exc).__name__, retry_in=wait)
                await asyncio.sleep(wait)
                continue
            failures = 0
            try:
                await self.settle_batch(messages)
            except Exception:  # noqa: BLE001 (the inbox outlives any one batch: it comes back)
                log.exception("inbox.batch_failed", count=len(messages))

    async def _receive(self) -> list[dict[str, Any]]:
        """One long poll, in a daemon thread of its own: unlike asyncio.to_thread, a poll under way
        then holds up neither the loop's shutdown nor the interpreter's exit. What a poll abandoned
        by a stopping inbox receives is made visible again at once (not after the visibility
        timeout), for the next master."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[dict[str, Any]]] = loop.create_future()

        def hand_over(messages: list[dict[str, Any]], error: BaseException | None) -> None:
            if future.cancelled():
                threading.Thread(target=self._release, args=(messages,), daemon=True).start()
            elif error is not None:
                future.set_exception(error)
            else:
                future.set_result(messages)

        def work() -> None:
            messages: list[dict[str, Any]] = []
            error: BaseException | None = None
            try:
                response = self.sqs.receive_message(QueueUrl=self.queue_url, WaitTimeSeconds=self.wait_seconds,
                                                    MaxNumberOfMessages=BATCH, AttributeNames=["ApproximateReceiveCount"])
                messages = list(response.get("Messages", []))
            except Exception as exc:  # noqa: BLE001 (handed to the awaiting task)
                error = exc
            if self._stopped.is_set():
                self._release(messages)
                return
            try:
                loop.call_soon_threadsafe(hand_over, messages, error)
            except RuntimeError:  # the loop is closed
                self._release(messages)

        threading.Thread(target=work, name="cbas-inbox-receive", daemon=True).start()
        try:
            return await future
        except asyncio.CancelledError:
            self._stopped.set()
            raise

    def _release(self, messages: list[dict[str, Any]]) -> None:
        """Make received messages visible again now (in a thread: the loop may be gone)."""
        if not messages:
            return
        try:
            self.sqs.change_message_visibility_batch(QueueUrl=self.queue_url, Entries=[
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"], "VisibilityTimeout": 0}
                for i, m in enumerate(messages)])
        except Exception as exc:  # noqa: BLE001 (they come back after the visibility timeout anyway)
            log.warning("inbox.release_failed", count=len(messages), error=str(exc))

    async def poll_once(self) -> int:
        """One receive and its settling (tests); how many messages came."""
        messages = await self._receive()
        await self.settle_batch(messages)
        return len(messages)

    async def settle_batch(self, messages: list[dict[str, Any]]) -> None:
        if not messages:
            return
        delays = await asyncio.gather(*(self.settle(m) for m in messages))
        done = [m["ReceiptHandle"] for m, d in zip(messages, delays) if d is None]
        later = [(m["ReceiptHandle"], d) for m, d in zip(messages, delays) if d is not None]
        await self._batch("delete_message_batch", [{"ReceiptHandle": h} for h in done])
        await self._batch("change_message_visibility_batch",
                          [{"ReceiptHandle": h, "VisibilityTimeout": d} for h, d in later])

    async def _batch(self, operation: str, entries: list[dict[str, Any]]) -> None:
        """A delete or visibility batch; a failure only means the message comes back sooner or later."""
        if not entries:
            return
        numbered = [{"Id": str(i), **entry} for i, entry in enumerate(entries)]
        try:
            response = await asyncio.to_thread(aws_retry(getattr(self.sqs, operation)), QueueUrl=self.queue_url,
                                               Entries=numbered)
        except (ClientError, BotoCoreError) as exc:
            log.warning("inbox.batch_call_failed", operation=operation, count=len(entries), error=str(exc))
            return
        for failed in response.get("Failed", []):
            log.warning("inbox.batch_call_failed", operation=operation, code=failed.get("Code"),
                        error=failed.get("Message"))

    def _parse(self, body: bytes) -> Envelope | None:
        return self.bus.unwrap(self.verifier.verify(body))

    async def settle(self, message: dict[str, Any]) -> int | None:
        """Take one queued message: None to delete it, else seconds until it is to be seen again."""
        sqs_id = message.get("MessageId")
        receives = int(message.get("Attributes", {}).get("ApproximateReceiveCount", "1"))
        structlog.contextvars.clear_contextvars()
        try:
            envelope = await asyncio.to_thread(self._parse, str(message.get("Body", "")).encode())
        except CertificateUnavailable as exc:  # perhaps genuine: try again later
            log.warning("message.retry", sqs_id=sqs_id, reason=str(exc), receives=receives)
            return self.delay(receives)
        except (InvalidSignature, InvalidMessage, TooDeep) as exc:
            return self._rejected(sqs_id, str(exc))
        except (ClientError, BotoCoreError) as exc:  # confirming a subscription
            log.warning("message.retry", sqs_id=sqs_id, reason=str(exc), receives=receives)
            return self.delay(receives)
        if envelope is None:
            log.info("inbox.control_message", sqs_id=sqs_id)
            return None
        if envelope.recipient != MASTER:
            return self._rejected(sqs_id, f"message for {envelope.recipient!r} in the master's queue")
        if envelope.type == MessageType.PING and utcnow() - envelope.sent_at > self.ping_max_age:
            self.metrics.ignored.labels(reason="old-ping").inc()
            log.info("message.ignored", type=envelope.type, sender=envelope.sender,
                     why=f"a ping sent at {envelope.sent_at.isoformat()}: a newer one says more")
            return None
        try:
            async with asyncio.timeout(self.handle_seconds):
                await self.inbox.take(envelope)
        except Refused as exc:
            self.metrics.rejected.inc()
            self.metrics.refused.labels(reason=exc.reason).inc()
            log.warning("message.refused", reason=exc.reason, error=str(exc), sqs_id=sqs_id, sender=envelope.sender)
            return None
        except UnroutableMessage as exc:  # never of its type: it would fail the same way again
            return self._rejected(sqs_id, str(exc))
        except NotYet as exc:
            log.info("message.not_yet", type=envelope.type, sender=envelope.sender, why=str(exc), receives=receives)
            return self.delay(receives)
        except Exception:  # noqa: BLE001 (a handler's failure or TimeoutError: the queue delivers it again)
            log.exception("message.failed", type=envelope.type, sender=envelope.sender, id=envelope.id,
                          receives=receives)
            return self.delay(receives)
        return None

    def _rejected(self, sqs_id: str | None, reason: str) -> None:
        self.metrics.rejected.inc()
        log.warning("message.rejected", reason=reason, sqs_id=sqs_id, source="queue")
        return None
