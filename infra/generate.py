"""Writes the deploy artefacts from one source, so they cannot drift apart.

    python -m infra.generate            # rewrite them
    python -m infra.generate --check    # exit 1 if a checked-in file is stale (the tests run this)

What it writes:
- `infra/template.json`: the stack Chalice does not create (jobs table, cluster, task definition, roles,
  log group, security group). Deploy it alone, then `chalice deploy --stage <stage>` with the settings its
  `ChaliceEnvironment` output prints.
- `infra/merge-template.json`: the same resources plus what wires them into Chalice's functions (settings,
  least-privilege roles, the event rule's cluster filter, the runner manager's policy). Use it with
  `chalice package --merge-template infra/merge-template.json OUT` to get one template for the whole system.
- `.chalice/policy-<stage>.json`: the Lambdas' policy for `chalice deploy` (`autogen_policy: false`).
- `infra/runner-manager-policy.json`: what the runner manager needs: invoking this API, nothing else.

The jobs table comes from `chalicelib.schema`, the code's own description of it. Every name derives from
the stage (`fargate-ci-<stage>...`), which is what lets the hand-written Chalice policy name its resources.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

from chalicelib.schema import TABLE_SCHEMA, TTL_ATTRIBUTE

ROOT = Path(__file__).resolve().parent.parent
APP = "fargate-ci"  # Chalice's app_name: the Lambdas are fargate-ci-<stage>[-<function>]
CONTAINER = "ci-coordinator"
SSH_PORT = 22
API_STAGE = "api"  # Chalice's api_gateway_stage

# `chalice package` names the app's resources after its handlers (app.py); the merge template adds to them.
CHALICE_FUNCTIONS = ("APIHandler", "OnTaskStateChange", "Reaper")
CHALICE_ROLES = ("ApiHandlerRole", "OnTaskStateChangeRole", "ReaperRole")
EVENT_FUNCTION, EVENT_NAME = "OnTaskStateChange", "OnTaskStateChangeEvent"
SCHEDULE_FUNCTION, SCHEDULE_NAME = "Reaper", "ReaperEvent"

# Names, as CloudFormation Fn::Sub strings. `${Stage}` is the template's parameter.
NAME = APP + "-${Stage}"
TABLE_NAME = NAME + "-jobs"
TASK_FAMILY = NAME + "-coordinator"
ROLE_PATH = f"/{APP}/${{Stage}}/"
TASK_LOG_GROUP = f"/{APP}/${{Stage}}/tasks"
ARN = "arn:${AWS::Partition}:%s:${AWS::Region}:${AWS::AccountId}:%s"
CLUSTER_ARN = ARN % ("ecs", "cluster/" + NAME)

# The private registries' secret: the stack's parameter (none: a secret name nobody has), or, in the
# Chalice policy file, the secrets named `fargate-ci-<stage>-*` (operators-guide "Private registries").
REPOSITORY_CREDENTIALS = "${RepositoryCredentialsSecret}"

# Task sizes Fargate accepts for the task definition's default (per-job overrides are checked by the code).
TASK_CPUS = ["256", "512", "1024", "2048", "4096", "8192", "16384"]
CAPACITY_SHARE = "(FARGATE|FARGATE_SPOT)(:[0-9]+){0,2}"  # PROVIDER[:WEIGHT[:BASE]]
LOG_RETENTION_DAYS = [1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557]


def sub(text: str) -> dict:
    return {"Fn::Sub": text}


def ref(name: str) -> dict:
    return {"Ref": name}


def get_att(resource: str, attribute: str) -> dict:
    return {"Fn::GetAtt": [resource, attribute]}


def lambda_statements() -> list[dict]:
    """The orchestrator's permissions, with `${...}` placeholders that `render` fills per flavour.

    Each action is one the code calls (tests/deploy checks both directions) or one AWS requires for it:
    RunTask with tags needs TagResource, and a task definition with roles needs PassRole for them.
    """
    return [
        {
            "Sid": "StartTasksFromOurTaskDefinitionsInOurCluster",
            "Effect": "Allow",
            "Action": ["ecs:RunTask"],
            # Ours, per-job ones registered from them included (`<family>-job-<hash>`, chalicelib.taskdefs).
            "Resource": [ARN % ("ecs", f"task-definition/{NAME}-*")],
            "Condition": {"ArnEquals": {"ecs:cluster": CLUSTER_ARN}},
        },
        {
            # Per-job images (design.md "Per-job images"): the default task definition is their base. ECS's
            # service authorization reference lists no resource type for these three actions. Registering
            # one that names the task roles passes them (PassTaskRolesToEcsOnly below).
            "Sid": "PerJobTaskDefinitions",
            "Effect": "Allow",
            "Action": [
                "ecs:DescribeTaskDefinition",
                "ecs:RegisterTaskDefinition",
                "ecs:DeregisterTaskDefinition",
            ],
            "Resource": ["*"],
        },
        {
            "Sid": "ManageTasksInOurCluster",
            "Effect": "Allow",
            "Action": ["ecs:StopTask", "ecs:DescribeTasks"],
            "Resource": [ARN % ("ecs", f"task/{NAME}/*")],
            "Condition": {"ArnEquals": {"ecs:cluster": CLUSTER_ARN}},
        },
        {
            # Tagging on create (RunTask's tags, propagateTags): the task ARN names the cluster.
            "Sid": "TagTasksInOurCluster",
            "Effect": "Allow",
            "Action": ["ecs:TagResource"],
            "Resource": [ARN % ("ecs", f"task/{NAME}/*")],
        },
        {
            # ListTasks authorises against container instances, which Fargate has none of: scope by cluster.
            "Sid": "ListTasksInOurCluster",
            "Effect": "Allow",
            "Action": ["ecs:ListTasks"],
            "Resource": ["*"],
            "Condition": {"ArnEquals": {"ecs:cluster": CLUSTER_ARN}},
        },
        {
            # The public-IP lookup; DescribeNetworkInterfaces has no resource-level permissions.
            "Sid": "FindTaskPublicAddress",
            "Effect": "Allow",
            "Action": ["ec2:DescribeNetworkInterfaces"],
            "Resource": ["*"],
        },
        {
            "Sid": "PassTaskRolesToEcsOnly",
            "Effect": "Allow",
            "Action": ["iam:PassRole"],
            "Resource": ["${TaskRole.Arn}", "${TaskExecutionRole.Arn}"],
            "Condition": {"StringEquals": {"iam:PassedToService": "ecs-tasks.amazonaws.com"}},
        },
        {
            "Sid": "JobsTable",
            "Effect": "Allow",
            "Action": [
                "dynamodb:GetItem",
                "dynamodb:PutItem",
                "dynamodb:UpdateItem",
                "dynamodb:Query",
                "dynamodb:DeleteItem",  # a per-job task definition's record, when it is deregistered
            ],
            "Resource": [
                ARN % ("dynamodb", f"table/{TABLE_NAME}"),
                ARN % ("dynamodb", f"table/{TABLE_NAME}/index/*"),
            ],
        },
        {
            # Service images' EXPOSEd ports (chalicelib/registry.py), read once per per-job task definition:
            # ECR's registry login has no resource-level permissions; reading a manifest and a config blob
            # over ECR's registry API is authorised as these two, on the repository (as for the tasks' pull).
            "Sid": "LogInToEcr",
            "Effect": "Allow",
            "Action": ["ecr:GetAuthorizationToken"],
            "Resource": ["*"],
        },
        {
            "Sid": "ReadServiceImageConfigsFromEcr",
            "Effect": "Allow",
            "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"],
            "Resource": [ARN % ("ecr", "repository/*")],
        },
        {
            # The private registries' login (FARGATE_REPOSITORY_CREDENTIALS), for the same lookups.
            "Sid": "ReadTheRegistryCredentials",
            "Effect": "Allow",
            "Action": ["secretsmanager:GetSecretValue"],
            "Resource": [REPOSITORY_CREDENTIALS],
        },
        {
            # The SSH user CA: sign job certificates and read its public half; the private key stays in KMS.
            "Sid": "SignWithTheSshUserCa",
            "Effect": "Allow",
            "Action": ["kms:GetPublicKey", "kms:Sign"],
            "Resource": ["${SshUserCaKey.Arn}"],
        },
        {
            "Sid": "OwnLogs",
            "Effect": "Allow",
            "Action": ["logs:CreateLogGroup", "logs:CreateLogStream", "logs:PutLogEvents"],
            "Resource": [ARN % ("logs", "log-group:${LambdaLogGroupPrefix}*")],
        },
    ]


def runner_manager_statements() -> list[dict]:
    """The runner manager calls the API (SigV4) and nothing else: no ECS, no DynamoDB."""
    # GET/jobs: `fargate-driver status` (the list is owner-scoped: a caller sees only its own jobs).
    routes = ["GET/health", "POST/jobs", "GET/jobs", "GET/jobs/*", "DELETE/jobs/*", "POST/jobs/*/heartbeat"]
    return [
        {
            "Sid": "CallTheOrchestratorApi",
            "Effect": "Allow",
            "Action": ["execute-api:Invoke"],
            "Resource": [ARN % ("execute-api", f"${{RestAPI}}/{API_STAGE}/{route}") for route in routes],
        }
    ]


def render(value: Any, replacements: dict[str, str], *, as_sub: bool) -> Any:
    """Fill placeholders in every string; wrap those still holding `${...}` in Fn::Sub if `as_sub`."""
    if isinstance(value, dict):
        return {k: render(v, replacements, as_sub=as_sub) for k, v in value.items()}
    if isinstance(value, list):
        rendered = [render(v, replacements, as_sub=as_sub) for v in value]
        return list(dict.fromkeys(rendered)) if all(isinstance(v, str) for v in rendered) else rendered
    if isinstance(value, str):
        for placeholder, replacement in replacements.items():
            value = value.replace(placeholder, replacement)
        return sub(value) if as_sub and "${" in value else value
    return value


def literal_replacements(stage: str) -> dict[str, str]:
    """For a policy file outside CloudFormation: names from the stage, any region and account."""
    return {
        "${AWS::Partition}": "aws",
        "${AWS::Region}": "*",
        "${AWS::AccountId}": "*",
        "${Stage}": stage,
        # The template puts both task roles under the stage's path; their names are CloudFormation's.
        "${TaskRole.Arn}": f"arn:aws:iam::*:role{ROLE_PATH.replace('${Stage}', stage)}*",
        "${TaskExecutionRole.Arn}": f"arn:aws:iam::*:role{ROLE_PATH.replace('${Stage}', stage)}*",
        "${LambdaLogGroupPrefix}": f"/aws/lambda/{APP}-{stage}",
        # The CA key's id is KMS's: the stack's key is tagged with the stage, which the policy cannot name.
        "${SshUserCaKey.Arn}": "arn:aws:kms:*:*:key/*",
        REPOSITORY_CREDENTIALS: f"arn:aws:secretsmanager:*:*:secret:{APP}-{stage}-*",
    }


def policy(statements: list[dict], replacements: dict[str, str], *, as_sub: bool) -> dict:
    return {"Version": "2012-10-17", "Statement": render(statements, replacements, as_sub=as_sub)}


def chalice_policy(stage: str) -> dict:
    return policy(lambda_statements(), literal_replacements(stage), as_sub=False)


def runner_manager_policy_document() -> dict:
    """The documented runner manager policy: replace REGION, ACCOUNT_ID and API_ID with your values."""
    placeholders = {
        "${AWS::Partition}": "aws",
        "${AWS::Region}": "REGION",
        "${AWS::AccountId}": "ACCOUNT_ID",
        "${RestAPI}": "API_ID",
    }
    return policy(runner_manager_statements(), placeholders, as_sub=False)


def orchestrator_settings() -> dict[str, Any]:
    """The Lambda settings (design.md "Orchestrator settings") that come from this stack's resources."""
    return {
        "FARGATE_CLUSTER": ref("Cluster"),
        "FARGATE_SUBNETS": {"Fn::Join": [",", ref("TaskSubnets")]},
        "FARGATE_SECURITY_GROUPS": get_att("TaskSecurityGroup", "GroupId"),
        # The family: ECS runs its latest ACTIVE revision, and the allowlist admits any of its revisions.
        "FARGATE_TASK_DEFINITION": sub(TASK_FAMILY),
        "FARGATE_ALLOWED_TASK_DEFINITIONS": ref("AllowedTaskDefinitions"),
        "FARGATE_CONTAINER_NAME": CONTAINER,
        "FARGATE_ASSIGN_PUBLIC_IP": ref("AssignPublicIp"),
        "FARGATE_ADDRESS": ref("SshAddress"),
        "FARGATE_CAPACITY_PROVIDERS": ref("CapacityProviders"),
        "FARGATE_ALLOWED_IMAGES": ref("AllowedImages"),
        "FARGATE_REPOSITORY_CREDENTIALS": ref("RepositoryCredentialsSecretArn"),
        "JOBS_TABLE": ref("JobsTable"),
        "TASK_ROLE_NAME": ref("TaskRole"),  # a role's Ref is its name
        "SSH_CA_KMS_KEY_IDS": get_att("SshUserCaKey", "Arn"),
    }


