"""The hand-written IAM: the orchestrator may do what its code calls and no more; the runner manager may
only call the API."""

from __future__ import annotations

import fnmatch
import json

import pytest

from infra import generate
from tests.deploy.aws_calls import iam_actions, method_calls, orchestrator_calls
from tests.deploy.conftest import ROOT

# Actions AWS authorises on no narrower resource than "*" (ListTasks is then scoped by its condition).
NO_RESOURCE_LEVEL = {
    "ec2:DescribeNetworkInterfaces",
    "ecs:ListTasks",
    "ecs:DescribeTaskDefinition",
    "ecs:RegisterTaskDefinition",
    "ecs:DeregisterTaskDefinition",
    "ecr:GetAuthorizationToken",
}
LOGS = {"logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"}


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _text(value) -> str:
    """An ARN as written: a literal, or the Fn::Sub string of the merged template with its pseudo
    parameters filled in (so that splitting on ":" works)."""
    if not isinstance(value, dict):
        return value
    text = value["Fn::Sub"]
    for pseudo, example in (
        ("${AWS::Partition}", "aws"),
        ("${AWS::Region}", "eu-west-1"),
        ("${AWS::AccountId}", "123456789012"),
    ):
        text = text.replace(pseudo, example)
    return text


def _lambda_policies() -> list[tuple[str, str, dict]]:
    """(where, cluster name as written there, policy document) for every policy the Lambdas may get."""
    policies = [
        (
            f".chalice/{path.name}",
            f"fargate-ci-{path.stem.removeprefix('policy-')}",
            json.loads(path.read_text()),
        )
        for path in sorted((ROOT / ".chalice").glob("policy-*.json"))
    ]
    merged = json.loads((ROOT / "infra" / "merge-template.json").read_text())["Resources"]
    for role in generate.CHALICE_ROLES:
        document = merged[role]["Properties"]["Policies"][0]["PolicyDocument"]
        policies.append((f"merge-template {role}", "fargate-ci-${Stage}", document))
    return policies


LAMBDA_POLICIES = _lambda_policies()
POLICY_IDS = [where for where, _, _ in LAMBDA_POLICIES]


def _allowed(document: dict) -> set[str]:
    return {a for s in document["Statement"] if s["Effect"] == "Allow" for a in _as_list(s["Action"])}


def _statements_with(document: dict, action: str) -> list[dict]:
    return [s for s in document["Statement"] if action in _as_list(s["Action"])]


@pytest.fixture(scope="module")
def needed() -> set[str]:
    return iam_actions(orchestrator_calls(ROOT / "chalicelib"))


def test_the_scan_finds_the_orchestrators_calls(needed):
    # GIVEN the orchestrator's adapters WHEN scanned THEN the calls every job makes are there
    assert {
        "ecs:RunTask",
        "ecs:StopTask",
        "ecs:DescribeTasks",
        "dynamodb:PutItem",
        "dynamodb:GetItem",
    } <= needed


def test_the_scan_sees_direct_and_dispatched_calls():
    source = """
class Tasks:
    def _call(self, operation, **params):
        return getattr(self._ecs, operation)(**params)

    def stop(self):
        self._call("delete_cluster", cluster="x")
        self._ec2.describe_instances()
        self._table.delete_item(Key={})
        self._ecs.get_paginator("list_services")
"""
    calls = method_calls(source)
    assert calls == {
        ("ecs", "delete_cluster"),
        ("ec2", "describe_instances"),
        ("dynamodb", "delete_item"),
        ("ecs", "list_services"),
    }
    assert iam_actions(calls) == {
        "ecs:DeleteCluster",
        "ec2:DescribeInstances",
        "dynamodb:DeleteItem",
        "ecs:ListServices",
    }
    with pytest.raises(ValueError, match="no operation for method 'launch_rockets'"):
        iam_actions({("ecs", "launch_rockets")})


