"""The MNIST scripts, run as a learner runs them, on CPU and tiny learnable data."""

import re
import signal
import subprocess

import pytest
import torch

from conftest import assert_offline_stop, finished_steps, last_value, load_example, read_metrics, run_script

# 600 tiny training images, 1/12 held out for validation -> 550 to train on.
TRAIN_IMAGES = 600 - 600 // 12
BATCH = 32
STEPS_PER_EPOCH = -(-TRAIN_IMAGES // BATCH)  # the last, smaller batch counts too
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


def test_resume_without_checkpoint_starts_fresh(mnist_dir, tmp_path):
    result = run_script("mnist_lightning.py", "--data-dir", mnist_dir, "--output-dir", tmp_path / "x",
                        *CPU, "--fast-dev-run", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no checkpoint" in result.stdout


def test_fast_dev_run_runs_one_batch_and_saves_nothing(mnist_dir, tmp_path):
    out = tmp_path / "fdr"
    result = run_script("mnist_lightning.py", "--data-dir", mnist_dir, "--output-dir", out, *CPU, "--fast-dev-run")
    assert result.returncode == 0, result.stderr[-3000:]
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
    assert_clean_error(result, "--strategy fsdp needs GPUs")


@pytest.fixture(scope="module")
def mnist_script():
    return load_example("mnist_lightning")


# --num-nodes 2 asks Lightning whether SLURM runs this; on a machine with srun it warns.
@pytest.mark.filterwarnings("ignore:The `srun` command is available")
@pytest.mark.parametrize(
    "flags, expected",
    [
        (("--devices", "0"), "--devices must be"),
        (("--devices", "two"), "--devices must be"),
        (("--batch-size", "0"), "--batch-size must be at least 1"),
        (("--max-epochs", "0"), "--max-epochs must be at least 1"),
        (("--strategy", "deepspeed"), "invalid choice: 'deepspeed'"),
        (("--strategy", "fsdp", "--accelerator", "cpu"), "--strategy fsdp needs GPUs"),
        (("--num-nodes", "2"), "--num-nodes above 1 needs a launcher"),  # else: a hang
        (("--precision", "bf16-true"), "invalid choice: 'bf16-true'"),
    ],
)
def test_bad_flags_give_one_clear_line(mnist_script, capsys, flags, expected):
    with pytest.raises(SystemExit) as stopped:
        mnist_script.parse_args(list(flags))
    assert stopped.value.code == 2  # argparse's exit status for a usage error
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], errors


def test_slurm_task_count_mismatch_is_refused(mnist_dir, tmp_path):
    slurm = {"SLURM_NTASKS": "3", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    result = run_script("mnist_lightning.py", "--data-dir", mnist_dir, "--output-dir", tmp_path,
                        *CPU, "--devices", 2, "--strategy", "ddp", env=slurm)
    assert_clean_error(result, "SLURM started 3 tasks but --devices 2 x --num-nodes 1 = 2")


@pytest.mark.parametrize("script", ["mnist_lightning", "cifar10_lightning"])
def test_several_slurm_tasks_without_srun_are_refused(script, monkeypatch, capsys):
    # A job script's own shell has no step id; every task that srun starts has one.
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    module = load_example(script)
    with pytest.raises(SystemExit) as stopped:
        module.check_slurm_tasks(2, 1)  # the counts match: only the missing srun is wrong
    assert str(stopped.value.code).startswith("error: this SLURM job has 2 tasks but the script was not "
                                              "started by srun")
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # started by srun
    module.check_slurm_tasks(2, 1)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task needs no srun
    monkeypatch.delenv("SLURM_STEP_ID")
    module.check_slurm_tasks(1, 1)


def test_offline_missing_data_gives_clear_message(tmp_path):
    from torchvision.datasets import MNIST

    if load_example("mnist_lightning").can_reach(MNIST.mirrors[0]):
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


def test_worker_count_follows_the_cpus_slurm_gives_the_task(mnist_script, monkeypatch):
    import os

    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert mnist_script.usable_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # fewer CPUs than the node has
    assert mnist_script.usable_cpus() == 1


@pytest.mark.parametrize("script", ["mnist_lightning", "cifar10_lightning"])
def test_default_workers_none_on_a_cpu_and_up_to_the_cpus_on_a_gpu(script, monkeypatch):
    module = load_example(script)
    most = {"mnist_lightning": 2, "cifar10_lightning": 4}[script]
    assert module.parse_args(["--accelerator", "cpu"]).num_workers == 0
    assert module.parse_args(["--accelerator", "cpu", "--num-workers", "3"]).num_workers == 3
    # On a GPU node with 8 cores (pretended).
    monkeypatch.setattr(module.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(module.torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(module.os, "sched_getaffinity", lambda pid: set(range(8)))
    # Outside SLURM all 8 cores are usable: the script's own cap applies.
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert module.parse_args([]).num_workers == most
    # In a SLURM task of 3 CPUs: workers, and a CPU left for training.
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert module.parse_args([]).num_workers == min(most, 2)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert module.parse_args([]).num_workers == 0


@pytest.mark.parametrize("script", ["mnist_lightning.py", "cifar10_lightning.py"])
def test_last_checkpoint_records_the_best_checkpoint_of_its_own_epoch(mnist_dir, cifar_dir, tmp_path, script):
    # --resume restores the best-checkpoint bookkeeping from last.ckpt. If last.ckpt were
    # written before the best checkpoint of the same epoch, it would record the epoch before,
    # and a resumed run would keep (and might test) a checkpoint that is not the best.
    out = tmp_path / "run"
    data = mnist_dir if script.startswith("mnist") else cifar_dir
    result = run_script(script, "--data-dir", data, "--output-dir", out, *CPU, "--max-epochs", 1,
                        "--batch-size", BATCH, "--no-progress-bar")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    [best] = [state for key, state in ckpt["callbacks"].items() if "'monitor': 'val_acc'" in key]
    [best_file] = (out / "checkpoints").glob("best-epoch=0-*.ckpt")
    assert best["best_model_path"] == str(best_file)
    assert best["best_model_score"] == pytest.approx(last_value(read_metrics(out), "val_acc"))


@pytest.mark.parametrize("script, batch", [("mnist_lightning", 128), ("cifar10_lightning", 90)])
def test_requeue_signal_near_an_epochs_end_waits_for_its_validation(mnist_dir, cifar_dir, tmp_path,
                                                                      monkeypatch, script, batch):
    # Five steps per epoch for both tiny data sets (550 MNIST images with the last smaller
    # batch, 450 CIFAR-10 images without it), so the callback's check every tenth step
    # falls on the last step of epoch 1. A checkpoint saved there would resume in epoch 2,
    # and epoch 1 would never be validated: the check has to wait one step.
    module = load_example(script)
    data = mnist_dir if script.startswith("mnist") else cifar_dir
    out = tmp_path / "run"
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242",
                        "SLURM_NODELIST": "node1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    requeues, run = [], subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **k:
                        requeues.append(cmd) if cmd[0] == "scontrol" else run(cmd, *a, **k))
    check = module.RequeueOnSignal.on_train_batch_end

    def signal_in_the_first_step_of_epoch_1(self, trainer, *args):
        if trainer.global_step == 6 and not self.signalled:
            signal.raise_signal(signal.SIGUSR1)  # what SLURM sends before the time limit
        return check(self, trainer, *args)

    monkeypatch.setattr(module.RequeueOnSignal, "on_train_batch_end", signal_in_the_first_step_of_epoch_1)
    args = ["--data-dir", str(data), "--output-dir", str(out), *CPU, "--no-progress-bar", "--num-workers", "0",
            "--max-epochs", "3", "--batch-size", str(batch)]
    handler = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(SystemExit) as stopped:
            module.main(args)
        assert stopped.value.code == 0
        assert requeues == [["scontrol", "requeue", "4242"]]
        saved = torch.load(out / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
        assert saved["global_step"] == 11  # the first step of epoch 2, not the last of epoch 1
        module.main(args + ["--resume"])  # the requeued job starts again
    finally:
        signal.signal(signal.SIGUSR1, handler)
    validated = [int(r["epoch"]) for r in read_metrics(out) if r.get("val_acc")]
    assert validated == [0, 1, 2]


@pytest.mark.parametrize("device, expected", [("gpu", "not a device name"), ("cuda:7", "PyTorch sees no GPU")])
def test_plain_script_refuses_a_device_it_cannot_use_in_one_line(capsys, device, expected):
    if device.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    plain = load_example("mnist_pytorch")
    with pytest.raises(SystemExit) as stopped:
        plain.main(["--device", device, "--data-dir", "no-such-folder"])  # before any data
    assert str(stopped.value.code).startswith(f"error: --device {device}: {expected}")
