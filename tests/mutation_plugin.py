"""pytest plugin for `make mutate` only (loaded by `[tool.mutmut]` `pytest_add_cli_args`, not `make test`).

mutmut runs each mutant's covering tests in a fresh fork, in the order of a Python set. Three costs dominated
a mutant: rebuilding the API tier's moto world whenever that order switched test module (it is
module-scoped), moto loading ~5000 default AMIs into every EC2 backend it builds, and every new boto3
session parsing the same botocore JSON models again. This plugin removes all three without changing what
any test checks:

- tests run grouped by module, the unit tier first (the fastest to fail), each module in its file order;
- moto skips its default AMIs (no test here uses one);
- every botocore loader shares one cache, filled before mutmut forks its workers.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")


def _share_botocore_models() -> None:
    """One cache for all botocore loaders: the models are read-only, each session already shares its own."""
    from botocore import loaders

    shared: dict = {}
    original_init = loaders.Loader.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self._cache = shared

    loaders.Loader.__init__ = init
    import boto3

    session = boto3.session.Session(
        aws_access_key_id="warm", aws_secret_access_key="warm", region_name="eu-west-1"
    )
    for service in ("ec2", "ecs", "dynamodb", "sts", "events", "logs", "cloudwatch"):
        session.client(service)
    session.resource("dynamodb")


_share_botocore_models()


def _tier(item: pytest.Item) -> int:
    return 0 if item.nodeid.startswith("tests/unit/") else 1


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Each module's tests in their file order, as `make test` runs them (module fixtures may rely on it).
    position = {id(item): i for i, item in enumerate(items)}

    def key(item: pytest.Item) -> tuple:
        path, line, _ = item.location
        return (_tier(item), path, line if line is not None else -1, position[id(item)])

    items.sort(key=key)
