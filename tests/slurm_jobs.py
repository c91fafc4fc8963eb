"""The test cluster and its jobs, for test_slurm.py and test_cluster_recipes.py: submit a
job, wait for it, read its log and its state, and preempt it as Slurm does before a time
limit.

The cluster is two virtual nodes, n1 and n2, on this machine; start it as root with

    .ci/slurm_cluster.sh start

(.ci/run does that). Where sbatch is missing or no cluster answers, the tests that need one
are skipped with the reason. The jobs train on the CPU and tiny data: the templates' GPU
request is overridden on the sbatch command line (--gpus-per-node=0) and --accelerator cpu
is appended to the script's flags, exactly as a user may override any template line.
"""

import csv
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, finished_steps, learner_environ, metrics_files

TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))
# Those that start one task per GPU (torchrun starts the processes itself: one task per node).
GPU_TEMPLATES = [t for t in TEMPLATES if "--gpus-per-node=" in t.read_text() and "torchrun" not in t.name]
CLUSTER_SCRIPT = REPO / ".ci" / "slurm_cluster.sh"

# Templates ask for GPUs and many cores; on this 2-core machine each task gets one core.
ON_TEST_CLUSTER = ("--gpus-per-node=0", "--cpus-per-task=1")
RANK_LINE = re.compile(r"rank (\d+)/(\d+) \(local rank (\d+)\) on (\S+) uses (\S+)")


def template(name: str) -> Path:
    path = REPO / "slurm" / name
    assert path.is_file(), f"no template {path}"
    return path


# ------------------------------------------------------------------------ the cluster

