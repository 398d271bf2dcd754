"""GET /jobs: the query string parsed and validated, and the opaque page cursor. Pure: no AWS here.

Every rejection is an InvalidInput naming the parameter. The cursor is the last listed record's position in
the owner index (its record key and `created_at`), base64url-encoded JSON; it is opaque to callers and only
ever accepted from its owner: its record key must carry the caller's own digest.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from chalicelib.clock import iso, parse
from chalicelib.errors import InvalidInput
from chalicelib.jobs import is_record_key, owner_digest
from chalicelib.schema import OWNER_KEY, TABLE_KEY
from chalicelib.states import JobState

DEFAULT_LIMIT = 50
MAX_LIMIT = 100
PARAMETERS = ("live", "state", "since", "limit", "cursor")
# An ISO 8601 UTC instant: date, time, optional fraction, Z (or +00:00).
_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)", re.ASCII)
_CREATED_AT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z", re.ASCII)
_MAX_CURSOR = 512


@dataclass(frozen=True)
class ListQuery:
    """A validated GET /jobs."""

    owner_key: str
    live: bool | None = None  # None: live and finished jobs alike
    states: tuple[str, ...] = ()  # empty: any state
    since: str | None = None  # created at or after, in `clock.iso`'s form (string order is time order)
    limit: int = DEFAULT_LIMIT
    start_key: dict | None = None  # where the previous page ended (the owner index's key)


def parse_list_query(params: Mapping[str, str] | None, owner: str) -> ListQuery:
    """The query string of GET /jobs for `owner`: live=true|false, state=S[,S...], since=<ISO 8601 UTC>,
    limit=1..100, cursor=<next_cursor of the previous page>. Unknown parameters are refused."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise InvalidInput(
            f"unknown query parameter {unknown[0]!r} (known: {', '.join(PARAMETERS)})", field=unknown[0]
        )
    digest = owner_digest(owner)
    return ListQuery(
        owner_key=digest,
        live=_live(params.get("live")),
        states=_states(params.get("state")),
        since=_since(params.get("since")),
        limit=_limit(params.get("limit")),
        start_key=decode_cursor(params["cursor"], digest) if "cursor" in params else None,
    )


def _live(value: str | None) -> bool | None:
    if value is None:
        return None
    if value not in ("true", "false"):
        raise InvalidInput("live must be true or false", field="live")
    return value == "true"


def _states(value: str | None) -> tuple[str, ...]:
    if value is None:
        return ()
    names = [name.strip().upper() for name in value.split(",")]
    known = [s.value for s in JobState]
    for name in names:
        if name not in known:
            raise InvalidInput(f"state {name!r} is not a job state ({', '.join(known)})", field="state")
    return tuple(dict.fromkeys(names))


def _since(value: str | None) -> str | None:
    if value is None:
        return None
    if not _INSTANT.fullmatch(value):
        raise InvalidInput("since must be an ISO 8601 UTC time such as 2026-12-01T08:00:00Z", field="since")
    try:
        # Before 1970 means "all": no job is older (and iso() needs a four-digit year to sort as text).
        return iso(max(0.0, parse(value) or 0.0))
    except (ValueError, OverflowError):
        raise InvalidInput(f"since {value!r} is not a valid time", field="since") from None


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise InvalidInput(f"limit must be an integer from 1 to {MAX_LIMIT}", field="limit")
    return int(value)


def encode_cursor(start_key: Mapping[str, str]) -> str:
    """The opaque `next_cursor` for a page that ended at `start_key` (the owner index's key)."""
    position = {"k": start_key[TABLE_KEY], "c": start_key["created_at"]}
    return base64.urlsafe_b64encode(json.dumps(position, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(cursor: str, digest: str) -> dict:
    """The owner index's start key a cursor stands for; InvalidInput unless it is one of `digest`'s."""
    bad = InvalidInput("cursor is not a next_cursor this API gave you", field="cursor")
    if not isinstance(cursor, str) or not cursor or len(cursor) > _MAX_CURSOR:
        raise bad
    try:
        position = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        raise bad from None
    if not isinstance(position, dict) or set(position) != {"k", "c"}:
        raise bad
    key, created = position["k"], position["c"]
    if not isinstance(key, str) or not isinstance(created, str) or not _CREATED_AT.fullmatch(created):
        raise bad
    if not is_record_key(key) or not key.endswith("/" + digest):
        raise bad
    return {TABLE_KEY: key, OWNER_KEY: digest, "created_at": created}
