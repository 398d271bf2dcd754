"""OpenSSH user certificates signed by a CA whose private key never leaves KMS. Pure: the signature comes
from a callable (the KMS adapter), so this module only lays out bytes.

Formats (OpenSSH's PROTOCOL.certkeys, RFC 4251 for string/uint/mpint, RFC 5656 for ECDSA keys and
signatures): an `ssh-ed25519-cert-v01@openssh.com` certificate for the job's ed25519 client key, signed by
an `ecdsa-sha2-nistp256` CA. KMS's ECC_NIST_P256 key with ECDSA_SHA_256 signs sha256(message) and answers a
DER `ECDSA-Sig-Value` (RFC 3279 2.2.3); OpenSSH wants `string "ecdsa-sha2-nistp256", string (mpint r,
mpint s)` (RFC 5656 3.1.2), and sshd accepts the CA type (its default CASignatureAlgorithms list it).
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

CERT_TYPE = "ssh-ed25519-cert-v01@openssh.com"
CA_TYPE = "ecdsa-sha2-nistp256"
USER_CERT = 1
# A P-256 SubjectPublicKeyInfo (what KMS GetPublicKey answers, DER): this header, then the 65-byte
# uncompressed point (0x04 || X || Y). id-ecPublicKey (1.2.840.10045.2.1), prime256v1 (1.2.840.10045.3.1.7).
_P256_SPKI_HEADER = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
_ED25519_LINE = re.compile(r"ssh-ed25519 ([A-Za-z0-9+/]{68}={0,2})( .*)?")
CLOCK_SKEW = 60  # a certificate is valid from a minute ago: the task's clock may run a little ahead


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _mpint(value: int) -> bytes:
    """RFC 4251 mpint (>= 0): length, minimal big-endian bytes, a 0 first if the top bit is set."""
    if value == 0:
        return _string(b"")
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return _string(b"\x00" + raw if raw[0] & 0x80 else raw)


def ca_public_blob(spki_der: bytes) -> bytes:
    """The CA's public key as SSH wire bytes, from KMS's DER SubjectPublicKeyInfo of an ECC_NIST_P256 key."""
    if len(spki_der) != len(_P256_SPKI_HEADER) + 65 or not spki_der.startswith(_P256_SPKI_HEADER):
        raise ValueError("the CA key is not an ECC_NIST_P256 public key (SubjectPublicKeyInfo)")
    point = spki_der[len(_P256_SPKI_HEADER) :]
    if point[0] != 0x04:
        raise ValueError("the CA key's point is not uncompressed")
    return _string(CA_TYPE.encode()) + _string(b"nistp256") + _string(point)


def ca_public_line(spki_der: bytes, comment: str = "fargate-ci-user-ca") -> str:
    """The CA's public key as an OpenSSH line (sshd's TrustedUserCAKeys)."""
    return f"{CA_TYPE} {base64.b64encode(ca_public_blob(spki_der)).decode()} {comment}"


def _der_integer(data: bytes, at: int) -> tuple[int, int]:
    if data[at] != 0x02:
        raise ValueError("not a DER INTEGER")
    length = data[at + 1]
    if length & 0x80:
        raise ValueError("DER INTEGER too long for a P-256 signature")
    start = at + 2
    return int.from_bytes(data[start : start + length], "big"), start + length


def ssh_signature(der: bytes) -> bytes:
    """KMS's DER ECDSA signature as an SSH signature blob."""
    if len(der) < 8 or der[0] != 0x30 or der[1] != len(der) - 2:
        raise ValueError("not a DER ECDSA signature")
    r, at = _der_integer(der, 2)
    s, end = _der_integer(der, at)
    if end != len(der):
        raise ValueError("trailing bytes after a DER ECDSA signature")
    return _string(CA_TYPE.encode()) + _string(_mpint(r) + _mpint(s))


def ed25519_public_key(line: str) -> bytes:
    """The 32 key bytes of an `ssh-ed25519 AAAA...` line."""
    match = _ED25519_LINE.fullmatch(line.strip())
    if not match:
        raise ValueError("not an ssh-ed25519 public key line")
    blob = base64.b64decode(match[1])
    prefix = _string(b"ssh-ed25519")
    if not blob.startswith(prefix) or len(blob) != len(prefix) + 4 + 32:
        raise ValueError("not an ssh-ed25519 public key")
    return blob[len(prefix) + 4 :]


@dataclass(frozen=True)
class CertificateRequest:
    public_key_line: str  # the job's client key (ssh-ed25519)
    principal: str  # the task id: sshd in that task accepts only this name (AuthorizedPrincipalsFile)
    key_id: str  # logged by sshd on every login: the job key and attempt
    valid_after: int  # epoch seconds
    valid_before: int
    serial: int
    nonce: bytes


def user_certificate(request: CertificateRequest, ca_spki_der: bytes, sign: Callable[[bytes], bytes]) -> str:
    """An OpenSSH user certificate line (`ssh-ed25519-cert-v01@openssh.com AAAA... key_id`).

    No critical options and no extensions: no PTY, no port, agent or X11 forwarding, no user rc (the task's
    sshd refuses them anyway). `sign(message)` returns the CA's DER ECDSA-SHA256 signature of `message`."""
    body = b"".join(
        (
            _string(CERT_TYPE.encode()),
            _string(request.nonce),
            _string(ed25519_public_key(request.public_key_line)),
            struct.pack(">Q", request.serial),
            struct.pack(">I", USER_CERT),
            _string(request.key_id.encode()),
            _string(_string(request.principal.encode())),
            struct.pack(">Q", request.valid_after),
            struct.pack(">Q", request.valid_before),
            _string(b""),  # critical options
            _string(b""),  # extensions: none (no permit-pty, no forwarding)
            _string(b""),  # reserved
            _string(ca_public_blob(ca_spki_der)),
        )
    )
    certificate = body + _string(ssh_signature(sign(body)))
    return f"{CERT_TYPE} {base64.b64encode(certificate).decode()} {request.key_id}"
