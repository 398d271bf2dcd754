"""Builds the real adapters, once, on first use (never at import time, so tests can swap them)."""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from chalicelib.settings import current_settings

if TYPE_CHECKING:
    from chalicelib.service import JobService


@cache
def job_service() -> JobService:
    # Imported here, not at the top: importing the app must not load boto3 or build clients.
    import boto3
    from botocore.config import Config

    from chalicelib.ecs import EcsTasks
    from chalicelib.kms import KmsCa
    from chalicelib.registry import AwsRegistryCredentials, RegistryClient
    from chalicelib.service import JobService
    from chalicelib.store import JobStore

    settings = current_settings()
    session = boto3.session.Session()
    # ECS retries are ours (EcsTasks._call) so that throttling ends in a 503 with Retry-After.
    ecs = session.client(
        "ecs",
        config=Config(retries={"mode": "standard", "max_attempts": 1}, connect_timeout=2, read_timeout=10),
    )
    ec2 = session.client(
        "ec2",
        config=Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=2, read_timeout=5),
    )
    table = session.resource(
        "dynamodb",
        config=Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=2, read_timeout=3),
    ).Table(settings.table)
    kms = session.client(
        "kms",
        config=Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=2, read_timeout=5),
    )
    ca = KmsCa(kms, settings.ca_key_ids)
    quick = Config(retries={"mode": "standard", "max_attempts": 2}, connect_timeout=2, read_timeout=3)

    @cache
    def client(service: str, region: str | None) -> Any:
        # ECR in the registry's own region; the credentials secret in its ARN's region.
        return session.client(service, region_name=region, config=quick)

    registry = RegistryClient(
        AwsRegistryCredentials(client, settings.repository_credentials),
        dict(settings.registry_endpoints),
    )
    return JobService(settings, JobStore(table), EcsTasks(ecs, ec2, settings), ca=ca, registry=registry)


def reset() -> None:
    """Forget built adapters and settings (tests change the environment between cases)."""
    job_service.cache_clear()
    current_settings.cache_clear()
