"""JobStore on DynamoDB: one table, created on first use if missing.

Schema (partition key `pk`, sort key `sk`, both strings; index `by-state` on `state_pk`):

| item | pk | sk | state_pk (indexed) |
|---|---|---|---|
| job | `JOB#<id>` | `JOB` | `JOBSTATE#<state>` |
| ledger entry | `LEDGER#<id>` | `LEDGER` | `LEDGERSTATE#<state>` |
| checkpoint | `JOB#<job id>` | `CKPT#<checkpoint id>` | - |
| event | `JOB#<job id>` | `EVENT#<time>#<random>` | - |
| seen message | `MSG#<id>` | `SEEN` | - (attribute `expires`, the table's TTL) |

Every record is kept as JSON in `data` with its `version`; every update is a conditional write
on that version, so of two writers exactly one wins. A job's update with its event is one
TransactWriteItems (both land or neither; IAM authorizes each Put as dynamodb:PutItem). The state index is eventually consistent (a
query may return an item under its old state, or twice): its hits are only candidates, read again
from the table with consistent reads and filtered on the state they really have. Calls are
blocking boto3 run in threads.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from decimal import Decimal
from typing import Any, Callable, TypeVar

import boto3
from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError

from cbas.aws.retry import aws_retry
from cbas.backends import JobMutation, NotFound, StaleWrite, mutate_with_retries
from cbas.models import CheckpointRecord, Job, JobEvent, LedgerEntry, LedgerState, utcnow
from cbas.state import JobState

T = TypeVar("T")
STATE_INDEX = "by-state"


def _conditional_failed(error: ClientError) -> bool:
    """A conditional write that lost; in a transaction, also one another transaction got in the
    way of (TransactionConflict): both mean the item changed, so read it again."""
    code = error.response.get("Error", {}).get("Code")
    if code == "TransactionCanceledException":
        reasons = {r.get("Code") for r in error.response.get("CancellationReasons", [])}
        return bool(reasons & {"ConditionalCheckFailed", "TransactionConflict"})
    return code == "ConditionalCheckFailedException"


class DynamoJobStore:
    def __init__(self, table_name: str, resource: Any | None = None) -> None:
        self.resource = resource or boto3.resource("dynamodb")
        self.table_name = table_name
        self.table = self._ensure_table()

    @aws_retry
    def _ensure_table(self) -> Any:
        client = self.resource.meta.client
        try:
            client.describe_table(TableName=self.table_name)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
                raise
            client.create_table(
                TableName=self.table_name, BillingMode="PAY_PER_REQUEST",
                AttributeDefinitions=[{"AttributeName": n, "AttributeType": "S"} for n in ("pk", "sk", "state_pk")],
                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}],
                GlobalSecondaryIndexes=[{
                    "IndexName": STATE_INDEX, "KeySchema": [{"AttributeName": "state_pk", "KeyType": "HASH"}],
                    "Projection": {"ProjectionType": "ALL"},
                }],
            )
            client.get_waiter("table_exists").wait(TableName=self.table_name)
            client.update_time_to_live(TableName=self.table_name,
                                       TimeToLiveSpecification={"Enabled": True, "AttributeName": "expires"})
        return self.resource.Table(self.table_name)

    async def _run(self, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await asyncio.to_thread(aws_retry(func), *args, **kwargs)

    def _put(self, item: dict[str, Any], condition: str, values: dict[str, Any] | None = None,
             names: dict[str, str] | None = None) -> None:
        kwargs: dict[str, Any] = {"Item": item, "ConditionExpression": condition}
        if values:
            kwargs["ExpressionAttributeValues"] = values
        if names:
            kwargs["ExpressionAttributeNames"] = names
        self.table.put_item(**kwargs)

    def _query_all(self, **kwargs: Any) -> list[dict[str, Any]]:
        items, start = [], None
        while True:
            page = self.table.query(**kwargs, **({"ExclusiveStartKey": start} if start else {}))
            items += page["Items"]
            start = page.get("LastEvaluatedKey")
            if not start:
                return items

    def _query_index(self, state_pk: str) -> list[dict[str, Any]]:
        return self._query_all(IndexName=STATE_INDEX, KeyConditionExpression=Key("state_pk").eq(state_pk))

    def _fresh(self, candidates: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The current items behind index hits (deduplicated), by consistent batch reads."""
        keys = list({(item["pk"], item["sk"]): None for item in candidates})
        items: list[dict[str, Any]] = []
        for start in range(0, len(keys), 100):
            request = {self.table_name: {"Keys": [{"pk": pk, "sk": sk} for pk, sk in keys[start:start + 100]],
                                         "ConsistentRead": True}}
            while request:
                response = self.resource.batch_get_item(RequestItems=request)
                items += response["Responses"].get(self.table_name, [])
                request = response.get("UnprocessedKeys") or {}
        return items

    def _by_state(self, prefix: str, states: list[str]) -> list[dict[str, Any]]:
        candidates: list[dict[str, Any]] = []
        for state in states:
            candidates += self._query_index(f"{prefix}{state}")
        wanted = {f"{prefix}{state}" for state in states}
        return [item for item in self._fresh(candidates) if item.get("state_pk") in wanted]

    def _query_pk(self, pk: str, sk_prefix: str) -> list[dict[str, Any]]:
        return self._query_all(KeyConditionExpression=Key("pk").eq(pk) & Key("sk").begins_with(sk_prefix))

    # --- jobs -----------------------------------------------------------------------------------------
    @staticmethod
    def _job_item(job: Job) -> dict[str, Any]:
        return {"pk": f"JOB#{job.id}", "sk": "JOB", "state_pk": f"JOBSTATE#{job.state.value}",
                "version": job.version, "data": job.model_dump_json()}

    async def create_job(self, job: Job) -> Job:
        try:
            await self._run(self._put, self._job_item(job), "attribute_not_exists(pk)")
        except ClientError as exc:
            if _conditional_failed(exc):
                raise StaleWrite(f"job {job.id} exists already") from None
            raise
        return job

    async def get_job(self, job_id: str) -> Job:
        item = (await self._run(self.table.get_item, Key={"pk": f"JOB#{job_id}", "sk": "JOB"}, ConsistentRead=True)).get("Item")
        if item is None:
            raise NotFound(f"job {job_id}")
        return Job.model_validate_json(item["data"])

    async def list_jobs(self, states: set[JobState] | None = None) -> list[Job]:
        wanted = states if states is not None else set(JobState)
        items = await self._run(self._by_state, "JOBSTATE#", sorted(s.value for s in wanted))
        jobs = [Job.model_validate_json(item["data"]) for item in items]
        return sorted(jobs, key=lambda job: (job.submitted_at, job.id))

    async def update_job(self, job: Job, event: JobEvent | None = None) -> Job:
        new = job.model_copy(update={"version": job.version + 1, "updated_at": utcnow()})
        try:
            if event is None:
                await self._run(self._put, self._job_item(new), "#v = :v", {":v": job.version}, {"#v": "version"})
            else:
                # one token for every try: a try whose answer was lost, made again, is the same write
                await self._run(self._put_with_event, self._job_item(new), job.version, self._event_item(event),
                                secrets.token_hex(16))
        except ClientError as exc:
            if _conditional_failed(exc):
                raise StaleWrite(f"job {job.id} changed since version {job.version}") from None
            raise
        return new

    def _put_with_event(self, item: dict[str, Any], version: int, event: dict[str, Any], token: str) -> None:
        """The job's conditional write and its event as one transaction (both land, or neither).
        The resource's client types plain values itself, as the table's calls do. AWS treats a
        transaction made again with the same token within 10 minutes as the one it answered
        (moto 5.2.5 ignores the token: that is not tested here)."""
        self.resource.meta.client.transact_write_items(ClientRequestToken=token, TransactItems=[
            {"Put": {"TableName": self.table_name, "Item": item, "ConditionExpression": "#v = :v",
                     "ExpressionAttributeNames": {"#v": "version"}, "ExpressionAttributeValues": {":v": version}}},
            {"Put": {"TableName": self.table_name, "Item": event}},
        ])

    async def mutate_job(self, job_id: str, change: JobMutation, event: JobEvent | None = None) -> Job | None:
        return await mutate_with_retries(self, job_id, change, event)

    # --- the ledger -------------------------------------------------------------------------------------
    async def put_ledger(self, entry: LedgerEntry) -> LedgerEntry:
        new = entry.model_copy(update={"version": entry.version + 1})
        item = {"pk": f"LEDGER#{new.id}", "sk": "LEDGER", "state_pk": f"LEDGERSTATE#{new.state.value}",
                "version": new.version, "data": new.model_dump_json()}
        try:
            if entry.version == 0:
                await self._run(self._put, item, "attribute_not_exists(pk)")
            else:
                await self._run(self._put, item, "#v = :v", {":v": entry.version}, {"#v": "version"})
        except ClientError as exc:
            if _conditional_failed(exc):
                raise StaleWrite(f"ledger entry {entry.id} changed since version {entry.version}") from None
            raise
        return new

    async def list_ledger(self, live_only: bool = True) -> list[LedgerEntry]:
        states = [LedgerState.LAUNCHING, LedgerState.RUNNING] + ([] if live_only else [LedgerState.TERMINATED])
        items = await self._run(self._by_state, "LEDGERSTATE#", [s.value for s in states])
        return sorted((LedgerEntry.model_validate_json(i["data"]) for i in items), key=lambda e: (e.created_at, e.id))

    # --- checkpoints and events -----------------------------------------------------------------------------
    async def add_checkpoint(self, record: CheckpointRecord) -> bool:
        item = {"pk": f"JOB#{record.job_id}", "sk": f"CKPT#{record.id}", "data": record.model_dump_json()}
        try:
            await self._run(self._put, item, "attribute_not_exists(sk)")
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    async def list_checkpoints(self, job_id: str) -> list[CheckpointRecord]:
        items = await self._run(self._query_pk, f"JOB#{job_id}", "CKPT#")
        return sorted((CheckpointRecord.model_validate_json(i["data"]) for i in items), key=lambda c: c.id)

    async def mark_checkpoint_bad(self, job_id: str, checkpoint_id: str) -> None:
        await self._mark_checkpoint(job_id, checkpoint_id, bad=True)

    async def mark_snapshot_deleted(self, job_id: str, checkpoint_id: str) -> None:
        await self._mark_checkpoint(job_id, checkpoint_id, snapshot_deleted=True)

    async def _mark_checkpoint(self, job_id: str, checkpoint_id: str, **fields: bool) -> None:
        """Written only over the record as read: two marks at once (bad, snapshot gone) both stay."""
        for _ in range(10):
            items = await self._run(self._query_pk, f"JOB#{job_id}", f"CKPT#{checkpoint_id}")
            read = next((i["data"] for i in items if i["sk"] == f"CKPT#{checkpoint_id}"), None)
            if read is None:
                return
            record = CheckpointRecord.model_validate_json(read)
            if all(getattr(record, name) == value for name, value in fields.items()):
                return
            item = {"pk": f"JOB#{job_id}", "sk": f"CKPT#{checkpoint_id}",
                    "data": record.model_copy(update=fields).model_dump_json()}
            try:
                await self._run(self._put, item, "#data = :read", {":read": read}, {"#data": "data"})
                return
            except ClientError as exc:
                if not _conditional_failed(exc):
                    raise
        raise StaleWrite(f"checkpoint {checkpoint_id} of job {job_id} kept changing")

    @staticmethod
    def _event_item(event: JobEvent) -> dict[str, Any]:
        return {"pk": f"JOB#{event.job_id}", "sk": f"EVENT#{event.at.isoformat()}#{secrets.token_hex(4)}",
                "data": event.model_dump_json()}

    async def add_event(self, event: JobEvent) -> None:
        await self._run(self.table.put_item, Item=self._event_item(event))

    async def list_events(self, job_id: str) -> list[JobEvent]:
        items = await self._run(self._query_pk, f"JOB#{job_id}", "EVENT#")
        return [JobEvent.model_validate_json(i["data"]) for i in sorted(items, key=lambda i: i["sk"])]

    # --- seen messages ----------------------------------------------------------------------------------------
    async def first_sighting(self, message_id: str, window_seconds: float) -> bool:
        now = time.time()
        item = {"pk": f"MSG#{message_id}", "sk": "SEEN", "expires": int(now + window_seconds) + 1,
                "expires_exact": Decimal(repr(now + window_seconds))}
        try:  # new, or seen so long ago that it has expired (TTL deletes lazily)
            await self._run(self._put, item, "attribute_not_exists(pk) OR expires_exact < :now", {":now": Decimal(repr(now))})
        except ClientError as exc:
            if _conditional_failed(exc):
                return False
            raise
        return True

    async def seen(self, message_id: str, window_seconds: float) -> bool:
        response = await self._run(self.table.get_item, Key={"pk": f"MSG#{message_id}", "sk": "SEEN"},
                                   ConsistentRead=True)
        item = response.get("Item")
        return item is not None and float(item["expires_exact"]) >= time.time()

    async def close(self) -> None:
        pass
