"""One job of a `.gitlab-ci.yml` file as a JobSpec.

The file is read with PyYAML (YAML 1.1, as GitLab's Psych; anchors and merge keys work, GitLab's
`!reference` tags do not); a `.json` file (or one starting with `{`) as JSON. Global `variables`,
`before_script` and `after_script` (top level or under `default:`) apply to the job, as in GitLab.
"""

from __future__ import annotations

import json
import re

import yaml

from runner_emulator.job import JobSpec

RESERVED = {
    "variables",
    "stages",
    "default",
    "include",
    "workflow",
    "image",
    "services",
    "before_script",
    "after_script",
    "cache",
    "spec",
}
_DURATION_UNITS = {
    "s": 1, "sec": 1, "secs": 1, "second": 1, "seconds": 1,
    "m": 60, "min": 60, "mins": 60, "minute": 60, "minutes": 60,
    "h": 3600, "hr": 3600, "hrs": 3600, "hour": 3600, "hours": 3600,
    "d": 86400, "day": 86400, "days": 86400,
}  # fmt: skip


class PipelineError(ValueError):
    """The file is not a job this reader understands; the message says where."""


def parse_duration(value: str | int | float) -> float:
    """GitLab's `timeout:` forms: `3600`, `90m`, `1h 30m`, `2 hours`, `45 seconds`."""
    if isinstance(value, int | float):
        return float(value)
    text = value.strip().lower()
    if text.isdigit():
        return float(text)
    total = 0.0
    rest = text
    for amount, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", text):
        if unit not in _DURATION_UNITS:
            raise PipelineError(f"timeout {value!r}: unknown unit {unit!r}")
        total += float(amount) * _DURATION_UNITS[unit]
        rest = rest.replace(amount, "", 1).replace(unit, "", 1)
    if total <= 0 or rest.strip(" ,and"):
        raise PipelineError(f"timeout {value!r} is not a duration such as 10m or 1h 30m")
    return total


def load_job(path: str, name: str | None = None) -> tuple[str, JobSpec]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    document = (
        json.loads(text) if path.endswith(".json") or text.lstrip().startswith("{") else parse_yaml(text)
    )
    if not isinstance(document, dict):
        raise PipelineError(f"{path}: the top level must be a mapping of jobs")
    return job_from_document(document, name, path)


def job_from_document(
    document: dict, name: str | None = None, source: str = "pipeline"
) -> tuple[str, JobSpec]:
    jobs = {
        k: v
        for k, v in document.items()
        if k not in RESERVED and not k.startswith(".") and isinstance(v, dict) and "script" in v
    }
    if not jobs:
        raise PipelineError(f"{source}: no job with a `script:` found")
    if name is None:
        if len(jobs) > 1:
            raise PipelineError(f"{source}: several jobs ({', '.join(jobs)}); choose one with --job")
        name = next(iter(jobs))
    if name not in jobs:
        raise PipelineError(f"{source}: no job named {name!r} (jobs: {', '.join(jobs)})")
    job = jobs[name]
    default = document.get("default") if isinstance(document.get("default"), dict) else {}
    variables = {**_variables(document.get("variables"), source), **_variables(job.get("variables"), name)}
    before = _lines(
        job.get("before_script", default.get("before_script", document.get("before_script"))), name
    )
    after = _lines(job.get("after_script", default.get("after_script", document.get("after_script"))), name)
    spec = JobSpec(
        script=before + _lines(job["script"], name),
        after_script=after,
        variables=variables,
        name=name,
        stage=str(job.get("stage", "test")),
    )
    image = job.get("image", default.get("image", document.get("image")))
    if image is not None:
        spec.image, spec.image_entrypoint = _image(image, name)
    for item in job.get("services", default.get("services", document.get("services"))) or []:
        service_name, entrypoint = _image(item, name)
        service = {"name": service_name, "alias": "", "entrypoint": entrypoint, "command": None}
        if isinstance(item, dict):
            service["alias"] = str(item.get("alias") or "")
            service["command"] = (
                _lines(item.get("command"), name) if item.get("command") is not None else None
            )
            if item.get("variables"):
                service["variables"] = [
                    {"key": k, "value": v} for k, v in _variables(item["variables"], name).items()
                ]
        spec.services.append(service)
    if job.get("timeout") is not None:
        spec.timeout = parse_duration(job["timeout"])
    return name, spec


def _image(value: object, where: str) -> tuple[str, list[str] | None]:
    """`image: name` or `image: {name: ..., entrypoint: [...]}` (services too)."""
    if isinstance(value, str) and value:
        return value, None
    if isinstance(value, dict) and isinstance(value.get("name"), str) and value["name"]:
        entrypoint = value.get("entrypoint")
        return value["name"], (_lines(entrypoint, where) if entrypoint is not None else None)
    raise PipelineError(f"{where}: an image is a name or a mapping with a name")


def _lines(value: object, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return [str(v) for v in value]
    raise PipelineError(f"{where}: a script must be a string or a list of strings")


def _variables(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PipelineError(f"{where}: variables must be a mapping")
    out = {}
    for key, item in value.items():
        if isinstance(item, dict):  # the long form: {value: ..., description: ...}
            item = item.get("value", "")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise PipelineError(f"{where}: variable name {key!r} is not valid")
        if isinstance(item, bool):
            item = "true" if item else "false"
        out[key] = "" if item is None else str(item)
    return out


# --- YAML ----------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML 1.1, as GitLab's own parser (Ruby's Psych) reads `.gitlab-ci.yml`: `on`/`yes` are booleans too.
    GitLab's `!reference` tag is named as what this reader cannot do, rather than a constructor error."""


def _reference(loader: yaml.SafeLoader, node: yaml.Node) -> object:
    line = node.start_mark.line + 1
    raise PipelineError(f"line {line}: !reference tags are not supported by the runner emulator")


_Loader.add_constructor("!reference", _reference)


def parse_yaml(text: str) -> object:
    """A YAML document (PyYAML's safe loader); a syntax error is a PipelineError naming the line."""
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (_Loader is a SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        raise PipelineError(f"{where}{exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"not YAML: {exc}") from None
