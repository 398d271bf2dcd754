"""Issue 17: `make deploy STAGE=... IMAGE=... DRY_RUN=1` runs everything up to the AWS calls: it packages the
app, writes the packaged template and the change set's parameters, and prints the outputs a deploy prints.
No AWS call is made (the environment has no credentials, and every endpoint is a closed port). The pieces
an actual deploy adds (the update's parameters, the package's S3 key) are checked on their own."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from botocore.stub import ANY

from infra import deploy, generate
from tests.deploy.conftest import ROOT

IMAGE = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/fargate-ci:1.4.0"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _make(*variables: str, out: Path) -> subprocess.CompletedProcess:
    # No credentials and a dead endpoint: an AWS call would fail the run. `-o` keeps make from reinstalling.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{_closed_port()}",
        AWS_SHARED_CREDENTIALS_FILE="/nonexistent",
        AWS_CONFIG_FILE="/nonexistent",
    )
    env.pop("MAKEFLAGS", None)
    return subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", "deploy", *variables, f"OUT={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _checkout_state() -> str:
    return subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=all", ".chalice", "infra"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    before = _checkout_state()
    result = _make(
        "STAGE=qa",
        f"IMAGE={IMAGE}",
        "DRY_RUN=1",
        "BUILD=1",
        "PARAMS=VpcId=vpc-0123456789abcdef0 TaskSubnets=subnet-a,subnet-b "
        "RunnerManagerSecurityGroup=sg-01234567",
        out=out,
    )
    return result, out / "qa", before


def test_the_dry_run_prints_what_the_operator_copies_next(dry_run):
    result, _, _ = dry_run
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-5:] == [
        "[Orchestrator]",
        'URL = "https://API_ID.execute-api.eu-west-1.amazonaws.com/api/"',
        'Region = "eu-west-1"',  # from the image's ECR registry: nothing else named one
        "",
        "Attach to the runner manager's role: "
        "arn:aws:iam::ACCOUNT_ID:policy/fargate-ci-qa-RunnerManagerPolicy-ID",
    ], result.stdout
    assert "dry run: would deploy stack fargate-ci-qa in eu-west-1" in result.stderr
    # BUILD=1 in a dry run: the image commands are shown, not run.
    assert f"+ docker buildx build --platform linux/amd64 -t {IMAGE} --push" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_packaged_template_points_every_function_at_the_uploaded_package(dry_run):
    result, directory, _ = dry_run
    assert result.returncode == 0, result.stderr
    packaged = json.loads((directory / "packaged.json").read_text())
    archive = directory / "package" / "deployment.zip"
    key = f"fargate-ci-qa/{hashlib.sha256(archive.read_bytes()).hexdigest()}.zip"
    functions = {n: r for n, r in packaged["Resources"].items() if r["Type"] == "AWS::Serverless::Function"}
    assert set(functions) == set(generate.CHALICE_FUNCTIONS)
    for resource in functions.values():
        assert resource["Properties"]["CodeUri"] == f"s3://fargate-ci-artifacts-ACCOUNT_ID-eu-west-1/{key}"
    assert f"would upload {archive} to s3://fargate-ci-artifacts-ACCOUNT_ID-eu-west-1/{key}" in result.stderr
    # The whole system: the merge template's resources and outputs are in it.
    assert {"JobsTable", "Cluster", "TasksReapedAlarm", "Dashboard", "RunnerManagerPolicy"} <= set(
        packaged["Resources"]
    )
    assert {"EndpointURL", "RunnerManagerPolicyArn"} <= set(packaged["Outputs"])
    assert packaged["Transform"] == "AWS::Serverless-2016-10-31"
    policy = json.loads((directory / "project" / ".chalice" / "policy-qa.json").read_text())
    assert policy == generate.chalice_policy("qa")


def test_the_change_sets_parameters_are_the_ones_given(dry_run):
    _, directory, _ = dry_run
    parameters = json.loads((directory / "parameters.json").read_text())
    assert {p["ParameterKey"]: p["ParameterValue"] for p in parameters} == {
        "Stage": "qa",
        "ImageUri": IMAGE,
        "VpcId": "vpc-0123456789abcdef0",
        "TaskSubnets": "subnet-a,subnet-b",
        "RunnerManagerSecurityGroup": "sg-01234567",
    }


def test_the_dry_run_leaves_the_checkout_as_it_was(dry_run):
    _, _, before = dry_run
    assert _checkout_state() == before


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (["STAGE=Prod!", f"IMAGE={IMAGE}"], "STAGE 'Prod!'"),
        (["STAGE=qa", "IMAGE=not an image"], "is not an image URI"),
        (["STAGE=qa", "IMAGE=registry.example.com/ci:1"], "no AWS region"),
        (
            ["STAGE=qa", f"IMAGE={IMAGE}", "PARAMS=Vpc=vpc-1"],
            "--parameter Vpc: the stack has no such parameter",
        ),
        (["STAGE=qa", f"IMAGE={IMAGE}", "PARAMS=Stage=prod"], "--parameter Stage: given by STAGE"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, variables, message):
    result = _make(*variables, "DRY_RUN=1", out=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.iterdir())  # nothing packaged


def test_make_deploy_without_stage_or_image_says_how():
    result = subprocess.run(
        ["make", "-s", "-o", ".venv/.installed", "deploy"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and result.stderr.startswith("usage: make deploy STAGE=<stage> IMAGE=")


def test_an_update_keeps_every_parameter_it_is_not_given():
    plan = deploy.Plan(
        stage="prod", image=IMAGE, region="eu-west-1", parameters={"Stage": "prod", "ImageUri": IMAGE}
    )
    template = {"Parameters": {"Stage": {}, "ImageUri": {}, "VpcId": {}, "AlarmTopicArn": {}, "New": {}}}
    update = deploy.stack_parameters(plan, template, existing={"Stage", "ImageUri", "VpcId", "AlarmTopicArn"})
    assert update == [
        {"ParameterKey": "ImageUri", "ParameterValue": IMAGE},
        {"ParameterKey": "Stage", "ParameterValue": "prod"},
        {"ParameterKey": "AlarmTopicArn", "UsePreviousValue": True},
        {"ParameterKey": "VpcId", "UsePreviousValue": True},
    ]  # "New" (a parameter this version added) takes its default
    assert deploy.stack_parameters(plan, template, existing=None) == update[:2]


def test_the_lines_printed_after_a_deploy_are_the_stacks_outputs():
    lines = deploy.orchestrator_lines(
        {
            "EndpointURL": "https://abc.execute-api.eu-west-1.amazonaws.com/api/",
            "RunnerManagerPolicyArn": "arn:p",
        },
        "eu-west-1",
    )
    assert 'URL = "https://abc.execute-api.eu-west-1.amazonaws.com/api/"' in lines
    assert lines[-1] == "Attach to the runner manager's role: arn:p"


# --- the AWS part of a real deploy, against botocore's Stubber (the calls and their parameters) ----------

URL = "https://fargate-ci-artifacts-123456789012-eu-west-1.s3.eu-west-1.amazonaws.com/fargate-ci-prod/t.json"
NOW = datetime(2026, 12, 2, tzinfo=UTC)


@pytest.fixture
def cfn():
    import boto3
    from botocore.stub import Stubber

    client = boto3.client(
        "cloudformation", region_name="eu-west-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    with Stubber(client) as stubber:
        yield client, stubber
        stubber.assert_no_pending_responses()


def _plan() -> deploy.Plan:
    return deploy.Plan(
        stage="prod", image=IMAGE, region="eu-west-1", parameters={"Stage": "prod", "ImageUri": IMAGE}
    )


def _stack(status: str, **extra) -> dict:
    return {"Stacks": [{"StackName": "fargate-ci-prod", "CreationTime": NOW, "StackStatus": status, **extra}]}


OUTPUTS = [
    {"OutputKey": "EndpointURL", "OutputValue": "https://abc.execute-api.eu-west-1.amazonaws.com/api/"},
    {"OutputKey": "RunnerManagerPolicyArn", "OutputValue": "arn:aws:iam::123456789012:policy/p"},
]


def test_a_first_deploy_creates_the_stack_through_a_change_set(cfn):
    client, stubber = cfn
    plan = _plan()
    stubber.add_client_error(
        "describe_stacks", "ValidationError", "Stack with id fargate-ci-prod does not exist"
    )
    stubber.add_response(
        "create_change_set",
        {"Id": "arn:cs", "StackId": "arn:stack"},
        {
            "StackName": "fargate-ci-prod",
            "ChangeSetName": ANY,
            "ChangeSetType": "CREATE",
            "TemplateURL": URL,
            "Parameters": [
                {"ParameterKey": "ImageUri", "ParameterValue": IMAGE},
                {"ParameterKey": "Stage", "ParameterValue": "prod"},
            ],
            "Capabilities": ["CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"],
        },
    )
    stubber.add_response("describe_change_set", {"Status": "CREATE_COMPLETE"})
    stubber.add_response("execute_change_set", {})
    stubber.add_response("describe_stacks", _stack("CREATE_COMPLETE"))
    stubber.add_response("describe_stacks", _stack("CREATE_COMPLETE", Outputs=OUTPUTS))

    outputs = deploy.deploy_stack(
        client, plan, URL, lambda existing: deploy.stack_parameters(plan, {}, existing=existing)
    )

    assert outputs["EndpointURL"] == "https://abc.execute-api.eu-west-1.amazonaws.com/api/"


def test_an_upgrade_without_changes_says_so_and_prints_the_outputs(cfn, capsys):
    client, stubber = cfn
    plan = _plan()
    template = {"Parameters": {"Stage": {}, "ImageUri": {}, "VpcId": {}}}
    stubber.add_response(
        "describe_stacks",
        _stack("UPDATE_COMPLETE", Parameters=[{"ParameterKey": k} for k in ("Stage", "ImageUri", "VpcId")]),
    )
    stubber.add_response(
        "create_change_set",
        {"Id": "arn:cs"},
        {
            "StackName": "fargate-ci-prod",
            "ChangeSetName": ANY,
            "ChangeSetType": "UPDATE",
            "TemplateURL": URL,
            "Parameters": [
                {"ParameterKey": "ImageUri", "ParameterValue": IMAGE},
                {"ParameterKey": "Stage", "ParameterValue": "prod"},
                {"ParameterKey": "VpcId", "UsePreviousValue": True},
            ],
            "Capabilities": ANY,
        },
    )
    reason = (  # CloudFormation's words for an update that changes nothing
        "The submitted information didn't contain changes. "
        "Submit different information to create a change set."
    )
    stubber.add_response("describe_change_set", {"Status": "FAILED", "StatusReason": reason})
    stubber.add_response("describe_change_set", {"Status": "FAILED", "StatusReason": reason})
    stubber.add_response("describe_stacks", _stack("UPDATE_COMPLETE", Outputs=OUTPUTS))

    outputs = deploy.deploy_stack(
        client, plan, URL, lambda existing: deploy.stack_parameters(plan, template, existing=existing)
    )

    assert outputs["RunnerManagerPolicyArn"] == "arn:aws:iam::123456789012:policy/p"
    assert "no changes to deploy" in capsys.readouterr().err


def test_a_change_set_that_fails_for_another_reason_is_a_clear_error(cfn):
    client, stubber = cfn
    plan = _plan()
    stubber.add_client_error("describe_stacks", "ValidationError", "does not exist")
    stubber.add_response("create_change_set", {"Id": "arn:cs"})
    reason = "Template format error: Unresolved resource dependencies [Nope] in the Resources block"
    stubber.add_response("describe_change_set", {"Status": "FAILED", "StatusReason": reason})
    stubber.add_response("describe_change_set", {"Status": "FAILED", "StatusReason": reason})
    with pytest.raises(deploy.DeployError, match=r"change set deploy-\w+: Template format error"):
        deploy.deploy_stack(client, plan, URL, lambda existing: [])
