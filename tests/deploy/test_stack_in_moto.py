"""The infrastructure stack, created by moto's CloudFormation: its outputs are a configuration the
orchestrator accepts, its table works with the orchestrator's store, and the `chalice deploy` policy names
the resources it really creates."""

from __future__ import annotations

import fnmatch
import json

import boto3
import pytest
from moto import mock_aws

from chalicelib.jobs import record_key
from chalicelib.schema import LIVE_INDEX, OWNER_INDEX, POOL_INDEX, TABLE_KEY, TASK_INDEX
from chalicelib.settings import load_settings
from chalicelib.store import JobStore
from infra import generate
from tests.deploy.conftest import ROOT

REGION = "eu-west-1"
STAGE = "prod"
STACK = f"fargate-ci-{STAGE}-infra"
IMAGE = f"123456789012.dkr.ecr.{REGION}.amazonaws.com/fargate-ci:1.0.0"


@pytest.fixture(scope="module")
def stack():
    """Create the stack in moto as an operator would, with a VPC, two subnets and a runner manager SG."""
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
            env.delenv(name, raising=False)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", REGION)
        with mock_aws():
            ec2 = boto3.client("ec2", region_name=REGION)
            vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
            subnets = [
                ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.0.{i}.0/24")["Subnet"]["SubnetId"] for i in (1, 2)
            ]
            runner_sg = ec2.create_security_group(GroupName="runner", Description="runner manager", VpcId=vpc)
            parameters = {
                "Stage": STAGE,
                "VpcId": vpc,
                "TaskSubnets": ",".join(subnets),
                "RunnerManagerSecurityGroup": runner_sg["GroupId"],
                "ImageUri": IMAGE,
                "CapacityProviders": "FARGATE_SPOT:3,FARGATE:1",
            }
            cfn = boto3.client("cloudformation", region_name=REGION)
            cfn.create_stack(
                StackName=STACK,
                TemplateBody=(ROOT / "infra" / "template.json").read_text(),
                Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
                Capabilities=["CAPABILITY_IAM"],
            )
            (described,) = cfn.describe_stacks(StackName=STACK)["Stacks"]
            outputs = {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}
            yield {"status": described["StackStatus"], "outputs": outputs, "parameters": parameters}


def test_the_stack_is_created(stack):
    assert stack["status"] == "CREATE_COMPLETE"


def test_its_settings_output_is_a_configuration_the_orchestrator_accepts(stack):
    environment = json.loads(stack["outputs"]["ChaliceEnvironment"])
    settings = load_settings(environment)
    assert settings.cluster == f"fargate-ci-{STAGE}"
    assert settings.table == f"fargate-ci-{STAGE}-jobs"
    assert settings.subnets == tuple(stack["parameters"]["TaskSubnets"].split(","))
    assert settings.security_groups == (stack["outputs"]["TaskSecurityGroupId"],)
    assert settings.default_task_definition == stack["outputs"]["TaskDefinitionFamily"]
    assert [(c.provider, c.weight) for c in settings.capacity_providers] == [
        ("FARGATE_SPOT", 3),
        ("FARGATE", 1),
    ]


def test_the_orchestrators_store_works_on_its_table(stack):
    table = boto3.resource("dynamodb", region_name=REGION).Table(stack["outputs"]["JobsTableName"])
    indexes = {i["IndexName"] for i in table.global_secondary_indexes}
    assert indexes == {LIVE_INDEX, TASK_INDEX, OWNER_INDEX, POOL_INDEX}
    store = JobStore(table)
    key = record_key("arn:aws:iam::123456789012:user/runner-a", "t3sT1234-5005")
    job = {TABLE_KEY: key, "job_key": "t3sT1234-5005", "state": "RUNNING", "live": "1", "deadline": 1}
    job["created_at"] = "2026-12-02T08:00:00.000Z"
    job["task_arn"] = "arn:t"
    assert store.create(job) is None
    assert store.get(key)["job_key"] == "t3sT1234-5005"
    assert store.find_by_task("arn:t")["job_key"] == "t3sT1234-5005"
    assert [j["job_key"] for j in store.live_jobs()[0]] == ["t3sT1234-5005"]
    listed, more = store.jobs_of(key.rsplit("/", 1)[1], limit=10, live=True)
    assert [j["job_key"] for j in listed] == ["t3sT1234-5005"] and more is None


def test_the_task_definition_and_the_ssh_rule(stack):
    ecs = boto3.client("ecs", region_name=REGION)
    task = ecs.describe_task_definition(taskDefinition=stack["outputs"]["TaskDefinitionFamily"])[
        "taskDefinition"
    ]
    (container,) = task["containerDefinitions"]
    assert (container["name"], container["image"]) == ("ci-coordinator", IMAGE)
    # (moto's CloudFormation registers only family, containers and memory; the roles are checked below.)
    ec2 = boto3.client("ec2", region_name=REGION)
    (group,) = ec2.describe_security_groups(GroupIds=[stack["outputs"]["TaskSecurityGroupId"]])[
        "SecurityGroups"
    ]
    (rule,) = group["IpPermissions"]
    assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
    assert [p["GroupId"] for p in rule["UserIdGroupPairs"]] == [
        stack["parameters"]["RunnerManagerSecurityGroup"]
    ]
    assert not rule.get("IpRanges")


def test_the_chalice_deploy_policy_names_what_the_stack_created(stack):
    # The hand-written policy cannot Ref the stack: it relies on the naming convention. Check it holds.
    outputs = stack["outputs"]
    task_definition_arn = boto3.client("ecs", region_name=REGION).describe_task_definition(
        taskDefinition=outputs["TaskDefinitionFamily"]
    )["taskDefinition"]["taskDefinitionArn"]
    table_arn = boto3.client("dynamodb", region_name=REGION).describe_table(
        TableName=outputs["JobsTableName"]
    )["Table"]["TableArn"]
    task_arn = outputs["ClusterArn"].replace(":cluster/", ":task/") + "/0123456789abcdef"
    expected = {
        "ecs:RunTask": [task_definition_arn],
        "ecs:StopTask": [task_arn],
        "ecs:TagResource": [task_arn],
        "iam:PassRole": [outputs["TaskRoleArn"], outputs["TaskExecutionRoleArn"]],
        "dynamodb:Query": [table_arn, f"{table_arn}/index/{LIVE_INDEX}"],
    }
    statements = generate.chalice_policy(STAGE)["Statement"]
    for action, arns in expected.items():
        (statement,) = [s for s in statements if action in s["Action"]]
        for arn in arns:
            assert any(fnmatch.fnmatchcase(arn, pattern) for pattern in statement["Resource"]), (action, arn)
        cluster = statement.get("Condition", {}).get("ArnEquals", {}).get("ecs:cluster")
        if cluster:
            assert fnmatch.fnmatchcase(outputs["ClusterArn"], cluster)