def parameters() -> dict:
    return {
        "Stage": {
            "Type": "String",
            "Default": "dev",
            "AllowedPattern": "^[a-z][a-z0-9-]{0,19}$",
            "Description": "The Chalice stage; every name derives from it (fargate-ci-<stage>...)",
        },
        "VpcId": {"Type": "AWS::EC2::VPC::Id", "Description": "The VPC the tasks run in"},
        "TaskSubnets": {
            "Type": "List<AWS::EC2::Subnet::Id>",
            "Description": "Subnets for the tasks (private ones need NAT or VPC endpoints for ECR, S3, logs)",
        },
        "RunnerManagerCidr": {
            "Type": "String",
            "Default": "",
            "AllowedPattern": r"^$|^\d{1,3}(\.\d{1,3}){3}/\d{1,2}$",
            "Description": "CIDR the runner manager SSHes to the tasks from; or give its security group",
        },
        "RunnerManagerSecurityGroup": {
            "Type": "String",
            "Default": "",
            "AllowedPattern": "^$|^sg-[0-9a-f]{8,17}$",
            "Description": "The runner manager's security group (SSH to the tasks); or give its CIDR",
        },
        "ImageUri": {
            "Type": "String",
            "AllowedPattern": "^[^\\s]+$",
            "Description": "The task image built from images/debian/Dockerfile (an ECR image URI)",
        },
        "TaskCpu": {"Type": "String", "Default": "1024", "AllowedValues": TASK_CPUS},
        "TaskMemory": {
            "Type": "String",
            "Default": "2048",
            "AllowedPattern": "^[0-9]+$",
            "Description": "MiB; must suit TaskCpu (Fargate's table of task sizes)",
        },
        "CpuArchitecture": {"Type": "String", "Default": "X86_64", "AllowedValues": ["X86_64", "ARM64"]},
        "TaskWatchdogIdleSeconds": {
            "Type": "String",
            "Default": "60",
            "AllowedPattern": "^[0-9]{1,9}$",
            "Description": "A task with no runner SSH connection for this long stops itself (0: never)",
        },
        "TaskWatchdogStartSeconds": {
            "Type": "String",
            "Default": "120",
            "AllowedPattern": "^[1-9][0-9]{0,8}$",
            "Description": "A task no runner has connected to this long after its start stops itself",
        },
        "AssignPublicIp": {"Type": "String", "Default": "false", "AllowedValues": ["false", "true"]},
        "SshAddress": {
            "Type": "String",
            "Default": "private",
            "AllowedValues": ["private", "public"],
            "Description": "Which task address the driver connects to (public needs AssignPublicIp=true)",
        },
        "CapacityProviders": {
            "Type": "String",
            "Default": "",
            "AllowedPattern": f"^$|^{CAPACITY_SHARE}(,{CAPACITY_SHARE})*$",
            "Description": "e.g. FARGATE_SPOT:3,FARGATE:1; empty means the FARGATE launch type",
        },
        "AllowedTaskDefinitions": {
            "Type": "String",
            "Default": "",
            "Description": f"Comma list of extra task definitions jobs may choose (families {APP}-<stage>-*)",
        },
        "AllowedImages": {
            "Type": "String",
            "Default": "",
            "Description": "Comma list of image globs (registry/repository) a job's image: and services: "
            "may name; empty: jobs run in the task image only",
        },
        "RepositoryCredentialsSecretArn": {
            "Type": "String",
            "Default": "",
            "Description": "Secrets Manager secret with a private registry's credentials (none for ECR)",
        },
        "TaskRolePolicyArns": {
            "Type": "CommaDelimitedList",
            "Default": "",
            "Description": "Managed policies for what jobs may do in AWS (the task role); none by default",
        },
        "TaskLogRetentionDays": {"Type": "Number", "Default": 30, "AllowedValues": LOG_RETENTION_DAYS},
        "OrchestratorUrl": {
            "Type": "String",
            "Default": "",
            "AllowedPattern": "^$|^https://[^\\s]+$",
            "Description": "The API's URL (chalice deploy prints it): tasks publish their host key there. "
            "The merged template sets it itself",
        },
    }


