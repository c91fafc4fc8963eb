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


def check(monkeypatch, capsys, env: dict, *args) -> tuple[int, str]:
    """The exit status and output of `python examples/check_setup.py ARGS` in a shell with
    these SLURM variables, run in this process (the packages it imports are imported here
    already); the run above starts it as a learner does."""
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(REPO)  # it names commands relative to where it runs
    try:
        load_example("check_setup").main([str(a) for a in args])
        code = 0
    except SystemExit as stopped:
        code = stopped.code
    return code, capsys.readouterr().out


def test_missing_data_fails_and_prints_the_download_command(monkeypatch, capsys, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out = check(monkeypatch, capsys, {}, "--data-dir", empty)
    assert code == 1, out
    assert "PROBLEM  MNIST is not in" in out
    assert "PROBLEM  CIFAR-10 is not in" in out
    # The fix is the exact command, runnable from where the learner is (the repo root).
    assert f"python examples/mnist_lightning.py --data-dir {empty} --download-only" in out
    assert f"python examples/cifar10_lightning.py --data-dir {empty} --download-only" in out
    assert "2 problem(s) found" in out


def test_slurm_job_with_more_tasks_than_gpus_is_a_problem(monkeypatch, capsys, tmp_path):
    data = write_tiny_cifar10(write_tiny_mnist(tmp_path / "data"))
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "train", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NTASKS_PER_NODE": "4", "SLURM_GPUS_ON_NODE": "2"}
    code, out = check(monkeypatch, capsys, job, "--data-dir", data)
    assert code == 1, out
    assert "job 4242 (train): 1 node(s), 4 task(s) per node, 2 GPU(s) per node" in out
    assert "PROBLEM  4 task(s) per node but 2 GPU(s) per node" in out
    assert "--ntasks-per-node=2" in out
    assert "PROBLEM  no --cpus-per-task" in out


def test_slurm_job_named_interactive_gets_a_note_not_a_failure(monkeypatch, capsys, tmp_path):
    data = write_tiny_cifar10(write_tiny_mnist(tmp_path / "data"))
    job = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "interactive", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_NTASKS_PER_NODE": "1", "SLURM_CPUS_PER_TASK": "2"}
    code, out = check(monkeypatch, capsys, job, "--data-dir", data)
    assert "Lightning ignores SLURM in a job named 'interactive'" in out
    assert "start every run with srun python script.py ...; for scripts of your own" in out
    assert "--job-name=lesson" in out
    # Without a GPU job layout to get wrong, nothing else is amiss (a GPU machine has no
    # SLURM_GPUS_* here, and one task per visible GPU is not required for this job name).
    assert code == 0, out


def test_help_documents_the_data_dir_flag(monkeypatch, capsys):
    code, out = check(monkeypatch, capsys, {}, "--help")
    assert code == 0
    assert "--data-dir" in out and "default: data" in out


def test_check_without_cluster_tools_next_to_it_names_the_missing_file(tmp_path):
    # A learner downloaded check_setup.py alone: the training scripts would not start either.
    shutil.copy(EXAMPLES / "check_setup.py", tmp_path)
    data = write_tiny_cifar10(write_tiny_mnist(tmp_path / "data"))
    result = run_command([sys.executable, str(tmp_path / "check_setup.py"), "--data-dir", str(data)], tmp_path,
                         {**learner_environ(), **NO_SLURM}, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"PROBLEM  cluster_tools.py is not in {tmp_path}; the training scripts import it" in result.stdout
    assert "Traceback" not in result.stderr
