"""The job templates in slurm/, submitted with the real sbatch to a real (throwaway) cluster.

The cluster is two virtual nodes, n1 and n2, on this machine; start it as root with

    .ci/slurm_cluster.sh start

(.ci/run does that). Where sbatch is missing or no cluster answers, the tests that need one
are skipped with the reason. The jobs train on the CPU and tiny data: the templates' GPU
request is overridden on the sbatch command line (--gpus-per-node=0) and --accelerator cpu
is appended to the script's flags, exactly as a user may override any template line.
"""

import csv
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_CIFAR_TRAIN, TINY_MNIST_TRAIN, finished_steps, learner_environ, metrics_files

TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))
GPU_TEMPLATES = [t for t in TEMPLATES if "--gpus-per-node=" in t.read_text()]
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
    """The environment sbatch passes on to the job: `python` is the interpreter running the tests."""
    bin_dir = tmp_path_factory.mktemp("bin")
    wrapper = bin_dir / "python"
    # A wrapper, not a symlink: a virtual environment is only found through its real path.
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(0o755)
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


# ----------------------------------------------------------- static: no cluster needed

def test_there_is_one_template_per_mode():
    assert {t.name for t in TEMPLATES} == {
        "mnist-cpu-ddp.sbatch", "mnist-gpu.sbatch",
        "cifar10-ddp.sbatch", "cifar10-ddp-multinode.sbatch", "cifar10-fsdp.sbatch",
    }


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_has_the_lines_that_make_requeue_and_resources_work(path):
    text = path.read_text()
    directives = re.findall(r"^#SBATCH (--[\w-]+)", text, flags=re.M)
    for option in ("--job-name", "--nodes", "--ntasks-per-node", "--cpus-per-task", "--mem", "--time",
                   "--output", "--open-mode", "--signal", "--requeue"):
        assert option in directives, f"{path.name}: no #SBATCH {option}"
    assert "#SBATCH --output=%x-%j.out" in text
    assert "#SBATCH --open-mode=append" in text
    # No B: prefix: the signal must reach the Python processes, not the batch shell.
    assert re.search(r"^#SBATCH --signal=SIGUSR1@90\b", text, flags=re.M)
    # Per-task GPU binding breaks the device numbering that Lightning relies on.
    assert "--gpus-per-task" not in text and "--gpu-bind" not in text
    # Account and partition only as switched-off examples: no cluster is hard-coded.
    assert not re.search(r"^#SBATCH --(account|partition|reservation)", text, flags=re.M)
    assert text.count("==== Site-specific lines") == 1
    # -e covers the site-specific commands (a mistyped module stops the job); -u only
    # what follows them, because some module and conda scripts use unset variables.
    site_end = text.index("==== End of the site-specific lines")
    assert text.index("set -eo pipefail") < text.index("# module load") < site_end
    assert site_end < text.index("\nset -u\n")
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in text
    assert "export OMP_NUM_THREADS=$SLURM_CPUS_PER_TASK" in text
    # The launch: srun, unbuffered Python, sizes from the allocation, resume, the user's flags.
    launch = text[text.index("srun --kill-on-bad-exit"):]
    assert re.search(r"python -u examples/\w+\.py", launch)
    for piece in ('--devices "$SLURM_NTASKS_PER_NODE"', '--num-nodes "$SLURM_JOB_NUM_NODES"',
                  "--resume", '--output-dir "$OUTPUT_DIR"', '"$@"'):
        assert piece in launch, f"{path.name}: the srun line lacks {piece}"
    assert "$SLURM_JOB_ID" in text.split("OUTPUT_DIR=", 1)[1].splitlines()[0]


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_every_sbatch_line_comes_before_the_first_command(path):
    # sbatch stops reading #SBATCH lines at the first command; the site-specific
    # '##SBATCH' lines, once switched on, must still be read.
    lines = path.read_text().splitlines()[1:]
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.startswith("#"))
    assert not [line for line in lines[first_command:] if re.match(r"#+ *SBATCH", line)]