@pytest.mark.parametrize(("where", "cluster", "document"), LAMBDA_POLICIES, ids=POLICY_IDS)
def test_lambda_policy_allows_every_call_the_code_makes(where, cluster, document, needed):
    missing = needed - _allowed(document)
    assert not missing, f"{where} lacks {sorted(missing)}: add them in infra/generate.py and regenerate"


@pytest.mark.parametrize(("where", "cluster", "document"), LAMBDA_POLICIES, ids=POLICY_IDS)
def test_lambda_policy_allows_nothing_the_code_does_not_need(where, cluster, document, needed):
    unused = _allowed(document) - needed - LOGS
    assert not unused, f"{where} grants {sorted(unused)}, which no code calls"


@pytest.mark.parametrize(("where", "cluster", "document"), LAMBDA_POLICIES, ids=POLICY_IDS)
def test_wildcards_only_where_aws_offers_nothing_narrower(where, cluster, document):
    for statement in document["Statement"]:
        actions = set(_as_list(statement["Action"]))
        assert not any("*" in action for action in actions), statement["Sid"]
        if "*" in _as_list(statement["Resource"]):
            assert actions <= NO_RESOURCE_LEVEL, f"{statement['Sid']}: {sorted(actions)} on Resource *"
    for statement in _statements_with(document, "ecs:ListTasks"):
        assert _text(statement["Condition"]["ArnEquals"]["ecs:cluster"]).endswith(f":cluster/{cluster}")


@pytest.mark.parametrize(("where", "cluster", "document"), LAMBDA_POLICIES, ids=POLICY_IDS)
def test_ecs_rights_stay_in_the_cluster(where, cluster, document):
    for action in ("ecs:RunTask", "ecs:StopTask", "ecs:DescribeTasks", "ecs:ListTasks", "ecs:TagResource"):
        statements = _statements_with(document, action)
        assert statements, f"{where} does not grant {action}"
        for statement in statements:
            resources = [_text(r) for r in _as_list(statement["Resource"])]
            condition = statement.get("Condition", {}).get("ArnEquals", {}).get("ecs:cluster")
            if action == "ecs:TagResource":
                # Tagging is authorised on the task's ARN, which names its cluster.
                assert all(f":task/{cluster}/" in r for r in resources), resources
                continue
            assert condition is not None and _text(condition).endswith(f":cluster/{cluster}"), statement[
                "Sid"
            ]
            if action == "ecs:RunTask":
                assert all(f":task-definition/{cluster}-" in r for r in resources), resources
            elif action != "ecs:ListTasks":
                assert all(f":task/{cluster}/" in r for r in resources), resources


