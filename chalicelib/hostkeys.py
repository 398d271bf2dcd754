"""The task's host key and the job's certificate: how a job and its task come to trust each other without any
private key leaving the place it was made.

- The task makes its own ed25519 host key at boot and publishes the public half here (PUT
  /tasks/{task_id}/host-key), signed with its task role's credentials. ECS names a task role's session after
  the task id (the caller is `arn:aws:sts::<acct>:assumed-role/<role>/<task id>`: aws/amazon-ecs-agent#3498,
  "tasks assume the task role and the session ID is the task ID"), so only that task can sign as itself.
  The first key bound to the task's record wins (a conditional write); another one is refused and logged.
  The driver pins the key the job view shows.
- The job's client key is certified by the SSH user CA (KMS) for the job's task only: the certificate's
  principal is the task id, which the task's sshd accepts (AuthorizedPrincipalsFile), valid until the job's
  deadline, without extensions.
"""

from __future__ import annotations

import re
import secrets

from chalicelib import clock
from chalicelib.certs import CLOCK_SKEW, CertificateRequest, ca_public_line, user_certificate
from chalicelib.context import JobContext
from chalicelib.errors import Forbidden, HostKeyConflict, StaleWrite, TaskNotFound, Throttled
from chalicelib.jobs import record_key_from_started_by, task_id
from chalicelib.observability import count, logger
from chalicelib.schema import TABLE_KEY
from chalicelib.states import CERTIFIED, HOST_KEY_PUBLISHED, TERMINAL

_SESSION = re.compile(
    r"arn:aws[a-z-]*:sts::(?P<account>[0-9]{12}):assumed-role/(?P<role>[^/]+)/(?P<session>.+)"
)


def check_task_caller(ctx: JobContext, caller_arn: object, account: str | None, wanted_task: str) -> None:
    """Only the task itself: a session of the configured task role, named after `wanted_task`, in our
    account."""
    role = ctx.settings.task_role_name
    if not role:
        raise Forbidden("this orchestrator has no task role configured (setting TASK_ROLE_NAME)")
    match = _SESSION.fullmatch(caller_arn) if isinstance(caller_arn, str) else None
    if (
        match is None
        or match["role"] != role
        or match["session"] != wanted_task
        or (account is not None and match["account"] != account)
    ):
        raise Forbidden(f"only task {wanted_task} itself (its task role's session) may publish its host key")


def publish(ctx: JobContext, caller_arn: object, account: str | None, task: str, host_key: str) -> dict:
    """Bind the task's host public key to its record, once. Returns what the task needs to trust its jobs:
    the CA keys and the principal its sshd accepts."""
    check_task_caller(ctx, caller_arn, account, task)
    snapshots = ctx.tasks.describe([task])
    snapshot = snapshots[0] if snapshots else None
    if snapshot is None or snapshot.cluster_arn != ctx.tasks.cluster_arn():
        raise TaskNotFound(f"task {task} is not in this orchestrator's cluster")
    key = record_key_from_started_by(snapshot.started_by)
    if key is None:
        raise TaskNotFound(f"task {task} was not started by this orchestrator")
    if snapshot.desired_status == "STOPPED" or snapshot.last_status == "STOPPED":
        raise TaskNotFound(f"task {task} is stopping")
    logger.append_keys(task_arn=snapshot.task_arn)
    item = ctx.store.get(key)
    if item is None or item["state"] in TERMINAL:
        raise TaskNotFound(f"no live job or pool slot stands for task {task}")
    if not item.get("task_arn"):
        # RunTask's answer is being recorded (milliseconds); the task asks again.
        raise Throttled(f"task {task} is not on record yet; retry", retry_after=1)
    if item["task_arn"] != snapshot.task_arn:
        raise TaskNotFound(f"task {task} is not the task of its record (an earlier attempt's)")
    try:
        ctx.store.transition(
            item[TABLE_KEY],
            HOST_KEY_PUBLISHED,
            # A warm pool task becomes claimable once its key is known (not one being stopped).
            set_fields={"host_key": host_key, **({"pool": "idle"} if _warming(item) else {})},
            equal={"task_arn": snapshot.task_arn},
            absent=("host_key",),
        )
        count("HostKeysPublished")
        logger.info("host key published", task_arn=snapshot.task_arn)
    except StaleWrite:
        current = ctx.reread(item)
        if current.get("host_key") != host_key:
            count("HostKeysRefused")
            logger.warning("a second, different host key for a task was refused", task_arn=snapshot.task_arn)
            raise HostKeyConflict(f"task {task} has published a different host key already") from None
    return {
        "task_id": task,
        "principal": task,
        "user_ca_keys": [ca_public_line(spki) for spki in ctx.ca.public_keys()],
    }


def _warming(item: dict) -> bool:
    return item.get("pool") == "warming" and not item.get("stop_requested")


def certify(ctx: JobContext, item: dict, public_key: str) -> dict:
    """Record a certificate for the job's client key, for the job's task only, valid until the job's
    deadline. Returns the record (unchanged when it has one, has no task yet, or is over)."""
    if item.get("ssh_certificate") or not item.get("task_arn") or item["state"] in TERMINAL:
        return item
    now = ctx.now()
    request = CertificateRequest(
        public_key_line=public_key,
        principal=task_id(item["task_arn"]),
        key_id=f"{item['job_key']} attempt {int(item['attempt'])}",
        valid_after=int(now) - CLOCK_SKEW,
        valid_before=int(item["deadline"]),
        serial=secrets.randbits(63),
        nonce=secrets.token_bytes(32),
    )
    certificate = user_certificate(request, ctx.ca.signing_key(), ctx.ca.sign)
    try:
        updated = ctx.store.transition(
            item[TABLE_KEY],
            CERTIFIED,
            set_fields={"ssh_certificate": certificate, "updated_at": clock.iso(now)},
            equal={"task_arn": item["task_arn"], "attempt": item["attempt"]},
        )
    except StaleWrite:
        return ctx.reread(item)
    count("CertificatesIssued")
    return updated
