"""Who is calling: the job owner, from the identity API Gateway's IAM authoriser verified. Pure."""

from __future__ import annotations

import re
from typing import Any

from chalicelib.errors import Forbidden

# STS names every session of a role differently (botocore picks a new name per AssumeRole); the role is the
# caller. The role's path is not part of an assumed-role ARN, and neither part may contain "/".
_ASSUMED_ROLE = re.compile(r"(arn:[a-z-]+:sts::[0-9]{12}:assumed-role/[^/]+)/[^/]+")


def owner_of(identity: Any) -> str:
    """The owner a request acts for: `requestContext.identity.userArn`, an assumed role as its role.

    No identity (the route was reached without IAM authorisation) is refused: nothing may be anonymous."""
    arn = identity.get("userArn") if isinstance(identity, dict) else None
    if not isinstance(arn, str) or not arn.startswith("arn:"):
        raise Forbidden("the request carries no IAM identity; sign it with SigV4 (service execute-api)")
    session = _ASSUMED_ROLE.fullmatch(arn)
    return session[1] if session else arn