@pytest.mark.parametrize(("where", "cluster", "document"), LAMBDA_POLICIES, ids=POLICY_IDS)
def test_only_the_task_roles_are_passed_and_only_to_ecs_tasks(where, cluster, document):
    (statement,) = _statements_with(document, "iam:PassRole")
    assert statement["Condition"] == {"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}}
    resources = {_text(r) for r in _as_list(statement["Resource"])}
    if where.startswith("merge-template"):
        assert resources == {"${TaskRole.Arn}", "${TaskExecutionRole.Arn}"}
    else:
        stage = cluster.removeprefix("fargate-ci-")
        assert resources == {f"arn:aws:iam::*:role/fargate-ci/{stage}/*"}


@pytest.mark.parametrize(("where", "cluster", "document"), LAMBDA_POLICIES, ids=POLICY_IDS)
def test_dynamodb_rights_are_on_the_jobs_table_and_its_indexes_only(where, cluster, document):
    for statement in document["Statement"]:
        if any(a.startswith("dynamodb:") for a in _as_list(statement["Action"])):
            resources = sorted(_text(r) for r in _as_list(statement["Resource"]))
            assert [r.split(":", 5)[5] for r in resources] == [
                f"table/{cluster}-jobs",
                f"table/{cluster}-jobs/index/*",
            ]


def _runner_manager_policies() -> list[tuple[str, dict]]:
    merged = json.loads((ROOT / "infra" / "merge-template.json").read_text())
    return [
        (
            "infra/runner-manager-policy.json",
            json.loads((ROOT / "infra" / "runner-manager-policy.json").read_text()),
        ),
        (
            "merge-template RunnerManagerPolicy",
            merged["Resources"]["RunnerManagerPolicy"]["Properties"]["PolicyDocument"],
        ),
    ]


@pytest.mark.parametrize(
    ("where", "document"), _runner_manager_policies(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_runner_manager_may_only_invoke_this_api(where, document):
    assert _allowed(document) == {"execute-api:Invoke"}
    for statement in document["Statement"]:
        assert statement["Effect"] == "Allow" and "Condition" not in statement
        for resource in _as_list(statement["Resource"]):
            api_part = _text(resource).split(":", 5)[5]
            assert api_part.split("/")[0] in ("API_ID", "${RestAPI}"), resource
            assert api_part.split("/")[1] == generate.API_STAGE


def test_runner_manager_can_call_every_route_and_nothing_else():
    from app import app

    document = json.loads((ROOT / "infra" / "runner-manager-policy.json").read_text())
    patterns = [r for s in document["Statement"] for r in _as_list(s["Resource"])]
    prefix = f"arn:aws:execute-api:REGION:ACCOUNT_ID:API_ID/{generate.API_STAGE}/"

    def allowed(method: str, path: str) -> bool:
        return any(fnmatch.fnmatchcase(prefix + method + path, p) for p in patterns)

    # Every route but the tasks' own (a task publishes its host key with its task role).
    routes = [(m, p) for p, methods in app.routes.items() for m in methods if not p.startswith("/tasks/")]
    assert routes, "app.py defines no routes"
    for method, path in routes:
        concrete = path.replace("{job_key}", "t3sT1234-5005")
        assert allowed(method, concrete), f"the runner manager cannot call {method} {path}"
    assert not allowed("PUT", "/jobs/t3sT1234-5005")
    assert not allowed("PUT", "/tasks/0123456789abcdef0123456789abcdef/host-key")
    assert not allowed("POST", "/admin")


def test_the_task_role_may_only_publish_a_host_key():
    role = json.loads((ROOT / "infra" / "template.json").read_text())["Resources"]["TaskRole"]["Properties"]
    [inline] = role["Policies"]
    [statement] = inline["PolicyDocument"]["Statement"]
    assert statement["Action"] == ["execute-api:Invoke"]
    assert _text(statement["Resource"]).endswith(f"/{generate.API_STAGE}/PUT/tasks/*/host-key")


def test_the_scan_sees_calls_on_a_client_made_per_region():
    source = """
class Logins:
    def ecr(self, region):
        return self._client("ecr", region).get_authorization_token(registryIds=["1"])
"""
    assert method_calls(source) == {("ecr", "get_authorization_token")}
    # the registry API's reads that ECR's login is used for
    assert iam_actions(method_calls(source)) == {
        "ecr:GetAuthorizationToken",
        "ecr:BatchGetImage",
        "ecr:GetDownloadUrlForLayer",
    }


@pytest.mark.parametrize(("where", "cluster", "document"), LAMBDA_POLICIES, ids=POLICY_IDS)
def test_registry_lookups_read_ecr_repositories_and_only_the_registry_credentials_secret(
    where, cluster, document
):
    for action in ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"):
        [statement] = _statements_with(document, action)
        assert [_text(r).split(":", 5)[5] for r in _as_list(statement["Resource"])] == ["repository/*"]
    [statement] = _statements_with(document, "secretsmanager:GetSecretValue")
    [resource] = _as_list(statement["Resource"])
    if where.startswith("merge-template"):
        # the stack's parameter, or (none given) a secret name nobody has: never every secret
        condition, given, none = resource["Fn::If"]
        assert condition == "HasRepositoryCredentials" and given == {"Ref": "RepositoryCredentialsSecretArn"}
        assert _text(none).endswith(":secret:fargate-ci-${Stage}-no-repository-credentials")
    else:
        assert resource == f"arn:aws:secretsmanager:*:*:secret:{cluster}-*"
