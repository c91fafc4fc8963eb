"""The setup check, run as a learner runs it before the workshop."""

import importlib.util
import os
import shutil
import sys

import pytest

from conftest import EXAMPLES, REPO, learner_environ, load_example, run_command, run_script
from tiny_data import write_tiny_cifar10, write_tiny_mnist

# Hide any real SLURM job the tests might run in: the script treats empty as unset.
NO_SLURM = {name: "" for name in os.environ if name.startswith("SLURM_")}


@pytest.mark.skipif(importlib.util.find_spec("jsonargparse") is None,
                    reason="the check needs jsonargparse (LightningCLI), which is not installed here")
def test_ready_when_both_datasets_are_present(tmp_path):
    data = write_tiny_cifar10(write_tiny_mnist(tmp_path / "data"))
    result = run_script("check_setup.py", "--data-dir", data, env=NO_SLURM)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"ok       MNIST in {data / 'MNIST' / 'raw'}" in result.stdout
    assert f"ok       CIFAR-10 in {data / 'cifar-10-batches-py'}" in result.stdout
    # Versions are read and checked against requirements.txt next to examples/.
    for package in ("torch", "torchvision", "lightning", "torchmetrics", "jsonargparse"):
        assert f"ok       {package} " in result.stdout
    assert "(supported: >=" in result.stdout
    assert "Ready for the lesson." in result.stdout
    assert "PROBLEM" not in result.stdout


def test_a_requirement_with_extras_is_read_and_its_extras_are_checked(monkeypatch):
    check_setup = load_example("check_setup")
    # requirements.txt: jsonargparse[signatures]>=4.39,<5  # for LightningCLI ...
    assert check_setup.read_ranges(REPO / "requirements.txt")["jsonargparse"] == ">=4.39,<5"
    assert check_setup.pip_name("jsonargparse") == "jsonargparse[signatures]"
    # jsonargparse installed without its "signatures" extra: docstring-parser is missing.
    requires = ['docstring-parser>=0.17; extra == "signatures"',
                'jsonargparse[typing-extensions]; extra == "signatures"',
                'ruyaml>=0.20; extra == "ruyaml"']
    metadata = check_setup.importlib.metadata

    def distribution(name):
        if name == "docstring-parser":
            raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "requires", lambda name: requires)
    monkeypatch.setattr(metadata, "distribution", distribution)
    assert check_setup.missing_extras("jsonargparse") == ["docstring-parser"]
    assert check_setup.missing_extras("torch") == []  # no extras asked for


def test_missing_data_fails_and_prints_the_download_command(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_script("check_setup.py", "--data-dir", empty, env=NO_SLURM)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "PROBLEM  MNIST is not in" in result.stdout
    assert "PROBLEM  CIFAR-10 is not in" in result.stdout
    # The fix is the exact command, runnable from where the learner is (the repo root).
    assert f"python examples/mnist_lightning.py --data-dir {empty} --download-only" in result.stdout
    assert f"python examples/cifar10_lightning.py --data-dir {empty} --download-only" in result.stdout
    assert "2 problem(s) found" in result.stdout


def test_slurm_job_with_more_tasks_than_gpus_is_a_problem(tmp_path):
    data = write_tiny_cifar10(write_tiny_mnist(tmp_path / "data"))
    job = {**NO_SLURM, "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NTASKS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "2"}
    result = run_script("check_setup.py", "--data-dir", data, env=job)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "job 4242 (train): 1 node(s), 4 task(s) per node, 2 GPU(s) per node" in result.stdout
    assert "PROBLEM  4 task(s) per node but 2 GPU(s) per node" in result.stdout
    assert "--ntasks-per-node=2" in result.stdout
    assert "PROBLEM  no --cpus-per-task" in result.stdout


def test_slurm_job_named_interactive_gets_a_note_not_a_failure(tmp_path):
    data = write_tiny_cifar10(write_tiny_mnist(tmp_path / "data"))
    job = {**NO_SLURM, "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "interactive", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "2"}
    result = run_script("check_setup.py", "--data-dir", data, env=job)
    assert "Lightning ignores SLURM in a job named 'interactive'" in result.stdout
    assert "--job-name=" in result.stdout
    # Without a GPU job layout to get wrong, nothing else is amiss (a GPU machine has no
    # SLURM_GPUS_* here, and one task per visible GPU is not required for this job name).
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_documents_the_data_dir_flag():
    result = run_script("check_setup.py", "--help")
    assert result.returncode == 0
    assert "--data-dir" in result.stdout and "default: data" in result.stdout


def test_check_without_cluster_tools_next_to_it_names_the_missing_file(tmp_path):
    # A learner downloaded check_setup.py alone: the training scripts would not start either.
    shutil.copy(EXAMPLES / "check_setup.py", tmp_path)
    data = write_tiny_cifar10(write_tiny_mnist(tmp_path / "data"))
    result = run_command([sys.executable, str(tmp_path / "check_setup.py"), "--data-dir", str(data)], tmp_path,
                         {**learner_environ(), **NO_SLURM}, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"PROBLEM  cluster_tools.py is not in {tmp_path}; the training scripts import it" in result.stdout
    assert "Traceback" not in result.stderr
