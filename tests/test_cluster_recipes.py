"""The recipes of the "Cluster recipes" page, run on the test cluster (see slurm_jobs.py):
a sweep as a job array and the table that gathers it, torchrun started by srun on two
nodes, and the scripts in an interactive allocation (salloc), the mistakes included.

Apart from test_slurm.py, so that the two files' jobs, which mostly wait, run side by
side under `make test`.
"""

import csv
import math
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, TINY_CIFAR_TRAIN, TINY_MNIST_TRAIN, finished_steps, run_command
from slurm_jobs import (FINAL_STATES, ON_TEST_CLUSTER, RANK_LINE, assert_requeued_once_and_finished, job_fields,
                        job_log, poll, preempt_and_restart, sbatch, template)

SWEEP = template("mnist-sweep.sbatch")
TORCHRUN = template("cifar10-torchrun.sbatch")


# ----------------------------------------------------------- static: no cluster needed

def test_sweep_values_are_one_per_array_task():
    text = SWEEP.read_text()
    values = re.search(r"^VALUES=\((.*)\)$", text, flags=re.M).group(1).split()
    first, last = map(int, re.search(r"^#SBATCH --array=(\d+)-(\d+)", text, flags=re.M).groups())
    assert (first, last) == (0, len(values) - 1)


def test_sweep_task_without_a_value_stops_with_one_line(tmp_path):
    # An --array wider than the list: the task that has no value says so, and trains nothing.
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "3", "SLURM_NTASKS_PER_NODE": "1", "SLURM_SUBMIT_DIR": str(REPO)}
    result = subprocess.run(["bash", str(SWEEP)], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr == "error: array task 3 has no value: VALUES has 3; submit with --array=0-2\n"


def test_torchrun_template_refuses_more_than_one_task_per_node():
    env = {**os.environ, "SLURM_GPUS_PER_NODE": "4", "SLURM_NTASKS_PER_NODE": "4", "SLURM_SUBMIT_DIR": str(REPO)}
    result = subprocess.run(["bash", str(TORCHRUN)], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "error: --ntasks-per-node=4; torchrun needs 1: it starts one process per GPU itself" in result.stderr


# ------------------------------------------------------------- under the real sbatch

def test_sweep_runs_one_task_per_value_and_the_table_gathers_them(cluster, job_env, mnist_dir, tmp_path):
    # The runs go where the template puts them, runs/mnist-sweep-<array job id>/lr-<value>,
    # so the array job is submitted from a copy of the repository's layout.
    (tmp_path / "slurm").mkdir()
    (tmp_path / "slurm" / SWEEP.name).write_text(SWEEP.read_text())
    (tmp_path / "examples").symlink_to(REPO / "examples")
    env = {**job_env, "DATA_DIR": str(mnist_dir)}
    result = subprocess.run(["sbatch", "--parsable", *ON_TEST_CLUSTER, f"slurm/{SWEEP.name}",
                             "--accelerator", "cpu", "--max-epochs", "1", "--batch-size", "32"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    array_job = result.stdout.strip()
    tasks = [f"{array_job}_{i}" for i in range(3)]
    poll("the three array tasks to end",
         lambda: all(job_fields(t).get("JobState") in FINAL_STATES for t in tasks), timeout=150)
    for i, task in enumerate(tasks):
        log = (tmp_path / f"mnist-sweep-{array_job}_{i}.out").read_text()
        assert job_fields(task)["JobState"] == "COMPLETED", log[-3000:]
        assert finished_steps(log) == math.ceil(TINY_MNIST_TRAIN / 32)
    sweep = tmp_path / "runs" / f"mnist-sweep-{array_job}"
    runs = sorted(p.name for p in sweep.iterdir())
    assert runs == ["lr-0.0003", "lr-0.001", "lr-0.003"]
    for run in runs:
        assert (sweep / run / "logs" / "version_0" / "metrics.csv").is_file()

    gathered = run_command([sys.executable, str(REPO / "examples" / "gather_runs.py"), str(sweep)],
                           tmp_path, env, timeout=60)
    assert gathered.returncode == 0, gathered.stderr
    lines = gathered.stdout.splitlines()
    print(gathered.stdout)  # the table, for the record
    assert lines[0].split() == ["run", "lr", "best_val_acc", "test_acc", "epochs", "steps", "finished"]
    assert sorted(line.split()[0] for line in lines[1:4]) == runs
    assert lines[4] == f"3 runs; table written to {sweep / 'runs.csv'}"
    with open(sweep / "runs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(float(row["lr"]) for row in rows) == [0.0003, 0.001, 0.003]
    assert all(row["finished"] == "yes" and float(row["test_acc"]) > 0 for row in rows)
    accuracies = [float(row["best_val_acc"]) for row in rows]
    assert accuracies == sorted(accuracies, reverse=True)


def test_torchrun_spans_both_nodes_and_resumes_after_a_requeue(cluster, job_env, cifar_dir, tmp_path):
    # srun starts one torchrun per node; the script takes torchrun's ranks, not SLURM's,
    # and its requeue handling still saves, requeues and resumes the job.
    out = tmp_path / "run"
    epochs, batch = 6, 8
    env = {**job_env, "DATA_DIR": str(cifar_dir)}
    job, _ = sbatch(tmp_path, env, TORCHRUN.name, "--accelerator", "cpu", "--model", "cnn",
                    "--max-epochs", epochs, "--batch-size", batch, "--output-dir", out,
                    opts=list(ON_TEST_CLUSTER), wait=False)
    preempt_and_restart(job, tmp_path, out / "checkpoints" / "last.ckpt")
    log, fields = job_log(tmp_path, job), job_fields(job)
    assert_requeued_once_and_finished(log, job, fields, out, epochs * (TINY_CIFAR_TRAIN // 2 // batch))
    # Both runs: world size 2, one process on each node, each the first on its node.
    # (Which node gets rank 0 is torchrun's choice: the first to arrive.)
    print("\n".join(m.group(0) for m in RANK_LINE.finditer(log)))  # for the record (pytest -s)
    runs = [{m.groups() for m in RANK_LINE.finditer(part)} for part in log.split("requeued SLURM job")]
    for ranks in runs:
        assert {(rank, world, local) for rank, world, local, _, _ in ranks} == {("0", "2", "0"), ("1", "2", "0")}
        assert {host for *_, host, _ in ranks} == {"n1", "n2"}
    # The training processes never failed; torchrun itself reports the requeue's SIGTERM.
    assert "[rank0]: Traceback" not in log and "[rank1]: Traceback" not in log


# ------------------------------------------------------- interactive allocations

def salloc(tmp_path, env, *args, timeout=120) -> subprocess.CompletedProcess:
    """salloc ARGS as a learner types it at a login node (the test's shell is one)."""
    return run_command(["salloc", *map(str, args)], REPO, env, timeout=timeout)


def test_salloc_with_srun_runs_one_ddp_run_over_the_tasks(cluster, job_env, mnist_dir, tmp_path):
    # salloc names such a job "interactive", for which Lightning ignores SLURM: each task
    # would start a DDP run of its own. The scripts take SLURM's ranks whenever srun
    # started several tasks, whatever the job's name.
    result = salloc(tmp_path, job_env, "--nodes=1", "--ntasks=2", "srun", "python", "examples/mnist_lightning.py",
                    "--data-dir", mnist_dir, "--accelerator", "cpu", "--devices", 2, "--strategy", "ddp",
                    "--max-epochs", 1, "--batch-size", 32, "--output-dir", tmp_path / "run", "--no-progress-bar")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert {m.groups() for m in RANK_LINE.finditer(output)} == {("0", "2", "0", "n1", "cpu"),
                                                                ("1", "2", "1", "n1", "cpu")}
    assert output.count("finished after") == 1
    assert finished_steps(output) == math.ceil(TINY_MNIST_TRAIN / 2 / 32)


@pytest.mark.parametrize(
    "allocation, launch, flags, expected",
    [
        # Two tasks, one device each: two runs on top of each other, before the check.
        (["--nodes=1", "--ntasks=2"], ["srun"], ["--devices", "1"],
         "error: SLURM started 2 tasks but --devices 1 x --num-nodes 1 = 1"),
        # Lightning issue #20391: fewer tasks than --ntasks-per-node promises (srun passes
        # the allocation's SLURM_NTASKS_PER_NODE on to a step of one task).
        (["--nodes=1", "--ntasks-per-node=2", "--job-name=lesson"], ["srun", "--ntasks=1"], [],
         "error: SLURM started 1 tasks but the job asks for --ntasks-per-node=2 on 1 node(s)"),
        # Python started in salloc's shell, on the login node, not on the job's node.
        (["--nodes=1", "--ntasks=2"], [], ["--devices", "2"], "error: this shell holds SLURM job"),
    ],
    ids=["devices-1-for-2-tasks", "fewer-tasks-than-per-node", "python-on-the-login-node"],
)
def test_salloc_mistakes_stop_with_one_line(cluster, job_env, mnist_dir, tmp_path, allocation, launch, flags,
                                            expected):
    # The mistakes whose detection rests on what SLURM itself sets in these cases; the
    # others of the page's table (--num-nodes forgotten, tasks spread unevenly) are
    # checked in test_cluster_tools.py with the variables SLURM set here for them.
    result = salloc(tmp_path, job_env, *allocation, *launch, "python", "examples/mnist_lightning.py",
                    "--data-dir", mnist_dir, "--accelerator", "cpu", "--output-dir", tmp_path / "run", *flags,
                    timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-3000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), output[-3000:]
    assert "Traceback" not in output and "finished after" not in output
