"""The sandbox's DynamoDB keeps DynamoDB's per-item atomicity (sandbox/moto_dynamodb.py): of conditional
writes racing on one item, exactly one passes. moto's condition check is slowed down here so that, without
the lock, every racer passes it before any writes (deterministic, not a timing lottery)."""

from __future__ import annotations

import threading
import time

import boto3
import pytest
from botocore.exceptions import ClientError
from moto import mock_aws

from sandbox import moto_dynamodb

RACERS = 4


@pytest.fixture
def slow_conditions(monkeypatch):
    """Every condition moto evaluates takes 50 ms after it has decided."""
    from moto.dynamodb import models

    real = models.create_condition_expression_parser

    class SlowCondition:
        def __init__(self, condition):
            self.condition = condition

        def expr(self, item):
            verdict = self.condition.expr(item)
            time.sleep(0.05)
            return verdict

    class SlowParser:
        def __init__(self, parser):
            self.parser = parser

        def parse(self):
            return SlowCondition(self.parser.parse())

    monkeypatch.setattr(models, "create_condition_expression_parser", lambda *args: SlowParser(real(*args)))


def race(write) -> list[str]:
    """Run `write(n)` in RACERS threads at once; the outcome of each: "ok" or the error code."""
    outcomes: list[str] = []
    barrier = threading.Barrier(RACERS)

    def one(n: int) -> None:
        barrier.wait()
        try:
            write(n)
            outcomes.append("ok")
        except ClientError as exc:
            outcomes.append(exc.response["Error"]["Code"])

    threads = [threading.Thread(target=one, args=(n,)) for n in range(RACERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return sorted(outcomes)


@pytest.mark.parametrize("call", ["update_item", "put_item"])
def test_of_conditional_writes_racing_on_one_item_one_passes(slow_conditions, monkeypatch, call):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    moto_dynamodb.install()
    with mock_aws():
        dynamodb = boto3.resource("dynamodb", region_name="eu-west-1")
        table = dynamodb.create_table(
            TableName="jobs",
            KeySchema=[{"AttributeName": "k", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "k", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        table.put_item(Item={"k": "pool/1", "state": "idle"})

        def claim(n: int) -> None:
            if call == "update_item":
                table.update_item(
                    Key={"k": "pool/1"},
                    UpdateExpression="SET claimed_by = :me",
                    ConditionExpression="attribute_not_exists(claimed_by)",
                    ExpressionAttributeValues={":me": f"job-{n}"},
                )
            else:
                table.put_item(
                    Item={"k": "pool/1", "claimed_by": f"job-{n}"},
                    ConditionExpression="attribute_not_exists(claimed_by)",
                )

        outcomes = race(claim)

        assert outcomes == ["ConditionalCheckFailedException"] * (RACERS - 1) + ["ok"]


def test_installing_twice_wraps_once():
    from moto.dynamodb.models import DynamoDBBackend

    moto_dynamodb.install()
    first = DynamoDBBackend.update_item
    moto_dynamodb.install()

    assert DynamoDBBackend.update_item is first
    assert first.__wrapped__.__name__ == "update_item"
    assert not getattr(first.__wrapped__, "atomic_in_sandbox", False)
