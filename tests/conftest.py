"""Shared fixtures: tiny, learnable datasets in torchvision's own on-disk layouts.

The scripts' real loading code reads these files, so a smoke run exercises the same
path a learner's run does. Each class is drawn so that its label is visible in the
pixels: a model that learns anything at all scores far above chance.
"""

import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: runs for more than a few seconds")


def pytest_collection_modifyitems(config, items):
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


# ---------------------------------------------------------------- MNIST (IDX files)

def _mnist_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28x28 noise with a bright 6x6 block whose position encodes the label."""
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        row, col = 2 + (label // 5) * 13, 1 + (label % 5) * 5
        images[i, row : row + 6, col : col + 6] = 255
    return images


def _write_idx(path: Path, array: np.ndarray):
    # IDX: a big-endian magic number (0x08 = unsigned bytes, then the number of
    # dimensions), each dimension as a big-endian int32, then the raw bytes.
    header = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_tiny_mnist(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", _mnist_images(labels, rng))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8))
    return root


# ------------------------------------------------------ CIFAR-10 (pickled batches)

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """32x32 RGB noise with a central square whose colour encodes the label.

    Colour survives random crops and flips, so augmentation does not hide the label.
    """
    palette = np.array([[(c >> 2) & 1, (c >> 1) & 1, c & 1] for c in range(10)]) * 200 + np.array(
        [[0, 0, 0]] * 8 + [[55, 55, 0], [0, 55, 55]]
    )
    images = rng.integers(0, 50, size=(len(labels), 3, 32, 32), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, :, 8:24, 8:24] = palette[label][:, None, None]
    return images


def write_tiny_cifar10(root: Path, per_batch: int = 100, n_test: int = 200, seed: int = 0) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = n_test if name == "test_batch" else per_batch
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = _cifar_images(labels, rng).reshape(n, 3 * 32 * 32)
        batch = {"batch_label": name, "labels": labels.tolist(), "data": images, "filenames": []}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch}, f)
    return root


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    return write_tiny_mnist(tmp_path_factory.mktemp("mnist-data"))


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory) -> Path:
    return write_tiny_cifar10(tmp_path_factory.mktemp("cifar-data"))


# ------------------------------------------------------------------- running

def run_script(name: str, *args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run examples/<name> as a learner would: a fresh Python process, from the repo root."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    # Keep the smoke runs quiet and deterministic on small CPUs.
    full_env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *map(str, args)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def finished_steps(output: str) -> int:
    """The step count the scripts print last: 'finished after N training steps'."""
    import re

    match = re.search(r"finished after (\d+) training steps", output)
    assert match, f"no 'finished after' line in:\n{output[-3000:]}"
    return int(match.group(1))


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