def jobs_table() -> dict:
    properties = {"TableName": sub(TABLE_NAME), **copy.deepcopy(TABLE_SCHEMA)}
    properties["TimeToLiveSpecification"] = {"AttributeName": TTL_ATTRIBUTE, "Enabled": True}
    # Job records are operational state that expires within days: no backups, and the stack owns them.
    return {
        "Type": "AWS::DynamoDB::Table",
        "DeletionPolicy": "Delete",
        "UpdateReplacePolicy": "Delete",
        "Properties": properties,
    }


def ecs_tasks_trust() -> dict:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "ecs-tasks.amazonaws.com"},
                "Action": "sts:AssumeRole",
                # Only ECS acting for this account may assume it (the confused-deputy guard).
                "Condition": {"StringEquals": {"aws:SourceAccount": ref("AWS::AccountId")}},
            }
        ],
    }


def infra_resources() -> dict:
    return {
        "JobsTable": jobs_table(),
        "Cluster": {
            "Type": "AWS::ECS::Cluster",
            "Properties": {
                "ClusterName": sub(NAME),
                "CapacityProviders": ["FARGATE", "FARGATE_SPOT"],
                "DefaultCapacityProviderStrategy": [{"CapacityProvider": "FARGATE", "Weight": 1}],
                "Tags": [{"Key": "managed-by", "Value": APP}],
            },
        },
        "TaskLogGroup": {
            "Type": "AWS::Logs::LogGroup",
            "DeletionPolicy": "Delete",
            "UpdateReplacePolicy": "Delete",
            "Properties": {
                "LogGroupName": sub(TASK_LOG_GROUP),
                "RetentionInDays": ref("TaskLogRetentionDays"),
            },
        },
        "TaskExecutionRole": {
            "Type": "AWS::IAM::Role",
            "Properties": {
                "Path": sub(ROLE_PATH),
                "Description": "ECS pulls the task image and writes the task's logs with it",
                "AssumeRolePolicyDocument": ecs_tasks_trust(),
                "Policies": [
                    {
                        "PolicyName": "PullImageWriteLogs",
                        "PolicyDocument": {
                            "Version": "2012-10-17",
                            "Statement": [
                                {
                                    # GetAuthorizationToken has no resource-level permissions.
                                    "Effect": "Allow",
                                    "Action": ["ecr:GetAuthorizationToken"],
                                    "Resource": "*",
                                },
                                {
                                    "Effect": "Allow",
                                    "Action": [
                                        "ecr:BatchCheckLayerAvailability",
                                        "ecr:GetDownloadUrlForLayer",
                                        "ecr:BatchGetImage",
                                    ],
                                    "Resource": sub(ARN % ("ecr", "repository/*")),
                                },
                                {
                                    "Effect": "Allow",
                                    "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
                                    "Resource": get_att("TaskLogGroup", "Arn"),
                                },
                                {
                                    # repositoryCredentials of per-job images from a private registry.
                                    "Fn::If": [
                                        "HasRepositoryCredentials",
                                        {
                                            "Effect": "Allow",
                                            "Action": ["secretsmanager:GetSecretValue"],
                                            "Resource": ref("RepositoryCredentialsSecretArn"),
                                        },
                                        {"Ref": "AWS::NoValue"},
                                    ]
                                },
                            ],
                        },
                    }
                ],
            },
        },
        "TaskRole": {
            "Type": "AWS::IAM::Role",
            "Properties": {
                "Path": sub(ROLE_PATH),
                "Description": "The task publishes its host key with it; what CI jobs may do in AWS: nothing "
                "more unless TaskRolePolicyArns says so",
                "AssumeRolePolicyDocument": ecs_tasks_trust(),
                "ManagedPolicyArns": {
                    "Fn::If": ["HasTaskRolePolicies", ref("TaskRolePolicyArns"), ref("AWS::NoValue")]
                },
                "Policies": [
                    {
                        "PolicyName": "PublishOwnHostKey",
                        "PolicyDocument": {
                            "Version": "2012-10-17",
                            "Statement": [
                                {
                                    # The orchestrator also checks that the session (the task id) is the
                                    # task the URL names: a task can only publish its own key.
                                    "Effect": "Allow",
                                    "Action": ["execute-api:Invoke"],
                                    "Resource": sub(
                                        ARN % ("execute-api", f"*/{API_STAGE}/PUT/tasks/*/host-key")
                                    ),
                                }
                            ],
                        },
                    }
                ],
            },
        },
        "SshUserCaKey": {
            # Jobs log in to their task with certificates of this CA (design.md "The task's host key and the
            # job's certificate"); its private key never leaves KMS. Rotation: operators-guide.md.
            "Type": "AWS::KMS::Key",
            "Properties": {
                "Description": sub("fargate-ci ${Stage}: SSH user CA for CI job certificates"),
                "KeySpec": "ECC_NIST_P256",
                "KeyUsage": "SIGN_VERIFY",
                "KeyPolicy": {
                    "Version": "2012-10-17",
                    "Statement": [
                        {
                            # The account's IAM policies decide (the Lambdas' roles get Sign, GetPublicKey).
                            "Sid": "AccountIamPolicies",
                            "Effect": "Allow",
                            "Principal": {"AWS": sub("arn:${AWS::Partition}:iam::${AWS::AccountId}:root")},
                            "Action": "kms:*",
                            "Resource": "*",
                        }
                    ],
                },
            },
        },
        "TaskSecurityGroup": {
            "Type": "AWS::EC2::SecurityGroup",
            "Properties": {
                "GroupDescription": sub("fargate-ci ${Stage} CI job tasks: SSH from the runner manager only"),
                "VpcId": ref("VpcId"),
                "Tags": [{"Key": "Name", "Value": sub(NAME + "-tasks")}, {"Key": "managed-by", "Value": APP}],
            },
        },
        "SshFromRunnerManagerCidr": {
            "Type": "AWS::EC2::SecurityGroupIngress",
            "Condition": "HasRunnerManagerCidr",
            "Properties": {
                "GroupId": get_att("TaskSecurityGroup", "GroupId"),
                "Description": "SSH from the runner manager",
                "IpProtocol": "tcp",
                "FromPort": SSH_PORT,
                "ToPort": SSH_PORT,
                "CidrIp": ref("RunnerManagerCidr"),
            },
        },
        "SshFromRunnerManagerSecurityGroup": {
            "Type": "AWS::EC2::SecurityGroupIngress",
            "Condition": "HasRunnerManagerSecurityGroup",
            "Properties": {
                "GroupId": get_att("TaskSecurityGroup", "GroupId"),
                "Description": "SSH from the runner manager",
                "IpProtocol": "tcp",
                "FromPort": SSH_PORT,
                "ToPort": SSH_PORT,
                "SourceSecurityGroupId": ref("RunnerManagerSecurityGroup"),
            },
        },
        "TaskDefinition": {
            "Type": "AWS::ECS::TaskDefinition",
            "Properties": {
                "Family": sub(TASK_FAMILY),
                "Cpu": ref("TaskCpu"),
                "Memory": ref("TaskMemory"),
                "NetworkMode": "awsvpc",
                "RequiresCompatibilities": ["FARGATE"],
                "RuntimePlatform": {
                    "OperatingSystemFamily": "LINUX",
                    "CpuArchitecture": ref("CpuArchitecture"),
                },
                "ExecutionRoleArn": get_att("TaskExecutionRole", "Arn"),
                "TaskRoleArn": get_att("TaskRole", "Arn"),
                "ContainerDefinitions": [
                    {
                        # The container the orchestrator addresses (FARGATE_CONTAINER_NAME).
                        "Name": CONTAINER,
                        "Image": ref("ImageUri"),
                        "Essential": True,
                        "PortMappings": [{"ContainerPort": SSH_PORT, "Protocol": "tcp"}],
                        # Fargate Spot warns two minutes ahead; give the job all of it.
                        "StopTimeout": 120,
                        # The image's orphan watchdog (images/debian/entrypoint.sh; design.md "Orphans").
                        "Environment": [
                            {"Name": "WATCHDOG_IDLE_SECONDS", "Value": ref("TaskWatchdogIdleSeconds")},
                            {"Name": "WATCHDOG_START_SECONDS", "Value": ref("TaskWatchdogStartSeconds")},
                            # Where the task publishes its host key (entrypoint.sh).
                            {"Name": "FARGATE_CI_API_URL", "Value": ref("OrchestratorUrl")},
                        ],
                        "LogConfiguration": {
                            "LogDriver": "awslogs",
                            "Options": {
                                "awslogs-group": ref("TaskLogGroup"),
                                "awslogs-region": ref("AWS::Region"),
                                "awslogs-stream-prefix": "job",
                            },
                        },
                    }
                ],
                "Tags": [{"Key": "managed-by", "Value": APP}],
            },
        },
    }


