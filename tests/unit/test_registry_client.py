"""chalicelib/registry.py against real registries over real HTTP: the sandbox's registry (token flow, Basic
login, OCI index, blob redirect to a "CDN") and small misbehaving ones (bad digest, oversize, silence)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from chalicelib import registry as registry_module
from chalicelib.errors import RegistryLookupFailed
from chalicelib.registry import ImageConfig, RegistryClient, parse_challenge
from chalicelib.taskdefs import parse_image
from sandbox.registry import RegistryHandler, canonical, serve

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "registry"
ECR = "123456789012.dkr.ecr.eu-west-1.amazonaws.com"
# The OCI image-spec's own example config (tests/fixtures/README.md): EXPOSE 8080/tcp, User alice.
SPEC_CONFIG = json.loads((FIXTURES / "oci-config-example.json").read_text())
PORTS_CONFIG = {
    "config": {"ExposedPorts": {"9000-9010/tcp": {}, "53/udp": {}, "7000/tcp": {}, "8080": {}}},
    "rootfs": {"type": "layers", "diff_ids": []},
}
IMAGES = {("acme/app", "1"): SPEC_CONFIG, ("acme/ports", "1"): PORTS_CONFIG}


def resolve(repository: str, tag: str) -> dict | None:
    return IMAGES.get((repository, tag))


class Logins:
    """The credentials a real deployment reads from ECR and Secrets Manager, and what was asked of them."""

    def __init__(
        self, ecr: tuple[str, str] = ("AWS", "ecr-password"), private: tuple[str, str] | None = None
    ):
        self._ecr, self._private = ecr, private
        self.asked: list[str] = []

    def ecr(self, registry: str) -> tuple[str, str]:
        self.asked.append(registry)
        return self._ecr

    def private(self) -> tuple[str, str] | None:
        self.asked.append("private")
        return self._private


@pytest.fixture
def hub() -> Iterator[ThreadingHTTPServer]:
    """Docker Hub's way: an anonymous Bearer token from the realm its 401 names."""
    server = serve(resolve)
    yield server
    server.shutdown()


def url(server: ThreadingHTTPServer, host: str = "127.0.0.1") -> str:
    return f"http://{host}:{server.server_address[1]}"


def lookup(server: ThreadingHTTPServer, image: str, **kwargs: object) -> ImageConfig:
    ref = parse_image(image)
    client = RegistryClient(endpoints={ref.registry: url(server)}, **kwargs)  # type: ignore[arg-type]
    return client.image_config(ref)


def test_the_token_flow_reads_the_images_config_for_the_tasks_platform(hub):
    config = lookup(hub, "acme/app:1")
    assert config == ImageConfig(
        exposed_ports=("8080/tcp",), user="alice", workdir="/home/alice", architecture="amd64"
    )
    assert config.first_exposed_port() == 8080
    arm = RegistryClient(endpoints={"docker.io": url(hub)}).image_config(
        parse_image("acme/app:1"), {"cpuArchitecture": "ARM64", "operatingSystemFamily": "LINUX"}
    )
    assert arm.architecture == "arm64"
    # tokens were handed out for that repository only
    assert set(hub.RequestHandlerClass.tokens.values()) == {"acme/app"}


def test_the_first_exposed_port_is_the_lowest_tcp_one_as_gitlabs_docker_executor_picks_it(hub):
    config = lookup(hub, "acme/ports:1")
    assert config.first_exposed_port() == 7000  # not 53/udp; a range counts by its first port; "8080" is tcp
    assert ImageConfig(exposed_ports=("53/udp",)).first_exposed_port() is None
    assert ImageConfig(exposed_ports=("9000-9010/tcp", "x/tcp", "70000/tcp")).first_exposed_port() == 9000
    assert ImageConfig().first_exposed_port() is None


def test_an_image_the_registry_lacks_is_a_clear_failure(hub):
    with pytest.raises(RegistryLookupFailed, match=r"has no docker.io/acme/nothing:1"):
        lookup(hub, "acme/nothing:1")


