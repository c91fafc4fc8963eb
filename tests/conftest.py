"""Shared fixtures: the tiny data sets of examples/tiny_data.py, running scripts, reading their logs."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
# The tests import the example scripts' modules (cluster_tools, tiny_data, the scripts
# themselves) as the scripts import each other: from the folder they live in.
sys.path.insert(0, str(EXAMPLES))

import tiny_data  # noqa: E402
from tiny_data import write_tiny_cifar10, write_tiny_mnist  # noqa: E402

# Training images the scripts see in the tiny data sets, after their validation splits:
# mnist_lightning.py holds 1/12 out, cifar10_lightning.py 1/10.
TINY_MNIST_TRAIN = tiny_data.MNIST_TRAIN - tiny_data.MNIST_TRAIN // 12
TINY_CIFAR_TRAIN = 5 * tiny_data.CIFAR_PER_BATCH - 5 * tiny_data.CIFAR_PER_BATCH // 10


# Test files whose tests (one xdist group each) take longest in all: SLURM jobs, in order.
LONGEST_GROUPS = ("test_slurm", "test_cluster_recipes")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: runs for more than a few seconds")
    config.addinivalue_line("markers", "xdist_group(name): tests that run one after another in one process")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    # `make test` runs the tests in parallel processes (pytest-xdist, --dist loadgroup). A test
    # file's tests stay together in one process, in their order, so its module fixtures (a
    # built site, a trained run) are made once and the SLURM jobs never compete for the test
    # cluster; test_page_commands.py groups its tests by page instead. The GPU tests share
    # nothing and run on a GPU machine lent for minutes: each is a group of its own.
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            alone = item.path.stem == "test_gpu"
            item.add_marker(pytest.mark.xdist_group(item.name if alone else item.path.stem))
    # The longest chains first: the SLURM files' tests run one after another for minutes, so
    # they start at once, on two workers, and the short groups fill in around them instead
    # of one worker finishing them alone at the end. (A stable sort: each file keeps its order.)
    items.sort(key=lambda item: item.path.stem not in LONGEST_GROUPS)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to PyTorch here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    return write_tiny_mnist(tmp_path_factory.mktemp("mnist-data"))


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar-data"))


# ------------------------------------------------------------------- running

# Where torch.distributed finds its peers. A learner's shell has none of these; if a test
# process had them, every DDP run started from it would meet on one fixed port.
DISTRIBUTED_SETTINGS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK")


def learner_environ() -> dict:
    """This process's environment, less the distributed settings a learner would not have."""
    return {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_SETTINGS}


def run_command(args: list, cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run, except that a command that runs out of time is stopped with all its
    children: a hung DDP run leaves no rank behind to disturb the tests after it."""
    process = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # its own process group, ranks included
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise subprocess.TimeoutExpired(args, timeout, stdout, stderr) from None
    return subprocess.CompletedProcess(args, process.returncode, stdout, stderr)


def run_script(name: str, *args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run examples/<name> as a learner would: a fresh Python process, from the repo root."""
    full_env = {**learner_environ(), "PYTHONUNBUFFERED": "1", **(env or {})}
    # Keep the smoke runs quiet and deterministic on small CPUs.
    full_env.setdefault("OMP_NUM_THREADS", "1")
    return run_command([sys.executable, str(EXAMPLES / name), *map(str, args)], REPO, full_env, timeout)


def finished_steps(output: str) -> int:
    """The step count the scripts print last: 'finished after N training steps'."""
    import re

    found = re.findall(r"finished after (\d+) training steps", output)
    assert found, f"no 'finished after' line in:\n{output[-3000:]}"
    return int(found[-1])


def load_example(name: str):
    """Import examples/<name>.py as a module, for unit tests of its pieces."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def metrics_files(output_dir: Path) -> list[Path]:
    """logs/version_N/metrics.csv of every run in output_dir, oldest first."""
    files = (output_dir / "logs").glob("version_*/metrics.csv")
    return sorted(files, key=lambda p: int(p.parent.name.split("_")[1]))


def read_metrics(output_dir: Path) -> list[dict]:
    """All rows of all runs in output_dir, in the order they were written."""
    import csv

    rows = []
    for path in metrics_files(output_dir):
        with open(path, newline="") as f:
            rows += list(csv.DictReader(f))
    assert rows, f"no metrics under {output_dir}"
    return rows


def last_value(rows: list[dict], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    assert values, f"no {key} in metrics.csv"
    return values[-1]


def assert_offline_stop(module, script: str, dataset: str, tmp_path: Path, monkeypatch, capsys):
    """Run a Lightning script's main() in-process, as `python SCRIPT`, on a pretended
    offline machine with an empty data folder, and check that it stops with one line that
    names the download command. (The subprocess tests of this case skip wherever the data
    server is reachable, as on CI.)"""
    monkeypatch.setattr(module.cluster_tools, "can_reach", lambda *args, **kwargs: False)
    monkeypatch.setattr(sys, "argv", [script])
    empty = tmp_path / "empty"
    with pytest.raises(SystemExit) as stopped:
        module.main(["--data-dir", str(empty), "--output-dir", str(tmp_path / "out"),
                     "--accelerator", "cpu"])
    message = stopped.value.code
    # A string: Python prints it as one line to stderr and exits with status 1.
    assert isinstance(message, str) and "\n" not in message, message
    assert message.startswith(f"error: {dataset} is not in {empty}")
    assert message.endswith(f"python {script} --data-dir {empty} --download-only")
    assert "Traceback" not in "".join(capsys.readouterr())
    assert not empty.exists()  # nothing was downloaded or started


# The SLURM tests' fixtures: `cluster` (skips without the test cluster) and `job_env`.
# Imported last: slurm_jobs.py imports the helpers above from this module.
from slurm_jobs import cluster, job_env  # noqa: E402, F401