# --- alarms and the dashboard (design.md "Observability": the metrics and their dimensions) ---------------

NAMESPACE = "FargateCI"  # chalicelib.observability.NAMESPACE
SERVICE = {"Name": "service", "Value": APP}  # every metric's `service` dimension
REAPED_REASONS = ("Deadline", "HeartbeatLost", "NoJobRecord", "JobFinished")
START_FAILURE_REASONS = ("TaskStartFailed", "NoCapacity", "Throttled")
# Chalice's function names for `chalice deploy` (`<app>-<stage>[-<handler>]`); the merged stack Refs its own.
DEPLOYED_FUNCTIONS = {
    "APIHandler": sub(NAME),
    "OnTaskStateChange": sub(NAME + "-on_task_state_change"),
    "Reaper": sub(NAME + "-reaper"),
}
# The merged stack's dead-letter queues, for the event rule and the schedule (EventBridge sends what it could
# not deliver there; `dead_letter_resources` creates them and lets EventBridge write to them).
DEAD_LETTER_QUEUES = {
    "OnTaskStateChangeEvent": "TaskEventsDeadLetterQueue",
    "ReaperEvent": "ReaperDeadLetterQueue",
}
# The event rule retries delivery for an hour (a task event older than that is stale: the reaper's
# DescribeTasks refresh has caught up); the schedule for one reaper period (the next run does the work).
EVENT_RETRY = {"MaximumRetryAttempts": 20, "MaximumEventAgeInSeconds": 3600}
SCHEDULE_RETRY = {"MaximumRetryAttempts": 2, "MaximumEventAgeInSeconds": 300}


