"""Per-job ed25519 key pairs: the client key the runner manager logs in with, and the task's host key.

Only prepare makes keys, so `cryptography` is imported here, inside the function, not by config or run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyPair:
    private_pem: str  # OpenSSH PEM: a secret, never logged or stored outside the 0600 metadata files
    public_line: str  # "ssh-ed25519 AAAA... comment"

    def __repr__(self) -> str:  # keep the private half out of any accidental log line or traceback
        return f"KeyPair(public_line={self.public_line!r})"


def generate_ed25519(comment: str) -> KeyPair:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode("ascii")
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return KeyPair(private_pem=private_pem, public_line=f"{public.decode('ascii')} {comment}")


def public_line_of(private_pem: str) -> str:
    """The "ssh-ed25519 AAAA..." line of a client key file (its PEM; a certificate after it is ignored).
    ValueError when the file holds no such key."""
    from cryptography.hazmat.primitives import serialization

    end = "-----END OPENSSH PRIVATE KEY-----"
    pem, found, _ = private_pem.partition(end)
    if not found:
        raise ValueError("no OpenSSH private key")
    key = serialization.load_ssh_private_key((pem + end + "\n").encode("ascii"), password=None)
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public.decode("ascii")
