"""Tiny, learnable stand-ins for MNIST and CIFAR-10 in torchvision's own on-disk layouts.

The scripts' real loading code reads these files, so a run on them exercises the same path
a run on the real data does, in seconds. Each class is drawn so that its label is visible
in the pixels: a model that learns anything at all scores far above chance.

    python examples/tiny_data.py tiny      # writes tiny/MNIST/raw/ and tiny/cifar-10-batches-py/

Then add --data-dir tiny to a script's command. The lesson's tests use the same functions;
they need only NumPy.
"""

import argparse
import pickle
import struct
from pathlib import Path

import numpy as np

# The sizes of the tiny data sets; the lesson's tests count training steps from them.
MNIST_TRAIN, MNIST_TEST = 600, 200
CIFAR_PER_BATCH, CIFAR_TEST = 100, 200  # 5 training batches of CIFAR_PER_BATCH images

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


def write_tiny_mnist(root: Path, n_train: int = MNIST_TRAIN, n_test: int = MNIST_TEST,
                     seed: int = 0) -> Path:
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


def write_tiny_cifar10(root: Path, per_batch: int = CIFAR_PER_BATCH, n_test: int = CIFAR_TEST,
                       seed: int = 0) -> Path:
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="writes FOLDER/MNIST/raw/ and FOLDER/cifar-10-batches-py/")
    root = Path(parser.parse_args(argv).folder)
    write_tiny_mnist(root)
    write_tiny_cifar10(root)
    print(f"tiny MNIST and CIFAR-10 written to {root}: use --data-dir {root}")


if __name__ == "__main__":
    main()
