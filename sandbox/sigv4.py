"""API Gateway's IAM authorisation, done locally: verify a request's SigV4 signature (service execute-api).

The signature is recomputed with botocore's own SigV4Auth over exactly the headers the client listed in
SignedHeaders, so anything botocore signs verifies and any change to a signed part does not.

Besides IAM users (long-term keys), `RoleSessions` plays STS for one role: temporary credentials (ASIA...
key, secret, session token) whose token names the session, so each set of credentials is a different
`arn:aws:sts::<account>:assumed-role/<role>/<session>`, as botocore's assume-role provider gives.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import string
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

MAX_SKEW = timedelta(minutes=5)
SERVICE = "execute-api"
_AUTHORIZATION = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/\s,]+)/(?P<date>\d{8})/(?P<region>[^/\s,]+)/"
    r"(?P<service>[^/\s,]+)/aws4_request,\s*SignedHeaders=(?P<headers>[a-z0-9;._-]+),\s*"
    r"Signature=(?P<signature>[0-9a-f]{64})$"
)


@dataclass(frozen=True)
class Identity:
    """One IAM user the sandbox knows."""

    profile: str
    user_arn: str
    user_id: str
    access_key: str
    secret_key: str
    session_token: str | None = None  # temporary credentials (an assumed role's session)

    def request_context(self) -> dict[str, str]:
        """What API Gateway puts into `requestContext.identity` for an IAM-authorised caller."""
        account = self.user_arn.split(":")[4]
        return {
            "accountId": account,
            "accessKey": self.access_key,
            "caller": self.user_id,
            "user": self.user_id,
            "userArn": self.user_arn,
        }


class SignatureRejected(Exception):
    """Why API Gateway answers 403; the message is what it says."""


_SESSION_NAME = re.compile(r"[\w+=,.@-]{2,64}", re.ASCII)  # STS's RoleSessionName


class RoleSessions:
    """The sandbox's STS for its roles: the runner's (`role`) and any `other_roles` (the tasks' role, whose
    sessions the sandbox's container credentials endpoint names after the task id, as ECS does). Nothing is
    stored per session: a session's secret key is derived from the roles' secret, the role, its access key
    and its name, and the session token carries the last three."""

    def __init__(
        self, role_secret: bytes, account: str, role: str, profile: str, other_roles: tuple[str, ...] = ()
    ):
        self._secret = role_secret
        self.account = account
        self.role = role
        self.profile = profile
        self._roles = (role, *other_roles)

    def mint(self, session: str, role: str | None = None) -> Identity:
        """New temporary credentials for `session` of `role` (AssumeRole with that RoleSessionName)."""
        role = role or self.role
        if role not in self._roles:
            raise ValueError(f"role {role!r} is not one of the sandbox's roles")
        if not _SESSION_NAME.fullmatch(session):
            raise ValueError(f"{session!r} is not a role session name (2-64 of A-Z a-z 0-9 _+=,.@-)")
        key = "ASIA" + "".join(secrets.choice(string.ascii_uppercase + "234567") for _ in range(16))
        claims = {"key": key, "session": session, "role": role}
        token = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode()
        return self._identity(key, session, token, role)

    def identity(self, access_key: str, token: str) -> Identity | None:
        """The session these temporary credentials belong to, or None when the token is not ours for them."""
        try:
            claims = json.loads(base64.urlsafe_b64decode(token.encode()))
            key, session, role = claims["key"], claims["session"], claims.get("role", self.role)
        except (ValueError, TypeError, KeyError, AttributeError):
            return None
        if key != access_key or not isinstance(session, str) or not _SESSION_NAME.fullmatch(session):
            return None
        if role not in self._roles:
            return None
        return self._identity(key, session, token, role)

    def _identity(self, key: str, session: str, token: str, role: str) -> Identity:
        seed = f"{key}\n{session}" if role == self.role else f"{role}\n{key}\n{session}"
        secret = hmac.new(self._secret, seed.encode(), hashlib.sha256).hexdigest()[:40]
        role_id = "AROA" + hashlib.sha256(role.encode()).hexdigest()[:17].upper()
        return Identity(
            profile=self.profile if role == self.role else role,
            user_arn=f"arn:aws:sts::{self.account}:assumed-role/{role}/{session}",
            user_id=f"{role_id}:{session}",
            access_key=key,
            secret_key=secret,
            session_token=token,
        )


def verify(
    identities: dict[str, Identity],
    region: str,
    method: str,
    url: str,
    headers: dict[str, str],
    body: bytes,
    now: datetime | None = None,
    sessions: RoleSessions | None = None,
) -> Identity:
    """The identity that signed this request (an IAM user, or a session of `sessions`' role), or
    SignatureRejected."""
    lowered = {name.lower(): value for name, value in headers.items()}
    authorization = lowered.get("authorization")
    if not authorization:
        raise SignatureRejected("Missing Authentication Token")
    match = _AUTHORIZATION.match(authorization.strip())
    if not match:
        raise SignatureRejected("Authorization header is not a valid AWS4-HMAC-SHA256 signature")
    if match["service"] != SERVICE or match["region"] != region:
        raise SignatureRejected(
            f"Credential should be scoped to a valid region and service '{SERVICE}' in '{region}'"
        )
    token = lowered.get("x-amz-security-token")
    identity = identities.get(match["key"])
    if identity is None and token and sessions is not None:
        identity = sessions.identity(match["key"], token)
    if identity is None or (token and identity.session_token is None):
        raise SignatureRejected("The security token included in the request is invalid.")
    signed = match["headers"].split(";")
    if "host" not in signed:
        raise SignatureRejected("'Host' must be a signed header")
    if identity.session_token is not None and "x-amz-security-token" not in signed:
        raise SignatureRejected("'X-Amz-Security-Token' must be a signed header")
    missing = [name for name in signed if name not in lowered]
    if missing:
        raise SignatureRejected(f"Signed header {missing[0]} is missing from the request")
    stamp = lowered.get("x-amz-date", "")
    try:
        signed_at = datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        raise SignatureRejected("Request is missing a valid X-Amz-Date header") from None
    if "x-amz-date" not in signed:
        raise SignatureRejected("'X-Amz-Date' must be a signed header")
    if match["date"] != stamp[:8]:
        raise SignatureRejected("Credential date does not match X-Amz-Date")
    current = now or datetime.now(UTC)
    if abs(current - signed_at) > MAX_SKEW:
        raise SignatureRejected("Signature expired: the request is more than 5 minutes old or in the future")
    declared_hash = lowered.get("x-amz-content-sha256")
    if declared_hash is not None and declared_hash != hashlib.sha256(body).hexdigest():
        raise SignatureRejected("The provided x-amz-content-sha256 header does not match the body")

    request = AWSRequest(method=method, url=url, data=body, headers={name: lowered[name] for name in signed})
    request.context["timestamp"] = stamp
    credentials = Credentials(identity.access_key, identity.secret_key, identity.session_token)
    signer = SigV4Auth(credentials, SERVICE, region)
    # Exactly the client's SignedHeaders, even those botocore would not sign itself (e.g. user-agent).
    signer.headers_to_sign = lambda req: _only(req, signed)  # type: ignore[method-assign]
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, match["signature"]):
        raise SignatureRejected(
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method."
        )
    return identity


def _only(request: AWSRequest, names: list[str]):
    from botocore.awsrequest import HTTPHeaders

    chosen = HTTPHeaders()
    for name in names:
        chosen[name] = request.headers[name]
    return chosen
