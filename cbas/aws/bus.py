"""MessageBus on one SNS topic. Each endpoint subscribes with a filter policy on the `recipient`
message attribute; every delivery is verified (cbas.aws.sns) before anything reads it; a
subscription confirmation for our topic is confirmed here, anything else is refused."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import boto3
import structlog
from botocore.exceptions import ClientError

from cbas.aws.retry import aws_retry
from cbas.aws.sns import InvalidSignature, SnsVerifier
from cbas.backends import DeliveryError, InvalidMessage, envelope_of
from cbas.messages import Envelope

log = structlog.get_logger(__name__)


class SnsMessageBus:
    def __init__(self, topic_arn: str, verifier: SnsVerifier, client: Any | None = None) -> None:
        self.topic_arn = topic_arn
        self.verifier = verifier
        self.client = client or boto3.client("sns")
        self._subscriptions: dict[str, str] = {}  # recipient -> subscription ARN

    async def send(self, message: Envelope) -> None:
        def publish() -> None:
            self.client.publish(
                TopicArn=self.topic_arn, Message=message.model_dump_json(),
                MessageAttributes={"recipient": {"DataType": "String", "StringValue": message.recipient},
                                   "message_id": {"DataType": "String", "StringValue": message.id}},
            )

        try:
            await asyncio.to_thread(aws_retry(publish))
        except ClientError as exc:
            raise DeliveryError(f"cannot publish {message.type} to {message.recipient}: {exc}") from exc

    async def subscribe(self, recipient: str, url: str) -> None:
        def subscribe() -> str:
            response = self.client.subscribe(
                TopicArn=self.topic_arn, Protocol="https" if url.startswith("https") else "http", Endpoint=url,
                Attributes={"FilterPolicy": json.dumps({"recipient": [recipient]}), "RawMessageDelivery": "false"},
                ReturnSubscriptionArn=True,
            )
            return str(response["SubscriptionArn"])

        self._subscriptions[recipient] = await asyncio.to_thread(aws_retry(subscribe))

    async def unsubscribe(self, recipient: str) -> None:
        arn = self._subscriptions.pop(recipient, None)
        if arn and arn.startswith("arn:"):
            await asyncio.to_thread(aws_retry(self.client.unsubscribe), SubscriptionArn=arn)

    async def unsubscribe_stale(self, keep: set[str]) -> list[str]:
        """Unsubscribe worker endpoints whose recipient is not in `keep` (machines that are gone)."""
        def prune() -> list[str]:
            removed = []
            pages = self.client.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=self.topic_arn)
            for page in pages:
                for subscription in page["Subscriptions"]:
                    arn = subscription["SubscriptionArn"]
                    if not arn.startswith("arn:"):
                        continue  # still pending confirmation
                    attributes = self.client.get_subscription_attributes(SubscriptionArn=arn)["Attributes"]
                    recipients = json.loads(attributes.get("FilterPolicy") or "{}").get("recipient", [])
                    if recipients and all(r.startswith("worker/") and r not in keep for r in recipients):
                        self.client.unsubscribe(SubscriptionArn=arn)
                        removed += recipients
            return removed

        return await asyncio.to_thread(aws_retry(prune))

    def parse_delivery(self, body: bytes) -> Envelope | None:
        """The envelope of a verified notification; None for a confirmation handled here."""
        try:
            fields = self.verifier.verify(body)
        except InvalidSignature as exc:
            raise InvalidMessage(str(exc)) from None
        return self.unwrap(fields)

    def unwrap(self, fields: dict[str, Any]) -> Envelope | None:
        """What a verified SNS message (an HTTP delivery, or a queued one: cbas.aws.sqs_inbox)
        carries: the envelope of a notification; None for a confirmation, handled here."""
        if fields["Type"] == "SubscriptionConfirmation":
            aws_retry(self.client.confirm_subscription)(TopicArn=self.topic_arn, Token=fields["Token"])
            log.info("sns.subscription_confirmed", topic=self.topic_arn)
            return None
        if fields["Type"] == "UnsubscribeConfirmation":
            return None
        return envelope_of(fields["Message"])

    async def receive(self, body: bytes) -> Envelope | None:
        return await asyncio.to_thread(self.parse_delivery, body)

    async def close(self) -> None:
        for recipient in list(self._subscriptions):
            await self.unsubscribe(recipient)
