"""Deploy or upgrade one stage in one command: `make deploy STAGE=prod IMAGE=<uri> [BUILD=1] [DRY_RUN=1]`.

    python -m infra.deploy --stage prod --image 123456789012.dkr.ecr.eu-west-1.amazonaws.com/fargate-ci:1.2 \\
        [--build] [--region eu-west-1] [--bucket NAME] [--parameter VpcId=vpc-... --parameter ...] [--dry-run]

Steps (the operator's guide's "Deploy to AWS", one stack):
1. with `--build`, build the task image from images/debian and push it (needs Docker; ECR login by boto3);
2. `chalice package --merge-template` of a copy of the app under build/<stage>/project, with the stage's
   policy (`infra.generate`) beside it: nothing in the checkout changes;
3. upload the Lambda package to S3 (`--bucket`, default fargate-ci-artifacts-<account>-<region>, created if
   missing; the key is the package's sha256) and write the packaged template;
4. create or update the stack `fargate-ci-<stage>` through a change set (an update keeps every parameter
   not given: `make deploy STAGE=prod IMAGE=<new tag>` is the upgrade);
5. print the driver's `[Orchestrator] URL` and the runner manager's policy ARN.

`--dry-run` does 1-3 without any AWS call (and prints the Docker commands instead of running them), writes
the packaged template and the change set's parameters under `build/<stage>/`, and prints what it would
deploy and the outputs it would print, with the values only AWS knows as placeholders.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infra import generate

ROOT = generate.ROOT
STAGE_RE = re.compile(r"[a-z][a-z0-9-]{0,19}")  # the template's Stage parameter
IMAGE_RE = re.compile(r"[a-z0-9.-]+(:[0-9]+)?/[a-z0-9._/-]+(:[A-Za-z0-9._-]{1,128}|@sha256:[0-9a-f]{64})")
ECR_RE = re.compile(r"(?P<account>\d{12})\.dkr\.ecr\.(?P<region>[a-z0-9-]+)\.amazonaws\.com(\.cn)?/")
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
CAPABILITIES = ["CAPABILITY_IAM", "CAPABILITY_AUTO_EXPAND"]
UNKNOWN_ACCOUNT = "ACCOUNT_ID"


class DeployError(Exception):
    """What is wrong, in one line (the command prints it and exits 1)."""


@dataclass
class Plan:
    stage: str
    image: str
    region: str
    build: bool = False
    dry_run: bool = False
    bucket: str | None = None
    parameters: dict[str, str] = field(default_factory=dict)
    out: Path = ROOT / "build"

    @property
    def stack(self) -> str:
        return f"{generate.APP}-{self.stage}"

    @property
    def directory(self) -> Path:
        return self.out / self.stage


def parse_args(argv: list[str] | None, environ: dict[str, str]) -> Plan:
    parser = argparse.ArgumentParser(prog="python -m infra.deploy", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", required=True, help="the stage (fargate-ci-<stage>): a-z, 0-9, -")
    parser.add_argument("--image", required=True, help="the task image URI (ImageUri); built with --build")
    parser.add_argument("--build", action="store_true", help="build images/debian and push it as --image")
    parser.add_argument(
        "--region", help="default: AWS_REGION, AWS_DEFAULT_REGION, else the image's ECR region"
    )
    parser.add_argument(
        "--bucket", help="S3 bucket for the Lambda package (default: fargate-ci-artifacts-...)"
    )
    parser.add_argument(
        "--parameter",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a stack parameter (VpcId, TaskSubnets, RunnerManagerSecurityGroup, ...); repeat it",
    )
    parser.add_argument("--dry-run", action="store_true", help="everything up to the first AWS call")
    parser.add_argument("--out", default=str(ROOT / "build"), help="where build/<stage>/ goes")
    args = parser.parse_args(argv)
    if not STAGE_RE.fullmatch(args.stage):
        raise DeployError(f"STAGE {args.stage!r}: 1-20 characters, a-z first, then a-z, 0-9 or -")
    if not IMAGE_RE.fullmatch(args.image):
        raise DeployError(f"IMAGE {args.image!r} is not an image URI with a tag (REGISTRY/REPOSITORY:TAG)")
    ecr = ECR_RE.match(args.image)
    region = args.region or environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION")
    region = region or (ecr["region"] if ecr else None)
    if not region or not REGION_RE.fullmatch(region):
        raise DeployError("no AWS region: give --region (REGION=...) or set AWS_REGION")
    if args.bucket is not None and not BUCKET_RE.fullmatch(args.bucket):
        raise DeployError(f"--bucket {args.bucket!r} is not an S3 bucket name")
    known = generate.merge_template()["Parameters"]
    parameters: dict[str, str] = {}
    for item in args.parameter:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeployError(f"--parameter {item!r}: expected KEY=VALUE")
        if key not in known:
            raise DeployError(
                f"--parameter {key}: the stack has no such parameter ({', '.join(sorted(known))})"
            )
        if key in ("Stage", "ImageUri"):
            raise DeployError(f"--parameter {key}: given by STAGE / IMAGE")
        parameters[key] = value
    parameters.update(Stage=args.stage, ImageUri=args.image)
    return Plan(
        stage=args.stage,
        image=args.image,
        region=region,
        build=args.build,
        dry_run=args.dry_run,
        bucket=args.bucket,
        parameters=parameters,
        out=Path(args.out),
    )


def run(command: list[str], *, dry_run: bool, stdin: str | None = None, env: dict | None = None) -> None:
    """Run a local command (printed first); in a dry run only print it."""
    print("+ " + " ".join(command), file=sys.stderr)
    if dry_run:
        return
    result = subprocess.run(command, input=stdin, text=True, env=env, check=False)
    if result.returncode != 0:
        raise DeployError(f"{command[0]} {command[1]} failed (exit {result.returncode})")


# --- 1: the image ------------------------------------------------------------------------------------------


def build_image(plan: Plan, aws: Any | None) -> None:
    if not plan.dry_run and shutil.which("docker") is None:
        raise DeployError(
            "Docker is not available here: build and push the image elsewhere (operator's guide, step 1), "
            "then deploy without BUILD"
        )
    registry = plan.image.split("/", 1)[0]
    if ECR_RE.match(plan.image):
        if aws is None:
            print(
                f"+ docker login --username AWS --password-stdin {registry}  (token from ECR)",
                file=sys.stderr,
            )
        else:
            token = aws.client("ecr").get_authorization_token()["authorizationData"][0]["authorizationToken"]
            import base64

            password = base64.b64decode(token).decode().split(":", 1)[1]
            run(
                ["docker", "login", "--username", "AWS", "--password-stdin", registry],
                dry_run=False,
                stdin=password,
            )
    platform = "linux/arm64" if plan.parameters.get("CpuArchitecture") == "ARM64" else "linux/amd64"
    build = ["docker", "buildx", "build", "--platform", platform, "-t", plan.image, "--push"]
    run([*build, str(ROOT / "images" / "debian")], dry_run=plan.dry_run)


# --- 2 and 3: the package -----------------------------------------------------------------------------------


# What Chalice packages: the app and its config (the deployment package holds app.py, chalicelib/ and
# requirements.txt's packages).
PROJECT_FILES = ("app.py", "requirements.txt", "chalicelib", ".chalice/config.json")


def package(plan: Plan) -> tuple[dict, Path]:
    """`chalice package --merge-template` of a copy of the app: the SAM template and the Lambda zip."""
    project, target = plan.directory / "project", plan.directory / "package"
    for stale in (project, target):
        shutil.rmtree(stale, ignore_errors=True)
    for name in PROJECT_FILES:
        source, copy = ROOT / name, project / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, copy)
    # Chalice reads the stage's policy from .chalice/policy-<stage>.json (autogen_policy is off).
    policy = generate.chalice_policy(plan.stage)
    (project / ".chalice" / f"policy-{plan.stage}.json").write_text(generate.dump(policy))
    chalice = Path(sys.executable).with_name("chalice")
    env = dict(os.environ, AWS_DEFAULT_REGION=plan.region)
    merge = str(ROOT / "infra" / "merge-template.json")
    command = [str(chalice if chalice.exists() else "chalice"), "package", "--stage", plan.stage]
    command += ["--pkg-format", "cloudformation", "--merge-template", merge, str(target.resolve())]
    print("+ " + " ".join(command), file=sys.stderr)
    result = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise DeployError(f"chalice package failed: {(result.stderr or result.stdout).strip()[-500:]}")
    return json.loads((target / "sam.json").read_text()), target / "deployment.zip"


def packaged_template(template: dict, bucket: str, key: str) -> dict:
    """The template with every function's local CodeUri replaced by the uploaded package."""
    result = json.loads(json.dumps(template))
    functions = [r for r in result["Resources"].values() if r.get("Type") == "AWS::Serverless::Function"]
    if not functions:
        raise DeployError("chalice package produced no function")
    for resource in functions:
        resource["Properties"]["CodeUri"] = f"s3://{bucket}/{key}"
    return result


