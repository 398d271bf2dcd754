"""The one place that talks to DynamoDB: job records, guarded by conditional writes."""

from __future__ import annotations

from typing import Any

from boto3.dynamodb.conditions import Attr, ConditionBase, Key
from botocore.exceptions import ClientError

from chalicelib.errors import StaleWrite
from chalicelib.schema import LIVE_INDEX, TABLE_KEY, TASK_INDEX


def _conditional_failed(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == "ConditionalCheckFailedException"


class JobStore:
    """Job records keyed by record key (`jobs.record_key`: job key and owner). Every write that changes state
    carries a condition."""

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

    def update(
        self,
        key: str,
        *,
        set_fields: dict[str, Any] | None = None,
        remove: tuple[str, ...] = (),
        condition: ConditionBase | None = None,
    ) -> dict:
        """Apply a change if `condition` holds; raise StaleWrite if it does not. Returns the new record."""
        names: dict[str, str] = {}
        values: dict[str, Any] = {}
        sets = []
        for i, (name, value) in enumerate((set_fields or {}).items()):
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
        exists = Attr(TABLE_KEY).exists()
        params: dict[str, Any] = {
            "Key": {TABLE_KEY: key},
            "UpdateExpression": expression.strip(),
            "ExpressionAttributeNames": names,
            "ConditionExpression": exists & condition if condition is not None else exists,
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
