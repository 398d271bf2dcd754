"""The one place that talks to DynamoDB: job records, guarded by conditional writes.

Every write after a record's creation is `transition`: an event of `states`' transition table plus the
event's guards as plain data; the DynamoDB condition is built here and nowhere else."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from boto3.dynamodb.conditions import Attr, Key
from botocore.exceptions import ClientError

from chalicelib.errors import StaleWrite
from chalicelib.schema import LIVE_INDEX, POOL_INDEX, TABLE_KEY, TASK_INDEX
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
        """Write a new job; if the key exists already, return the existing record instead."""
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