def _metric(name: str, *, namespace: str = NAMESPACE, stat: str = "Sum", **dimensions: Any) -> dict:
    dims = [SERVICE] if namespace == NAMESPACE else []
    dims += [{"Name": k, "Value": v} for k, v in dimensions.items()]
    return {
        "Metric": {"Namespace": namespace, "MetricName": name, "Dimensions": dims},
        "Period": 300,
        "Stat": stat,
    }


def _sum_alarm(name: str, description: str, metrics: list[dict], threshold: float) -> dict:
    """An alarm on the sum of `metrics` over 5 minutes (metric math; no data is not a breach)."""
    queries = [{"Id": f"m{i}", "MetricStat": m, "ReturnData": False} for i, m in enumerate(metrics)]
    ids = ", ".join(q["Id"] for q in queries)
    queries.append({"Id": "total", "Expression": f"SUM(FILL([{ids}], 0))", "Label": name, "ReturnData": True})
    return _alarm(name, description, {"Metrics": queries}, threshold)


def _alarm(name: str, description: str, what: dict, threshold: float, periods: int = 1) -> dict:
    return {
        "Type": "AWS::CloudWatch::Alarm",
        "Properties": {
            "AlarmName": sub(f"{NAME}-{name}"),
            "AlarmDescription": description,
            "ComparisonOperator": "GreaterThanOrEqualToThreshold",
            "Threshold": threshold,
            "EvaluationPeriods": periods,
            "TreatMissingData": "notBreaching",
            "AlarmActions": {"Fn::If": ["HasAlarmTopic", [ref("AlarmTopicArn")], ref("AWS::NoValue")]},
            **what,
        },
    }