def test_a_pinned_digest_is_fetched_by_digest_and_checked(hub):
    index = lookup(hub, "acme/app:1")  # makes the documents
    assert index.user == "alice"
    handler = hub.RequestHandlerClass
    digest = next(d for d, (t, _) in handler.content.documents.items() if t.endswith("index.v1+json"))
    assert lookup(hub, f"acme/app@{digest}").first_exposed_port() == 8080
    other = "sha256:" + "0" * 64
    with pytest.raises(RegistryLookupFailed, match="has no"):
        lookup(hub, f"acme/app@{other}")


def test_ecr_takes_its_basic_login_and_only_ecr_gets_it():
    server = serve(resolve, auth="basic", basic_login=("AWS", "ecr-password"))
    try:
        logins = Logins()
        client = RegistryClient(logins, {ECR: url(server)})
        assert client.image_config(parse_image(f"{ECR}/acme/app:1")).user == "alice"
        assert logins.asked == [ECR]
        wrong = RegistryClient(Logins(ecr=("AWS", "stale")), {ECR: url(server)})
        with pytest.raises(RegistryLookupFailed, match=r"refused access \(401\)"):
            wrong.image_config(parse_image(f"{ECR}/acme/app:1"))
        # A Basic registry that is not ECR gets the private registries' secret, and none when there is none.
        private = RegistryClient(Logins(private=None), {"registry.example.com": url(server)})
        with pytest.raises(RegistryLookupFailed, match="wants a login and none is configured"):
            private.image_config(parse_image("registry.example.com/acme/app:1"))
        secret = RegistryClient(
            Logins(private=("AWS", "ecr-password")), {"registry.example.com": url(server)}
        )
        assert secret.image_config(parse_image("registry.example.com/acme/app:1")).user == "alice"
    finally:
        server.shutdown()


def test_a_blob_redirect_to_another_host_is_followed_without_our_token(hub):
    # The blob comes from a "CDN" on another host name, which (like S3's signed URLs) refuses any
    # Authorization header: the config is read only if the token stays behind.
    hub.RequestHandlerClass.cdn_base = url(hub, "localhost")
    ref = parse_image("acme/app:1")
    client = RegistryClient(endpoints={"docker.io": url(hub), "cdn": url(hub, "localhost")})
    assert client.image_config(ref).first_exposed_port() == 8080


def test_a_redirect_or_realm_to_plain_http_elsewhere_is_refused(hub):
    hub.RequestHandlerClass.cdn_base = url(hub, "localhost")  # http, and not an endpoint of ours
    with pytest.raises(RegistryLookupFailed, match="HTTPS only"):
        lookup(hub, "acme/app:1")


def test_loopback_and_link_local_registries_are_refused_unless_configured():
    for image in ("127.0.0.1:5000/acme/app:1", "localhost:5000/acme/app:1", "169.254.169.254/acme/app:1"):
        with pytest.raises(RegistryLookupFailed, match="not a registry's address"):
            RegistryClient().image_config(parse_image(image))


class Tampered(RegistryHandler):
    """Serves a config blob other than the one its digest names."""

    def _cdn(self, digest: str) -> None:
        found = self.content.get(digest)
        if found is None or b'"config"' not in found[1]:
            return super()._cdn(digest)
        body = found[1].replace(b"8080/tcp", b"2222/tcp")
        self._send(200, body, {"Content-Type": "application/octet-stream"})


def test_a_document_that_does_not_match_its_digest_is_refused():
    server = serve(resolve, handler=Tampered)
    try:
        with pytest.raises(RegistryLookupFailed, match="the image config does not match its digest"):
            lookup(server, "acme/app:1")
    finally:
        server.shutdown()


