"""The sandbox's image store as registries: derived images (POST /images) and what the registries serve of
them, read back with the orchestrator's own client (chalicelib/registry.py) over real HTTP."""

from __future__ import annotations

import boto3
import pytest
from moto import mock_aws

from chalicelib.errors import RegistryLookupFailed
from chalicelib.registry import AwsRegistryCredentials, ImageConfig, RegistryClient
from chalicelib.taskdefs import parse_image
from sandbox.aws_host import serve_registries
from sandbox.images import ImageStore
from sandbox.layout import IMAGE


@pytest.fixture
def store(tmp_path):
    return ImageStore(tmp_path / "images")  # resolving and deriving need no built filesystem


def test_a_derived_image_takes_its_bases_filesystem_and_the_config_overrides(store):
    image = store.derive(
        "sandbox/web:1",
        "busybox",
        {
            "ExposedPorts": {"8080/tcp": {}, "53": {}},
            "Entrypoint": ["httpd"],
            "Env": ["MODE=test", "PATH=/bin"],
            "WorkingDir": "/www",
            "User": "1000",
        },
    )
    busybox = store.resolve("busybox")
    assert image.binds == busybox.binds
    assert image.entrypoint == ("httpd",) and image.cmd == ()  # ENTRYPOINT resets the base's CMD
    assert dict(image.env) == {"PATH": "/bin", "MODE": "test"}
    assert (image.workdir, image.user, image.exposed_ports) == ("/www", "1000", ("8080/tcp", "53/tcp"))
    assert store.resolve("sandbox/web:1") == image
    assert store.resolve("docker.io/sandbox/web:1") == image
    assert store.resolve("sandbox/web:2") is None  # per tag
    kept = store.derive("sandbox/cmd:1", "sandbox/web:1", {"Cmd": ["-f"]})
    assert (kept.entrypoint, kept.cmd) == (("httpd",), ("-f",))


@pytest.mark.parametrize(
    ("name", "base", "config", "message"),
    [
        ("Sandbox/Web", "busybox", {}, "name"),
        ("ghcr.io/acme/web:1", "busybox", {}, "Docker Hub name"),
        ("busybox:2", "busybox", {}, "not busybox"),
        ("sandbox/web:1", "alpine", {}, "base: no image 'alpine'"),
        ("sandbox/web:1", "busybox", {"Volumes": {}}, "config takes only"),
        ("sandbox/web:1", "busybox", {"Cmd": "httpd"}, "Cmd must be a list"),
        ("sandbox/web:1", "busybox", {"Env": ["NOEQUALS"]}, "Env: 'NOEQUALS'"),
        ("sandbox/web:1", "busybox", {"WorkingDir": "www"}, "WorkingDir must be an absolute path"),
        ("sandbox/web:1", "busybox", {"ExposedPorts": {"http": {}}}, "ExposedPorts must name ports"),
    ],
)
def test_a_bad_derived_image_is_refused_naming_what_is_wrong(store, name, base, config, message):
    with pytest.raises(ValueError, match=message):
        store.derive(name, base, config)
    assert store.resolve("sandbox/web:1") is None


def test_the_registries_serve_each_image_with_the_config_its_containers_run_with(store):
    store.derive("sandbox/db:1", "busybox", {"ExposedPorts": {"5432/tcp": {}}, "WorkingDir": "/data"})
    servers = serve_registries(store)
    try:
        endpoints = {host: f"http://127.0.0.1:{s.server_address[1]}" for host, s in servers.items()}
        with mock_aws():  # ecr:GetAuthorizationToken as moto answers it: the login the sandbox's ECR wants
            session = boto3.session.Session(
                aws_access_key_id="test", aws_secret_access_key="test", region_name="eu-west-1"
            )
            logins = AwsRegistryCredentials(
                lambda service, region: session.client(service, region_name=region)
            )
            client = RegistryClient(logins, endpoints)
            task = client.image_config(parse_image(IMAGE))
        assert task.first_exposed_port() == 22 and task.workdir == "/root"
        db = client.image_config(parse_image("sandbox/db:1"), {"cpuArchitecture": "ARM64"})
        assert db == ImageConfig(exposed_ports=("5432/tcp",), workdir="/data", architecture="arm64")
        assert client.image_config(parse_image("busybox:1.36")).first_exposed_port() is None
        with pytest.raises(RegistryLookupFailed, match=r"has no docker\.io/library/alpine:3"):
            client.image_config(parse_image("alpine:3"))
    finally:
        for server in servers.values():
            server.shutdown()
