"""The scripts on a real GPU: FSDP wrap policies and sharding strategies, FSDP2, checkpoints
saved and loaded back, bf16, torch.compile, DDP. Skipped where PyTorch sees no GPU."""

import re

import pytest

from conftest import last_value, read_metrics, run_script

pytestmark = pytest.mark.gpu

TINY = ("--max-epochs", 1, "--batch-size", 32, "--no-progress-bar")


def assert_trained_and_tested(result, out):
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    # The test stage loads the best checkpoint back, so a test_acc proves the round trip.
    assert "Loaded model weights from the checkpoint" in result.stdout + result.stderr
    last_value(read_metrics(out), "test_acc")  # fails unless the test stage logged an accuracy
    peak = re.search(r"rank 0: peak GPU memory ([\d.]+) GiB", result.stdout)
    assert peak and float(peak.group(1)) > 0


@pytest.mark.parametrize("policy", ["none", "block", "size"])
def test_fsdp_wrap_policy_trains_saves_and_reloads(cifar_dir, tmp_path, policy):
    out = tmp_path / policy
    result = run_script("cifar10_lightning.py", "--data-dir", cifar_dir, "--output-dir", out, *TINY,
                        "--model", "resnet18", "--strategy", "fsdp", "--devices", 1, "--wrap-policy", policy)
    assert_trained_and_tested(result, out)


@pytest.mark.parametrize("sharding", ["SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"])
def test_fsdp_sharding_strategy_trains(cifar_dir, tmp_path, sharding):
    out = tmp_path / sharding
    result = run_script("cifar10_lightning.py", "--data-dir", cifar_dir, "--output-dir", out, *TINY,
                        "--model", "resnet18", "--strategy", "fsdp", "--devices", 1, "--sharding", sharding)
    assert_trained_and_tested(result, out)


def test_fsdp_sharded_checkpoint_with_activation_checkpointing_is_restored(cifar_dir, tmp_path):
    out = tmp_path / "sharded"
    args = ("--data-dir", cifar_dir, "--output-dir", out, "--model", "resnet18", "--strategy", "fsdp",
            "--devices", 1, "--checkpoint-format", "sharded", "--activation-checkpointing", *TINY)
    first = run_script("cifar10_lightning.py", *args)
    assert_trained_and_tested(first, out)
    assert (out / "checkpoints" / "last.ckpt").is_dir()  # sharded: a folder of pieces
    steps = int(re.search(r"finished after (\d+) training steps", first.stdout).group(1))
    again = run_script("cifar10_lightning.py", *args, "--resume")
    assert again.returncode == 0, again.stderr[-4000:]
    assert "Restored all states from the checkpoint" in again.stdout + again.stderr
    assert f"finished after {steps} training steps" in again.stdout  # nothing left to train


def test_fsdp2_vit_trains_saves_and_reloads_on_one_gpu(cifar_dir, tmp_path):
    out = tmp_path / "fsdp2"
    result = run_script("cifar10_lightning.py", "--data-dir", cifar_dir, "--output-dir", out, *TINY,
                        "--model", "vit", "--strategy", "fsdp2", "--devices", 1)
    assert_trained_and_tested(result, out)
    assert (out / "checkpoints" / "last.ckpt").is_dir()  # sharded: a folder of pieces
    # bf16-mixed is the default on a GPU that computes in bfloat16; FSDP2 takes it too.
    assert "Using bfloat16 Automatic Mixed Precision (AMP)" in result.stdout + result.stderr
    assert re.search(r"rank 0/1: parameters, gradients and optimizer state: [\d.]+ MB", result.stdout)


def test_bf16_compiled_cnn_trains_on_one_gpu(cifar_dir, tmp_path):
    out = tmp_path / "compiled"
    result = run_script("cifar10_lightning.py", "--data-dir", cifar_dir, "--output-dir", out, *TINY,
                        "--model", "cnn", "--compile", timeout=600)
    assert_trained_and_tested(result, out)
    # bf16-mixed is the default on a GPU that computes in bfloat16 (A100, H100 and newer).
    assert "Using bfloat16 Automatic Mixed Precision (AMP)" in result.stdout + result.stderr


def test_ddp_on_one_gpu_trains(cifar_dir, tmp_path):
    out = tmp_path / "ddp"
    result = run_script("cifar10_lightning.py", "--data-dir", cifar_dir, "--output-dir", out, *TINY,
                        "--strategy", "ddp", "--devices", 1)
    assert_trained_and_tested(result, out)


def test_mnist_trains_on_gpu(mnist_dir, tmp_path):
    out = tmp_path / "mnist"
    result = run_script("mnist_lightning.py", "--data-dir", mnist_dir, "--output-dir", out, *TINY)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "GPU available: True (cuda), used: True" in result.stdout + result.stderr
    assert last_value(read_metrics(out), "test_acc") > 0.8
