"""fargate.toml: every bad, missing or unknown key is one clear error naming the file and the key."""

from __future__ import annotations

import pytest

from fargate_ci_driver.errors import ConfigError
from fargate_ci_driver.settings import load, parse

GOOD = {
    "LogLevel": "info",
    "Fargate": {"Region": "eu-west-1", "TaskDefinition": "ci-coordinator:3", "PlatformVersion": "1.4.0"},
    "TaskMetadata": {"Directory": "/var/lib/fargate-driver"},
    "SSH": {"Username": "root", "Port": 22},
    "Orchestrator": {"URL": "https://abc.execute-api.eu-west-1.amazonaws.com/api/"},
    "Job": {"BuildsDir": "/builds", "CacheDir": "/cache", "PrepareTimeout": 300},
}


def with_changes(**sections: dict | str | None) -> dict:
    doc = {k: (dict(v) if isinstance(v, dict) else v) for k, v in GOOD.items()}
    for name, change in sections.items():
        if change is None:
            doc.pop(name, None)
        elif isinstance(change, dict):
            section = doc.setdefault(name, {})
            for key, value in change.items():
                if value is None:
                    section.pop(key, None)
                else:
                    section[key] = value
        else:
            doc[name] = change
    return doc


def test_a_go_driver_file_plus_the_orchestrator_section_loads():
    settings = parse(GOOD, "f.toml")
    assert settings.orchestrator_url == "https://abc.execute-api.eu-west-1.amazonaws.com/api"
    assert settings.region == "eu-west-1"  # signing region falls back to [Fargate] Region
    assert settings.task_definition == "ci-coordinator:3"
    assert (settings.ssh_user, settings.ssh_port, settings.ssh_shell) == ("root", 22, "bash")
    assert (settings.builds_dir, settings.cache_dir, settings.prepare_timeout) == ("/builds", "/cache", 300)
    assert settings.notes == ()


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"Orchestrator": {"URL": None}}, "[Orchestrator] URL is required"),
        ({"Orchestrator": {"URL": "ftp://x"}}, "[Orchestrator] URL"),
        ({"Orchestrator": {"URL": 12}}, "[Orchestrator] URL: expected a string, got an integer"),
        ({"Orchestrator": {"Timeout": 0}}, "[Orchestrator] Timeout"),
        ({"Orchestrator": {"Timeout": "10"}}, "[Orchestrator] Timeout: expected a number"),
        ({"Orchestrator": {"Region": "Ireland"}}, "[Orchestrator] Region"),
        ({"Fargate": {"Region": None}}, "[Orchestrator] Region (or [Fargate] Region) is required"),
        ({"Fargate": {"TaskDefinition": "bad name!"}}, "[Fargate] TaskDefinition"),
        ({"Fargate": {"PlatformVersion": "newest"}}, "[Fargate] PlatformVersion"),
        ({"Fargate": {"EnablePublicIP": "yes"}}, "[Fargate] EnablePublicIP: expected true or false"),
        ({"Fargate": {"Subnets": "subnet-1"}}, "[Fargate] Subnets: expected a list of strings"),
        ({"Fargate": {"Zone": "a"}}, "unknown key [Fargate] Zone in [Fargate]"),
        ({"TaskMetadata": None}, "[TaskMetadata] Directory is required"),
        ({"TaskMetadata": {"Directory": "relative/dir"}}, "[TaskMetadata] Directory"),
        ({"SSH": {"Port": 70000}}, "[SSH] Port: 70000 is not between 1 and 65535"),
        ({"SSH": {"Port": True}}, "[SSH] Port: expected an integer, got a boolean"),
        ({"SSH": {"Username": "Root Admin"}}, "[SSH] Username"),
        ({"SSH": {"Shell": "bash; rm -rf /"}}, "[SSH] Shell"),
        ({"SSH": {"PrivateKeyPath": "/k"}}, "[SSH] PrivateKeyPath is no longer supported"),
        ({"Job": {"PrepareTimeout": -1}}, "[Job] PrepareTimeout"),
        ({"Job": {"BuildsDir": "builds"}}, "[Job] BuildsDir"),
        ({"LogLevel": "loud"}, "LogLevel: 'loud' is not one of"),
        ({"LogFormat": "xml"}, "LogFormat"),
        ({"Extra": {"A": 1}}, "unknown section [Extra]"),
        ({"Colour": "blue"}, "unknown key Colour at the top level"),
    ],
)
def test_each_bad_or_missing_key_is_named(change, named):
    with pytest.raises(ConfigError) as caught:
        parse(with_changes(**change), "/etc/gitlab-runner/fargate.toml")
    message = str(caught.value)
    assert message.startswith("/etc/gitlab-runner/fargate.toml: ")
    assert named in message
    assert "\n" not in message


