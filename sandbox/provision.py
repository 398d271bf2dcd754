"""The AWS resources a fresh sandbox account needs, created through moto's own API (boto3)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from chalicelib.schema import TABLE_SCHEMA, TTL_ATTRIBUTE
from sandbox.layout import (
    ACCOUNT_ID,
    AVAILABILITY_ZONES,
    CLUSTER,
    CONTAINER,
    IMAGE,
    LARGE_TASK_FAMILY,
    OTHER_TASK_FAMILY,
    QUEUE,
    RULE,
    STOP_TIMEOUT,
    TABLE,
    TASK_FAMILY,
)

SUBNETS_PER_VPC = 3


@dataclass(frozen=True)
class Provisioned:
    vpc_id: str
    vpc_cidr: str
    subnets: list[str]
    subnet_cidrs: list[str]
    security_group: str
    cluster: str
    cluster_arn: str
    table: str
    queue_url: str
    queue_arn: str
    rule: str
    task_definitions: dict[str, str]
    ca_key_id: str  # the SSH user CA: an ECC_NIST_P256 SIGN_VERIFY key in KMS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def provision(
    session: Any,
    endpoint_url: str,
    network_octet: int,
    ssh_port: int,
    task_env: dict[str, str] | None = None,
) -> Provisioned:
    """Create the VPC, cluster, task definitions, jobs table and the event rule → queue.

    `task_env` goes into every task definition's container environment (after SSH_PORT), as an operator's
    settings for the task image do (e.g. WATCHDOG_IDLE_SECONDS)."""

    def client(name: str) -> Any:
        return session.client(name, endpoint_url=endpoint_url)

    ec2, ecs, dynamodb, sqs, events = (client(n) for n in ("ec2", "ecs", "dynamodb", "sqs", "events"))
    ca_key_id = client("kms").create_key(
        Description="fargate-ci SSH user CA", KeyUsage="SIGN_VERIFY", KeySpec="ECC_NIST_P256"
    )["KeyMetadata"]["KeyId"]

    vpc_cidr = f"127.{network_octet}.0.0/16"
    vpc_id = ec2.create_vpc(CidrBlock=vpc_cidr)["Vpc"]["VpcId"]
    # moto's Fargate RunTask needs DNS hostnames on the task's VPC.
    ec2.modify_vpc_attribute(VpcId=vpc_id, EnableDnsHostnames={"Value": True})
    ec2.modify_vpc_attribute(VpcId=vpc_id, EnableDnsSupport={"Value": True})
    subnet_cidrs = [f"127.{network_octet}.{n}.0/24" for n in range(1, SUBNETS_PER_VPC + 1)]
    subnets = [
        ec2.create_subnet(VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=AVAILABILITY_ZONES[i])["Subnet"][
            "SubnetId"
        ]
        for i, cidr in enumerate(subnet_cidrs)
    ]
    security_group = ec2.create_security_group(
        GroupName="fargate-ci-tasks", Description="CI tasks: SSH from the runner manager", VpcId=vpc_id
    )["GroupId"]
    ec2.authorize_security_group_ingress(
        GroupId=security_group,
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": ssh_port,
                "ToPort": ssh_port,
                "IpRanges": [{"CidrIp": vpc_cidr}],
            }
        ],
    )

    cluster_arn = ecs.create_cluster(
        clusterName=CLUSTER,
        capacityProviders=["FARGATE", "FARGATE_SPOT"],
        defaultCapacityProviderStrategy=[{"capacityProvider": "FARGATE", "weight": 1}],
    )["cluster"]["clusterArn"]
    task_definitions = {
        family: _register(ecs, family, cpu, memory, ssh_port, task_env or {})
        for family, cpu, memory in (
            (TASK_FAMILY, 256, 512),
            (LARGE_TASK_FAMILY, 1024, 2048),
            (OTHER_TASK_FAMILY, 256, 512),
        )
    }

    dynamodb.create_table(TableName=TABLE, **TABLE_SCHEMA)
    dynamodb.update_time_to_live(
        TableName=TABLE, TimeToLiveSpecification={"Enabled": True, "AttributeName": TTL_ATTRIBUTE}
    )

    # A failed handler leaves the message; it comes back after the visibility timeout, as Lambda retries.
    queue_url = sqs.create_queue(QueueName=QUEUE, Attributes={"VisibilityTimeout": "5"})["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    pattern = {
        "source": ["aws.ecs"],
        "detail-type": ["ECS Task State Change"],
        "detail": {"clusterArn": [cluster_arn]},
    }
    events.put_rule(Name=RULE, EventPattern=json.dumps(pattern), State="ENABLED")
    events.put_targets(Rule=RULE, Targets=[{"Id": "task-events", "Arn": queue_arn}])

    return Provisioned(
        vpc_id=vpc_id,
        vpc_cidr=vpc_cidr,
        subnets=subnets,
        subnet_cidrs=subnet_cidrs,
        security_group=security_group,
        cluster=CLUSTER,
        cluster_arn=cluster_arn,
        table=TABLE,
        queue_url=queue_url,
        queue_arn=queue_arn,
        rule=RULE,
        task_definitions=task_definitions,
        ca_key_id=ca_key_id,
    )


def _register(ecs: Any, family: str, cpu: int, memory: int, ssh_port: int, task_env: dict[str, str]) -> str:
    role = f"arn:aws:iam::{ACCOUNT_ID}:role"
    return ecs.register_task_definition(
        family=family,
        networkMode="awsvpc",
        requiresCompatibilities=["FARGATE"],
        cpu=str(cpu),
        memory=str(memory),
        taskRoleArn=f"{role}/fargate-ci-task",
        executionRoleArn=f"{role}/fargate-ci-task-execution",
        containerDefinitions=[
            {
                "name": CONTAINER,
                "image": IMAGE,
                "essential": True,
                "memory": memory,  # moto's Fargate RunTask fails without a per-container memory
                "portMappings": [{"containerPort": ssh_port, "hostPort": ssh_port, "protocol": "tcp"}],
                "environment": [
                    {"name": "SSH_PORT", "value": str(ssh_port)},
                    *({"name": name, "value": value} for name, value in task_env.items()),
                ],
                "stopTimeout": STOP_TIMEOUT,
            }
        ],
    )["taskDefinition"]["taskDefinitionArn"]
