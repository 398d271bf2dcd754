"""Image references, service aliases, the allowlist, and the sandbox's image store."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from chalicelib.taskdefs import InvalidImage, allowed, parse_image, service_aliases
from sandbox.images import BUSYBOX, ImageStore
from sandbox.layout import IMAGE


@pytest.mark.parametrize(
    ("reference", "registry", "repository", "tag", "digest"),
    [
        ("busybox", "docker.io", "library/busybox", "latest", ""),
        ("busybox:1.36", "docker.io", "library/busybox", "1.36", ""),
        ("docker.io/library/busybox:1.36", "docker.io", "library/busybox", "1.36", ""),
        ("index.docker.io/library/busybox", "docker.io", "library/busybox", "latest", ""),
        ("bitnami/redis:7.2", "docker.io", "bitnami/redis", "7.2", ""),
        ("localhost:5000/team/app", "localhost:5000", "team/app", "latest", ""),
        (
            "registry.example.com:4999/tutum/wordpress:1",
            "registry.example.com:4999",
            "tutum/wordpress",
            "1",
            "",
        ),
        ("postgres@sha256:" + "a" * 64, "docker.io", "library/postgres", "", "sha256:" + "a" * 64),
        (IMAGE, "123456789012.dkr.ecr.eu-west-1.amazonaws.com", "fargate-ci/debian", "latest", ""),
    ],
)
def test_image_references_parse_as_docker_does(reference, registry, repository, tag, digest):
    ref = parse_image(reference)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repository, tag, digest)


@pytest.mark.parametrize(
    "reference",
    [
        "",
        "Busybox",
        "busybox:",
        "busybox:bad tag",
        "a//b",
        "-x",
        "busybox\n",
        "busybox@sha256:short",
        "x" * 300,
    ],
)
def test_what_is_not_an_image_reference_is_refused(reference):
    with pytest.raises(InvalidImage):
        parse_image(reference)


def test_ecr_images_are_told_apart():
    assert parse_image(IMAGE).is_ecr
    assert not parse_image("busybox").is_ecr
    assert not parse_image("evil.com/123456789012.dkr.ecr.eu-west-1.amazonaws.com/x").is_ecr


def test_service_aliases_follow_gitlabs_rules():
    # docs/executors/docker.md "Accessing the services" (tests/fixtures/README.md)
    assert service_aliases("tutum/wordpress:latest") == ("tutum__wordpress", "tutum-wordpress")
    assert service_aliases("registry.gitlab-wp.com:4999/tutum/wordpress") == (
        "registry.gitlab-wp.com__tutum__wordpress",
        "registry.gitlab-wp.com-tutum-wordpress",
    )
    assert service_aliases("postgres:16") == ("postgres", "postgres")


def test_the_allowlist_matches_registry_and_repository_globs():
    patterns = ("busybox", "library/alpine*", "123456789012.dkr.ecr.*.amazonaws.com/*", "ghcr.io/acme/*")
    assert allowed(parse_image("busybox:1.36"), patterns)
    assert allowed(parse_image("docker.io/library/alpine3"), patterns)
    assert allowed(parse_image(IMAGE), patterns)
    assert allowed(parse_image("ghcr.io/acme/tools/builder:2"), patterns)  # * spans /
    assert not allowed(parse_image("ghcr.io/other/x"), patterns)
    assert not allowed(parse_image("evil/busybox"), patterns)
    assert not allowed(parse_image("busybox"), ())


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ImageStore:
    store = ImageStore(tmp_path_factory.mktemp("images"))
    store.build()
    return store


def test_the_store_knows_busybox_by_any_spelling_and_tag_and_nothing_unknown(store):
    for name in ("busybox", "busybox:1.36", "docker.io/library/busybox:latest"):
        image = store.resolve(name)
        assert image is not None and image.cmd == ("sh",) and image.entrypoint == ()
    assert store.resolve("alpine") is None
    assert store.resolve("evil/busybox") is None
    assert store.resolve("NOT A NAME") is None
    assert store.resolve(IMAGE.replace(":latest", ":v2")) is not None


def test_busybox_holds_only_a_static_busybox(store):
    files = sorted(p for p in store.busybox_root.rglob("*") if not p.is_symlink() and p.is_file())
    assert files == [store.busybox_root / "bin" / "busybox"]
    links = {os.readlink(p) for p in (store.busybox_root / "bin").iterdir() if p.is_symlink()}
    assert links == {"busybox"}
    for absent in ("bash", "sshd", "python3", "git"):
        assert not (store.busybox_root / "bin" / absent).exists()
    banner = subprocess.run([store.busybox_root / "bin" / "busybox"], capture_output=True, text=True).stdout
    assert banner.startswith("BusyBox v")
    assert BUSYBOX.read_bytes() == (store.busybox_root / "bin" / "busybox").read_bytes()


def test_the_task_images_etc_holds_nothing_private(store):
    etc = store.task_etc
    assert not list(etc.rglob("ssh_host_*_key"))
    assert not (etc / "gshadow").exists()
    shadow = (etc / "shadow").read_text().splitlines()
    assert shadow and all(line.split(":")[1] == "*" for line in shadow)
    sshd = next(line for line in (etc / "passwd").read_text().splitlines() if line.startswith("sshd:"))
    assert sshd.split(":")[2:4] == ["0", "0"]
    for path in etc.rglob("*"):
        if not path.is_symlink() and path.is_file():
            assert Path("/etc", path.relative_to(etc)).stat().st_mode & 0o004 or path.name in (
                "shadow",
                "passwd",
            )
