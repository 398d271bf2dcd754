"""Issue 17: the templates' alarms, dashboard, and the event rule's and schedule's retry policy and
dead-letter queue. The alarms watch metrics the code really emits, with the dimensions it gives them; both
templates pass cfn-lint (tests/deploy/test_templates.py). SAM's event properties (`RetryPolicy`,
`DeadLetterConfig.Arn` on `CloudWatchEvent` and `Schedule` events) are as the AWS SAM developer guide
documents them."""

from __future__ import annotations

import ast
import json
import re

import pytest

from infra import generate
from tests.deploy.conftest import ROOT
from tests.deploy.test_templates import merged as merged  # the fixture: `chalice package --merge-template`

TEMPLATES = {
    name: json.loads((ROOT / "infra" / name).read_text()) for name in ("template.json", "merge-template.json")
}


def _emitted() -> dict[str, set[str]]:
    """Every metric name chalicelib and app.py emit (count/seconds calls and the EVENTS_* constants), with the
    string values they give a dimension."""
    names: dict[str, set[str]] = {}
    constants: dict[str, str] = {}
    sources = [*sorted((ROOT / "chalicelib").glob("*.py")), ROOT / "app.py"]
    trees = [ast.parse(path.read_text()) for path in sources]
    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                for target in node.targets:
                    if isinstance(target, ast.Name) and target.id.startswith("EVENTS_"):
                        constants[target.id] = node.value.value
    for tree in trees:
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("count", "seconds")):
                continue
            if not node.args:
                continue
            first = node.args[0]
            name = first.value if isinstance(first, ast.Constant) else constants.get(getattr(first, "id", ""))
            if name is None:
                continue
            values = names.setdefault(name, set())
            for keyword in node.keywords:
                if isinstance(keyword.value, ast.Constant):
                    values.add(f"{keyword.arg}={keyword.value.value}")
                elif keyword.arg:
                    values.add(f"{keyword.arg}=*")
    for value in constants.values():  # the event handler counts them through a table
        names.setdefault(value, set())
    return names


EMITTED = _emitted()


def _alarms(template: dict) -> dict[str, dict]:
    return {
        n: r["Properties"]
        for n, r in template["Resources"].items()
        if r.get("Type") == "AWS::CloudWatch::Alarm"
    }


def _ours(alarm: dict) -> list[dict]:
    """The FargateCI metrics an alarm reads (a plain alarm or the MetricStats of its metric math)."""
    if "MetricName" in alarm:
        found = [
            {
                "MetricName": alarm["MetricName"],
                "Namespace": alarm["Namespace"],
                "Dimensions": alarm["Dimensions"],
            }
        ]
    else:
        found = [q["MetricStat"]["Metric"] for q in alarm["Metrics"] if "MetricStat" in q]
    return [m for m in found if m["Namespace"] == "FargateCI"]


def test_the_scan_finds_the_metrics_at_all():
    assert {"TasksStarted", "TaskStartLatency", "TasksReaped", "ApiErrors", "EventsApplied"} <= set(EMITTED)
    assert "reason=Deadline" in EMITTED["TasksReaped"] or "reason=*" in EMITTED["TasksReaped"]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_alarm_reads_a_metric_the_code_emits_with_its_dimensions(name):
    for alarm_name, alarm in _alarms(TEMPLATES[name]).items():
        for metric in _ours(alarm):
            assert metric["MetricName"] in EMITTED, f"{alarm_name}: {metric['MetricName']} is never emitted"
            dims = {d["Name"]: d["Value"] for d in metric["Dimensions"]}
            assert dims.pop("service") == "fargate-ci"  # observability.SERVICE
            for key, value in dims.items():
                emitted = EMITTED[metric["MetricName"]]
                assert f"{key}={value}" in emitted or f"{key}=*" in emitted, f"{alarm_name}: {key}={value}"


