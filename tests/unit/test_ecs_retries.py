"""EcsTasks' retries: exponential, jittered back-off, bounded in number and in time (the API Lambda must
answer before API Gateway's 29 s)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from chalicelib import ecs
from chalicelib.errors import Throttled
from chalicelib.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class ThrottledEcs:
    """Every call takes `call_seconds` on the clock and is throttled."""

    def __init__(self, clock: Clock, call_seconds: float) -> None:
        self.clock, self.call_seconds, self.calls = clock, call_seconds, 0

    def describe_tasks(self, **_: object) -> dict:
        self.calls += 1
        self.clock.now += self.call_seconds
        raise ClientError({"Error": {"Code": "ThrottlingException", "Message": "slow down"}}, "DescribeTasks")


def tasks(clock: Clock, client: ThrottledEcs, **kwargs: object) -> ecs.EcsTasks:
    settings = Settings(
        cluster="c",
        subnets=("subnet-1",),
        security_groups=("sg-1",),
        table="t",
        default_task_definition="td",
        allowed_task_definitions=(),
    )
    return ecs.EcsTasks(client, None, settings, sleep=clock.sleep, monotonic=lambda: clock.now, **kwargs)


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 10])
def test_backoff_doubles_from_a_fifth_of_a_second_up_to_two_with_jitter(attempt, monkeypatch):
    base = min(2.0, 0.1 * 2**attempt)
    monkeypatch.setattr(ecs.random, "random", lambda: 0.0)
    assert ecs.backoff(attempt) == pytest.approx(base * 0.5)
    monkeypatch.setattr(ecs.random, "random", lambda: 0.999999)
    assert ecs.backoff(attempt) == pytest.approx(base * 1.5, rel=1e-5)


def test_quick_throttling_is_retried_up_to_the_attempt_limit_then_a_503():
    clock = Clock()
    client = ThrottledEcs(clock, call_seconds=0.05)

    with pytest.raises(Throttled) as raised:
        tasks(clock, client, attempts=4)._call("describe_tasks")

    assert client.calls == 4
    assert len(clock.sleeps) == 3
    assert raised.value.retry_after == 2


def test_slow_calls_stop_retrying_once_the_time_budget_is_spent():
    clock = Clock()
    client = ThrottledEcs(clock, call_seconds=5.0)  # ECS answering slowly, at the client's read timeout

    with pytest.raises(Throttled):
        tasks(clock, client, attempts=10, retry_budget=8.0)._call("describe_tasks")

    # 5 s, pause, 5 s: a third call would start after the 8 s budget.
    assert client.calls == 2
    assert clock.now <= 8.0 + 5.0 + 2.0


def test_the_budget_and_the_clients_timeouts_fit_the_api_lambdas_timeout():
    import json
    from pathlib import Path

    config = json.loads((Path(__file__).resolve().parents[2] / ".chalice" / "config.json").read_text())
    api_timeout = config["lambda_functions"]["api_handler"]["lambda_timeout"]
    longest_call = 2 + 10  # factory: connect_timeout + read_timeout
    assert ecs.RETRY_BUDGET_SECONDS + longest_call + 2.0 <= api_timeout - 3  # room for DynamoDB writes


def test_a_read_timeout_is_retried_like_throttling_and_ends_in_a_503():
    from botocore.exceptions import ReadTimeoutError

    clock = Clock()

    class SilentEcs:
        calls = 0

        def run_task(self, **_: object) -> dict:
            SilentEcs.calls += 1
            clock.now += 10.0
            raise ReadTimeoutError(endpoint_url="https://ecs.eu-west-1.amazonaws.com/")

    with pytest.raises(Throttled, match="did not answer"):
        tasks(clock, SilentEcs())._call("run_task")

    assert SilentEcs.calls == 1  # a second 10 s call would start after the 8 s budget