def test_templates_pass_shellcheck():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = subprocess.run(["shellcheck", *map(str, TEMPLATES), str(CLUSTER_SCRIPT)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("path", GPU_TEMPLATES, ids=lambda p: p.name)
def test_gpu_template_refuses_more_tasks_than_gpus(path):
    # The check runs before anything is launched, so plain bash can show it.
    env = {**os.environ, "SLURM_GPUS_PER_NODE": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_SUBMIT_DIR": str(REPO)}
    result = subprocess.run(["bash", str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "error: the job has 2 GPUs per node but --ntasks-per-node=4; make them equal" in result.stderr


@pytest.mark.parametrize("path", GPU_TEMPLATES, ids=lambda p: p.name)
def test_gpu_template_with_gres_refuses_more_tasks_than_gpus(path):
    # With --gres=gpu:N instead of --gpus-per-node, sbatch sets only SLURM_GPUS_ON_NODE.
    env = {**os.environ, "SLURM_GPUS_ON_NODE": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_SUBMIT_DIR": str(REPO)}
    env.pop("SLURM_GPUS_PER_NODE", None)
    result = subprocess.run(["bash", str(path)], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "error: the job has 2 GPUs per node but --ntasks-per-node=4; make them equal" in result.stderr


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_submitted_from_elsewhere_says_where_to_submit_from(path, tmp_path):
    env = {**os.environ, "SLURM_SUBMIT_DIR": str(tmp_path)}
    result = subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"error: submit from the repository root; {tmp_path} has no examples/" in result.stderr


# ------------------------------------------------------------- under the real sbatch

@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_sbatch_accepts_template(cluster, path):
    # --test-only: parse every #SBATCH line and find room on a 32-core node, start nothing.
    # No GPUs exist here, so that one request is overridden; all other lines are checked as written.
    result = subprocess.run(["sbatch", "--test-only", "--gpus-per-node=0", str(path)],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "to start at" in result.stderr


def test_cpu_template_trains_with_two_ranks_on_one_node(cluster, job_env, mnist_dir, tmp_path):
    out = tmp_path / "run"
    env = {**job_env, "DATA_DIR": str(mnist_dir)}
    job, fields = sbatch(tmp_path, env, "mnist-cpu-ddp.sbatch",
                         "--max-epochs", 1, "--batch-size", 32, "--output-dir", out,
                         opts=["--cpus-per-task=1"])
    log = job_log(tmp_path, job)
    assert fields["JobState"] == "COMPLETED", log[-3000:]
    ranks = {m.groups() for m in RANK_LINE.finditer(log)}
    assert ranks == {("0", "2", "0", "n1", "cpu"), ("1", "2", "1", "n1", "cpu")}
    # Each rank trains on its half of the data.
    assert finished_steps(log) == math.ceil(TINY_MNIST_TRAIN / 2 / 32)
    assert (out / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "name, data, script_args, opts",
    [
        ("mnist-gpu.sbatch", "mnist_dir", [], []),
        # Two tasks instead of four: this machine has two cores; the devices follow the allocation.
        ("cifar10-ddp.sbatch", "cifar_dir", ["--model", "cnn"], ["--ntasks-per-node=2"]),
    ],
)
def test_gpu_template_runs_on_cpu_with_the_documented_overrides(
        cluster, job_env, request, tmp_path, name, data, script_args, opts):
    env = {**job_env, "DATA_DIR": str(request.getfixturevalue(data))}
    job, fields = sbatch(tmp_path, env, name, "--accelerator", "cpu", *script_args,
                         "--max-epochs", 1, "--batch-size", 32, "--output-dir", tmp_path / "run",
                         opts=[*ON_TEST_CLUSTER, *opts])
    log = job_log(tmp_path, job)
    assert fields["JobState"] == "COMPLETED", log[-3000:]
    assert finished_steps(log) > 0
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "opts, script_args, expected",
    [
        (["--ntasks=1"], [], "SLURM started 1 tasks but --devices 2 x --num-nodes 1 = 2"),
        ([], ["--devices", "1"], "SLURM started 2 tasks but --devices 1 x --num-nodes 1 = 1"),
    ],
    ids=["sbatch-ntasks-1", "script-devices-1"],
)
def test_task_count_that_does_not_match_devices_stops_with_one_clear_line(
        cluster, job_env, mnist_dir, tmp_path, opts, script_args, expected):
    env = {**job_env, "DATA_DIR": str(mnist_dir)}
    job, fields = sbatch(tmp_path, env, "mnist-cpu-ddp.sbatch", *script_args,
                         "--output-dir", tmp_path / "run", opts=["--cpus-per-task=1", *opts])
    log = job_log(tmp_path, job)
    assert fields["JobState"] == "FAILED"
    assert fields["ExitCode"] != "0:0"
    assert expected in log, log[-3000:]
    assert "Traceback" not in log
    assert "finished after" not in log


def test_script_started_without_srun_in_a_job_of_two_tasks_stops_with_one_clear_line(
        cluster, job_env, mnist_dir, tmp_path):
    # The classic mistake: the job asks for two tasks, but its script runs python itself.
    # Only one process starts, and without the check it would wait for the second one
    # until the time limit ends the job.
    job_script = tmp_path / "without-srun.sbatch"
    job_script.write_text(
        "#!/bin/bash\n#SBATCH --job-name=without-srun\n#SBATCH --nodes=1\n#SBATCH --ntasks-per-node=2\n"
        "#SBATCH --time=1\n"
        'python examples/mnist_lightning.py --accelerator cpu --devices "$SLURM_NTASKS_PER_NODE" "$@"\n')
    job, fields = sbatch(tmp_path, job_env, job_script, "--data-dir", mnist_dir, "--output-dir", tmp_path / "run",
                         opts=list(ON_TEST_CLUSTER))
    log = job_log(tmp_path, job)
    assert fields["JobState"] == "FAILED", log[-3000:]
    assert "error: this SLURM job has 2 tasks but the script was not started by srun" in log, log[-3000:]
    assert "Traceback" not in log


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


def test_preempted_job_saves_requeues_and_finishes_with_the_planned_steps(cluster, job_env, mnist_dir, tmp_path):
    # Two DDP ranks, as the template asks for: the signal may reach them at different
    # moments, and the scripts' RequeueOnSignal makes them save together between steps.
    # Each rank has DataLoader workers, as on a GPU: SLURM signals every process of the
    # job step, the workers too, and a worker that does not expect SIGUSR1 dies of it.
    out = tmp_path / "run"
    epochs, batch = 20, 8
    env = {**job_env, "DATA_DIR": str(mnist_dir)}
    job, _ = sbatch(tmp_path, env, "mnist-cpu-ddp.sbatch",
                    "--max-epochs", epochs, "--batch-size", batch, "--output-dir", out,
                    "--num-workers", 1, opts=["--cpus-per-task=1"], wait=False)
    preempt_and_restart(job, tmp_path, out / "checkpoints" / "last.ckpt")
    planned = epochs * math.ceil(TINY_MNIST_TRAIN / 2 / batch)
    assert_requeued_once_and_finished(job_log(tmp_path, job), job, job_fields(job), out, planned)
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == planned


def test_multinode_template_runs_fsdp2_on_two_nodes_and_resumes_after_a_requeue(cluster, job_env, cifar_dir,
                                                                                 tmp_path):
    # The multi-node template with --strategy fsdp2, one rank on each node, the data staged
    # to each node's local disk: each rank holds half of the model, the requeue checkpoint
    # is a folder with one piece per rank, and the restarted job reads it back and finishes.
    out, local_disk = tmp_path / "run", tmp_path / "node-local"
    env = {**job_env, "DATA_DIR": str(cifar_dir), "STAGE_DATA": "1", "LOCAL_DISK": str(local_disk)}
    epochs, batch = 8, 8
    job, _ = sbatch(tmp_path, env, "cifar10-ddp-multinode.sbatch",
                    "--accelerator", "cpu", "--strategy", "fsdp2", "--model", "vit", "--vit-width", 64,
                    "--max-epochs", epochs, "--batch-size", batch, "--output-dir", out,
                    opts=[*ON_TEST_CLUSTER, "--ntasks-per-node=1"], wait=False)
    preempt_and_restart(job, tmp_path, out / "checkpoints" / "last.ckpt" / "meta.pt")
    log, fields = job_log(tmp_path, job), job_fields(job)
    assert_requeued_once_and_finished(log, job, fields, out, epochs * (TINY_CIFAR_TRAIN // 2 // batch))
    # Global ranks 0 and 1, each local rank 0 of its own node: FSDP2 across two nodes.
    assert {m.groups() for m in RANK_LINE.finditer(log)} == {("0", "2", "0", "n1", "cpu"), ("1", "2", "0", "n2", "cpu")}
    assert {p.name for p in (out / "hpc_ckpt_1.ckpt").glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    # Both runs, both ranks: what each holds, half of the model.
    held = [float(mb) for mb in re.findall(r"^rank \d/2: parameters, gradients and optimizer state: ([\d.]+) MB$",
                                           log, re.M)]
    assert len(held) == 4 and max(held) - min(held) <= 0.15, held  # halves of 2.5 MB
    # Each run copied the data set once per node, read that copy, and removed it at the end.
    staged = local_disk / f"{fields['UserId'].split('(')[0]}-{job}"
    for node in ("n1", "n2"):
        assert log.count(f"data staged to {staged / 'cifar-10-batches-py'} on {node}") == 2
    assert not staged.exists()
