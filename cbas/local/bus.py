"""MessageBus for the local backend: POST each envelope straight to its recipient's endpoint.

Deliveries have the shape of SNS notifications and are signed (HMAC-SHA256 with a key kept in
the CBAS home, mode 0600) over SNS's string-to-sign, so endpoints verify every message the
same way on both backends. Subscriptions (recipient -> URL) live in the job store's database.

Delivery is SNS's, so that local tests of a master or worker that is away mean what they would
on AWS: a send to a recipient that cannot be reached (not subscribed, not listening, answering
5xx) succeeds for the sender, is tried again `delivery_retries` times `retry_seconds` apart in
the background, and is then dropped. A 4xx answer is a refusal (MessageRejected), said at once.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import secrets
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import structlog

from cbas import jsonlimits
from cbas.backends import DeliveryError, InvalidMessage, MessageRejected, envelope_of
from cbas.jsonlimits import TooDeep
from cbas.local.database import connect
from cbas.messages import Envelope

log = structlog.get_logger(__name__)

SIGNATURE_VERSION = "local-hmac-sha256"
MAX_AGE = timedelta(hours=1)
_NOTIFICATION_FIELDS = ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type")


def load_or_create_secret(path: Path) -> bytes:
    """A random secret shared by the processes of one CBAS home, created once, mode 0600."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_hex(32).encode()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return path.read_bytes()
        with os.fdopen(fd, "wb") as out:
            out.write(secret)
        return secret


def string_to_sign(fields: dict[str, str]) -> bytes:
    """SNS's canonical form: 'key\\nvalue\\n' for each present field, in a fixed order."""
    return "".join(f"{key}\n{fields[key]}\n" for key in _NOTIFICATION_FIELDS if key in fields).encode()


class LocalMessageBus:
    def __init__(self, home: Path, db_path: Path, timeout: float = 10.0, delivery_retries: int = 3,
                 retry_seconds: float = 20.0) -> None:
        self._key = load_or_create_secret(home / "bus.key")
        self._conn = connect(db_path)
        # the endpoints table is SQLite: a query waits out another process's lock on its own thread
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bus-endpoints")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self.delivery_retries = delivery_retries  # 0: an unreachable recipient is the sender's DeliveryError
        self.retry_seconds = retry_seconds
        self._retrying: set[asyncio.Task[None]] = set()

    def sign(self, message: Envelope) -> bytes:
        fields = {
            "Type": "Notification",
            "MessageId": message.id,
            "TopicArn": "cbas:local",
            "Message": message.model_dump_json(),
            "Timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
        }
        digest = hmac.new(self._key, string_to_sign(fields), hashlib.sha256).digest()
        fields["SignatureVersion"] = SIGNATURE_VERSION
        fields["Signature"] = base64.b64encode(digest).decode()
        return json.dumps(fields).encode()

    async def receive(self, body: bytes) -> Envelope:
        return self.parse_delivery(body)  # an HMAC check: no I/O, nothing to wait for

    def parse_delivery(self, body: bytes) -> Envelope:
        try:
            fields = jsonlimits.loads(body)
        except TooDeep:
            raise
        except (ValueError, UnicodeDecodeError):
            raise InvalidMessage("body is not JSON") from None
        if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
            raise InvalidMessage("body is not a notification object of strings")
        missing = [k for k in ("Type", "MessageId", "Message", "Timestamp", "Signature", "SignatureVersion") if k not in fields]
        if missing:
            raise InvalidMessage(f"notification lacks {', '.join(missing)}")
        if fields["Type"] != "Notification":
            raise InvalidMessage(f"unexpected notification type {fields['Type']!r}")
        if fields["SignatureVersion"] != SIGNATURE_VERSION:
            raise InvalidMessage(f"unsupported SignatureVersion {fields['SignatureVersion']!r}")
        try:
            given = base64.b64decode(fields["Signature"], validate=True)
        except ValueError:
            raise InvalidMessage("Signature is not base64") from None
        expected = hmac.new(self._key, string_to_sign(fields), hashlib.sha256).digest()
        if not hmac.compare_digest(given, expected):
            raise InvalidMessage("bad signature")
        try:
            stamp = datetime.fromisoformat(fields["Timestamp"].replace("Z", "+00:00"))
        except ValueError:
            raise InvalidMessage("Timestamp is not an ISO time") from None
        if stamp.tzinfo is None or abs(datetime.now(timezone.utc) - stamp) > MAX_AGE:
            raise InvalidMessage("stale or undated Timestamp")
        message = envelope_of(fields["Message"])
        if message.id != fields["MessageId"]:
            raise InvalidMessage("MessageId does not match the envelope id")
        return message

    async def _query(self, sql: str, params: tuple[str, ...] = ()) -> list[Any]:
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, lambda: self._conn.execute(sql, params).fetchall())

    async def subscribe(self, recipient: str, url: str) -> None:
        await self._query("INSERT OR REPLACE INTO endpoints (recipient, url) VALUES (?, ?)", (recipient, url))

    async def unsubscribe(self, recipient: str) -> None:
        await self._query("DELETE FROM endpoints WHERE recipient = ?", (recipient,))

    async def unsubscribe_stale(self, keep: set[str]) -> list[str]:
        rows = await self._query("SELECT recipient FROM endpoints WHERE recipient LIKE 'worker/%'")
        stale = [row[0] for row in rows if row[0] not in keep]
        for recipient in stale:
            await self.unsubscribe(recipient)
        return stale

    async def endpoint(self, recipient: str) -> str | None:
        rows = await self._query("SELECT url FROM endpoints WHERE recipient = ?", (recipient,))
        return rows[0][0] if rows else None

    async def send(self, message: Envelope) -> None:
        try:
            await self._post(message)
        except DeliveryError as exc:
            if self.delivery_retries <= 0:
                raise
            log.debug("bus.delivery_retrying", type=message.type, recipient=message.recipient, error=str(exc))
            task = asyncio.create_task(self._retry(message))
            self._retrying.add(task)
            task.add_done_callback(self._retrying.discard)

    async def _retry(self, message: Envelope) -> None:
        for _ in range(self.delivery_retries):
            await asyncio.sleep(self.retry_seconds)
            try:
                await self._post(message)
                return
            except MessageRejected as exc:
                log.warning("bus.delivery_refused", type=message.type, recipient=message.recipient, error=str(exc))
                return
            except DeliveryError as exc:
                error = str(exc)
        log.warning("bus.delivery_dropped", type=message.type, id=message.id, recipient=message.recipient,
                    retries=self.delivery_retries, error=error)

    async def _post(self, message: Envelope) -> None:
        url = await self.endpoint(message.recipient)
        if url is None:
            raise DeliveryError(f"no endpoint subscribed for {message.recipient}")
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        try:
            async with self._session.post(url, data=self.sign(message), headers={"Content-Type": "text/plain"}) as resp:
                if resp.status >= 500:
                    raise DeliveryError(f"{message.recipient} answered {resp.status}")
                if resp.status >= 400:
                    raise MessageRejected(f"{message.recipient} refused {message.type}: {resp.status} {await resp.text()}")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise DeliveryError(f"cannot reach {message.recipient} at {url}: {exc}") from exc

    async def close(self) -> None:
        for task in list(self._retrying):  # what is still being retried is dropped, as by a stopped SNS
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None
        await asyncio.get_running_loop().run_in_executor(self._thread, self._conn.close)
        self._thread.shutdown(wait=False)
