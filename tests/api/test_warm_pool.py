"""The warm pool against moto: refill, claim (one conditional write: never two jobs one task), events of a
claimed task reach its job, recycle, drain, and pool tasks are reaped like any other."""

from __future__ import annotations

import json
import threading

import boto3
import pytest

from chalicelib import factory
from chalicelib.ecs import EcsTasks
from chalicelib.jobs import record_key
from chalicelib.kms import KmsCa
from chalicelib.reaper import run_reaper
from chalicelib.service import JobService
from chalicelib.settings import load_settings
from chalicelib.store import JobStore
from tests.api.conftest import CLUSTER, OWNER, REGION, TABLE, as_caller, job_body, new_keys, post
from tests.api.test_task_events import deliver, task_event


@pytest.fixture
def pool_of(aws, monkeypatch):
    def configure(size: int) -> None:
        monkeypatch.setenv("WARM_POOL_SIZE", str(size))
        factory.reset()

    return configure


def pool_records(aws) -> list[dict]:
    return [i for i in aws.table.scan()["Items"] if i["pk"].startswith("pool/")]


def publish_all(client, aws) -> None:
    """Every warming pool task boots and publishes its host key, as the entrypoint does."""
    for item in pool_records(aws):
        if item.get("pool") == "warming":
            task_id = item["task_arn"].rsplit("/", 1)[1]
            response = client.http.put(
                f"/tasks/{task_id}/host-key",
                headers={
                    "Content-Type": "application/json",
                    **as_caller(f"arn:aws:sts::123456789012:assumed-role/fargate-ci-task/{task_id}"),
                },
                body=json.dumps({"host_key": new_keys()[0]}),
            )
            assert response.status_code == 200, response.body


def describe(aws, arns: list[str]) -> list[dict]:
    return aws.ecs.describe_tasks(cluster=CLUSTER, tasks=arns, include=["TAGS"])["tasks"]


def test_the_reaper_fills_the_pool_with_idle_tasks_of_the_default_definition(client, aws, pool_of):
    pool_of(2)
    report = run_reaper(factory.job_service(), factory.current_settings())

    assert report["pool_started"] == 2
    records = pool_records(aws)
    assert len(records) == 2 and {r["pool"] for r in records} == {"warming"}
    for task in describe(aws, [r["task_arn"] for r in records]):
        assert task["startedBy"].startswith("gl-pool/")
        assert "task-definition/ci-coordinator:" in task["taskDefinitionArn"]
        assert {"key": "gitlab-ci:pool", "value": "idle"} in task["tags"]
        env = {e["name"]: e["value"] for e in task["overrides"]["containerOverrides"][0]["environment"]}
        assert int(env["WATCHDOG_START_SECONDS"]) > 3600  # it waits for a job longer than a cold task
    # Full: a second run starts nothing.
    assert run_reaper(factory.job_service(), factory.current_settings())["pool_started"] == 0


def test_a_matching_job_claims_an_idle_task_and_says_so(client, aws, pool_of):
    pool_of(1)
    factory.job_service().refill_pool()
    publish_all(client, aws)
    [idle] = pool_records(aws)

    body = job_body()
    view = json.loads(post(client, body).body)

    assert view["warm"] is True and view["task_arn"] == idle["task_arn"]
    assert view["host_key"] == idle["host_key"]  # the driver pins it at once
    assert view["ssh_certificate"]  # for that task's id
    assert len(aws.ecs.list_tasks(cluster=CLUSTER)["taskArns"]) == 1  # no RunTask for the job
    [claimed] = pool_records(aws)
    assert claimed["claimed_by"] == record_key(OWNER, view["job_key"])
    assert "task_arn" not in claimed and "pool" not in claimed and "live" not in claimed
    # Another job finds the pool empty and starts cold.
    other = json.loads(post(client, job_body("5006")).body)
    assert not other["warm"] and other["task_arn"] != idle["task_arn"]


def test_a_job_that_asks_for_another_size_or_definition_starts_cold(client, aws, pool_of):
    pool_of(1)
    factory.job_service().refill_pool()
    publish_all(client, aws)

    sized = json.loads(post(client, job_body(cpu=512, memory=1024)).body)
    large = json.loads(post(client, job_body("5006", task_definition="ci-coordinator-large")).body)

    assert not sized["warm"] and not large["warm"]
    assert pool_records(aws)[0]["pool"] == "idle"


def test_a_pool_task_is_claimable_only_once_it_has_published_its_host_key(client, aws, pool_of):
    pool_of(1)
    factory.job_service().refill_pool()
    view = json.loads(post(client, job_body()).body)
    assert not view["warm"]


