"""Which attempt of a job this prepare started, when the answer to its `POST /jobs` never came.

The POST may have reached the orchestrator and started a task although the driver saw a timeout. The job's
view then names an attempt; it is ours exactly when its certificate certifies our client key: every prepare
makes a fresh key pair and the orchestrator signs the key of the request that started the attempt. Anything
else (no certificate yet, another key, a malformed one) is not proof, and nothing is stopped on a guess.

Pure: OpenSSH's formats only (PROTOCOL.certkeys: a certificate's blob is its type, a nonce, then the
certified public key's own fields; an ed25519 key's is one 32-byte string).
"""

from __future__ import annotations

import base64
import binascii

ED25519 = "ssh-ed25519"
ED25519_CERT = "ssh-ed25519-cert-v01@openssh.com"


def own_attempt(view: dict, public_line: str) -> int | None:
    """The view's attempt when its `ssh_certificate` certifies the key of `public_line`; else None."""
    attempt = view.get("attempt")
    if not isinstance(attempt, int) or isinstance(attempt, bool) or attempt < 1:
        return None
    certified = certified_key(view.get("ssh_certificate") or "")
    ours = public_key(public_line)
    return attempt if certified is not None and certified == ours else None


def public_key(line: str) -> bytes | None:
    """The 32 key bytes of an "ssh-ed25519 AAAA... [comment]" line."""
    fields = _fields(line, ED25519, 1)
    return fields[0] if fields and len(fields[0]) == 32 else None


def certified_key(line: str) -> bytes | None:
    """The 32 key bytes an "ssh-ed25519-cert-v01@openssh.com AAAA..." certificate certifies."""
    fields = _fields(line, ED25519_CERT, 2)  # the nonce, then the key
    return fields[1] if fields and len(fields[1]) == 32 else None


def _fields(line: str, kind: str, count: int) -> list[bytes] | None:
    """The first `count` strings after the type in a key line's blob, when the line is of `kind`."""
    parts = line.split() if isinstance(line, str) else []
    if len(parts) < 2 or parts[0] != kind:
        return None
    try:
        blob = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    strings: list[bytes] = []
    offset = 0
    while len(strings) < count + 1:
        if offset + 4 > len(blob):
            return None
        size = int.from_bytes(blob[offset : offset + 4], "big")
        offset += 4
        if offset + size > len(blob):
            return None
        strings.append(blob[offset : offset + size])
        offset += size
    if strings[0] != kind.encode():
        return None
    return strings[1:]
