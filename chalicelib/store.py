"""The one place that talks to DynamoDB: job records, guarded by conditional writes.

Every write after a record's creation is `transition`: an event of `states`' transition table plus the
event's guards as plain data; the DynamoDB condition is built here and nowhere else."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any

from boto3.dynamodb.conditions import Attr, Key
from botocore.exceptions import ClientError

from chalicelib.errors import StaleWrite
from chalicelib.schema import (
    LIVE_INDEX,
    OWNER_INDEX,
    OWNER_KEY,
    POOL_INDEX,
    TABLE_KEY,
    TASK_DEFINITION_LIVE,
    TASK_INDEX,
)
from chalicelib.states import ANY, JobState, Transition


def _conditional_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


class JobStore:
    """Job records keyed by record key (`jobs.record_key`: job key and owner). Every write carries a
    condition."""

    def __init__(self, table: Any):
        self._table = table

    def get(self, key: str) -> dict | None:
        return self._table.get_item(Key={TABLE_KEY: key}, ConsistentRead=True).get("Item")

    def create(self, item: dict) -> dict | None:
        """Write a new job; if the key exists already, return the existing record instead. The record gets
        its owner index key (the record key's owner digest) here, so no writer can forget it."""
        return self._put_new({**item, OWNER_KEY: item[TABLE_KEY].rsplit("/", 1)[-1]})

    def create_pool_task(self, item: dict) -> dict | None:
        """Write a warm pool task's record (`pool/<slot>`); no owner key: it is nobody's job until claimed."""
        return self._put_new(item)

    def _put_new(self, item: dict) -> dict | None:
        try:
            self._table.put_item(Item=item, ConditionExpression=Attr(TABLE_KEY).not_exists())
            return None
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise
        return self.get(item[TABLE_KEY])

    def transition(
        self,
        key: str,
        change: Transition,
        *,
        set_fields: Mapping[str, Any] | None = None,
        remove: Iterable[str] = (),
        equal: Mapping[str, Any] | None = None,
        absent: Iterable[str] = (),
        below: Mapping[str, Any] | None = None,
        absent_or_equal: Mapping[str, Any] | None = None,
        absent_or_below: Mapping[str, Any] | None = None,
        absent_or_in: Mapping[str, Iterable[Any]] | None = None,
    ) -> dict:
        """Apply one event of the transition table (`states`) to an existing record: set its target state
        (if it has one) with `set_fields`, drop `remove`, if the record is in one of the states it may come
        from and every guard holds (`equal`: attribute == value, `absent`: not set, `below`: attribute <
        value, and `absent_or_*`: not set, or the comparison holds). Raise StaleWrite if any does not; then
        nothing is written. Returns the new record."""
        fields = dict(set_fields or {})
        if change.target is not None:
            fields["state"] = change.target.value
        condition = Attr(TABLE_KEY).exists()
        if change.allowed_from != ANY:  # every record has a state: "any" needs no check
            states = [s.value for s in JobState if s in change.allowed_from]
            condition &= Attr("state").is_in(states)
        for name, value in (equal or {}).items():
            condition &= Attr(name).eq(value)
        for name in absent:
            condition &= Attr(name).not_exists()
        for name, value in (below or {}).items():
            condition &= Attr(name).lt(value)
        for name, value in (absent_or_equal or {}).items():
            condition &= Attr(name).not_exists() | Attr(name).eq(value)
        for name, value in (absent_or_below or {}).items():
            condition &= Attr(name).not_exists() | Attr(name).lt(value)
        for name, values in (absent_or_in or {}).items():
            condition &= Attr(name).not_exists() | Attr(name).is_in(list(values))
        return self._update(key, fields, tuple(remove), condition)

    def _update(self, key: str, set_fields: dict[str, Any], remove: tuple[str, ...], condition: Any) -> dict:
        names: dict[str, str] = {}
        values: dict[str, Any] = {}
        sets = []
        for i, (name, value) in enumerate(set_fields.items()):
            names[f"#s{i}"] = name
            values[f":s{i}"] = value
            sets.append(f"#s{i} = :s{i}")
        removes = []
        for i, name in enumerate(remove):
            names[f"#r{i}"] = name
            removes.append(f"#r{i}")
        expression = ""
        if sets:
            expression += "SET " + ", ".join(sets)
        if removes:
            expression += " REMOVE " + ", ".join(removes)
        params: dict[str, Any] = {
            "Key": {TABLE_KEY: key},
            "UpdateExpression": expression.strip(),
            "ExpressionAttributeNames": names,
            "ConditionExpression": condition,
            "ReturnValues": "ALL_NEW",
        }
        if values:
            params["ExpressionAttributeValues"] = values
        try:
            return self._table.update_item(**params)["Attributes"]
        except ClientError as exc:
            if _conditional_failed(exc):
                raise StaleWrite(f"job {key} changed under this write") from exc
            raise

    def find_by_task(self, task_arn: str) -> dict | None:
        items = self._table.query(IndexName=TASK_INDEX, KeyConditionExpression=Key("task_arn").eq(task_arn))[
            "Items"
        ]
        return items[0] if items else None

    def live_jobs(self, *, limit: int = 100, start_key: dict | None = None) -> tuple[list[dict], dict | None]:
        """Jobs that are not terminal, oldest deadline first (the sparse live index)."""
        params: dict[str, Any] = {
            "IndexName": LIVE_INDEX,
            "KeyConditionExpression": Key("live").eq("1"),
            "Limit": limit,
        }
        if start_key:
            params["ExclusiveStartKey"] = start_key
        response = self._table.query(**params)
        return response["Items"], response.get("LastEvaluatedKey")

    def jobs_of(
        self,
        owner_key: str,
        *,
        limit: int,
        live: bool | None = None,
        states: Iterable[str] = (),
        since: str | None = None,
        start_key: dict | None = None,
        max_reads: int = 10,
    ) -> tuple[list[dict], dict | None]:
        """One page of an owner's jobs, newest first (the owner index): at most `limit` records that pass
        the filters, and the index key to go on from (None: no more). DynamoDB applies `Limit` before a
        filter, so this reads on until the page is full, the index ends or `max_reads` queries were made
        (then a short page with a key to go on from)."""
        condition = Key(OWNER_KEY).eq(owner_key)
        if since:
            condition &= Key("created_at").gte(since)
        filters = []
        if live is not None:
            filters.append(Attr("live").exists() if live else Attr("live").not_exists())
        states = list(states)
        if states:
            filters.append(Attr("state").is_in(states))
        params: dict[str, Any] = {
            "IndexName": OWNER_INDEX,
            "KeyConditionExpression": condition,
            "ScanIndexForward": False,
            # A filter drops records after DynamoDB counted them: read whole pages then (at most 1 MB each).
            "Limit": 100 if filters else limit,
        }
        if filters:
            expression = filters[0]
            for more in filters[1:]:
                expression &= more
            params["FilterExpression"] = expression
        items: list[dict] = []
        for _ in range(max_reads):
            if start_key:
                params["ExclusiveStartKey"] = start_key
            response = self._table.query(**params)
            items.extend(response["Items"])
            start_key = response.get("LastEvaluatedKey")
            if len(items) >= limit or not start_key:
                break
        if len(items) > limit:
            # The page ends at the last record shown: the next one starts right after it.
            items = items[:limit]
            last = items[-1]
            start_key = {
                TABLE_KEY: last[TABLE_KEY],
                OWNER_KEY: last[OWNER_KEY],
                "created_at": last["created_at"],
            }
        return items, start_key

    # --- per-job task definitions (chalicelib.taskdefs): one record each, `taskdef/<family>` ---------------
    # In the sparse live index under `live` = "taskdef" with `deadline` = when it falls unused, so the reaper
    # finds the ones to deregister the way it finds jobs (job records carry `live` = "1").

    def claim_task_definition(self, item: dict) -> dict | None:
        """Write a task definition's record (registering); if it exists, return it instead. No owner key:
        it is nobody's job, so no caller's listing shows it."""
        return self._put_new(item)

    def task_definition_registered(
        self, key: str, arn: str, deadline: int, *, service_notes: list[str] | None = None
    ) -> dict:
        """The registered revision, and the notes of its registration (services the job cannot wait for)."""
        condition = Attr(TABLE_KEY).exists() & Attr("td_arn").not_exists()
        fields: dict = {"td_arn": arn, "deadline": deadline}
        if service_notes:
            fields["service_notes"] = service_notes
        return self._update(key, fields, ("lease_until",), condition)

    def take_over_registration(self, key: str, lease: int, new_lease: int) -> dict:
        """A registration whose registrant died (its lease ran out) is ours now; StaleWrite if not."""
        condition = Attr(TABLE_KEY).exists() & Attr("td_arn").not_exists() & Attr("lease_until").eq(lease)
        return self._update(key, {"lease_until": new_lease}, (), condition)

    def task_definition_used(self, key: str, deadline: int) -> None:
        """Push the record's deadline forward (never back); a concurrent newer use wins."""
        condition = Attr(TABLE_KEY).exists() & Attr("td_arn").exists() & Attr("deadline").lt(deadline)
        with contextlib.suppress(StaleWrite):
            self._update(key, {"deadline": deadline}, (), condition)

    def unused_task_definitions(self, now: int, *, limit: int = 25) -> list[dict]:
        response = self._table.query(
            IndexName=LIVE_INDEX,
            KeyConditionExpression=Key("live").eq(TASK_DEFINITION_LIVE) & Key("deadline").lt(now),
            Limit=limit,
        )
        return response["Items"]

    def forget_task_definition(self, key: str, deadline: int) -> bool:
        """Delete the record unless a job used it meanwhile (its deadline moved)."""
        try:
            self._table.delete_item(Key={TABLE_KEY: key}, ConditionExpression=Attr("deadline").eq(deadline))
            return True
        except ClientError as exc:
            if not _conditional_failed(exc):
                raise
            return False

    def pool_tasks(self, status: str, *, limit: int = 100) -> list[dict]:
        """Warm pool records whose `pool` is `status` ("warming" or "idle"), from the sparse pool index
        (eventually consistent: a claim is a conditional write on the record itself)."""
        items: list[dict] = []
        params: dict[str, Any] = {"IndexName": POOL_INDEX, "KeyConditionExpression": Key("pool").eq(status)}
        while len(items) < limit:
            response = self._table.query(**params, Limit=limit - len(items))
            items += response["Items"]
            if "LastEvaluatedKey" not in response:
                break
            params["ExclusiveStartKey"] = response["LastEvaluatedKey"]
        return items
