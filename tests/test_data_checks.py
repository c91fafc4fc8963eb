"""Data files that are there but bad (cut off, a web page saved in their place, unreadable):
found before training, named in one line with the fix, in the scripts and in check_setup.py.

Everything runs in this process, on fresh copies of the tiny data sets: each script stops
before its Trainer is built.
"""

import errno
import os
import pickle
import shlex
import sys
from pathlib import Path

import pytest

import cluster_tools
from conftest import REPO, load_example
from tiny_data import write_tiny_cifar10, write_tiny_mnist

HTML = b"<!DOCTYPE html>\n<html><body>Access denied</body></html>\n"


def cut(path: Path, keep: float = 0.5):
    """Keep the first part of a file, as an interrupted download or copy does."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def stop_line(script: str, argv: list, monkeypatch) -> str:
    """The one line `python examples/SCRIPT.py ARGV` stops with, run in this process on a
    machine that cannot download (so a file reported missing would stop it too)."""
    monkeypatch.setattr(cluster_tools, "can_reach", lambda *args, **kwargs: False)
    monkeypatch.setattr(sys, "argv", [f"examples/{script}.py"])
    with pytest.raises(SystemExit) as stopped:
        load_example(script).main([str(a) for a in argv])
    message = stopped.value.code
    assert isinstance(message, str) and "\n" not in message, message  # exit 1, one line
    return message


def bad_file_line(script: str, path: Path, reason: str, data: Path) -> str:
    kind = "an MNIST file" if script == "mnist_lightning" else "a CIFAR-10 batch"
    command = shlex.join(["python", f"examples/{script}.py", "--data-dir", str(data), "--download-only"])
    return f"error: {path} is not {kind} (truncated or corrupt: {reason}); delete it and run: {command}"


# ---------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("damage, reason", [(cut, "pickle data was truncated"),
                                            (lambda path: path.write_bytes(HTML), "it is a web page (HTML)")],
                         ids=["truncated", "html"])
def test_a_corrupt_cifar10_test_batch_stops_the_run_before_training(tmp_path, monkeypatch, damage, reason):
    # It used to be read only by trainer.test(), after the last epoch.
    data = write_tiny_cifar10(tmp_path / "data")
    test_batch = data / "cifar-10-batches-py" / "test_batch"
    damage(test_batch)
    out = tmp_path / "out"
    line = stop_line("cifar10_lightning", ["--data-dir", data, "--output-dir", out, "--accelerator", "cpu",
                                           "--max-epochs", 1, "--batch-size", 32, "--no-progress-bar"], monkeypatch)
    assert line == bad_file_line("cifar10_lightning", test_batch, reason, data)
    assert not (out / "logs").exists() and not (out / "checkpoints").exists()  # nothing trained


def test_a_pickle_error_names_the_cifar10_file_in_training_and_in_download_only(tmp_path, monkeypatch):
    data = write_tiny_cifar10(tmp_path / "data")
    batch = data / "cifar-10-batches-py" / "data_batch_3"
    cut(batch, keep=0.3)
    expected = bad_file_line("cifar10_lightning", batch, "pickle data was truncated", data)
    train = ["--data-dir", data, "--output-dir", tmp_path / "out", "--accelerator", "cpu", "--no-progress-bar"]
    assert stop_line("cifar10_lightning", train, monkeypatch) == expected
    # --download-only, which the line tells the learner to run, says the same: it used to say
    # "CIFAR-10 is ready".
    assert stop_line("cifar10_lightning", ["--data-dir", data, "--download-only"], monkeypatch) == expected


def test_cifar10_batches_are_checked_for_their_shape_and_labels(tmp_path):
    data = write_tiny_cifar10(tmp_path / "data")
    folder = data / "cifar-10-batches-py"
    assert cluster_tools.data_file_problems("CIFAR-10", str(data)) == ([], [], [])  # the tiny data passes

    tiny = pickle.loads((folder / "data_batch_1").read_bytes())  # 100 images, as each batch

    def rewrite(name, **changes):
        (folder / name).write_bytes(pickle.dumps({**tiny, **changes}))

    rewrite("data_batch_1", data=tiny["data"].reshape(-1, 1024))  # one colour channel only
    rewrite("data_batch_2", labels=[10] * 100)  # classes are 0 to 9
    rewrite("data_batch_4", labels=tiny["labels"][:-1])  # one label short
    (folder / "data_batch_5").write_bytes(b"")
    missing, unreadable, corrupt = cluster_tools.data_file_problems("CIFAR-10", str(data))
    assert (missing, unreadable) == ([], [])
    assert corrupt == [
        f"{folder / 'data_batch_1'} is not a CIFAR-10 batch (truncated or corrupt: "
        "its 'data' is not an (N, 3072) array of uint8)",
        f"{folder / 'data_batch_2'} is not a CIFAR-10 batch (truncated or corrupt: "
        "its 'labels' are not 100 classes from 0 to 9)",
        f"{folder / 'data_batch_4'} is not a CIFAR-10 batch (truncated or corrupt: "
        "its 'labels' are not 100 classes from 0 to 9)",
        f"{folder / 'data_batch_5'} is not a CIFAR-10 batch (truncated or corrupt: it is empty)",
    ]
    # Missing is not corrupt: the scripts' download advice stays as it was.
    (folder / "test_batch").unlink()
    assert cluster_tools.data_file_problems("CIFAR-10", str(data))[0] == [folder / "test_batch"]


# ------------------------------------------------------------------- MNIST

def test_a_truncated_mnist_file_is_named_not_reported_missing(tmp_path, monkeypatch):
    # It used to be "MNIST is not in DATA ... run --download-only", and that command then
    # failed too, for torchvision found the files "there".
    data = write_tiny_mnist(tmp_path / "data")
    images = data / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    cut(images)
    expected = bad_file_line("mnist_lightning", images, "78,408 bytes where its header promises 156,816", data)
    train = ["--data-dir", data, "--output-dir", tmp_path / "out", "--accelerator", "cpu"]
    assert stop_line("mnist_lightning", train, monkeypatch) == expected
    assert stop_line("mnist_lightning", ["--data-dir", data, "--download-only"], monkeypatch) == expected


def test_a_garbage_mnist_file_is_named_not_a_bare_assertion_error(tmp_path, monkeypatch):
    data = write_tiny_mnist(tmp_path / "data")
    labels = data / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(b"not an IDX file\n" * 40)
    line = stop_line("mnist_lightning", ["--data-dir", data, "--output-dir", tmp_path / "out"], monkeypatch)
    assert line == bad_file_line("mnist_lightning", labels, "magic number 0x6e6f7420, not 0x0801", data)
    # mnist_cli.py (LightningCLI) has the same data module, and no --download-only: the line
    # names the script that has one.
    monkeypatch.setattr(sys, "argv", ["examples/mnist_cli.py", "fit"])
    with pytest.raises(SystemExit) as stopped:
        load_example("mnist_lightning").MNISTDataModule(str(data), 32, 0).prepare_data()
    assert stopped.value.code == line


def test_mnist_files_are_checked_against_their_own_headers(tmp_path):
    data = write_tiny_mnist(tmp_path / "data")
    raw = data / "MNIST" / "raw"
    assert cluster_tools.data_file_problems("MNIST", str(data)) == ([], [], [])  # the tiny data passes
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-1])  # one label short, and a header that says so
    labels.write_bytes(labels.read_bytes()[:4] + (599).to_bytes(4, "big") + labels.read_bytes()[8:])
    test_labels = raw / "t10k-labels-idx1-ubyte"
    test_labels.write_bytes(test_labels.read_bytes()[:-1] + bytes([12]))  # classes are 0 to 9
    (raw / "t10k-images-idx3-ubyte").unlink()
    missing, unreadable, corrupt = cluster_tools.data_file_problems("MNIST", str(data))
    assert missing == [raw / "t10k-images-idx3-ubyte"] and unreadable == []
    assert corrupt == [
        f"{test_labels} is not an MNIST file (truncated or corrupt: a label 12, not 0 to 9)",
        f"{labels} holds 599 labels for the 600 images of train-images-idx3-ubyte",
    ]


# ------------------------------------------------------------ check_setup.py

def check_data(data_dir) -> int:
    """Run check_setup.py's data section, which prints its findings; return its number of
    problems (any, and check_setup.py exits 1 instead of saying "Ready for the lesson.")."""
    check_setup = load_example("check_setup")
    report = check_setup.Report()
    check_setup.check_data(report, str(data_dir))
    return report.problems


def test_check_setup_reports_corrupt_files_with_their_fix(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)  # it names the scripts relative to where it runs
    data = write_tiny_cifar10(write_tiny_mnist(tmp_path / "data"))
    images = data / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    cut(images)
    (data / "cifar-10-batches-py" / "test_batch").write_bytes(HTML)
    assert check_data(data) == 2  # it said "Ready for the lesson."
    out = capsys.readouterr().out
    for script, path, reason in [
        ("mnist_lightning", images, "78,408 bytes where its header promises 156,816"),
        ("cifar10_lightning", data / "cifar-10-batches-py" / "test_batch", "it is a web page (HTML)"),
    ]:
        kind = "an MNIST file" if script == "mnist_lightning" else "a CIFAR-10 batch"
        assert (f"  PROBLEM  {path} is not {kind} (truncated or corrupt: {reason})\n"
                f"           -> delete it, then on a machine with internet (your laptop, or a login node on a "
                f"cluster) run: python examples/{script}.py --data-dir {data} --download-only\n") in out
    assert "  ok  " not in out.split("Data (")[1]


def test_check_setup_reports_a_data_dir_that_is_a_file(tmp_path, capsys):
    data = tmp_path / "data"
    data.write_text("not a folder")
    assert check_data(data) == 1
    assert (f"  PROBLEM  {data} is a file, not a folder\n"
            f"           -> pass the folder that holds (or will hold) the data: --data-dir PATH\n"
            ) in capsys.readouterr().out


def test_check_setup_reports_a_data_dir_it_cannot_list_without_a_traceback(tmp_path, monkeypatch, capsys):
    data = write_tiny_cifar10(write_tiny_mnist(tmp_path / "data"))
    # What `chmod 000 data` does for any user but root (these tests may run as root):
    # the folder can be seen but not listed, and nothing in it can be reached.
    real_stat, real_listdir, real_access = os.stat, os.listdir, os.access

    def blocked(path, inside_only=False):
        if isinstance(path, int):  # an open file
            return False
        path = Path(os.fspath(path)).absolute()
        return data in path.parents or (not inside_only and path == data)

    def denied(path):
        return PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    def stat(path, *args, **kwargs):
        if blocked(path, inside_only=True):
            raise denied(path)
        return real_stat(path, *args, **kwargs)

    def listdir(path="."):
        if blocked(path):
            raise denied(path)
        return real_listdir(path)

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "listdir", listdir)
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: not blocked(path) and real_access(path, mode, **kw))
    problems = check_data(data)  # it raised PermissionError
    # The scripts stop with the same finding, in one line.
    with pytest.raises(SystemExit) as stopped:
        cluster_tools.check_data_files("MNIST", str(data))
    monkeypatch.undo()
    out = capsys.readouterr().out
    assert problems == 1, out  # once, not once per data set
    assert (f"  PROBLEM  cannot read {data} (Permission denied)\n"
            f"           -> make it readable for you (ls -l shows who owns it), or pass another --data-dir\n") in out
    assert stopped.value.code == f"error: cannot read {data} (Permission denied); make it readable, or pass " \
                                 f"another --data-dir"