def monitoring(functions: dict[str, Any], queues: dict[str, str]) -> dict:
    """Alarms and a dashboard: `functions` maps Chalice's handlers to their names, `queues` dead-letter
    queue logical ids to what they catch."""
    lambda_metrics = {
        kind: [_metric(kind, namespace="AWS/Lambda", FunctionName=fn) for fn in functions.values()]
        for kind in ("Errors", "Throttles")
    }
    resources = {
        "TasksReapedAlarm": _sum_alarm(
            "tasks-reaped",
            "The reaper or an event stopped a task nobody should need (any orphan is a bug worth a look)",
            [_metric("TasksReaped", reason=r) for r in REAPED_REASONS],
            1,
        ),
        "TaskStartFailuresAlarm": _sum_alarm(
            "task-start-failures",
            "RunTask refused tasks, found no capacity or stayed throttled (3 or more in 5 minutes)",
            [_metric("TaskStartFailures", reason=r) for r in START_FAILURE_REASONS],
            3,
        ),
        "StartLatencyAlarm": _alarm(
            "start-latency-p90",
            "p90 of the time from POST /jobs to the task running is above StartLatencyP90Seconds",
            {
                "Namespace": NAMESPACE,
                "MetricName": "TaskStartLatency",
                "Dimensions": [SERVICE],
                "ExtendedStatistic": "p90",
                "Period": 900,
                "Unit": "Seconds",
            },
            ref("StartLatencyP90Seconds"),
            periods=2,
        ),
        "LambdaErrorsAlarm": _sum_alarm(
            "lambda-errors",
            "An orchestrator Lambda failed (API, task events or reaper)",
            lambda_metrics["Errors"],
            1,
        ),
        "LambdaThrottlesAlarm": _sum_alarm(
            "lambda-throttles", "An orchestrator Lambda was throttled", lambda_metrics["Throttles"], 1
        ),
    }
    if queues:
        resources["DeadLetterAlarm"] = _sum_alarm(
            "dead-letters",
            "Task events or reaper runs EventBridge could not deliver are in a dead-letter queue",
            [
                _metric(
                    "ApproximateNumberOfMessagesVisible",
                    namespace="AWS/SQS",
                    stat="Maximum",
                    QueueName=get_att(q, "QueueName"),
                )
                for q in queues.values()
            ],
            1,
        )
    resources["Dashboard"] = {
        "Type": "AWS::CloudWatch::Dashboard",
        "Properties": {"DashboardName": sub(NAME), "DashboardBody": dashboard_body(functions, queues)},
    }
    return resources


