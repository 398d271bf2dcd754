"""Route tests: the real Chalice app through chalice.test.Client, against moto in-process."""

from __future__ import annotations

import json
import uuid
from types import SimpleNamespace

import boto3
import pytest
from chalice.local import LocalGateway
from chalice.test import Client
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from moto import mock_aws
from moto.ecs.models import ecs_backends
from moto.moto_api import state_manager

from chalicelib import factory
from chalicelib.jobs import record_key
from chalicelib.schema import TABLE_KEY, TABLE_SCHEMA, TTL_ATTRIBUTE
from chalicelib.store import JobStore
from sandbox import moto_dynamodb

REGION = "eu-west-1"
ACCOUNT = "123456789012"  # moto's default account: the API owner's, ours
CLUSTER = "fargate-ci"
TABLE = "fargate-ci-jobs"
OWNER = f"arn:aws:iam::{ACCOUNT}:user/runner-a"
STRANGER = f"arn:aws:iam::{ACCOUNT}:user/runner-b"
# A request's caller, as API Gateway's IAM authoriser puts it into requestContext.identity.userArn: the
# tests name it in this header (absent: OWNER; empty: no identity at all).
CALLER_HEADER = "X-Test-Caller-Arn"
TASK_ROLE = "fargate-ci-task"  # the tasks' role: a task signs as assumed-role/<it>/<task id>


def _task_definition(ecs, family: str) -> None:
    # moto needs memory on each container and awsvpc for Fargate (local-emulation-notes.md).
    ecs.register_task_definition(
        family=family,
        networkMode="awsvpc",
        requiresCompatibilities=["FARGATE"],
        cpu="256",
        memory="512",
        containerDefinitions=[
            {"name": "ci-coordinator", "image": "registry.example/ci:1", "memory": 512, "essential": True}
        ],
    )


@pytest.fixture(scope="module")
def aws_world():
    """moto's AWS for a whole test module: the VPC, cluster, task definitions and table are built once (they
    cost ~1 s); `aws` empties the table and the cluster's tasks before each test."""
    moto_dynamodb.install()  # DynamoDB's per-item atomicity, which moto lacks under threads
    with pytest.MonkeyPatch.context() as env, mock_aws():
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }.items():
            env.setenv(name, value)
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        env.delenv("AWS_PROFILE", raising=False)
        ec2 = boto3.client("ec2", region_name=REGION)
        vpc = ec2.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
        ec2.modify_vpc_attribute(VpcId=vpc, EnableDnsHostnames={"Value": True})
        subnets = [
            ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.9.{i}.0/24")["Subnet"]["SubnetId"] for i in (1, 2)
        ]
        sg = ec2.create_security_group(GroupName="ci-tasks", Description="ci", VpcId=vpc)["GroupId"]
        ecs = boto3.client("ecs", region_name=REGION)
        ecs.create_cluster(clusterName=CLUSTER, capacityProviders=["FARGATE", "FARGATE_SPOT"])
        for family in ("ci-coordinator", "ci-coordinator-large", "ci-other"):
            _task_definition(ecs, family)
        kms = boto3.client("kms", region_name=REGION)
        ca_key = kms.create_key(KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256")["KeyMetadata"]["KeyId"]
        dynamodb = boto3.client("dynamodb", region_name=REGION)
        dynamodb.create_table(TableName=TABLE, **TABLE_SCHEMA)
        dynamodb.update_time_to_live(
            TableName=TABLE, TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE}
        )
        settings = {
            "FARGATE_CLUSTER": CLUSTER,
            "FARGATE_SUBNETS": ",".join(subnets),
            "FARGATE_SECURITY_GROUPS": sg,
            "FARGATE_TASK_DEFINITION": "ci-coordinator",
            "FARGATE_ALLOWED_TASK_DEFINITIONS": "ci-coordinator-large,ci-missing",
            "FARGATE_CAPACITY_PROVIDERS": "FARGATE_SPOT:3,FARGATE:1",
            "JOBS_TABLE": TABLE,
            "JOB_REFRESH_AFTER": "3600",
            "SSH_CA_KMS_KEY_IDS": ca_key,
            "TASK_ROLE_NAME": TASK_ROLE,
            "ORCHESTRATOR_URL": "https://api.example/api",
        }
        for name, value in settings.items():
            env.setenv(name, value)
        yield SimpleNamespace(
            ecs=ecs,
            ec2=ec2,
            dynamodb=dynamodb,
            kms=kms,
            ca_key=ca_key,
            table=boto3.resource("dynamodb").Table(TABLE),
        )
        factory.reset()


@pytest.fixture
def aws(aws_world):
    """A clean world for one test: no job records, no tasks, moto's task progression manual again."""
    _empty(aws_world.table)
    for tasks_of_cluster in ecs_backends[ACCOUNT][REGION].tasks.values():
        tasks_of_cluster.clear()
    # moto starts tasks RUNNING and moves them on with every DescribeTasks unless told otherwise.
    state_manager.set_transition(model_name="ecs::task", transition={"progression": "manual", "times": 10**6})
    factory.reset()
    yield aws_world
    factory.reset()


