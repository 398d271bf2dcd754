"""`python -m bench`: the driver's overheads against the sandbox (real sshd, moto, the API), as medians over
repeated runs, each next to its comparison measured in the same run.

    python -m bench [--reps N] [--jobs 50] [--memory-jobs 20] [--provision-delay S] [--only 1,3,7]

Rows: 1 per-stage `run` vs OpenSSH fresh and through ControlMaster; 2 a nine-stage job vs fresh OpenSSH per
stage; 3 prepare minus the emulated provisioning delay; 4 jobs prepared concurrently through the API; 5 the
Lambda handler's cold import and the deployment package; 6 manager memory with concurrent jobs; 7 how long
an orphaned task lives with default settings (minutes: `--only 7` runs it alone); 8 `fargate-driver status`
with 200 jobs in the table; 9 prepare with a job's own image, new and repeated, next to the default image;
10 the warm pool: prepare with a warm task next to a cold start, and `--pool` prepares at once against a
pool of that size (a sandbox of its own, provisioning delay 30 s). It starts its own sandboxes and stops
them, even on failure.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from bench.sandbox_job import (
    REPO_ROOT,
    Job,
    OpenSsh,
    pss_kib,
    start_sandbox,
    stop_sandbox,
    wait_for,
)
from fargate_ci_driver.agent import client, protocol

Row = tuple[str, str, str, str, str]  # number, what, measured, comparison, goal (verdict)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def prepared(state: dict, work: Path, agent: bool = True) -> Job:
    job = Job.new(state, work, agent)
    job.stage("prepare")
    if agent:  # the agent holds the job's connection before the first stage, as after a real prepare
        wait_for(
            lambda: (client.request(job.metadata, {"op": "stats"})["jobs"].get(job.key) or {}).get(
                "connected"
            ),
            what="the agent to hold the job",
        )
    return job


# --- 1 and 2: stages ------------------------------------------------------------------------------------


def row_stage(state: dict, work: Path, reps: int) -> list[Row]:
    job = prepared(state, work / "stage")
    direct = Job(state, job.work, job.job_id, agent=False)  # the same job, the agent switched off
    ssh = OpenSsh(job)
    script = job.script("true\n")
    ssh.start_master()
    samples: dict[str, list[float]] = {"agent": [], "direct": [], "fresh": [], "master": [], "python": []}
    try:
        for _ in range(reps):  # interleaved, so every variant sees the same machine
            samples["agent"].append(job.stage("run", script, "build_script"))
            samples["direct"].append(direct.stage("run", script, "build_script"))
            samples["fresh"].append(ssh.run(script))
            samples["master"].append(ssh.run(script, master=True))
            samples["python"].append(_python_startup())
        nine: dict[str, list[float]] = {"driver": [], "fresh": []}
        for _ in range(max(3, reps // 4)):
            started = time.perf_counter()
            job.stage("config")
            for _ in range(9):
                job.stage("run", script, "build_script")
            nine["driver"].append(time.perf_counter() - started)
            nine["fresh"].append(sum(ssh.run(script) for _ in range(9)))
    finally:
        ssh.stop_master()
        job.cleanup()
    m = {k: median(v) for k, v in samples.items()}
    ratio = m["agent"] / m["master"]
    return [
        (
            "1",
            "per stage: `fargate-driver custom run` of `true` (agent)",
            ms(m["agent"]),
            f"OpenSSH fresh {ms(m['fresh'])}; ControlMaster {ms(m['master'])} ({ratio:.1f}x); "
            f"driver without agent {ms(m['direct'])}; floor: this venv's `python -c pass` {ms(m['python'])}",
            f"<= 3x ControlMaster: {verdict(ratio <= 3)}",
        ),
        (
            "2",
            "nine-stage job of `true`: config + 9 x run",
            ms(median(nine["driver"])),
            f"9 x OpenSSH fresh {ms(median(nine['fresh']))}",
            f"{verdict(median(nine['driver']) <= median(nine['fresh']))} (faster than fresh OpenSSH)",
        ),
    ]


def _python_startup() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


# --- 3: prepare -----------------------------------------------------------------------------------------


def row_prepare(state: dict, work: Path, reps: int) -> list[Row]:
    """Warm: the session agent is up, as on a runner manager between jobs (it stays a minute after the last
    one). Cold: the first prepare after it has gone (it then signs and checks sshd itself)."""
    delay = float(state["provision_delay"])
    totals: dict[str, list[float]] = {"warm": [], "cold": []}
    # Three cold prepares, each followed by warm ones, so both kinds see the same machine.
    plan = (["cold"] + ["warm"] * max(1, reps // 3)) * 3
    for n, kind in enumerate(plan):
        if kind == "cold":
            client.stop(state["metadata_dir"])
        job = Job.new(state, work / f"prepare-{n}")
        try:
            totals[kind].append(job.stage("prepare"))
        finally:
            job.cleanup()
    overhead = median(totals["warm"]) - delay
    return [
        (
            "3",
            "prepare minus the emulated provisioning delay (session agent up)",
            ms(overhead),
            f"prepare {ms(median(totals['warm']))}, provisioning delay {ms(delay)}; "
            f"first prepare with no agent running: {ms(median(totals['cold']) - delay)} over the delay",
            f"<= 300 ms: {verdict(overhead <= 0.3)}",
        )
    ]


# --- 9: per-job images --------------------------------------------------------------------------------


def row_images(state: dict, work: Path, reps: int) -> list[Row]:
    """prepare for a job whose image no job used before (RegisterTaskDefinition included, and a task of two
    containers), a repeat of that image (its task definition found in the table), and the default image, in
    turn, so all three see the same machine. The session agent is up."""
    delay = float(state["provision_delay"])
    totals: dict[str, list[float]] = {"default": [], "new": [], "cached": []}
    for n in range(reps):
        image = f"busybox:bench-{os.getpid()}-{n}"
        for kind, variables in (
            ("default", {}),
            ("new", {"CI_JOB_IMAGE": image}),
            ("cached", {"CI_JOB_IMAGE": image}),
        ):
            job = Job.new(state, work / f"image-{kind}-{n}", variables=variables)
            try:
                totals[kind].append(job.stage("prepare"))
            finally:
                job.cleanup()
    new, cached, default = (median(totals[k]) - delay for k in ("new", "cached", "default"))
    return [
        (
            "9",
            "prepare with `image: busybox`, minus the provisioning delay: a new image / its repeat",
            f"{ms(new)} / {ms(cached)}",
            f"default image {ms(default)} (all over the {ms(delay)} delay)",
            "measured (no goal set)",
        )
    ]


# --- 4: many jobs through the API -----------------------------------------------------------------------


def row_concurrent(state: dict, jobs: int) -> list[Row]:
    from fargate_ci_driver.api import ApiClient
    from fargate_ci_driver.backoff import READINESS
    from fargate_ci_driver.errors import ApiError
    from fargate_ci_driver.keys import generate_ed25519

    api = ApiClient(
        state["api_url"], state["region"], profile="sandbox", credentials_file=state["credentials_file"]
    )
    run = str(int(time.time()) % 10**8)
    bodies = []
    for n in range(jobs):
        client = generate_ed25519("bench")
        bodies.append(
            {
                "runner": "bEnChApI",
                "job_id": f"{run}{n:03d}",
                "project_id": "1",
                "pipeline_id": "1",
                "ssh_public_key": client.public_line,
            }
        )

    failed_polls: list[str] = []

    def one(body: dict) -> float:
        started = time.perf_counter()
        # Every job's create is sent twice at once, as a driver retrying a lost answer would.
        with concurrent.futures.ThreadPoolExecutor(2) as pair:
            views = list(pair.map(lambda b: _create(api, b), [body, body]))
        key = views[0]["job_key"]
        pauses = READINESS.pauses(running=False)
        while True:  # polled as prepare polls, and as tolerant of a failed poll
            try:
                if api.get_job(key).get("state") == "RUNNING":
                    return time.perf_counter() - started
            except ApiError as exc:
                failed_polls.append(str(exc))
            time.sleep(next(pauses))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        per_job = list(pool.map(one, bodies))
    wall = time.perf_counter() - started
    import boto3

    from chalicelib.jobs import record_key

    ecs = boto3.client(
        "ecs",
        region_name=state["region"],
        endpoint_url=state["aws_endpoint_url"],
        aws_access_key_id="bench",
        aws_secret_access_key="bench",  # noqa: S106 (moto accepts any key)
    )
    duplicates = 0
    for body in bodies:
        key = record_key(state["profiles"]["sandbox"], f"{body['runner']}-{body['job_id']}")
        tasks = ecs.list_tasks(cluster=state["cluster"], startedBy=f"gl-{key}")["taskArns"]
        duplicates += max(0, len(tasks) - 1)
    for body in bodies:  # best effort: stopping the sandbox stops whatever is left
        with contextlib.suppress(ApiError):
            api.stop_job(f"{body['runner']}-{body['job_id']}", "benchmark over", attempt=1)
    return [
        (
            "4",
            f"{jobs} jobs prepared concurrently through the API (create sent twice each)",
            f"wall {ms(wall)}",
            f"per job p50 {ms(median(per_job))}, p99 {ms(p99(per_job))}; provisioning delay "
            f"{ms(float(state['provision_delay']))}; failed polls {len(failed_polls)}",
            f"duplicate tasks {duplicates}: {verdict(duplicates == 0)}",
        )
    ]


def _create(api, body: dict) -> dict:
    from fargate_ci_driver.api import with_retries

    return with_retries(lambda: api.create_job(body), attempts=8)


# --- 10: the warm pool ----------------------------------------------------------------------------------

POOL_PROVISION_DELAY = 30.0  # as on AWS (30-90 s from RunTask to a reachable sshd)


def row_warm_pool(root: Path, work: Path, reps: int, pool: int) -> list[Row]:
    """A sandbox of its own with `WARM_POOL_SIZE=pool` and a 30 s provisioning delay: warm prepares next to
    cold ones (a job asking for another task definition, which the pool does not hold), then `pool`
    prepares at once against a full pool of `pool`."""
    directory = root / "pool-sandbox"
    state = start_sandbox(
        directory,
        POOL_PROVISION_DELAY,
        "--app-env",
        f"WARM_POOL_SIZE={pool}",
        "--schedule-rate",
        "5",
    )
    try:
        _wait_idle(state, pool)
        warm, cold = [], []
        for n in range(reps):
            job = Job.new(state, work / f"warm-{n}")
            try:
                warm.append(job.stage("prepare"))
                assert "Warm task claimed" in job.last_stdout, job.last_stdout
            finally:
                job.cleanup()
        for n in range(max(2, reps // 3)):
            job = Job.new(
                state, work / f"cold-{n}", variables={"FARGATE_TASK_DEFINITION": "ci-coordinator-large"}
            )
            try:
                cold.append(job.stage("prepare"))
                assert "(cold start)" in job.last_stdout, job.last_stdout
            finally:
                job.cleanup()
        _wait_idle(state, pool)
        jobs = [Job.new(state, work / f"burst-{n}") for n in range(pool)]
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(pool) as threads:
            per_job = list(threads.map(lambda j: j.stage("prepare"), jobs))
        wall = time.perf_counter() - started
        arns = [job.job_state()["task_arn"] for job in jobs]
        warm_jobs = sum("Warm task claimed" in job.last_stdout for job in jobs)
        for job in jobs:
            job.cleanup()
    finally:
        stop_sandbox(directory)
    twice = len(arns) - len(set(arns))
    return [
        (
            "10",
            f"prepare with a warm task (WARM_POOL_SIZE={pool}, provisioning delay "
            f"{POOL_PROVISION_DELAY:.0f} s)",
            ms(median(warm)),
            f"cold start (another task definition, same run): {ms(median(cold))}",
            f"<= 2 s: {verdict(median(warm) <= 2.0)}",
        ),
        (
            "10b",
            f"{pool} prepares at once against a pool of {pool}",
            f"wall {ms(wall)}",
            f"per job p50 {ms(median(per_job))}, p99 {ms(p99(per_job))}; warm {warm_jobs} of {pool}",
            f"claimed twice {twice}, every job warm: {verdict(twice == 0 and warm_jobs == pool)}",
        ),
    ]


def _wait_idle(state: dict, count: int, timeout: float = 300.0) -> None:
    """Until the pool has `count` idle (claimable) tasks."""
    import boto3

    table = boto3.resource(
        "dynamodb",
        region_name=state["region"],
        endpoint_url=state["aws_endpoint_url"],
        aws_access_key_id="bench",
        aws_secret_access_key="bench",  # noqa: S106 (moto accepts any key)
    ).Table(state["table"])

    def idle() -> bool:
        items = table.scan()["Items"]
        return sum(item.get("pool") == "idle" for item in items) >= count

    wait_for(idle, timeout, 0.5, f"{count} idle warm pool tasks")


# --- 5: the Lambda package ------------------------------------------------------------------------------


def row_lambda(work: Path, reps: int) -> list[Row]:
    probe = "import time; t = time.perf_counter(); import app; print(time.perf_counter() - t)"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_DEFAULT_REGION="eu-west-1", PYTHONDONTWRITEBYTECODE="1")
    imports = []
    for _ in range(reps):
        done = subprocess.run(
            [sys.executable, "-c", probe], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
        )
        imports.append(float(done.stdout.strip().splitlines()[-1]))
    out = work / "package"
    chalice = Path(sys.executable).parent / "chalice"
    done = subprocess.run(
        [str(chalice), "package", "--stage", "dev", "--pkg-format", "cloudformation", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        size_text, size_ok = f"chalice package failed: {done.stderr.strip()[-200:]}", False
    else:
        zips = list(out.glob("*.zip"))
        size = sum(z.stat().st_size for z in zips)
        unzipped = sum(i.file_size for z in zips for i in zipfile.ZipFile(z).infolist())
        size_text = f"package {size / 1e6:.2f} MB zipped, {unzipped / 1e6:.1f} MB unzipped"
        size_ok = size <= 5e6
    cold = median(imports)
    return [
        (
            "5",
            "Lambda handler module (app.py) cold import",
            ms(cold),
            size_text,
            f"<= 300 ms: {verdict(cold <= 0.3)}; <= 5 MB: {verdict(size_ok)}",
        )
    ]


# --- 6: memory ------------------------------------------------------------------------------------------


def row_memory(state: dict, work: Path, jobs: int) -> list[Row]:
    metadata = state["metadata_dir"]
    prepared_jobs: list[Job] = []
    try:
        prepared_jobs.append(prepared(state, work / "mem-0"))
        agent = client.agent_pid(metadata)
        time.sleep(1.0)  # the agent's warm-up imports are done
        base = pss_kib(agent)  # the fixed base: the agent with paramiko and botocore loaded, one job
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            prepared_jobs += list(pool.map(lambda n: prepared(state, work / f"mem-{n}"), range(1, jobs)))
        results = {}
        for phase, (label, agent_on) in enumerate((("agent", True), ("direct", False))):
            marker = f"60.{phase}{os.getpid() % 1000:03d}"  # a sleep only this phase starts
            stages = []
            for job in prepared_jobs:
                runner = Job(state, job.work, job.job_id, agent=agent_on)
                stages.append(runner.popen("run", job.script(f"sleep {marker}\n"), "build_script"))
            try:
                # Measured once every stage is running remotely: all imports done, all connections up.
                wait_for(lambda m=marker: _processes(f"sleep {m}") >= jobs, 120, 0.1, "every stage to start")
                pss = [pss_kib(p.pid) for p in stages]
                agent_now = pss_kib(agent) if agent_on else 0
            finally:
                for p in stages:  # cancel, as the runner would: the remote sleeps are killed
                    p.terminate()
                for p in stages:
                    p.wait(60)
            results[label] = (sum(pss), agent_now)
        run_agent, agent_busy = results["agent"]
        run_direct, _ = results["direct"]
        per_job = (run_agent + agent_busy - base) / jobs / 1024
        return [
            (
                "6",
                f"manager memory, {jobs} concurrent jobs in a stage (PSS)",
                f"{(run_agent + agent_busy) / 1024:.0f} MB total: agent {agent_busy / 1024:.0f} MB "
                f"+ {jobs} run {run_agent / 1024:.0f} MB",
                f"without agent: {jobs} run {run_direct / 1024:.0f} MB "
                f"({run_direct / jobs / 1024:.1f} MB/job)",
                f"{per_job:.1f} MB/job beyond the agent's {base / 1024:.0f} MB: "
                f"<= 10 MB {verdict(per_job <= 10)}",
            )
        ]
    finally:
        for job in prepared_jobs:
            job.cleanup()


def _processes(marker: str) -> int:
    """Processes whose command line holds `marker` (the sandbox's tasks are processes on this machine)."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                    count += 1
    return count


# --- 7: orphans ----------------------------------------------------------------------------------------

ORPHAN_GOAL = 240.0  # seconds, with default settings (issue 13)
ORPHAN_WAIT = 900.0  # give up (and report it) after this long


def row_orphans(state: dict, work: Path) -> list[Row]:
    """Seconds from a runner manager's end to its task STOPPED, with the default watchdog, client-alive and
    session-agent settings (the sandbox's task definitions set none: the image's defaults apply) and the
    orchestrator's default heartbeat timeout (15 min, so the reaper plays no part). Three jobs at once:

    - killed: the stage's `fargate-driver run` is SIGKILLed mid-stage, as when GitLab Runner dies; the session
      agent survives (its own session), the worst case: it kills the remote stage and holds the job's
      connection until its job idle ends.
    - no cleanup: a stage ends and `cleanup` never comes.
    - frozen: the stage's `run` (session agent off, so it holds the connection itself) is SIGSTOPped: no FIN,
      as when the manager's machine is gone; sshd's client-alive probes must notice.
    """
    import boto3

    ecs = boto3.client(
        "ecs",
        region_name=state["region"],
        endpoint_url=state["aws_endpoint_url"],
        aws_access_key_id="bench",
        aws_secret_access_key="bench",  # noqa: S106 (moto accepts any key)
    )
    killed, idle = prepared(state, work / "orphan-killed"), prepared(state, work / "orphan-idle")
    frozen = prepared(state, work / "orphan-frozen", agent=False)
    marker = f"3600.7{os.getpid() % 1000:03d}"  # a sleep only this row starts
    stages = {
        "killed": killed.popen("run", killed.script(f"sleep {marker}\n"), "build_script"),
        "frozen": frozen.popen("run", frozen.script(f"sleep {marker}\n"), "build_script"),
    }
    ended: dict[str, float] = {}
    try:
        idle.stage("run", idle.script("true\n"), "build_script")
        ended["no cleanup"] = time.monotonic()
        wait_for(lambda: _processes(f"sleep {marker}") >= 2, 120, 0.1, "both long stages to start")
        stages["killed"].send_signal(signal.SIGKILL)
        ended["killed"] = time.monotonic()
        stages["frozen"].send_signal(signal.SIGSTOP)
        ended["frozen"] = time.monotonic()
        arns = {"killed": _task_arn(killed), "no cleanup": _task_arn(idle), "frozen": _task_arn(frozen)}
        stopped = _wait_stopped(ecs, state["cluster"], arns)
    finally:
        for process in stages.values():
            process.kill()
            process.wait(60)
        for job in (killed, idle, frozen):
            job.cleanup()  # for a task that outlived ORPHAN_WAIT; a no-op otherwise
    took = {name: stopped[name] - ended[name] if name in stopped else None for name in arns}

    def shown(name: str) -> str:
        return f"{took[name]:.0f} s" if took[name] is not None else f"not stopped in {ORPHAN_WAIT:.0f} s"

    met = all(t is not None and t <= ORPHAN_GOAL for t in (took["killed"], took["no cleanup"]))
    return [
        (
            "7",
            "orphaned task, defaults (one run): the manager's driver SIGKILLed mid-stage → task STOPPED",
            shown("killed"),
            f"job ended without cleanup → STOPPED {shown('no cleanup')}; manager frozen (SIGSTOP, no FIN, "
            f"agent off) → STOPPED {shown('frozen')}",
            f"both <= {ORPHAN_GOAL:.0f} s: {verdict(met)}",
        )
    ]


def _task_arn(job: Job) -> str:
    return job.job_state()["task_arn"]


def _wait_stopped(ecs, cluster: str, arns: dict[str, str]) -> dict[str, float]:
    """When (monotonic) each task was first seen STOPPED, polled every half second."""
    stopped: dict[str, float] = {}
    deadline = time.monotonic() + ORPHAN_WAIT
    while len(stopped) < len(arns) and time.monotonic() < deadline:
        waiting = {name: arn for name, arn in arns.items() if name not in stopped}
        tasks = ecs.describe_tasks(cluster=cluster, tasks=list(waiting.values()))["tasks"]
        now = time.monotonic()
        status = {task["taskArn"]: task["lastStatus"] for task in tasks}
        for name, arn in waiting.items():
            if status.get(arn) == "STOPPED":
                stopped[name] = now
        time.sleep(0.5)
    return stopped


# --- the table ------------------------------------------------------------------------------------------


# --- 8: status ------------------------------------------------------------------------------------------


def row_status(state: dict, reps: int, jobs: int = 200) -> list[Row]:
    """`fargate-driver status` with `jobs` finished jobs of the caller in the table (written straight into
    moto's DynamoDB, as the orchestrator would have left them), as an operator runs it: a fresh process."""
    import boto3

    from chalicelib.jobs import owner_digest, record_key

    owner = state["profiles"]["sandbox"]
    table = boto3.resource(
        "dynamodb",
        region_name=state["region"],
        endpoint_url=state["aws_endpoint_url"],
        aws_access_key_id="bench",
        aws_secret_access_key="bench",  # noqa: S106 (moto accepts any key)
    ).Table(state["table"])
    base, region = time.time() - jobs, state["region"]
    with table.batch_writer() as batch:
        for n in range(jobs):
            key = f"bEnChStA-{n + 1}"
            created = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(base + n)) + ".000Z"
            batch.put_item(
                Item={
                    "pk": record_key(owner, key),
                    "owner_key": owner_digest(owner),
                    "owner": owner,
                    "job_key": key,
                    "job_id": str(n + 1),
                    "project_id": "1",
                    "project_path": "bench/status",
                    "attempt": 1,
                    "state": "STOPPED",
                    "task_arn": f"arn:aws:ecs:{region}:123456789012:task/{state['cluster']}/{n:032x}",
                    "capacity_provider": "FARGATE",
                    "stopped_reason": "CI job cleanup",
                    "created_at": created,
                }
            )
    command = [str(Path(sys.executable).parent / "fargate-driver"), "--config", state["toml_path"], "status"]

    def wall(*flags: str) -> tuple[float, str]:
        started = time.perf_counter()
        done = subprocess.run([*command, *flags], capture_output=True, text=True, check=True)
        return time.perf_counter() - started, done.stdout

    listed = wall("--all")[1].count("bEnChStA-")
    if listed != jobs:
        raise RuntimeError(f"status --all listed {listed} of the {jobs} bench jobs")
    every = median([wall("--all")[0] for _ in range(reps)])
    live = median([wall()[0] for _ in range(reps)])
    as_json = median([wall("--all", "--json")[0] for _ in range(reps)])
    floor = median([_python_startup() for _ in range(reps)])
    return [
        (
            "8",
            f"`fargate-driver status --all` with {jobs} jobs in the table (2 pages)",
            ms(every),
            f"`status` (live only: reads past all {jobs}) {ms(live)}; `--all --json` {ms(as_json)}; "
            f"floor `python -c pass` {ms(floor)}",
            f"<= 1 s: {verdict(every <= 1.0)}",
        )
    ]


