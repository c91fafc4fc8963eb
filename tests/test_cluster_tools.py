"""examples/cluster_tools.py, the plumbing both Lightning scripts share: tested once, here.

Where a behaviour needs a whole run, the MNIST script runs it: the scripts only call these
functions, so one script shows what both do.
"""

import argparse
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import cluster_tools
from conftest import TINY_MNIST_TRAIN, last_value, load_example, read_metrics, run_script

CPU = ("--accelerator", "cpu")


def parse(flags) -> argparse.Namespace:
    """Flags read as a lesson script reads them: its own flags, then the shared ones."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    cluster_tools.add_shared_flags(parser)
    args = parser.parse_args(list(flags))
    cluster_tools.check_flags(parser, args)
    return args


# --num-nodes 2 asks Lightning whether SLURM runs this; on a machine with srun it warns.
@pytest.mark.filterwarnings("ignore:The `srun` command is available")
@pytest.mark.parametrize(
    "flags, expected",
    [
        (("--devices", "0"), "--devices must be"),
        (("--devices", "two"), "--devices must be"),
        (("--num-workers", "-1"), "--num-workers must be 'auto' or 0 or more"),
        (("--batch-size", "0"), "--batch-size must be at least 1"),
        (("--max-epochs", "0"), "--max-epochs must be at least 1"),
        (("--lr", "-1"), "--lr must be positive and finite"),
        (("--lr", "nan"), "--lr must be positive and finite"),
        (("--strategy", "deepspeed"), "invalid choice: 'deepspeed'"),
        (("--strategy", "fsdp", "--accelerator", "cpu"), "--strategy fsdp needs GPUs"),
        (("--num-nodes", "2"), "--num-nodes above 1 needs a launcher"),  # else: a hang
    ],
)
def test_bad_shared_flags_give_one_clear_line(capsys, flags, expected):
    with pytest.raises(SystemExit) as stopped:
        parse(flags)
    assert stopped.value.code == 2  # argparse's exit status for a usage error
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], errors


def test_good_shared_flags_become_numbers():
    args = parse(["--devices", "2", "--num-workers", "3"])
    assert (args.devices, args.num_workers) == (2, 3)
    assert (parse([]).devices, parse([]).num_workers) == ("auto", "auto")


def test_several_slurm_tasks_without_srun_are_refused(monkeypatch):
    # A job script's own shell has no step id; every task that srun starts has one.
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    monkeypatch.delenv("SLURM_STEP_ID", raising=False)
    with pytest.raises(SystemExit) as stopped:
        cluster_tools.check_slurm_tasks(2, 1)  # the counts match: only the missing srun is wrong
    assert str(stopped.value.code).startswith("error: this SLURM job has 2 tasks but the script was not "
                                              "started by srun")
    monkeypatch.setenv("SLURM_STEP_ID", "0")  # started by srun
    cluster_tools.check_slurm_tasks(2, 1)
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task needs no srun
    monkeypatch.delenv("SLURM_STEP_ID")
    cluster_tools.check_slurm_tasks(1, 1)


def test_slurm_task_count_mismatch_is_refused_in_one_line(mnist_dir, tmp_path):
    slurm = {"SLURM_NTASKS": "3", "SLURM_JOB_NAME": "train", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"}
    result = run_script("mnist_lightning.py", "--data-dir", mnist_dir, "--output-dir", tmp_path,
                        *CPU, "--devices", 2, "--strategy", "ddp", env=slurm)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["error: SLURM started 3 tasks but --devices 2 x --num-nodes 1 = 2; set --ntasks-per-node "
                      "to the devices per node and --nodes to the number of nodes"]


def test_usable_cpus_follow_the_cpus_slurm_gives_the_task(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert cluster_tools.usable_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")  # fewer CPUs than the node has
    assert cluster_tools.usable_cpus() == 1


def test_auto_workers_none_on_a_cpu_and_up_to_the_cpus_on_a_gpu(monkeypatch):
    assert cluster_tools.loader_workers("auto", "cpu", most=4) == 0
    assert cluster_tools.loader_workers(3, "cpu", most=4) == 3  # asked for: as asked
    # On a GPU node with 8 cores (pretended).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert cluster_tools.loader_workers("auto", "auto", most=4) == 4  # the script's cap
    assert cluster_tools.loader_workers("auto", "cpu", most=4) == 0  # the CPU asked for
    # In a SLURM task of 3 CPUs: workers, and a CPU left for training.
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert cluster_tools.loader_workers("auto", "auto", most=4) == 2
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert cluster_tools.loader_workers("auto", "auto", most=4) == 0


def test_offline_stop_names_a_command_that_survives_copy_and_paste(monkeypatch, tmp_path):
    monkeypatch.setattr(cluster_tools, "can_reach", lambda *args, **kwargs: False)
    monkeypatch.setattr(cluster_tools.sys, "argv", ["examples/mnist_lightning.py"])
    with pytest.raises(SystemExit) as stopped:
        cluster_tools.stop_if_data_unreachable("MNIST", str(tmp_path / "my data"), False, "https://x.org/")
    assert stopped.value.code.endswith(
        f"run: python examples/mnist_lightning.py --data-dir '{tmp_path / 'my data'}' --download-only")
    # Data in place, or a machine that can download it: nothing to stop for.
    cluster_tools.stop_if_data_unreachable("MNIST", str(tmp_path), True, "https://x.org/")
    monkeypatch.setattr(cluster_tools, "can_reach", lambda *args, **kwargs: True)
    cluster_tools.stop_if_data_unreachable("MNIST", str(tmp_path), False, "https://x.org/")


def test_last_checkpoint_records_the_best_checkpoint_of_its_own_epoch(mnist_dir, tmp_path):
    # --resume restores the best-checkpoint bookkeeping from last.ckpt. If last.ckpt were
    # written before the best checkpoint of the same epoch, it would record the epoch before,
    # and a resumed run would keep (and might test) a checkpoint that is not the best.
    out = tmp_path / "run"
    result = run_script("mnist_lightning.py", "--data-dir", mnist_dir, "--output-dir", out, *CPU,
                        "--max-epochs", 1, "--batch-size", 32, "--no-progress-bar")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    [best] = [state for key, state in ckpt["callbacks"].items() if "'monitor': 'val_acc'" in key]
    [best_file] = (out / "checkpoints").glob("best-epoch=0-*.ckpt")
    assert best["best_model_path"] == str(best_file)
    assert best["best_model_score"] == pytest.approx(last_value(read_metrics(out), "val_acc"))
    # The run says where both went.
    assert f"checkpoints: {best_file} (best), {out / 'checkpoints' / 'last.ckpt'} (latest)" in result.stdout


def test_requeue_signal_near_an_epochs_end_waits_for_its_validation(mnist_dir, tmp_path, monkeypatch):
    # Five steps per epoch (the tiny MNIST at batch 128, the last batch smaller), so the
    # callback's check every tenth step falls on the last step of epoch 1. A checkpoint saved
    # there would resume in epoch 2, and epoch 1 would never be validated: the check waits.
    assert -(-TINY_MNIST_TRAIN // 128) == 5
    script = load_example("mnist_lightning")
    out = tmp_path / "run"
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242",
                        "SLURM_NODELIST": "node1", "SLURM_NODEID": "0", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    requeues, run = [], subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, *a, **k:
                        requeues.append(cmd) if cmd[0] == "scontrol" else run(cmd, *a, **k))
    check = cluster_tools.RequeueOnSignal.on_train_batch_end

    def signal_in_the_first_step_of_epoch_1(self, trainer, *args):
        if trainer.global_step == 6 and not self.signalled:
            signal.raise_signal(signal.SIGUSR1)  # what SLURM sends before the time limit
        return check(self, trainer, *args)

    monkeypatch.setattr(cluster_tools.RequeueOnSignal, "on_train_batch_end", signal_in_the_first_step_of_epoch_1)
    args = ["--data-dir", str(mnist_dir), "--output-dir", str(out), *CPU, "--no-progress-bar",
            "--num-workers", "0", "--max-epochs", "3", "--batch-size", "128"]
    handler = signal.getsignal(signal.SIGUSR1)
    try:
        with pytest.raises(SystemExit) as stopped:
            script.main(args)
        assert stopped.value.code == 0
        assert requeues == [["scontrol", "requeue", "4242"]]
        saved = torch.load(out / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
        assert saved["global_step"] == 11  # the first step of epoch 2, not the last of epoch 1
        script.main(args + ["--resume"])  # the requeued job starts again
    finally:
        signal.signal(signal.SIGUSR1, handler)
    validated = [int(r["epoch"]) for r in read_metrics(out) if r.get("val_acc")]
    assert validated == [0, 1, 2]


def test_the_module_needs_no_lesson_script(tmp_path):
    # A learner copies cluster_tools.py next to a script of their own: it imports on its own.
    shutil.copy(cluster_tools.__file__, tmp_path)
    done = subprocess.run([sys.executable, "-c", "import cluster_tools; print(cluster_tools.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(tmp_path / "cluster_tools.py")
