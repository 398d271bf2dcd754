"""DynamoDB's per-item atomicity, for moto (in this process).

DynamoDB applies each write, its condition included, atomically: of two conditional writes racing on one
item, one fails. moto checks the condition and then changes the item in plain Python without a lock, so
under concurrent requests (the sandbox's threaded moto server, tests with threads) both can pass, and a
claim, a lease or a launch guarded by a condition is then taken twice by moto, never by DynamoDB.
`install` serialises moto's item reads and writes with one lock, which is all the atomicity the code
relies on (no transaction spans more than one call).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

ITEM_CALLS = ("put_item", "update_item", "delete_item", "transact_write_items", "get_item", "query", "scan")
_LOCK = threading.RLock()


def install() -> None:
    """Wrap moto's DynamoDB backend calls in the lock; calling it again changes nothing."""
    from moto.dynamodb.models import DynamoDBBackend

    for name in ITEM_CALLS:
        original = getattr(DynamoDBBackend, name)
        if getattr(original, "atomic_in_sandbox", False):
            continue
        setattr(DynamoDBBackend, name, _serialised(original))


def _serialised(call: Any) -> Any:
    @functools.wraps(call)
    def serialised(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            return call(self, *args, **kwargs)

    serialised.atomic_in_sandbox = True  # type: ignore[attr-defined]
    return serialised
