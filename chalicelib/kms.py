"""The one place that talks to KMS: the SSH user CA's key (an asymmetric ECC_NIST_P256 SIGN_VERIFY key; its
private half never leaves KMS). AWS errors become the orchestrator's."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from chalicelib.errors import CertificateUnavailable

SIGNING_ALGORITHM = "ECDSA_SHA_256"


class KmsCa:
    """Signs with the first of `key_ids` (the current CA); every one of them is trusted by new tasks, so a
    rotation adds the new key first and drops the old one after the longest job (operators-guide)."""

    def __init__(self, kms_client: Any, key_ids: tuple[str, ...]):
        self._kms = kms_client
        self._key_ids = key_ids
        self._public: dict[str, bytes] = {}

    @property
    def configured(self) -> bool:
        return bool(self._key_ids)

    def _require(self) -> None:
        if not self._key_ids:
            raise CertificateUnavailable(
                "no SSH user CA is configured (setting SSH_CA_KMS_KEY_IDS)", retry_after=30
            )

    def public_keys(self) -> list[bytes]:
        """Every trusted CA key, as KMS's DER SubjectPublicKeyInfo (cached: a key's public half never
        changes)."""
        self._require()
        for key_id in self._key_ids:
            if key_id not in self._public:
                try:
                    self._public[key_id] = self._kms.get_public_key(KeyId=key_id)["PublicKey"]
                except (ClientError, BotoCoreError) as exc:
                    raise CertificateUnavailable(
                        f"KMS GetPublicKey for the SSH CA failed: {exc}", retry_after=2
                    ) from exc
        return [self._public[k] for k in self._key_ids]

    def signing_key(self) -> bytes:
        """The current CA's public key (DER)."""
        return self.public_keys()[0]

    def sign(self, message: bytes) -> bytes:
        """The current CA's DER ECDSA-SHA256 signature of `message` (KMS hashes it: MessageType RAW, at most
        4096 bytes, which a certificate never reaches)."""
        self._require()
        try:
            return self._kms.sign(
                KeyId=self._key_ids[0],
                Message=message,
                MessageType="RAW",
                SigningAlgorithm=SIGNING_ALGORITHM,
            )["Signature"]
        except (ClientError, BotoCoreError) as exc:
            raise CertificateUnavailable(f"KMS Sign for the SSH CA failed: {exc}", retry_after=2) from exc