class Oversized(RegistryHandler):
    """A manifest far larger than any real one: declared, or streamed without a length."""

    declare = True

    def _manifest(self, repository: str, reference: str) -> None:
        body = canonical(
            {"schemaVersion": 2, "manifests": [], "pad": "x" * (registry_module.MAX_MANIFEST + 10)}
        )
        if self.declare:
            return self._send(200, body, {"Content-Type": "application/vnd.oci.image.index.v1+json"})
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.oci.image.index.v1+json")
        self.send_header("Connection", "close")
        self.end_headers()
        for start in range(0, len(body), 65536):
            self.wfile.write(body[start : start + 65536])
        self.close_connection = True


@pytest.mark.parametrize("declare", [True, False])
def test_an_oversized_answer_is_refused(declare):
    server = serve(resolve, handler=type("Sized", (Oversized,), {"declare": declare}))
    try:
        with pytest.raises(RegistryLookupFailed, match=f"larger than {registry_module.MAX_MANIFEST} bytes"):
            lookup(server, "acme/app:1")
    finally:
        server.shutdown()


class Silent(RegistryHandler):
    """Accepts the connection, then says nothing until released."""

    release: threading.Event

    def do_GET(self) -> None:
        self.release.wait(30)


def test_a_registry_that_does_not_answer_is_given_up_on_within_the_budget():
    release = threading.Event()
    server = serve(resolve, handler=type("Quiet", (Silent,), {"release": release}))
    try:
        with pytest.raises(RegistryLookupFailed, match=r"no answer from 127\.0\.0\.1 within 0\.5 s"):
            lookup(server, "acme/app:1", timeout=5.0, budget=0.5)
    finally:
        release.set()
        server.shutdown()


def test_nothing_listening_is_a_clear_failure():
    server = serve(resolve)
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    client = RegistryClient(endpoints={"docker.io": f"http://127.0.0.1:{port}"})
    with pytest.raises(RegistryLookupFailed, match="connection refused"):
        client.image_config(parse_image("acme/app:1"))


def test_challenges_are_parsed_as_docker_hub_and_ecr_send_them():
    assert parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io"') == (
        "bearer",
        {"realm": "https://auth.docker.io/token", "service": "registry.docker.io"},
    )
    _, params = parse_challenge(
        'Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:a/b:pull,push"'
    )
    assert params["scope"] == "repository:a/b:pull,push"
    assert (
        parse_challenge(
            'Basic realm="https://1.dkr.ecr.us-east-1.amazonaws.com/",service="ecr.amazonaws.com"'
        )[0]
        == "basic"
    )


def test_an_index_without_the_tasks_platform_is_a_clear_failure():
    class OnlyPpc(RegistryHandler):
        def _manifest(self, repository: str, reference: str) -> None:
            body = canonical(
                {
                    "schemaVersion": 2,
                    "mediaType": "application/vnd.oci.image.index.v1+json",
                    "manifests": [
                        {
                            "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "size": 7143,
                            # the OCI image-spec's example index entry (image-index.md)
                            "digest": "sha256:"
                            "e692418e4cbaf90ca69d05a66403747baa33ee08806650b51fab815ad7fc331f",
                            "platform": {"architecture": "ppc64le", "os": "linux"},
                        }
                    ],
                }
            )
            self._send(200, body, {"Content-Type": "application/vnd.oci.image.index.v1+json"})

    server = serve(resolve, handler=OnlyPpc)
    try:
        with pytest.raises(RegistryLookupFailed, match="the image has no linux/amd64 variant"):
            lookup(server, "acme/app:1")
    finally:
        server.shutdown()


def test_a_login_the_token_service_refuses_falls_back_to_an_anonymous_token():
    class PickyTokens(RegistryHandler):
        """A token service that refuses the private registry's login, and hands anonymous tokens out."""

        def _token(self, query):
            if self.headers.get("Authorization"):
                return self._error(401, "UNAUTHORIZED", "bad credentials")
            return super()._token(query)

    server = serve(resolve, handler=PickyTokens)
    try:
        client = RegistryClient(Logins(private=("someone", "else's")), {"docker.io": url(server)})
        # the realm is plain HTTP on an endpoint of ours: the login is sent, refused, then left out
        assert client.image_config(parse_image("acme/app:1")).first_exposed_port() == 8080
    finally:
        server.shutdown()
