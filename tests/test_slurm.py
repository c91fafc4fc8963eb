"""The job templates in slurm/, submitted with the real sbatch to a real (throwaway) cluster:
see slurm_jobs.py for the cluster and the overrides. The recipes of the "Cluster recipes"
page (a sweep, torchrun, interactive allocations) are in test_cluster_recipes.py.
"""

import math
import os
import re
import shutil
import subprocess

import pytest
import torch

from conftest import REPO, TINY_CIFAR_TRAIN, TINY_MNIST_TRAIN, finished_steps
from slurm_jobs import (CLUSTER_SCRIPT, GPU_TEMPLATES, ON_TEST_CLUSTER, RANK_LINE, TEMPLATES,
                        assert_requeued_once_and_finished, job_fields, job_log, preempt_and_restart, sbatch)

# ----------------------------------------------------------- static: no cluster needed

def test_there_is_one_template_per_mode():
    assert {t.name for t in TEMPLATES} == {
        "mnist-cpu-ddp.sbatch", "mnist-gpu.sbatch",
        "cifar10-ddp.sbatch", "cifar10-ddp-multinode.sbatch", "cifar10-fsdp.sbatch",
        "mnist-sweep.sbatch", "cifar10-torchrun.sbatch",  # the cluster recipes
    }


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_has_the_lines_that_make_requeue_and_resources_work(path):
    text = path.read_text()
    array = "#SBATCH --array=" in text
    torchrun = "torchrun" in text.split("srun --kill-on-bad-exit", 1)[1].splitlines()[0]
    directives = re.findall(r"^#SBATCH (--[\w-]+)", text, flags=re.M)
    for option in ("--job-name", "--nodes", "--ntasks-per-node", "--cpus-per-task", "--mem", "--time",
                   "--output", "--open-mode", "--signal", "--requeue"):
        assert option in directives, f"{path.name}: no #SBATCH {option}"
    # Array tasks share the job id %j's array job id %A; each writes its own log (%a).
    assert f"#SBATCH --output={'%x-%A_%a.out' if array else '%x-%j.out'}" in text
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
    # PyTorch's threads per process = that process's cores, never every core of the node.
    threads = "$((SLURM_CPUS_PER_TASK / procs))" if torchrun else "$SLURM_CPUS_PER_TASK"
    assert f"export OMP_NUM_THREADS={threads}" in text
    # The launch: srun, unbuffered Python, sizes from the allocation, resume, the user's flags.
    launch = text[text.index("srun --kill-on-bad-exit"):]
    if torchrun:  # one torchrun per node, one process per GPU
        assert "export PYTHONUNBUFFERED=1" in text
        assert re.search(r"--nproc-per-node \"\$procs\"(.|\n)*examples/\w+\.py", launch)
        assert '--nnodes "$SLURM_JOB_NUM_NODES"' in launch
        devices = '--devices "$procs"'
    else:
        assert re.search(r"python -u examples/\w+\.py", launch)
        devices = '--devices "$SLURM_NTASKS_PER_NODE"'
    for piece in (devices, '--num-nodes "$SLURM_JOB_NUM_NODES"',
                  "--resume", '--output-dir "$OUTPUT_DIR"', '"$@"'):
        assert piece in launch, f"{path.name}: the srun line lacks {piece}"
    # Ids that survive a requeue: a requeued run finds its own checkpoints again.
    output_dir = text.split("OUTPUT_DIR=", 1)[1].splitlines()[0]
    assert ("$SLURM_ARRAY_JOB_ID" if array else "$SLURM_JOB_ID") in output_dir


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
    # Exercise 1's command, on the tiny data and with one core per task.
    job, fields = sbatch(tmp_path, env, "mnist-cpu-ddp.sbatch",
                         "--max-epochs", 1, "--output-dir", out,
                         opts=["--cpus-per-task=1"])
    log = job_log(tmp_path, job)
    assert fields["JobState"] == "COMPLETED", log[-3000:]
    ranks = {m.groups() for m in RANK_LINE.finditer(log)}
    assert ranks == {("0", "2", "0", "n1", "cpu"), ("1", "2", "1", "n1", "cpu")}
    # Each rank trains on its half of the data, in batches of the default 128.
    assert finished_steps(log) == math.ceil(TINY_MNIST_TRAIN / 2 / 128)
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
    job, fields = sbatch(tmp_path, env, "mnist-cpu-ddp.sbatch", "--max-epochs", 1, *script_args,
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


def test_preempted_job_saves_requeues_and_finishes_with_the_planned_steps(cluster, job_env, mnist_dir, tmp_path):
    # Two DDP ranks, as the template asks for: the signal may reach them at different
    # moments, and the scripts' RequeueOnSignal makes them save together between steps.
    # Exercise 3's command. Added here: each rank gets a DataLoader worker, as on a GPU:
    # SLURM signals every process of the job step, the workers too, and a worker that
    # does not expect SIGUSR1 dies of it.
    out = tmp_path / "run"
    epochs, batch = 10, 32  # the signal comes after the first epoch: nine are left
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