def stack_parameters(plan: Plan, template: dict, *, existing: set[str] | None) -> list[dict]:
    """The change set's parameters: those given, and for an update every other one as it was."""
    result = [{"ParameterKey": k, "ParameterValue": v} for k, v in sorted(plan.parameters.items())]
    if existing:
        given = set(plan.parameters)
        for key in sorted(set(template.get("Parameters", {})) & existing - given):
            result.append({"ParameterKey": key, "UsePreviousValue": True})
    return result


def orchestrator_lines(outputs: dict[str, str], region: str) -> list[str]:
    """What the operator copies next: the driver's config and the policy to attach."""
    return [
        "",
        "fargate.toml:",
        "[Orchestrator]",
        f'URL = "{outputs.get("EndpointURL", "?")}"',
        f'Region = "{region}"',
        "",
        f"Attach to the runner manager's role: {outputs.get('RunnerManagerPolicyArn', '?')}",
    ]


# --- 4 and 5: AWS -----------------------------------------------------------------------------------------


def default_bucket(account: str, region: str) -> str:
    return f"fargate-ci-artifacts-{account}-{region}"


def upload(s3: Any, bucket: str, key: str, path: Path, region: str) -> None:
    from botocore.exceptions import ClientError

    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise DeployError(f"S3 bucket {bucket}: {exc}") from None
        location = (
            {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        )
        print(f"creating S3 bucket {bucket}", file=sys.stderr)
        s3.create_bucket(Bucket=bucket, **location)
    s3.upload_file(str(path), bucket, key)


def deploy_stack(cfn: Any, plan: Plan, template_url: str, parameters_of: Any) -> dict[str, str]:
    """Create or update through a change set; the stack's outputs. The template goes by URL: the packaged
    one is larger than the 51,200 bytes CloudFormation takes inline."""
    from botocore.exceptions import ClientError

    try:
        (stack,) = cfn.describe_stacks(StackName=plan.stack)["Stacks"]
        existing = {p["ParameterKey"] for p in stack.get("Parameters", [])}
        kind = "UPDATE" if stack["StackStatus"] != "REVIEW_IN_PROGRESS" else "CREATE"
    except ClientError:
        existing, kind = None, "CREATE"
    name = f"deploy-{hashlib.sha256(template_url.encode()).hexdigest()[:12]}"
    cfn.create_change_set(
        StackName=plan.stack,
        ChangeSetName=name,
        ChangeSetType=kind,
        TemplateURL=template_url,
        Parameters=parameters_of(existing),
        Capabilities=CAPABILITIES,
    )
    try:
        cfn.get_waiter("change_set_create_complete").wait(StackName=plan.stack, ChangeSetName=name)
    except Exception as exc:  # noqa: BLE001 (the waiter's errors differ; "no changes" is one of them)
        described = cfn.describe_change_set(StackName=plan.stack, ChangeSetName=name)
        reason = described.get("StatusReason", str(exc))
        if "didn't contain changes" in reason or "No updates" in reason:
            print("no changes to deploy", file=sys.stderr)
            return outputs_of(cfn, plan.stack)
        raise DeployError(f"change set {name}: {reason}") from None
    cfn.execute_change_set(StackName=plan.stack, ChangeSetName=name)
    waiter = "stack_create_complete" if kind == "CREATE" else "stack_update_complete"
    try:
        cfn.get_waiter(waiter).wait(StackName=plan.stack, WaiterConfig={"Delay": 10, "MaxAttempts": 180})
    except Exception:  # noqa: BLE001 (the stack's events say why)
        raise DeployError(
            f"stack {plan.stack} did not deploy: see its events in the CloudFormation console"
        ) from None
    return outputs_of(cfn, plan.stack)


def outputs_of(cfn: Any, stack: str) -> dict[str, str]:
    (described,) = cfn.describe_stacks(StackName=stack)["Stacks"]
    return {o["OutputKey"]: o["OutputValue"] for o in described.get("Outputs", [])}


def deploy(plan: Plan) -> dict[str, str]:
    """The whole deploy; returns the outputs it printed (placeholders in a dry run)."""
    session = None
    account = UNKNOWN_ACCOUNT
    if not plan.dry_run:
        import boto3

        session = boto3.session.Session(region_name=plan.region)
        account = session.client("sts").get_caller_identity()["Account"]
    if plan.build:
        build_image(plan, session)
    template, archive = package(plan)
    key = f"{plan.stack}/{hashlib.sha256(archive.read_bytes()).hexdigest()}.zip"
    bucket = plan.bucket or default_bucket(account, plan.region)
    packaged = packaged_template(template, bucket, key)
    (plan.directory / "packaged.json").write_text(json.dumps(packaged, indent=2) + "\n")
    if plan.dry_run:
        parameters = stack_parameters(plan, packaged, existing=None)
        (plan.directory / "parameters.json").write_text(json.dumps(parameters, indent=2) + "\n")
        print(f"dry run: would upload {archive} to s3://{bucket}/{key}", file=sys.stderr)
        print(
            f"dry run: would deploy stack {plan.stack} in {plan.region} ({', '.join(CAPABILITIES)})",
            file=sys.stderr,
        )
        print(f"dry run: packaged template {plan.directory / 'packaged.json'}", file=sys.stderr)
        outputs = {
            "EndpointURL": f"https://API_ID.execute-api.{plan.region}.amazonaws.com/{generate.API_STAGE}/",
            "RunnerManagerPolicyArn": f"arn:aws:iam::{account}:policy/{plan.stack}-RunnerManagerPolicy-ID",
        }
    else:
        assert session is not None
        s3 = session.client("s3")
        upload(s3, bucket, key, archive, plan.region)
        template_key = key.replace(".zip", ".template.json")
        s3.upload_file(str(plan.directory / "packaged.json"), bucket, template_key)
        outputs = deploy_stack(
            session.client("cloudformation"),
            plan,
            f"https://{bucket}.s3.{plan.region}.amazonaws.com/{template_key}",
            lambda existing: stack_parameters(plan, packaged, existing=existing),
        )
    print("\n".join(orchestrator_lines(outputs, plan.region)))
    return outputs


def main(argv: list[str] | None = None) -> int:
    try:
        deploy(parse_args(argv, dict(os.environ)))
    except DeployError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