def _cluster_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when a cluster answers."""
    if shutil.which("sbatch") is None:
        return ("sbatch is not installed; to run these tests: apt-get install slurm-wlm munge, "
                "then (as root) .ci/slurm_cluster.sh start")
    try:
        nodes = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N %t"],
                               capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo got no answer within 30 s; start the test cluster: .ci/slurm_cluster.sh start"
    if nodes.returncode != 0:
        why = (nodes.stderr.strip().splitlines() or ["no message"])[-1][:200]
        return f"no SLURM cluster answers (sinfo: {why}); start one: .ci/slurm_cluster.sh start"
    ready = {line.split()[0] for line in nodes.stdout.splitlines() if line.split()[-1] in ("idle", "mix", "alloc")}
    if not {"n1", "n2"} <= ready:
        return f"the test nodes n1 and n2 are not both up (sinfo: {nodes.stdout.strip()!r})"
    return None


@pytest.fixture(scope="module")
def cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def job_env(tmp_path_factory) -> dict:
    """The environment sbatch passes on to the job: `python` is the interpreter running the
    tests, and `torchrun` its torchrun, as in a job that activated this environment."""
    bin_dir = tmp_path_factory.mktemp("bin")
    # Wrappers, not symlinks: a virtual environment is only found through its real path.
    for name, command in (("python", ""), ("torchrun", " -m torch.distributed.run")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{command} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {**learner_environ(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    for name in ("DATA_DIR", "STAGE_DATA", "LOCAL_DISK"):
        env.pop(name, None)  # only what a test sets itself
    return env


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def sbatch(tmp_path: Path, env: dict, name: str | Path, *script_args, opts=(), wait=True, timeout=150):
    """Submit slurm/<name> (or a job script of the test's own, given as a Path) from the
    repository root, as a user does; return (job id, job fields).

    The job's log goes to tmp_path; opts are sbatch options, script_args go after the template.
    With wait, poll until the job has ended. (`sbatch --wait` would do, but it checks after 2,
    10, 42 and 170 s, which makes a 12-second job take 42.)
    """
    job_script = name if isinstance(name, Path) else template(name)
    cmd = ["sbatch", "--parsable", f"--output={tmp_path}/%x-%j.out", *opts, str(job_script),
           *map(str, script_args)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    match = re.match(r"(\d+)", result.stdout)
    assert result.returncode == 0 and match, f"sbatch failed:\n{result.stdout}\n{result.stderr}"
    job = match.group(1)
    if wait:
        try:
            poll(f"job {job} to end", lambda: job_fields(job).get("JobState") in FINAL_STATES, timeout,
                 job=job, logs=tmp_path)
        finally:
            subprocess.run(["scancel", job], capture_output=True, timeout=30)  # no-op once ended
    return job, job_fields(job)


def job_log(tmp_path: Path, job_id: str) -> str:
    logs = list(tmp_path.glob(f"*-{job_id}.out"))
    assert logs, f"no log of job {job_id} in {tmp_path}"
    return logs[0].read_text(errors="replace")


def job_fields(job_id: str) -> dict:
    """scontrol's view of a job (no accounting is configured, so no sacct)."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id],
                         capture_output=True, text=True, timeout=30).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def poll(what: str, condition, timeout: float, interval: float = 0.5, job: str | None = None,
         logs: Path | None = None):
    """Wait until condition() is true; fail with `what` after timeout seconds, and with the
    job's state and the end of its log when a job and its log folder are given."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            message = f"timed out after {timeout:.0f} s waiting for {what}"
            if job:
                fields = job_fields(job)
                message += f"; job {job}: " + " ".join(f"{k}={fields.get(k)}" for k in
                                                       ("JobState", "Reason", "RunTime", "NodeList"))
            if job and logs and list(logs.glob(f"*-{job}.out")):
                message += "\n" + job_log(logs, job)[-3000:]
            pytest.fail(message)
        time.sleep(interval)


def preempt_and_restart(job: str, tmp_path: Path, first_checkpoint: Path):
    """Once the job has saved its first epoch, do what Slurm does 90 s before the time limit
    (SIGUSR1 to every task), wait until the job has requeued itself, let it start again at
    once, and wait until it ends."""
    try:
        # The first epoch's checkpoint: training is under way and the signal handlers are set.
        poll("the first epoch's checkpoint", first_checkpoint.exists, timeout=90, job=job, logs=tmp_path)
        assert job_fields(job)["JobState"] == "RUNNING"
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
        poll("the job to be requeued",
             lambda: job_fields(job).get("Restarts") == "1" and job_fields(job)["JobState"] == "PENDING",
             timeout=60, job=job, logs=tmp_path)
        # A requeued job may not start for about two minutes; let it start now. Not in the same
        # second as the requeue, though: slurmd refuses a launch whose credential is no newer
        # than the revoked one of the first run ("Job credential revoked"), and the job fails.
        requeued = time.time()
        poll("two seconds after the requeue", lambda: time.time() > requeued + 2, timeout=10, interval=0.1)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=30)
        poll("the requeued job to finish",
             lambda: job_fields(job)["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
             timeout=120, job=job, logs=tmp_path)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=30)


def assert_requeued_once_and_finished(log: str, job: str, fields: dict, out: Path, planned: int):
    """One requeue, one restart from its checkpoint, and exactly the planned steps in all."""
    assert fields["JobState"] == "COMPLETED", log[-3000:]
    assert fields["Restarts"] == "1"
    # The first run saved a checkpoint and requeued the job itself; the second run, whose
    # output was appended to the same log, restored that checkpoint.
    assert (out / "hpc_ckpt_1.ckpt").exists()
    # Printed once, by rank 0; the first run ends without a "finished after" line.
    assert log.count(f"saved {out / 'hpc_ckpt_1.ckpt'} and requeued SLURM job {job}") == 1
    assert log.count("finished after") == 1
    assert f"Restoring states from the checkpoint path at {out / 'hpc_ckpt_1.ckpt'}" in log
    assert finished_steps(log) == planned
    # Two runs, two metrics files; the second one's steps carry on instead of restarting at 0.
    versions = metrics_files(out)
    assert [p.parent.name for p in versions] == ["version_0", "version_1"]
    with open(versions[1], newline="") as f:
        second_run_steps = [int(row["step"]) for row in csv.DictReader(f)]
    assert second_run_steps and second_run_steps[0] > 0
    assert second_run_steps == sorted(second_run_steps)