def test_concurrent_claims_never_share_a_task(client, aws, pool_of, monkeypatch):
    size = 8
    pool_of(size)
    factory.job_service().refill_pool()
    publish_all(client, aws)
    settings = factory.current_settings()
    results: list[dict] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(size)

    def one_job(n: int) -> None:
        try:
            # Each thread its own clients (boto3 resources are not shared between threads).
            session = boto3.session.Session(region_name=REGION)
            service = JobService(
                settings,
                JobStore(session.resource("dynamodb").Table(TABLE)),
                EcsTasks(session.client("ecs"), session.client("ec2"), settings),
                ca=KmsCa(session.client("kms"), settings.ca_key_ids),
            )
            from chalicelib.jobs import parse_job_request

            request = parse_job_request(job_body(str(7000 + n)), settings, "123456789012")
            barrier.wait()
            results.append(service.start(request, OWNER)[0])
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=one_job, args=(n,)) for n in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert not errors, errors
    arns = [r["task_arn"] for r in results]
    assert len(set(arns)) == size  # 0 tasks claimed twice
    assert all(r.get("warm") for r in results)  # and every job warm: the pool had one for each
    claimed_by = [p["claimed_by"] for p in pool_records(aws)]
    assert len(set(claimed_by)) == size


def test_events_of_a_claimed_task_reach_its_job(client, aws, pool_of):
    pool_of(1)
    factory.job_service().refill_pool()
    publish_all(client, aws)
    [idle] = pool_records(aws)
    view = json.loads(post(client, job_body()).body)
    started_by = describe(aws, [view["task_arn"]])[0]["startedBy"]  # the pool's: it cannot change

    deliver(client, task_event(view["task_arn"], "RUNNING", 5, started_by=started_by))
    deliver(
        client,
        task_event(
            view["task_arn"],
            "STOPPED",
            9,
            started_by=started_by,
            startedAt="2026-11-29T20:00:30.000Z",
            stopCode="EssentialContainerExited",
        ),
    )

    job = json.loads(client.http.get(f"/jobs/{view['job_key']}").body)
    assert job["state"] == "STOPPED" and job["stop_code"] == "EssentialContainerExited"
    assert idle["pk"] in [p["pk"] for p in pool_records(aws)]  # the pool record only points at the job


def test_a_refill_replaces_a_claimed_task_after_the_jobs_ready_report(client, aws, pool_of):
    pool_of(1)
    factory.job_service().refill_pool()
    publish_all(client, aws)
    view = json.loads(post(client, job_body()).body)
    assert view["warm"]

    response = client.http.post(
        f"/jobs/{view['job_key']}/heartbeat",
        headers={"Content-Type": "application/json"},
        body=json.dumps({"attempt": 1, "ssh_ready_seconds": 0.4}),
    )

    assert response.status_code == 200
    assert [r.get("pool") for r in pool_records(aws) if "claimed_by" not in r] == ["warming"]


def test_size_zero_drains_the_pool_and_idle_tasks_are_recycled_at_their_max_age(client, aws, pool_of, stops):
    pool_of(2)
    factory.job_service().refill_pool()
    publish_all(client, aws)
    first = {r["task_arn"] for r in pool_records(aws)}

    # Past WARM_POOL_MAX_AGE (3600 s): the reaper stops both and starts two fresh ones.
    report = run_reaper(factory.job_service(), factory.current_settings(), now=_now() + 3700)
    assert report["tasks_stopped_PoolRecycled"] == 2 and set(stops) == first
    assert report["pool_started"] == 2

    pool_of(0)
    publish_all(client, aws)
    report = run_reaper(factory.job_service(), factory.current_settings())
    assert report["pool_drained"] == 2 and report["pool_started"] == 0
    assert not [r for r in pool_records(aws) if r.get("pool")]  # nothing claimable is left


def test_the_sweep_leaves_idle_and_claimed_pool_tasks_alone(client, aws, pool_of, stops):
    pool_of(2)
    factory.job_service().refill_pool()
    publish_all(client, aws)
    post(client, job_body())  # claims one

    run_reaper(factory.job_service(), factory.current_settings())

    assert stops == []


def _now() -> float:
    import time

    return time.time()


def test_the_pool_size_is_validated():
    from chalicelib.errors import ConfigurationError

    base = {
        "FARGATE_CLUSTER": "c",
        "FARGATE_SUBNETS": "s",
        "FARGATE_SECURITY_GROUPS": "g",
        "FARGATE_TASK_DEFINITION": "td",
        "JOBS_TABLE": "t",
    }
    assert load_settings({**base, "WARM_POOL_SIZE": "3"}).warm_pool_size == 3
    with pytest.raises(ConfigurationError, match="WARM_POOL_SIZE"):
        load_settings({**base, "WARM_POOL_SIZE": "-1"})