def dashboard_body(functions: dict[str, Any], queues: dict[str, str]) -> dict:
    """The dashboard's JSON as one Fn::Sub (names and regions filled in by CloudFormation)."""
    variables: dict[str, Any] = {f"fn{name}": fn for name, fn in functions.items()}
    variables.update({f"q{logical}": get_att(logical, "QueueName") for logical in queues.values()})
    svc = ["service", APP]

    def ours(*names: str, stat: str = "Sum") -> list[list]:
        return [[NAMESPACE, name, *svc, {"stat": stat}] for name in names]

    def by(name: str, dimension: str) -> list[dict]:
        schema = f"{{{NAMESPACE},service,{dimension}}}"
        search = f"SEARCH('{schema} MetricName=\"{name}\" service=\"{APP}\"', 'Sum', 300)"
        return [{"expression": search, "label": "", "id": "e1"}]

    def widget(title: str, metrics: list, x: int, y: int, stat: str = "Sum") -> dict:
        return {
            "type": "metric",
            "x": x,
            "y": y,
            "width": 12,
            "height": 6,
            "properties": {
                "title": title,
                "region": "${AWS::Region}",
                "stat": stat,
                "period": 300,
                "view": "timeSeries",
                "metrics": metrics,
            },
        }

    lambdas = []
    for name in functions:
        for kind in ("Errors", "Throttles"):
            lambdas.append(
                ["AWS/Lambda", kind, "FunctionName", f"${{fn{name}}}", {"label": f"{name} {kind}"}]
            )
    widgets = [
        widget("Tasks started", ours("TasksStarted"), 0, 0),
        widget(
            "Start latency (s): p50, p90",
            [
                *ours("TaskStartLatency", stat="p50"),
                *ours("TaskStartLatency", stat="p90"),
                *ours("SshReadyLatency", stat="p90"),
            ],
            12,
            0,
            "p90",
        ),
        widget("Tasks reaped by reason", by("TasksReaped", "reason"), 0, 6),
        widget("Task start failures by reason", by("TaskStartFailures", "reason"), 12, 6),
        widget("Task events", ours("EventsApplied", "EventsDroppedStale", "EventsDroppedUnknownTask"), 0, 12),
        widget("API errors by code", by("ApiErrors", "code"), 12, 12),
        widget("Lambda errors and throttles", lambdas, 0, 18),
    ]
    if queues:
        depth = [
            ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", f"${{q{q}}}"]
            for q in queues.values()
        ]
        widgets.append(widget("Dead letters (undelivered events)", depth, 12, 18, "Maximum"))
    return {"Fn::Sub": [json.dumps({"widgets": widgets}), variables]}


def dead_letter_resources() -> dict:
    """The dead-letter queues (14 days: time to look) and the policy that lets EventBridge, for this
    account only, send to them."""
    resources: dict[str, Any] = {}
    for event, logical in DEAD_LETTER_QUEUES.items():
        resources[logical] = {
            "Type": "AWS::SQS::Queue",
            "DeletionPolicy": "Delete",
            "UpdateReplacePolicy": "Delete",
            "Properties": {
                "QueueName": sub(f"{NAME}-{event}-dlq"),
                "MessageRetentionPeriod": 1209600,
                "SqsManagedSseEnabled": True,
            },
        }
    resources["DeadLetterQueuePolicy"] = {
        "Type": "AWS::SQS::QueuePolicy",
        "Properties": {
            "Queues": [ref(q) for q in DEAD_LETTER_QUEUES.values()],
            "PolicyDocument": {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Sid": "EventBridgeDeadLetters",
                        "Effect": "Allow",
                        "Principal": {"Service": "events.amazonaws.com"},
                        "Action": "sqs:SendMessage",
                        "Resource": [get_att(q, "Arn") for q in DEAD_LETTER_QUEUES.values()],
                        "Condition": {"StringEquals": {"aws:SourceAccount": ref("AWS::AccountId")}},
                    }
                ],
            },
        },
    }
    return resources


def monitoring_parameters() -> dict:
    return {
        "AlarmTopicArn": {
            "Type": "String",
            "Default": "",
            "AllowedPattern": "^$|^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}$",
            "Description": "SNS topic the alarms notify (empty: alarms without actions)",
        },
        "StartLatencyP90Seconds": {
            "Type": "Number",
            "Default": 180,
            "MinValue": 10,
            "Description": "Alarm when p90 of POST /jobs to task running stays above this for 30 minutes",
        },
    }


def conditions() -> dict:
    return {
        "HasRunnerManagerCidr": {"Fn::Not": [{"Fn::Equals": [ref("RunnerManagerCidr"), ""]}]},
        "HasRunnerManagerSecurityGroup": {
            "Fn::Not": [{"Fn::Equals": [ref("RunnerManagerSecurityGroup"), ""]}]
        },
        "HasRepositoryCredentials": {
            "Fn::Not": [{"Fn::Equals": [ref("RepositoryCredentialsSecretArn"), ""]}]
        },
        "HasTaskRolePolicies": {
            "Fn::Not": [{"Fn::Equals": [{"Fn::Join": ["", ref("TaskRolePolicyArns")]}, ""]}]
        },
        "HasAlarmTopic": {"Fn::Not": [{"Fn::Equals": [ref("AlarmTopicArn"), ""]}]},
    }


def rules() -> dict:
    return {
        "RunnerManagerCanReachTasks": {
            "Assertions": [
                {
                    "Assert": {
                        "Fn::Or": [
                            {"Fn::Not": [{"Fn::Equals": [ref("RunnerManagerCidr"), ""]}]},
                            {"Fn::Not": [{"Fn::Equals": [ref("RunnerManagerSecurityGroup"), ""]}]},
                        ]
                    },
                    "AssertDescription": "Give RunnerManagerCidr or RunnerManagerSecurityGroup (SSH source)",
                }
            ]
        }
    }


def outputs() -> dict:
    return {
        "ClusterName": {"Value": ref("Cluster")},
        "ClusterArn": {"Value": get_att("Cluster", "Arn")},
        "JobsTableName": {"Value": ref("JobsTable")},
        "TaskDefinitionFamily": {"Value": sub(TASK_FAMILY)},
        "TaskSecurityGroupId": {"Value": get_att("TaskSecurityGroup", "GroupId")},
        "TaskRoleArn": {"Value": get_att("TaskRole", "Arn")},
        "TaskExecutionRoleArn": {"Value": get_att("TaskExecutionRole", "Arn")},
        "TaskLogGroupName": {"Value": ref("TaskLogGroup")},
    }


