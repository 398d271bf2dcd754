"""Which AWS API operations the orchestrator's code calls, read from its source (no import, no AWS).

The adapters keep their boto3 clients as `self._ecs`, `self._ec2`, `self._table` (a DynamoDB Table
resource) or `self._dynamodb`. A call is either direct (`self._table.put_item(...)`) or through a
dispatcher method (`self._call("run_task", ...)` in a method that does `getattr(self._ecs, operation)`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import botocore.session
from botocore import xform_name

CLIENTS = {"_ecs": "ecs", "_ec2": "ec2", "_kms": "kms", "_table": "dynamodb", "_dynamodb": "dynamodb"}
# A method that makes a client per region: `self._client("ecr", region).get_authorization_token(...)`.
CLIENT_FACTORY = "_client"

# Table resource methods that are not client operations of the same name.
TABLE_METHODS = {"batch_writer": "BatchWriteItem", "load": "DescribeTable", "reload": "DescribeTable"}
# Operations IAM authorises as other actions: a transaction needs each item action it may perform.
AUTHORISED_AS = {
    "dynamodb:TransactWriteItems": {
        "dynamodb:PutItem",
        "dynamodb:UpdateItem",
        "dynamodb:DeleteItem",
        "dynamodb:ConditionCheckItem",
    },
    "dynamodb:TransactGetItems": {"dynamodb:GetItem"},
}
# What AWS requires along with an operation: RunTask with tags (and propagateTags) is also TagResource,
# and starting a task definition that names roles passes them to ECS.
# ECR's registry login is used for the registry API (chalicelib/registry.py reads a manifest and a config
# blob), which ECR authorises as BatchGetImage and GetDownloadUrlForLayer.
IMPLIED = {
    "ecs:RunTask": {"ecs:TagResource", "iam:PassRole"},
    "ecs:RegisterTaskDefinition": {"iam:PassRole"},
    "ecr:GetAuthorizationToken": {"ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer"},
}


def _client_of(node: ast.AST) -> str | None:
    """`self._ecs` → "ecs"; `self._client("ecr", region)` → "ecr"."""
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
        and node.attr in CLIENTS
    ):
        return CLIENTS[node.attr]
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "self"
        and node.func.attr == CLIENT_FACTORY
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return node.args[0].value
    return None


def _dispatchers(tree: ast.AST) -> dict[str, str]:
    """Methods that call `getattr(self._<client>, name)`: their first argument names an operation."""
    found = {}
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        for node in ast.walk(function):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "getattr"
                and node.args
                and _client_of(node.args[0])
            ):
                found[function.name] = _client_of(node.args[0])
    return found


def method_calls(source: str) -> set[tuple[str, str]]:
    """(service, python method name) for every AWS call in one module's source."""
    tree = ast.parse(source)
    dispatchers = _dispatchers(tree)
    calls = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        func = node.func
        service = _client_of(func.value)
        first = node.args[0] if node.args else None
        literal = first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None
        if service and func.attr in ("get_paginator", "get_waiter") and literal:
            calls.add((service, literal))
        elif service:
            calls.add((service, func.attr))
        elif (
            isinstance(func.value, ast.Name)
            and func.value.id == "self"
            and func.attr in dispatchers
            and literal
        ):
            calls.add((dispatchers[func.attr], literal))
    return calls


def _operations(service: str) -> dict[str, str]:
    """python method name → API operation name, from botocore's service model."""
    model = botocore.session.get_session().get_service_model(service)
    return {xform_name(name): name for name in model.operation_names}


def iam_actions(calls: set[tuple[str, str]]) -> set[str]:
    """The IAM actions the calls need. An unknown method is an error: teach this module about it."""
    actions: set[str] = set()
    for service, method in sorted(calls):
        operations = _operations(service)
        if service == "dynamodb" and method in TABLE_METHODS:
            operation = TABLE_METHODS[method]
        elif method in operations:
            operation = operations[method]
        else:
            raise ValueError(
                f"{service} has no operation for method {method!r}; extend tests/deploy/aws_calls.py"
            )
        action = f"{service}:{operation}"
        needed = AUTHORISED_AS.get(action, {action})
        actions |= needed
        for each in needed:
            actions |= IMPLIED.get(each, set())
    return actions


def orchestrator_calls(package: Path) -> set[tuple[str, str]]:
    calls: set[tuple[str, str]] = set()
    for module in sorted(package.glob("*.py")):
        calls |= method_calls(module.read_text())
    return calls