def test_keys_the_orchestrator_owns_now_are_accepted_with_one_note_each():
    settings = parse(
        with_changes(
            Fargate={
                "Cluster": "ci",
                "Subnet": "subnet-1",
                "SecurityGroups": ["sg-1"],
                "EnablePublicIP": False,
                "UsePublicIP": False,
                "EnableExecuteCommand": True,
            }
        ),
        "fargate.toml",
    )
    assert len(settings.notes) == 6
    assert (
        "fargate.toml: [Fargate] Subnet is set on the orchestrator now (FARGATE_SUBNETS); ignored here"
        in settings.notes
    )
    assert any("Cluster" in n and "FARGATE_CLUSTER" in n for n in settings.notes)
    assert any("EnableExecuteCommand" in n for n in settings.notes)


def test_keys_match_case_insensitively_like_the_go_driver():
    doc = {
        "loglevel": "debug",
        "fargate": {"region": "us-east-1"},
        "taskmetadata": {"directory": "/m"},
        "orchestrator": {"url": "http://127.0.0.1:1"},
    }
    settings = parse(doc)
    assert (settings.log_level, settings.region, settings.metadata_dir) == ("debug", "us-east-1", "/m")


def test_the_same_key_twice_in_different_case_is_an_error():
    doc = with_changes(SSH={"Port": 22, "port": 2222})
    with pytest.raises(ConfigError, match=r"\[SSH\] Port is set twice"):
        parse(doc)


def test_empty_strings_mean_unset_as_in_go_configs():
    settings = parse(with_changes(Fargate={"PlatformVersion": "", "TaskDefinition": ""}))
    assert settings.platform_version is None and settings.task_definition is None


def test_load_names_a_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load(str(tmp_path / "missing.toml"))
    bad = tmp_path / "bad.toml"
    bad.write_text("[Fargate\nRegion = ")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load(str(bad))


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/api",
        "http://127.200.0.1",
        "http://[::1]:8080",
        "http://localhost:80",
        "https://x.y",
    ],
)
def test_plain_http_is_allowed_only_to_a_loopback_address(url):
    assert parse(with_changes(Orchestrator={"URL": url}), "f.toml").orchestrator_url == url.rstrip("/")


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5/api",
        "http://abc.execute-api.eu-west-1.amazonaws.com",
        "http://128.0.0.1",
        "http://[::2]",
    ],
)
def test_plain_http_to_another_host_is_a_config_error_naming_the_key(url):
    with pytest.raises(ConfigError, match=r"f\.toml: \[Orchestrator\] URL: .* is plain http:// .* loopback"):
        parse(with_changes(Orchestrator={"URL": url}), "f.toml")


def test_an_orchestrator_url_with_credentials_is_refused():
    with pytest.raises(ConfigError, match="must not carry a user name or password"):
        parse(with_changes(Orchestrator={"URL": "https://user:pw@x.y/api"}), "f.toml")


def test_the_runner_section_is_optional_and_checked():
    settings = parse(with_changes(Runner={"ShortToken": "t3sT1234", "GitLabURL": "https://gl.example/"}), "f")
    assert (settings.runner_short_token, settings.gitlab_url) == ("t3sT1234", "https://gl.example")
    assert parse(GOOD, "f").runner_short_token is None
    with pytest.raises(ConfigError, match=r"\[Runner\] ShortToken: 'has space' is not 1-12"):
        parse(with_changes(Runner={"ShortToken": "has space"}), "f")
    with pytest.raises(ConfigError, match=r"\[Runner\] ShortToken: 'abcdefghijklm' is not 1-12"):
        parse(with_changes(Runner={"ShortToken": "abcdefghijklm"}), "f")
    with pytest.raises(ConfigError, match=r"\[Runner\] GitLabURL"):
        parse(with_changes(Runner={"GitLabURL": "gitlab.example.com"}), "f")