def _empty(table) -> None:
    keys = [k["AttributeName"] for k in table.key_schema]
    scan: dict = {"ProjectionExpression": ", ".join(f"#k{i}" for i in range(len(keys)))}
    scan["ExpressionAttributeNames"] = {f"#k{i}": k for i, k in enumerate(keys)}
    while True:
        page = table.scan(**scan)
        with table.batch_writer() as batch:
            for item in page["Items"]:
                batch.delete_item(Key=item)
        if "LastEvaluatedKey" not in page:
            return
        scan["ExclusiveStartKey"] = page["LastEvaluatedKey"]


@pytest.fixture
def stops(monkeypatch):
    """Every StopTask the orchestrator sends (still sent to moto)."""
    from chalicelib import ecs

    sent: list[str] = []
    real = ecs.EcsTasks.stop

    def stop(self, task_arn, reason):
        sent.append(task_arn)
        return real(self, task_arn, reason)

    monkeypatch.setattr(ecs.EcsTasks, "stop", stop)
    return sent


class IdentityGateway(LocalGateway):
    """chalice's LocalGateway plus what API Gateway adds for an IAM-authorised caller."""

    def _generate_lambda_event(self, method, path, headers, body):
        event = super()._generate_lambda_event(method, path, headers, body)
        named = {k.lower(): v for k, v in headers.items()}.get(CALLER_HEADER.lower(), OWNER)
        event["requestContext"]["accountId"] = ACCOUNT
        event["requestContext"]["requestId"] = str(uuid.uuid4())  # API Gateway's id of every request
        if named:
            event["requestContext"]["identity"].update(
                {"userArn": named, "accountId": named.split(":")[4], "caller": "AIDAEXAMPLE"}
            )
        return event


@pytest.fixture
def client(aws, tmp_path):
    # An empty project dir: no stage environment from .chalice/config.json overrides the test's.
    with Client(__import__("app").app, project_dir=str(tmp_path)) as c:
        c.http._local_gateway = IdentityGateway(c.http._local_gateway._app_object, c.http._config)
        yield c


def as_caller(arn: str) -> dict:
    """Headers that make a test request come from `arn` ("" for no identity)."""
    return {CALLER_HEADER: arn}


def new_keys() -> tuple[str, str]:
    """A fresh (client public key line, host private key PEM), as the driver makes per job."""
    client = Ed25519PrivateKey.generate().public_key()
    public = client.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    host = (
        Ed25519PrivateKey.generate()
        .private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        .decode()
    )
    return public, host


def job_body(job_id: str = "5005", **overrides) -> dict:
    public, _ = new_keys()
    body = {
        "runner": "t3sT_1234",
        "job_id": job_id,
        "gitlab_url": "https://gitlab.example.com",
        "project_id": "42",
        "project_path": "group/project",
        "pipeline_id": "1001",
        "job_name": "build",
        "ssh_public_key": public,
        "timeout_seconds": 3600,
    }
    body.update(overrides)
    return body


def post(client, body, raw: bytes | None = None):
    payload = raw if raw is not None else json.dumps(body)
    return client.http.post("/jobs", headers={"Content-Type": "application/json"}, body=payload)


def tasks(aws) -> list[str]:
    return aws.ecs.list_tasks(cluster=CLUSTER)["taskArns"]


def table_key(job_key: str, owner: str = OWNER) -> dict:
    """The jobs table's key of `owner`'s record of a job."""
    return {TABLE_KEY: record_key(owner, job_key)}


def record(aws, key: str) -> dict:
    """OWNER's record of a job, read consistently."""
    return aws.table.get_item(Key=table_key(key), ConsistentRead=True)["Item"]


def set_fields(aws, key: str, **fields) -> None:
    """Overwrite fields of OWNER's record of a job (to stage a state the API reached some other way)."""
    names = {f"#f{i}": k for i, k in enumerate(fields)}
    values = {f":v{i}": v for i, v in enumerate(fields.values())}
    aws.table.update_item(
        Key=table_key(key),
        UpdateExpression="SET " + ", ".join(f"#f{i} = :v{i}" for i in range(len(fields))),
        ExpressionAttributeNames=names,
        ExpressionAttributeValues=values,
    )


def delete(client, job_key: str, attempt: object = 1, caller: str | None = None, **body):
    """DELETE /jobs/{job_key} for `attempt` (None: leave it out), as `caller` (default OWNER)."""
    if attempt is not None:
        body["attempt"] = attempt
    headers = {"Content-Type": "application/json", **(as_caller(caller) if caller is not None else {})}
    return client.http.delete(f"/jobs/{job_key}", headers=headers, body=json.dumps(body))


def heartbeat(client, job_key: str, attempt: object = 1, caller: str | None = None, **body):
    """POST /jobs/{job_key}/heartbeat for `attempt` (None: leave it out), as `caller` (default OWNER)."""
    if attempt is not None:
        body["attempt"] = attempt
    headers = {"Content-Type": "application/json", **(as_caller(caller) if caller is not None else {})}
    return client.http.post(f"/jobs/{job_key}/heartbeat", headers=headers, body=json.dumps(body))


def race_after(monkeypatch, event: str, write) -> None:
    """Another writer (a second reaper run, a new attempt, an event handler) lands right after our `event`
    transition: `write` runs once, just after it."""
    real = JobStore.transition
    pending = [write]

    def transition(self, key, change, **guards):
        result = real(self, key, change, **guards)
        if change.event == event and pending:
            pending.pop()()
        return result

    monkeypatch.setattr(JobStore, "transition", transition)
