"""The ECS/EC2 adapter's requests and how it reads ECS's answers, checked with botocore's Stubber: every
request is validated against botocore's service model (installed in .venv) and must equal what we expect,
every canned answer must fit the model's output shape."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import boto3
import pytest
from botocore.exceptions import ClientError, ReadTimeoutError
from botocore.stub import Stubber
from moto import mock_aws

from chalicelib.ecs import EcsTasks, client_token, tag_value
from chalicelib.errors import NoCapacity, TaskNotFound, TaskStartFailed, Throttled
from chalicelib.jobs import parse_job_request, record_key, started_by
from chalicelib.settings import load_settings
from tests.api.conftest import new_keys

REGION = "eu-west-1"
# Fargate's own words (AWS re:Post knowledge-center/ecs-fargate-runtask-capacity).
CAPACITY = "Capacity is unavailable at this time. Please try again later or in a different availability zone"
ARN = "arn:aws:ecs:eu-west-1:123456789012:task/ci/0123456789abcdef0123456789abcdef"
RECORD = record_key("arn:aws:iam::123456789012:user/runner", "t3sT_1234-5005")
DEADLINE = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp()
PUBLIC, _ = new_keys()
ENV = {
    "FARGATE_CLUSTER": "ci",
    "FARGATE_SUBNETS": "subnet-a,subnet-b",
    "FARGATE_SECURITY_GROUPS": "sg-1",
    "FARGATE_TASK_DEFINITION": "ci-coordinator",
    "JOBS_TABLE": "jobs",
    "ORCHESTRATOR_URL": "https://api.example.com/api",
}


def settings(**change):
    return load_settings({**ENV, **change})


def request(s, **change):
    body = {
        "runner": "t3sT_1234",
        "job_id": "5005",
        "project_id": "42",
        "pipeline_id": "1001",
        "ssh_public_key": PUBLIC,
        **change,
    }
    return parse_job_request(body, s, "123456789012")


def clients():
    ecs_client = boto3.client("ecs", region_name=REGION, aws_access_key_id="a", aws_secret_access_key="b")
    ec2_client = boto3.client("ec2", region_name=REGION, aws_access_key_id="a", aws_secret_access_key="b")
    return ecs_client, ec2_client


class Sleeps(list):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def adapter(s, ecs_client, ec2_client=None, **kwargs) -> EcsTasks:
    return EcsTasks(ecs_client, ec2_client, s, sleep=kwargs.pop("sleep", Sleeps()), **kwargs)


def task(**fields) -> dict:
    return {
        "taskArn": ARN,
        "clusterArn": "arn:aws:ecs:eu-west-1:123456789012:cluster/ci",
        "lastStatus": "PROVISIONING",
        "desiredStatus": "RUNNING",
        "startedBy": started_by(RECORD),
        "cpu": "1024",
        "memory": "2048",
        "launchType": "FARGATE",
        **fields,
    }


def expected_run(s, req, **change) -> dict:
    params = {
        "cluster": "ci",
        "taskDefinition": "ci-coordinator",
        "count": 1,
        "startedBy": started_by(RECORD),
        "clientToken": client_token(RECORD, 1),
        "platformVersion": "LATEST",
        "networkConfiguration": {
            "awsvpcConfiguration": {
                "subnets": ["subnet-a", "subnet-b"],
                "securityGroups": ["sg-1"],
                "assignPublicIp": "DISABLED",
            }
        },
        "overrides": {
            "containerOverrides": [
                {
                    "name": "ci-coordinator",
                    # only where to publish its own host key: no key of any kind
                    "environment": [{"name": "FARGATE_CI_API_URL", "value": "https://api.example.com/api"}],
                }
            ]
        },
        "tags": [
            {"key": "gitlab-ci:job-key", "value": "t3sT_1234-5005"},
            {"key": "gitlab-ci:job-id", "value": "5005"},
            {"key": "gitlab-ci:project-id", "value": "42"},
            {"key": "gitlab-ci:pipeline-id", "value": "1001"},
            {"key": "gitlab-ci:runner", "value": "t3sT_1234"},
            {"key": "gitlab-ci:deadline", "value": "2030-01-02T03:04:05.000Z"},
            {"key": "managed-by", "value": "fargate-ci"},
        ],
        "propagateTags": "TASK_DEFINITION",
        "enableECSManagedTags": True,
        "launchType": "FARGATE",
    }
    params.update(change)
    return params


# -- RunTask -----------------------------------------------------------------------------------------------


def test_a_task_is_asked_for_with_the_api_url_tags_network_and_one_idempotency_token():
    s = settings()
    req = request(s)
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        stub.add_response("run_task", {"tasks": [task()], "failures": []}, expected_run(s, req))

        snapshot = adapter(s, ecs_client).run(req, RECORD, 1, DEADLINE)

        stub.assert_no_pending_responses()
    assert (snapshot.task_arn, snapshot.last_status, snapshot.cpu, snapshot.memory) == (
        ARN,
        "PROVISIONING",
        1024,
        2048,
    )
    assert snapshot.capacity_provider == "FARGATE"


def test_sizes_public_ips_extra_tags_and_the_container_name_reach_the_request():
    s = settings(
        FARGATE_ASSIGN_PUBLIC_IP="true",
        FARGATE_CONTAINER_NAME="runner",
        TASK_EXTRA_TAGS="team=ci,cost=42",
        FARGATE_ALLOWED_TASK_DEFINITIONS="ci-large",
    )
    req = request(s, cpu=1024, memory=4096, task_definition="ci-large:2", platform_version="1.4.0")
    expected = expected_run(s, req, taskDefinition="ci-large:2", platformVersion="1.4.0")
    expected["networkConfiguration"]["awsvpcConfiguration"]["assignPublicIp"] = "ENABLED"
    expected["overrides"]["containerOverrides"][0]["name"] = "runner"
    expected["overrides"]["cpu"] = "1024"
    expected["overrides"]["memory"] = "4096"
    expected["tags"] += [{"key": "team", "value": "ci"}, {"key": "cost", "value": "42"}]
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        stub.add_response("run_task", {"tasks": [task()], "failures": []}, expected)

        adapter(s, ecs_client).run(req, RECORD, 1, DEADLINE)

        stub.assert_no_pending_responses()


def test_capacity_providers_replace_the_launch_type_and_the_on_demand_fallback_has_its_own_token():
    s = settings(FARGATE_CAPACITY_PROVIDERS="FARGATE_SPOT:3,FARGATE:1:1")
    req = request(s)
    strategy = [
        {"capacityProvider": "FARGATE_SPOT", "weight": 3, "base": 0},
        {"capacityProvider": "FARGATE", "weight": 1, "base": 1},
    ]
    first = expected_run(s, req, capacityProviderStrategy=strategy, clientToken=client_token(RECORD, 2, 1))
    del first["launchType"]
    fallback = expected_run(
        s,
        req,
        capacityProviderStrategy=[{"capacityProvider": "FARGATE", "weight": 1, "base": 0}],
        clientToken=client_token(RECORD, 2, 1, "FARGATE"),
    )
    del fallback["launchType"]
    ecs_client, _ = clients()
    tasks = adapter(s, ecs_client)
    assert tasks.uses_spot is True
    with Stubber(ecs_client) as stub:
        stub.add_response("run_task", {"tasks": [task()]}, first)
        stub.add_response("run_task", {"tasks": [task(capacityProviderName="FARGATE")]}, fallback)

        tasks.run(req, RECORD, 2, DEADLINE, launch_try=1)
        snapshot = tasks.run(req, RECORD, 2, DEADLINE, launch_try=1, on_demand=True)

        stub.assert_no_pending_responses()
    assert snapshot.capacity_provider == "FARGATE"


def test_on_demand_without_spot_configured_is_the_configured_strategy():
    s = settings(FARGATE_CAPACITY_PROVIDERS="FARGATE:1")
    req = request(s)
    expected = expected_run(
        s, req, capacityProviderStrategy=[{"capacityProvider": "FARGATE", "weight": 1, "base": 0}]
    )
    del expected["launchType"]
    ecs_client, _ = clients()
    tasks = adapter(s, ecs_client)
    assert tasks.uses_spot is False
    with Stubber(ecs_client) as stub:
        stub.add_response("run_task", {"tasks": [task()]}, expected)

        tasks.run(req, RECORD, 1, DEADLINE, on_demand=True)

        stub.assert_no_pending_responses()


@pytest.mark.parametrize(
    ("reason", "detail", "error", "message"),
    [
        (CAPACITY, None, NoCapacity, f"ECS could not start the task: {CAPACITY}"),
        ("RESOURCE:MEMORY", "arn:x", NoCapacity, "ECS could not start the task: RESOURCE:MEMORY (arn:x)"),
        ("MISSING", "arn:td", TaskStartFailed, "ECS could not start the task: MISSING (arn:td)"),
    ],
)
def test_a_run_task_failure_is_no_capacity_or_a_start_failure_with_ecss_words(reason, detail, error, message):
    s = settings()
    failure = {"arn": ARN, "reason": reason}
    if detail:
        failure["detail"] = detail
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        stub.add_response("run_task", {"tasks": [], "failures": [failure]})

        with pytest.raises(error) as caught:
            adapter(s, ecs_client).run(request(s), RECORD, 1, DEADLINE)

    assert caught.value.message == message
    if error is NoCapacity:
        assert caught.value.retry_after == 30


def test_a_failure_without_a_reason_is_a_start_failure():
    s = settings()
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        stub.add_response("run_task", {"failures": [{"arn": ARN}]})

        with pytest.raises(TaskStartFailed, match=r"^ECS could not start the task: unknown$"):
            adapter(s, ecs_client).run(request(s), RECORD, 1, DEADLINE)


def test_an_answer_without_task_or_failure_is_a_start_failure():
    s = settings()
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        stub.add_response("run_task", {"tasks": [], "failures": []})

        with pytest.raises(TaskStartFailed, match=r"^ECS RunTask returned no task and no failure$"):
            adapter(s, ecs_client).run(request(s), RECORD, 1, DEADLINE)


@pytest.mark.parametrize(
    ("code", "message", "error"),
    [
        (
            "InvalidParameterException",
            "No Container Instances were found in your capacity provider",
            NoCapacity,
        ),
        ("ClientException", "TaskDefinition is inactive", TaskStartFailed),
        ("AccessDeniedException", "not allowed", TaskStartFailed),
    ],
)
def test_a_refused_run_task_names_ecss_code_and_message(code, message, error):
    s = settings()
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        stub.add_client_error(
            "run_task", service_error_code=code, service_message=message, http_status_code=400
        )

        with pytest.raises(error) as caught:
            adapter(s, ecs_client).run(request(s), RECORD, 1, DEADLINE)

    assert caught.value.message == f"ECS RunTask refused: {code}: {message}"


# -- retries -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code",
    ["ThrottlingException", "Throttling", "RequestLimitExceeded", "ServerException", "ServiceUnavailable"],
)
def test_throttling_and_server_errors_are_retried(code):
    s = settings()
    ecs_client, _ = clients()
    sleeps = Sleeps()
    with Stubber(ecs_client) as stub:
        stub.add_client_error("list_tasks", service_error_code=code, http_status_code=400)
        stub.add_response("list_tasks", {"taskArns": [ARN]})

        assert adapter(s, ecs_client, sleep=sleeps).list_running() == ([ARN], None)

    assert len(sleeps) == 1 and 0.1 <= sleeps[0] <= 0.3


def test_other_errors_are_not_retried():
    s = settings()
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        stub.add_client_error("list_tasks", service_error_code="AccessDeniedException", http_status_code=400)

        with pytest.raises(ClientError):
            adapter(s, ecs_client).list_running()


def test_throttling_that_persists_is_a_503_naming_the_operation():
    s = settings()
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        for _ in range(4):
            stub.add_client_error(
                "list_tasks", service_error_code="ThrottlingException", http_status_code=400
            )

        with pytest.raises(Throttled) as caught:
            adapter(s, ecs_client).list_running()

        stub.assert_no_pending_responses()
    assert caught.value.message == "AWS is throttling ECS list_tasks; retry shortly"
    assert caught.value.retry_after == 2


def test_an_ecs_that_does_not_answer_is_retried_then_a_503_naming_the_operation():
    class Silent:
        calls = 0

        def list_tasks(self, **_):
            Silent.calls += 1
            raise ReadTimeoutError(endpoint_url="https://ecs.eu-west-1.amazonaws.com")

    with pytest.raises(Throttled) as caught:
        adapter(settings(), Silent()).list_running()

    assert Silent.calls == 4
    assert caught.value.message.startswith("ECS did not answer list_tasks: Read timeout on endpoint URL")


def test_the_retry_budget_counts_from_the_first_call():
    s = settings()
    clock = iter([0.0, 7.95, 7.95, 7.95])  # started, then a slow first call

    class Throttling:
        calls = 0

        def list_tasks(self, **_):
            Throttling.calls += 1
            raise ClientError({"Error": {"Code": "ThrottlingException"}}, "ListTasks")

    with pytest.raises(Throttled):
        adapter(s, Throttling(), monotonic=lambda: next(clock)).list_running()

    assert Throttling.calls == 1  # 7.95 s + any back-off is past the 8 s budget


# -- StopTask, DescribeTasks, ListTasks ----------------------------------------------------------------------


def test_a_stop_names_the_cluster_task_and_a_reason_cut_to_255():
    s = settings()
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        stub.add_response("stop_task", {}, {"cluster": "ci", "task": ARN, "reason": "r" * 255})

        adapter(s, ecs_client).stop(ARN, "r" * 300)

        stub.assert_no_pending_responses()


def test_stopping_a_task_ecs_does_not_know_is_task_not_found():
    s = settings()
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        stub.add_client_error(
            "stop_task",
            service_error_code="InvalidParameterException",
            service_message="The referenced task was Not Found.",
        )

        with pytest.raises(TaskNotFound, match=f"^task {ARN} is not known to ECS$"):
            adapter(s, ecs_client).stop(ARN, "done")


def test_other_stop_errors_are_raised_as_they_are():
    s = settings()
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        stub.add_client_error(
            "stop_task", service_error_code="AccessDeniedException", service_message="denied"
        )

        with pytest.raises(ClientError):
            adapter(s, ecs_client).stop(ARN, "done")


def test_describe_asks_for_tags_in_batches_of_a_hundred():
    s = settings()
    arns = [f"{ARN[:-4]}{i:04d}" for i in range(150)]
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        stub.add_response(
            "describe_tasks",
            {"tasks": [task(taskArn=a) for a in arns[:100]]},
            {"cluster": "ci", "tasks": arns[:100], "include": ["TAGS"]},
        )
        stub.add_response(
            "describe_tasks",
            {"tasks": [task(taskArn=a) for a in arns[100:]]},
            {"cluster": "ci", "tasks": arns[100:], "include": ["TAGS"]},
        )

        snapshots = adapter(s, ecs_client).describe(arns)

        stub.assert_no_pending_responses()
    assert [x.task_arn for x in snapshots] == arns


def test_describe_reads_our_container_by_its_configured_name():
    s = settings(FARGATE_CONTAINER_NAME="runner")
    ecs_client, _ = clients()
    containers = [{"name": "sidecar", "exitCode": 9}, {"name": "runner", "exitCode": 0, "reason": "done"}]
    with Stubber(ecs_client) as stub:
        stub.add_response("describe_tasks", {"tasks": [task(containers=containers)]})

        (snapshot,) = adapter(s, ecs_client).describe([ARN])

    assert (snapshot.exit_code, snapshot.container_reason) == (0, "done")


def test_running_tasks_are_listed_a_page_at_a_time():
    s = settings()
    ecs_client, _ = clients()
    with Stubber(ecs_client) as stub:
        stub.add_response(
            "list_tasks",
            {"taskArns": [ARN], "nextToken": "page-2"},
            {"cluster": "ci", "desiredStatus": "RUNNING", "maxResults": 100},
        )
        stub.add_response(
            "list_tasks",
            {"taskArns": []},
            {"cluster": "ci", "desiredStatus": "RUNNING", "maxResults": 100, "nextToken": "page-2"},
        )

        tasks = adapter(s, ecs_client)
        assert tasks.list_running() == ([ARN], "page-2")
        assert tasks.list_running("page-2") == ([], None)

        stub.assert_no_pending_responses()


# -- EC2, the cluster ARN, tokens and tags -------------------------------------------------------------------


def test_the_public_address_is_the_enis_association():
    s = settings()
    ecs_client, ec2_client = clients()
    with Stubber(ec2_client) as stub:
        stub.add_response(
            "describe_network_interfaces",
            {
                "NetworkInterfaces": [
                    {"NetworkInterfaceId": "eni-1", "Association": {"PublicIp": "203.0.113.7"}}
                ]
            },
            {"NetworkInterfaceIds": ["eni-1"]},
        )
        stub.add_response(
            "describe_network_interfaces",
            {
                "NetworkInterfaces": [
                    {"NetworkInterfaceId": "eni-2"},
                    {"NetworkInterfaceId": "eni-2", "Association": {}},
                ]
            },
            {"NetworkInterfaceIds": ["eni-2"]},
        )

        tasks = adapter(s, ecs_client, ec2_client)
        assert tasks.public_address("eni-1") == "203.0.113.7"
        assert tasks.public_address("eni-2") is None

        stub.assert_no_pending_responses()


def test_the_cluster_arn_is_built_once_from_the_callers_account_and_region():
    s = settings()
    with mock_aws():
        ecs_client = boto3.client("ecs", region_name=REGION, aws_access_key_id="a", aws_secret_access_key="b")
        tasks = adapter(s, ecs_client)

        assert tasks.cluster_arn() == "arn:aws:ecs:eu-west-1:123456789012:cluster/ci"

    assert tasks.cluster_arn() == "arn:aws:ecs:eu-west-1:123456789012:cluster/ci"  # no AWS call any more


def test_a_cluster_named_by_arn_is_taken_as_it_is():
    arn = "arn:aws:ecs:us-east-1:999999999999:cluster/shared"
    ecs_client, _ = clients()

    assert adapter(settings(FARGATE_CLUSTER=arn), ecs_client).cluster_arn() == arn


def test_a_client_token_is_one_per_attempt_try_and_provider_and_names_the_owner():
    token = client_token(RECORD, 1)

    assert token == hashlib.sha256(f"{RECORD}/1".encode()).hexdigest()
    assert client_token(RECORD, 1, 0, "") == token
    assert client_token(RECORD, 1, 2) == hashlib.sha256(f"{RECORD}/1/2".encode()).hexdigest()
    assert client_token(RECORD, 1, 0, "FARGATE") == hashlib.sha256(f"{RECORD}/1/FARGATE".encode()).hexdigest()
    assert (
        client_token(RECORD, 1, 2, "FARGATE") == hashlib.sha256(f"{RECORD}/1/2/FARGATE".encode()).hexdigest()
    )
    other = record_key("arn:aws:iam::123456789012:user/other", "t3sT_1234-5005")
    assert client_token(other, 1) != token
    assert len(token) == 64  # RunTask's limit


def test_tag_values_keep_what_ecs_allows_and_replace_the_rest():
    assert tag_value("group/project: a_b.c=d+e-f@g 1") == "group/project: a_b.c=d+e-f@g 1"
    assert tag_value("a#b$c\nd") == "a_b_c_d"
    assert tag_value("x" * 300) == "x" * 256


class Answers:
    """An ECS client answering with shapes botocore's Stubber cannot produce (fields left out)."""

    def __init__(self, **answers) -> None:
        self.answers = answers

    def __getattr__(self, operation):
        def call(**_):
            answer = self.answers[operation]
            if isinstance(answer, Exception):
                raise answer
            return answer

        return call


def test_a_stop_error_without_a_message_is_raised_as_it_is():
    error = ClientError({"Error": {"Code": "AccessDeniedException"}}, "StopTask")

    with pytest.raises(ClientError):
        adapter(settings(), Answers(stop_task=error)).stop(ARN, "done")


def test_an_answer_without_tasks_describes_nothing():
    assert adapter(settings(), Answers(describe_tasks={})).describe([ARN]) == []
    assert adapter(settings(), Answers(list_tasks={})).list_running() == ([], None)
