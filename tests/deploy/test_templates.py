"""The CloudFormation: generated from one source, lint-clean alone and merged into Chalice's package, its
table the code's table, its resources wired into the Lambdas' settings."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from chalicelib.schema import TABLE_SCHEMA, TTL_ATTRIBUTE
from infra import generate
from tests.deploy.conftest import ROOT, tool

TEMPLATES = {
    "template.json": ROOT / "infra" / "template.json",
    "merge-template.json": ROOT / "infra" / "merge-template.json",
}


def _cfn_lint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("cfn-lint"), str(path)], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> tuple[Path, dict]:
    """`chalice package --merge-template`: the whole system as one SAM template (no AWS credentials)."""
    out = tmp_path_factory.mktemp("package")
    path = _chalice_package(ROOT, out, "--merge-template", "infra/merge-template.json")
    return path, json.loads(path.read_text())


def _chalice_package(project: Path, out: Path, *options: str, **env: str) -> Path:
    """`chalice package --stage dev` of `project` into `out` (no AWS credentials); the SAM template's path."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    environ.update(AWS_DEFAULT_REGION="eu-west-1", **env)
    result = subprocess.run(
        [tool("chalice"), "package", "--stage", "dev", "--pkg-format", "cloudformation", *options, str(out)],
        cwd=project,
        env=environ,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"chalice package failed:\n{result.stdout}\n{result.stderr}"
    return out / "sam.json"


def test_generated_files_are_up_to_date():
    assert generate.main(["--check"]) == 0, "run `python -m infra.generate` and commit the result"


@pytest.mark.parametrize("name", TEMPLATES)
def test_jobs_table_is_the_one_the_code_describes(name):
    table = json.loads(TEMPLATES[name].read_text())["Resources"]["JobsTable"]["Properties"]
    for key, value in TABLE_SCHEMA.items():
        assert table[key] == value, f"{name}: JobsTable {key} differs from chalicelib.schema"
    assert table["TimeToLiveSpecification"] == {"AttributeName": TTL_ATTRIBUTE, "Enabled": True}


def test_infra_template_alone_passes_cfn_lint():
    result = _cfn_lint(TEMPLATES["template.json"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_merged_template_passes_cfn_lint(merged):
    path, _ = merged
    result = _cfn_lint(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_catches_a_broken_merged_template(merged, tmp_path):
    # The lint is worth running only if it fails on a mistake of the kind a template edit makes.
    _, template = merged
    broken = json.loads(json.dumps(template))
    broken["Resources"]["TaskDefinition"]["Properties"]["NetworkMode"] = "bridged"
    path = tmp_path / "sam.json"
    path.write_text(json.dumps(broken))
    result = _cfn_lint(path)
    assert result.returncode != 0 and "'bridged'" in result.stdout


def test_merge_adds_to_resources_chalice_creates(merged):
    # A merge entry naming a resource Chalice does not create would leave a resource without a Type.
    _, template = merged
    untyped = [name for name, resource in template["Resources"].items() if "Type" not in resource]
    assert not untyped, f"merge-template.json names resources chalice package did not create: {untyped}"


def _functions(template: dict) -> dict[str, dict]:
    return {n: r for n, r in template["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}


def test_every_function_reads_its_settings_from_the_stack(merged):
    _, template = merged
    functions = _functions(template)
    assert set(functions) == set(generate.CHALICE_FUNCTIONS)
    for name, function in functions.items():
        variables = function["Properties"]["Environment"]["Variables"]
        for setting, value in generate.orchestrator_settings().items():
            assert variables[setting] == value, f"{name}: {setting}"
        assert variables["JOBS_TABLE"] == {"Ref": "JobsTable"}
        assert variables["FARGATE_CLUSTER"] == {"Ref": "Cluster"}


def test_every_function_runs_with_the_orchestrator_policy(merged):
    _, template = merged
    expected = json.loads((ROOT / "infra" / "merge-template.json").read_text())["Resources"]
    for name, function in _functions(template).items():
        role = function["Properties"]["Role"]["Fn::GetAtt"][0]
        policies = template["Resources"][role]["Properties"]["Policies"]
        assert policies == expected[role]["Properties"]["Policies"], name


def test_only_our_clusters_task_events_reach_the_handler(merged):
    _, template = merged
    events = template["Resources"][generate.EVENT_FUNCTION]["Properties"]["Events"]
    pattern = events[generate.EVENT_NAME]["Properties"]["Pattern"]
    assert pattern["source"] == ["aws.ecs"]
    assert pattern["detail-type"] == ["ECS Task State Change"]
    assert pattern["detail"] == {"clusterArn": [{"Fn::GetAtt": ["Cluster", "Arn"]}]}


def test_wired_settings_are_the_designs_and_the_codes():
    design = (ROOT / "docs" / "design.md").read_text()
    section = design.split("## Orchestrator settings", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", section))
    code = (ROOT / "chalicelib" / "settings.py").read_text()
    for setting in generate.orchestrator_settings():
        assert setting in documented, f"{setting} is not an orchestrator setting in design.md"
        assert f'"{setting}"' in code, f"chalicelib/settings.py does not read {setting}"


def test_settings_output_lists_every_wired_setting():
    output = json.loads(TEMPLATES["template.json"].read_text())["Outputs"]["ChaliceEnvironment"]["Value"]
    text, variables = output["Fn::Sub"]
    listed = json.loads(text)
    assert set(listed) == set(generate.orchestrator_settings())
    for setting, placeholder in listed.items():
        assert variables[placeholder[2:-1]] == generate.orchestrator_settings()[setting]


def test_task_definition_runs_the_container_the_orchestrator_addresses():
    resources = json.loads(TEMPLATES["template.json"].read_text())["Resources"]
    task = resources["TaskDefinition"]["Properties"]
    (container,) = task["ContainerDefinitions"]
    assert container["Name"] == generate.orchestrator_settings()["FARGATE_CONTAINER_NAME"] == "ci-coordinator"
    assert container["PortMappings"] == [{"ContainerPort": 22, "Protocol": "tcp"}]
    assert container["LogConfiguration"]["LogDriver"] == "awslogs"
    assert container["StopTimeout"] <= 120  # Fargate Spot's warning is two minutes
    assert task["NetworkMode"] == "awsvpc" and task["RequiresCompatibilities"] == ["FARGATE"]
    # The default task definition is one the orchestrator's RunTask permission covers.
    assert task["Family"]["Fn::Sub"].startswith(generate.NAME + "-")
    assert resources["Cluster"]["Properties"]["CapacityProviders"] == ["FARGATE", "FARGATE_SPOT"]
    for rule in ("SshFromRunnerManagerCidr", "SshFromRunnerManagerSecurityGroup"):
        ingress = resources[rule]["Properties"]
        assert (ingress["IpProtocol"], ingress["FromPort"], ingress["ToPort"]) == ("tcp", 22, 22)


def test_chalice_deploy_stage_names_the_stacks_resources():
    # `chalice deploy --stage dev` runs with policy-dev.json, which names the dev stack's resources: the
    # stage's settings must name the same ones (the ChaliceEnvironment output prints them).
    config = json.loads((ROOT / ".chalice" / "config.json").read_text())
    stage = config["stages"]["dev"]
    assert stage.get("iam_policy_file") == "policy-dev.json"
    assert stage.get("autogen_policy", config.get("autogen_policy")) is False  # the stage wins in Chalice
    settings = {**config.get("environment_variables", {}), **stage.get("environment_variables", {})}
    assert settings.get("FARGATE_CLUSTER") == "fargate-ci-dev"
    assert settings.get("JOBS_TABLE") == "fargate-ci-dev-jobs"
    assert settings.get("FARGATE_TASK_DEFINITION") == "fargate-ci-dev-coordinator"


# API Gateway ends every REST integration at 29 s (aws-and-peers.md): an API Lambda allowed longer would
# keep working on a request whose caller already got a 504.
API_GATEWAY_LIMIT_SECONDS = 29


def test_api_lambda_ends_before_api_gateway_gives_up(merged):
    _, template = merged
    functions = _functions(template)
    assert functions["APIHandler"]["Properties"]["Timeout"] < API_GATEWAY_LIMIT_SECONDS
    # The event handler and the reaper are not behind API Gateway: they keep the longer default.
    assert functions["Reaper"]["Properties"]["Timeout"] >= 60


def test_api_is_a_regional_endpoint(merged):
    # EDGE puts CloudFront in front of runner managers that sit in the same region, and cannot raise the
    # 29 s integration limit; REGIONAL can.
    _, template = merged
    (api,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::Serverless::Api"]
    assert api["Properties"]["EndpointConfiguration"] == "REGIONAL"


def test_reaper_schedule_follows_the_stage_setting_not_the_packaging_shell(tmp_path):
    # Chalice builds the schedule while it imports app.py; the stage's REAPER_RATE_MINUTES must win over
    # whatever the shell running `chalice package` happens to export.
    project = tmp_path / "project"
    files = subprocess.run(
        ["git", "ls-files", "app.py", "chalicelib", ".chalice", "requirements.txt"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_bytes((ROOT / name).read_bytes())
    config_path = project / ".chalice" / "config.json"
    config = json.loads(config_path.read_text())
    config["stages"]["dev"]["environment_variables"]["REAPER_RATE_MINUTES"] = "2"
    config_path.write_text(json.dumps(config))
    # The shell exports another rate than the stage's.
    template = json.loads(_chalice_package(project, tmp_path / "out", REAPER_RATE_MINUTES="7").read_text())
    schedules = [
        event["Properties"]["Schedule"]
        for event in template["Resources"]["Reaper"]["Properties"]["Events"].values()
    ]
    assert schedules == ["rate(2 minutes)"]