def settings_output() -> dict:
    """One JSON object of settings, ready for `.chalice/config.json`'s stage `environment_variables`."""
    values = {name: f"${{{name.replace('_', '')}}}" for name in orchestrator_settings()}
    variables = {name.replace("_", ""): value for name, value in orchestrator_settings().items()}
    return {
        "Description": "environment_variables for the stage in .chalice/config.json (chalice deploy)",
        "Value": {"Fn::Sub": [json.dumps(values), variables]},
    }


def template(description: str) -> dict:
    return {
        "AWSTemplateFormatVersion": "2010-09-09",
        "Description": description,
        "Parameters": {**parameters(), **monitoring_parameters()},
        "Rules": rules(),
        "Conditions": conditions(),
        "Resources": infra_resources(),
        "Outputs": outputs(),
    }


def infra_template() -> dict:
    result = template(
        f"{APP}: what Chalice does not create (table, cluster, task definition, roles, network)"
    )
    result["Outputs"]["ChaliceEnvironment"] = settings_output()
    # `chalice deploy` creates the event rule and the schedule itself: no dead-letter queues to watch here.
    result["Resources"].update(monitoring(DEPLOYED_FUNCTIONS, {}))
    return result


def merge_template() -> dict:
    """Merged into `chalice package` output: infra resources plus their wiring into Chalice's resources."""
    result = template(f"{APP}: the orchestrator (Chalice) with its table, cluster, task definition and roles")
    resources = result["Resources"]
    settings = orchestrator_settings()
    for function in CHALICE_FUNCTIONS:
        resources[function] = {"Properties": {"Environment": {"Variables": settings}}}
    # The task definition learns the API's URL from the stack (the Lambdas cannot: that would be a cycle).
    container = resources["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    for variable in container["Environment"]:
        if variable["Name"] == "FARGATE_CI_API_URL":
            variable["Value"] = sub(
                "https://${RestAPI}.execute-api.${AWS::Region}.${AWS::URLSuffix}/" + API_STAGE
            )
    # Only our cluster's task events reach the handler (the app's pattern cannot know the cluster).
    resources[EVENT_FUNCTION]["Properties"]["Events"] = {
        EVENT_NAME: {
            "Properties": {
                "Pattern": {"detail": {"clusterArn": [get_att("Cluster", "Arn")]}},
                "RetryPolicy": EVENT_RETRY,
                "DeadLetterConfig": {"Arn": get_att(DEAD_LETTER_QUEUES[EVENT_NAME], "Arn")},
            }
        }
    }
    resources[SCHEDULE_FUNCTION]["Properties"]["Events"] = {
        SCHEDULE_NAME: {
            "Properties": {
                "RetryPolicy": SCHEDULE_RETRY,
                "DeadLetterConfig": {"Arn": get_att(DEAD_LETTER_QUEUES[SCHEDULE_NAME], "Arn")},
            }
        }
    }
    resources.update(dead_letter_resources())
    resources.update(monitoring({name: ref(name) for name in CHALICE_FUNCTIONS}, DEAD_LETTER_QUEUES))
    in_stack = {"${LambdaLogGroupPrefix}": "/aws/lambda/${AWS::StackName}-"}
    lambda_policy = policy(lambda_statements(), in_stack, as_sub=True)
    for statement in lambda_policy["Statement"]:
        if statement["Resource"] == [sub(REPOSITORY_CREDENTIALS)]:
            statement["Resource"] = [
                {
                    "Fn::If": [
                        "HasRepositoryCredentials",
                        ref("RepositoryCredentialsSecretArn"),
                        sub(ARN % ("secretsmanager", f"secret:{NAME}-no-repository-credentials")),
                    ]
                }
            ]
    for role in CHALICE_ROLES:
        resources[role] = {
            "Properties": {"Policies": [{"PolicyName": "Orchestrator", "PolicyDocument": lambda_policy}]}
        }
    resources["RunnerManagerPolicy"] = {
        "Type": "AWS::IAM::ManagedPolicy",
        "Properties": {
            "Description": sub("fargate-ci ${Stage}: what the GitLab runner manager needs (call the API)"),
            "PolicyDocument": policy(runner_manager_statements(), {}, as_sub=True),
        },
    }
    result["Outputs"]["RunnerManagerPolicyArn"] = {
        "Description": "Attach to the runner manager's role or user",
        "Value": ref("RunnerManagerPolicy"),
    }
    return result


def artefacts(stages: list[str]) -> dict[Path, dict]:
    files = {
        ROOT / "infra" / "template.json": infra_template(),
        ROOT / "infra" / "merge-template.json": merge_template(),
        ROOT / "infra" / "runner-manager-policy.json": runner_manager_policy_document(),
    }
    for stage in stages:
        files[ROOT / ".chalice" / f"policy-{stage}.json"] = chalice_policy(stage)
    return files


def dump(document: dict) -> str:
    return json.dumps(document, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.generate", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", action="append", help="write .chalice/policy-<stage>.json (default: dev)")
    parser.add_argument("--check", action="store_true", help="only report files that are not up to date")
    args = parser.parse_args(argv)
    stale = []
    for path, document in artefacts(args.stage or ["dev"]).items():
        text = dump(document)
        if path.exists() and path.read_text() == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(text)
    if args.check and stale:
        print(f"stale: {', '.join(map(str, stale))}; run `python -m infra.generate`", file=sys.stderr)
        return 1
    for path in stale:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
