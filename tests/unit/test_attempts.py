"""Which attempt a prepare without an answer started: certificates made by OpenSSH's own ssh-keygen."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from fargate_ci_driver.attempts import certified_key, own_attempt, public_key
from fargate_ci_driver.keys import generate_ed25519, public_line_of


def certify(tmp_path: Path, public_line: str, key_type: str = "ed25519") -> str:
    """`public_line` certified by a fresh CA, as `ssh-keygen -s` writes it."""
    ca = tmp_path / "ca"
    if not ca.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", key_type, "-N", "", "-f", str(ca)], check=True)
    user = tmp_path / f"user-{len(list(tmp_path.iterdir()))}.pub"
    user.write_text(public_line + "\n")
    subprocess.run(
        ["ssh-keygen", "-q", "-s", str(ca), "-I", "job", "-n", "task-1", "-V", "+1h", str(user)], check=True
    )
    return user.with_name(user.stem + "-cert.pub").read_text().strip()


def test_the_attempt_whose_certificate_certifies_our_key_is_ours(tmp_path):
    ours = generate_ed25519("fargate-ci-t3sT-1")
    view = {"attempt": 2, "ssh_certificate": certify(tmp_path, ours.public_line)}

    assert own_attempt(view, ours.public_line) == 2
    assert certified_key(view["ssh_certificate"]) == public_key(ours.public_line)


def test_an_attempt_certified_for_another_key_is_not_ours(tmp_path):
    ours, theirs = generate_ed25519("a"), generate_ed25519("b")
    view = {"attempt": 3, "ssh_certificate": certify(tmp_path, theirs.public_line)}

    assert own_attempt(view, ours.public_line) is None


@pytest.mark.parametrize(
    "view",
    [
        {"attempt": 1},  # no certificate yet
        {"attempt": 1, "ssh_certificate": None},
        {"attempt": 1, "ssh_certificate": "ssh-ed25519-cert-v01@openssh.com !!!not-base64"},
        {"attempt": 1, "ssh_certificate": "ssh-ed25519-cert-v01@openssh.com AAAA"},  # truncated blob
        {"attempt": True, "ssh_certificate": "CERT"},
        {"attempt": 0, "ssh_certificate": "CERT"},
        {"attempt": "1", "ssh_certificate": "CERT"},
    ],
)
def test_no_proof_is_no_attempt(tmp_path, view):
    ours = generate_ed25519("a")
    if view.get("ssh_certificate") == "CERT":
        view = {**view, "ssh_certificate": certify(tmp_path, ours.public_line)}

    assert own_attempt(view, ours.public_line) is None


def test_a_certificate_of_another_key_type_or_a_key_line_as_certificate_proves_nothing(tmp_path):
    ours = generate_ed25519("a")
    # A certificate must be an ed25519 certificate: the key line itself, relabelled, is not one.
    relabelled = ours.public_line.replace("ssh-ed25519", "ssh-ed25519-cert-v01@openssh.com", 1)

    assert certified_key(relabelled) is None
    assert certified_key(ours.public_line) is None
    assert public_key("ssh-rsa AAAAB3NzaC1yc2E= x") is None


def test_the_key_files_public_line_is_the_one_prepare_sent(tmp_path):
    ours = generate_ed25519("fargate-ci-t3sT-1")
    certificate = certify(tmp_path, ours.public_line)
    # The key file holds the PEM, then (once the orchestrator answered) the certificate.
    assert public_line_of(ours.private_pem) == ours.public_line.rsplit(" ", 1)[0]
    assert public_line_of(ours.private_pem.rstrip("\n") + "\n" + certificate + "\n") == public_line_of(
        ours.private_pem
    )
    with pytest.raises(ValueError):
        public_line_of("KEY")
