"""The MNIST scripts, run as a learner runs them, on CPU and tiny learnable data."""

import re

import pytest
import torch

import cluster_tools

from conftest import TINY_MNIST_TRAIN, assert_offline_stop, finished_steps, last_value, load_example, read_metrics, \
    run_script

BATCH = 32
STEPS_PER_EPOCH = -(-TINY_MNIST_TRAIN // BATCH)  # the last, smaller batch counts too
CPU = ("--accelerator", "cpu")


def test_lightning_mnist_learns_and_reports_outputs(mnist_dir, tmp_path):
    out = tmp_path / "run"
    result = run_script("mnist_lightning.py", "--data-dir", mnist_dir, "--output-dir", out,
                        *CPU, "--max-epochs", 2, "--batch-size", BATCH)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    assert last_value(rows, "test_acc") > 0.8  # chance is 0.1
    assert last_value(rows, "val_acc") > 0.8
    assert last_value(rows, "train_loss") < 1.0  # log(10) = 2.3 before learning
    assert finished_steps(result.stdout) == 2 * STEPS_PER_EPOCH
    # The learner is told where the results went, and they are there.
    assert str(out / "logs" / "version_0" / "metrics.csv") in result.stdout
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert str(out / "checkpoints" / "last.ckpt") in result.stdout


def test_fast_dev_run_runs_one_batch_and_saves_nothing(mnist_dir, tmp_path):
    out = tmp_path / "fdr"
    # With --resume and nothing to resume from, too: the run starts from scratch and says so.
    result = run_script("mnist_lightning.py", "--data-dir", mnist_dir, "--output-dir", out, *CPU, "--fast-dev-run",
                        "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--resume: no checkpoint in {out}, starting from scratch" in result.stdout
    assert finished_steps(result.stdout) == 1
    assert not list(out.rglob("*.ckpt"))


def test_plain_pytorch_script_learns_the_same_data(mnist_dir, tmp_path):
    out = tmp_path / "plain"
    result = run_script("mnist_pytorch.py", "--data-dir", mnist_dir, "--output-dir", out,
                        "--epochs", 2, "--batch-size", BATCH, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(re.search(r"test_acc ([\d.]+)", result.stdout).group(1)) > 0.8
    assert len(re.findall(r"^epoch \d+:", result.stdout, flags=re.M)) == 2
    saved = torch.load(out / "best.pt", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "epoch"} <= set(saved)


def assert_clean_error(result, expected: str):
    """Non-zero exit, no traceback, and exactly one line that explains the problem."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    assert expected in error_lines[0], error_lines[0]


def test_bad_flag_from_the_command_line_gives_one_line_and_no_traceback(mnist_dir, tmp_path):
    # One run as a learner types it; the other bad flags are checked in-process below.
    result = run_script("mnist_lightning.py", "--data-dir", mnist_dir, "--output-dir", tmp_path,
                        "--strategy", "fsdp", "--accelerator", "cpu")
    assert_clean_error(result, "--strategy fsdp needs GPUs (Lightning refuses FSDP on CPU); use --strategy ddp on CPU")


@pytest.fixture(scope="module")
def mnist_script():
    return load_example("mnist_lightning")


@pytest.mark.parametrize(
    "flags, expected",
    [
        # The shared flags' checks are tested once, in test_cluster_tools.py.
        (("--precision", "bf16-true"), "invalid choice: 'bf16-true'"),
        (("--accelerator", "tpu"), "invalid choice: 'tpu'"),
    ],
)
def test_bad_flags_give_one_clear_line(mnist_script, capsys, flags, expected):
    with pytest.raises(SystemExit) as stopped:
        mnist_script.parse_args(list(flags))
    assert stopped.value.code == 2  # argparse's exit status for a usage error
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], errors


def test_offline_missing_data_gives_clear_message(tmp_path):
    from torchvision.datasets import MNIST

    if cluster_tools.can_reach(MNIST.mirrors[0]):
        pytest.skip("this machine can reach the MNIST mirror, so the offline path cannot be shown")
    empty = tmp_path / "empty"
    for script in ("mnist_lightning.py", "mnist_pytorch.py"):
        result = run_script(script, "--data-dir", empty, "--output-dir", tmp_path / "out", timeout=60)
        assert_clean_error(result, f"MNIST is not in {empty}")
        if script == "mnist_lightning.py":  # it names the command that fixes it
            assert f"--data-dir {empty} --download-only" in result.stderr


def test_offline_missing_data_stops_with_the_download_command_in_process(mnist_script, monkeypatch, capsys,
                                                                        tmp_path):
    # (mnist_pytorch.py has no such check: it reports the failed download itself,
    # which only the subprocess test above can show.)
    assert_offline_stop(mnist_script, "mnist_lightning.py", "MNIST", tmp_path, monkeypatch, capsys)


@pytest.mark.parametrize("device, expected", [("gpu", "not a device name"), ("cuda:7", "PyTorch sees no GPU")])
def test_plain_script_refuses_a_device_it_cannot_use_in_one_line(capsys, device, expected):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    plain = load_example("mnist_pytorch")
    with pytest.raises(SystemExit) as stopped:
        plain.main(["--device", device, "--data-dir", "no-such-folder"])  # before any data
    assert str(stopped.value.code).startswith(f"error: --device {device}: {expected}")