def table(rows: list[Row]) -> str:
    header = ("#", "measure", "median", "compared with (same run)", "goal")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _compile_driver() -> None:
    """Byte-compile the driver as `pip install` does for an installed package. An editable checkout relies on
    Python writing the .pyc files itself, which PYTHONDONTWRITEBYTECODE (set on some machines, this one
    included) prevents: every stage would then compile its modules again (~6 ms)."""
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parent.parent / "fargate_ci_driver"), quiet=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15, help="repetitions per median (default 15)")
    parser.add_argument("--jobs", type=int, default=50, help="concurrent jobs in row 4 (default 50)")
    parser.add_argument("--memory-jobs", type=int, default=20, help="concurrent jobs in row 6 (default 20)")
    parser.add_argument("--provision-delay", type=float, default=0.5, help="the sandbox's (default 0.5 s)")
    parser.add_argument("--pool", type=int, default=20, help="the warm pool's size in row 10 (default 20)")
    parser.add_argument(
        "--only", default="1,3,4,5,6,7,8,9,10", help="rows to run (1 includes 2; 7 and 10 take minutes)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the sandbox directory (logs)")
    args = parser.parse_args(argv)
    wanted = set(args.only.split(","))
    _compile_driver()
    root = Path(tempfile.mkdtemp(prefix="fargate-ci-bench-"))
    print(f"bench: sandbox in {root} (provisioning delay {args.provision_delay} s)", file=sys.stderr)
    rows: list[Row] = []
    steps: list[tuple[str, Callable[[], list[Row]]]] = []
    try:
        state = start_sandbox(root / "sandbox", args.provision_delay)
        work = root / "work"
        steps = [
            ("1", lambda: row_stage(state, work, args.reps)),
            ("3", lambda: row_prepare(state, work, max(5, args.reps // 2))),
            ("4", lambda: row_concurrent(state, args.jobs)),
            ("5", lambda: row_lambda(work, max(5, args.reps // 2))),
            ("6", lambda: row_memory(state, work, args.memory_jobs)),
            ("7", lambda: row_orphans(state, work)),
            ("8", lambda: row_status(state, args.reps)),
            ("9", lambda: row_images(state, work, max(5, args.reps // 2))),
            ("10", lambda: row_warm_pool(root, work, max(5, args.reps // 3), args.pool)),
        ]
        for number, step in steps:
            if number in wanted:
                print(f"bench: row {number} ...", file=sys.stderr)
                rows += step()
    finally:
        stop_sandbox(root / "sandbox")
        with contextlib.suppress(protocol.AgentGone):
            client.request(str(root / "sandbox" / "metadata"), {"op": "shutdown"})
        if not args.keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    print(table(sorted(rows)))
    print(
        f"\n{args.reps} repetitions; {os.cpu_count()} CPUs; python {sys.version.split()[0]}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