def test_the_reasons_the_alarms_sum_are_the_reasons_the_code_gives():
    literals = {v.split("=", 1)[1] for v in EMITTED["TasksReaped"] | EMITTED["TaskStartFailures"]}
    # The reaper's reasons come from its decisions (action.why); the rest are literals at the call.
    reaper = (ROOT / "chalicelib" / "reaper.py").read_text()
    for reason in generate.REAPED_REASONS:
        assert reason in literals or f'"{reason}"' in reaper, reason
    for reason in generate.START_FAILURE_REASONS:
        assert reason in literals or reason == "TaskStartFailed", reason  # the error's class name


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_alarms_issue_17_asks_for(name):
    alarms = _alarms(TEMPLATES[name])
    read = json.dumps(alarms)
    for metric in ("TasksReaped", "TaskStartFailures", "TaskStartLatency", '"Errors"', '"Throttles"'):
        assert metric in read, metric
    latency = next(a for a in alarms.values() if a.get("MetricName") == "TaskStartLatency")
    assert latency["ExtendedStatistic"] == "p90"
    for alarm in alarms.values():
        assert alarm["AlarmActions"] == {
            "Fn::If": ["HasAlarmTopic", [{"Ref": "AlarmTopicArn"}], {"Ref": "AWS::NoValue"}]
        }
    if name == "merge-template.json":
        assert "ApproximateNumberOfMessagesVisible" in read


def test_the_event_rule_and_the_schedule_retry_and_keep_what_they_could_not_deliver():
    resources = TEMPLATES["merge-template.json"]["Resources"]
    events = {
        generate.EVENT_NAME: resources[generate.EVENT_FUNCTION]["Properties"]["Events"][generate.EVENT_NAME],
        generate.SCHEDULE_NAME: resources[generate.SCHEDULE_FUNCTION]["Properties"]["Events"][
            generate.SCHEDULE_NAME
        ],
    }
    queues = set()
    for name, event in events.items():
        properties = event["Properties"]
        retry = properties["RetryPolicy"]
        assert 0 <= retry["MaximumRetryAttempts"] <= 185 and 60 <= retry["MaximumEventAgeInSeconds"] <= 86400
        queue = properties["DeadLetterConfig"]["Arn"]["Fn::GetAtt"][0]
        assert resources[queue]["Type"] == "AWS::SQS::Queue", name
        queues.add(queue)
    assert len(queues) == 2
    policy = resources["DeadLetterQueuePolicy"]["Properties"]
    assert sorted(q["Ref"] for q in policy["Queues"]) == sorted(queues)
    (statement,) = policy["PolicyDocument"]["Statement"]
    assert (
        statement["Principal"] == {"Service": "events.amazonaws.com"}
        and statement["Action"] == "sqs:SendMessage"
    )
    assert statement["Condition"] == {"StringEquals": {"aws:SourceAccount": {"Ref": "AWS::AccountId"}}}


def test_the_merged_sam_keeps_the_retry_policy_and_dead_letter_queue(merged):
    _, template = merged
    for function, event in (
        (generate.EVENT_FUNCTION, generate.EVENT_NAME),
        (generate.SCHEDULE_FUNCTION, generate.SCHEDULE_NAME),
    ):
        properties = template["Resources"][function]["Properties"]["Events"][event]["Properties"]
        assert "RetryPolicy" in properties and "Arn" in properties["DeadLetterConfig"]
    assert template["Resources"]["ReaperDeadLetterQueue"]["Type"] == "AWS::SQS::Queue"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_dashboard_is_json_once_cloudformation_fills_it_in(name):
    body = TEMPLATES[name]["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    text, variables = body
    placeholders = set(re.findall(r"\$\{([^}]+)\}", text))
    assert placeholders - {"AWS::Region"} == set(variables)
    filled = re.sub(r"\$\{[^}]+\}", "x", text)
    widgets = json.loads(filled)["widgets"]
    titles = " / ".join(w["properties"]["title"] for w in widgets)
    for part in (
        "Tasks started",
        "Start latency",
        "Tasks reaped",
        "Task start failures",
        "API errors",
        "Lambda",
    ):
        assert part in titles
    for metric in re.findall(r'"FargateCI", "(\w+)"', filled):
        assert metric in EMITTED


def test_chalice_deploys_functions_the_infra_templates_alarms_name():
    # `chalice deploy` names a function <app>-<stage>-<handler name>, the API's <app>-<stage>.
    app = (ROOT / "app.py").read_text()
    handlers = set(re.findall(r'name="(\w+)"', app))
    assert handlers == {"on_task_state_change", "reaper"}
    names = {v["Fn::Sub"] for v in generate.DEPLOYED_FUNCTIONS.values()}
    assert names == {"fargate-ci-${Stage}", *(f"fargate-ci-${{Stage}}-{h}" for h in handlers)}
