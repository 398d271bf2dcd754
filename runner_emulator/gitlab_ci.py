"""One job of a `.gitlab-ci.yml`-style file as a JobSpec, without a YAML dependency.

The subset is what a demo or test job needs: nested mappings by indentation, `- item` sequences, plain,
'single' and "double" quoted scalars, `|`/`>` block scalars, `[a, b]` flow lists and comments. A `.json`
file (or one starting with `{`) is read as JSON. Global `variables`, `before_script` and `after_script`
(top level or under `default:`) apply to the job, as in GitLab.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

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


@dataclass
class _Line:
    number: int
    indent: int
    text: str


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


# --- the YAML subset --------------------------------------------------------------------------------


def parse_yaml(text: str) -> object:
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.strip() in ("---", "..."):
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise PipelineError(f"line {number}: tabs are not allowed for indentation")
        lines.append(_Line(number, len(raw) - len(raw.lstrip(" ")), raw.rstrip()))
    parser = _Parser(lines)
    value = parser.block(0)
    parser.skip_blank()
    if parser.pos < len(parser.lines):
        line = parser.lines[parser.pos]
        raise PipelineError(f"line {line.number}: unexpected indentation")
    return value


class _Parser:
    def __init__(self, lines: list[_Line]) -> None:
        self.lines = lines
        self.pos = 0

    def skip_blank(self) -> None:
        while self.pos < len(self.lines) and _strip_comment(self.lines[self.pos].text).strip() == "":
            self.pos += 1

    def block(self, indent: int) -> object:
        self.skip_blank()
        if self.pos >= len(self.lines):
            return None
        line = self.lines[self.pos]
        if line.indent < indent:
            return None
        if _strip_comment(line.text).strip().startswith("- ") or _strip_comment(line.text).strip() == "-":
            return self.sequence(line.indent)
        return self.mapping(line.indent)

    def sequence(self, indent: int) -> list:
        items = []
        while True:
            self.skip_blank()
            if self.pos >= len(self.lines):
                return items
            line = self.lines[self.pos]
            content = _strip_comment(line.text).strip()
            if line.indent != indent or not (content.startswith("- ") or content == "-"):
                if line.indent > indent:
                    raise PipelineError(f"line {line.number}: unexpected indentation")
                return items
            rest = content[1:].strip()
            self.pos += 1
            if rest in ("|", ">", "|-", ">-", "|+", ">+"):
                items.append(self.block_scalar(indent, rest))
            elif rest == "":
                items.append(self.block(indent + 1))
            elif _is_key(rest):
                raise PipelineError(f"line {line.number}: mappings inside lists are not supported here")
            else:
                items.append(_scalar(rest, line.number))

    def mapping(self, indent: int) -> dict:
        out: dict = {}
        while True:
            self.skip_blank()
            if self.pos >= len(self.lines):
                return out
            line = self.lines[self.pos]
            if line.indent < indent:
                return out
            if line.indent > indent:
                raise PipelineError(f"line {line.number}: unexpected indentation")
            content = _strip_comment(line.text).strip()
            match = re.match(r"""^("[^"]*"|'[^']*'|[^:#\s][^:]*?)\s*:(\s+|$)(.*)$""", content)
            if not match:
                raise PipelineError(f"line {line.number}: expected `key: value`, got {content!r}")
            key = match.group(1).strip("'\"")
            rest = match.group(3).strip()
            self.pos += 1
            if key in out:
                raise PipelineError(f"line {line.number}: {key!r} is defined twice")
            if rest in ("|", ">", "|-", ">-", "|+", ">+"):
                out[key] = self.block_scalar(indent, rest)
            elif rest == "":
                self.skip_blank()
                nested = self.lines[self.pos] if self.pos < len(self.lines) else None
                if nested and (
                    nested.indent > indent or _strip_comment(nested.text).strip().startswith("- ")
                ):
                    out[key] = self.block(nested.indent)
                else:
                    out[key] = None
            else:
                out[key] = _scalar(rest, line.number)

    def block_scalar(self, parent_indent: int, style: str) -> str:
        collected: list[str] = []
        block_indent = None
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            if line.text.strip() == "":
                collected.append("")
                self.pos += 1
                continue
            if line.indent <= parent_indent:
                break
            if block_indent is None:
                block_indent = line.indent
            if line.indent < block_indent:
                break
            collected.append(line.text[block_indent:])
            self.pos += 1
        while collected and collected[-1] == "":
            collected.pop()
        if style.startswith(">"):
            text = re.sub(r"(?<!\n)\n(?!\n)", " ", "\n".join(collected))
        else:
            text = "\n".join(collected)
        return text if style.endswith("-") else text + "\n"


def _is_key(text: str) -> bool:
    return bool(re.match(r"""^("[^"]*"|'[^']*'|[A-Za-z_][\w.-]*)\s*:(\s|$)""", text))


def _strip_comment(text: str) -> str:
    """Drop a `# comment` that is not inside quotes."""
    quote = None
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or text[i - 1] in " \t"):
            return text[:i]
    return text


def _scalar(text: str, number: int) -> object:
    if text.startswith('"'):
        try:
            return json.loads(text)
        except ValueError:
            raise PipelineError(f"line {number}: bad double-quoted string {text}") from None
    if text.startswith("'"):
        if not text.endswith("'") or len(text) < 2:
            raise PipelineError(f"line {number}: unterminated single-quoted string")
        return text[1:-1].replace("''", "'")
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [_scalar(part.strip(), number) for part in inner.split(",")] if inner else []
    if text in ("true", "false"):
        return text == "true"
    if re.match(r"^-?\d+$", text):
        return int(text)
    if text in ("null", "~"):
        return None
    return text
