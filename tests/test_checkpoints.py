"""Faults around checkpoints lose no work: a folder that cannot be written stops a run before
it trains, a failed save leaves the last good checkpoint whole, --resume takes the checkpoint
furthest on and passes over one it cannot read, refuses settings it could not honour, and two
runs never share an output folder. The plumbing is examples/cluster_tools.py; where a whole
run is needed, the MNIST script runs it in-process on the tiny data.
"""

import csv
import errno
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import cluster_tools
from conftest import TINY_MNIST_TRAIN, load_example, metrics_files

RANK0 = SimpleNamespace(is_global_zero=True, fast_dev_run=False)  # what claim and resume ask of a Trainer


@pytest.fixture(scope="module")
def mnist():
    return load_example("mnist_lightning")


def train(mnist, mnist_dir, out, *flags):
    """mnist_lightning.main() on the tiny data; the number of steps per epoch is 5."""
    assert -(-TINY_MNIST_TRAIN // 128) == 5
    mnist.main(["--data-dir", str(mnist_dir), "--output-dir", str(out), "--accelerator", "cpu",
                "--no-progress-bar", "--num-workers", "0", *map(str, flags)])


def stop_message(stopped) -> str:
    message = stopped.value.code
    assert isinstance(message, str) and "\n" not in message, message  # one line, exit status 1
    return message


def test_a_checkpoint_folder_that_cannot_be_written_stops_the_run_before_it_trains(mnist, mnist_dir, tmp_path,
                                                                                      monkeypatch):
    # Lightning 2.6 ignores a PermissionError when it saves: such a run trained to the end,
    # saved nothing and failed only at its test stage.
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(SystemExit) as stopped:
        train(mnist, mnist_dir, out, "--max-epochs", 1)
    assert stop_message(stopped) == (f"error: cannot write checkpoints to {out / 'checkpoints'} (a file is in the way); "
                                     f"choose another --output-dir")
    assert not (out / "logs").exists()  # stopped before anything started
    # A read-only folder (a root test process ignores file modes, so the write fails here).
    def read_only(self, data):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(SystemExit) as stopped:
        cluster_tools.claim_output_dir(RANK0, tmp_path / "other")
    assert "(Permission denied); choose another --output-dir" in stop_message(stopped)


@pytest.mark.parametrize("surfaces_as", ["OSError", "RuntimeError"])
def test_a_save_that_fails_half_way_keeps_the_previous_checkpoint(tmp_path, monkeypatch, surfaces_as):
    # Lightning 2.6 writes a checkpoint in /tmp and moves it over the old one; across file
    # systems the move is a copy, which a full disk cuts short: a truncated last.ckpt.
    [io] = [p for p in cluster_tools.cluster_plugins() if isinstance(p, cluster_tools.TorchCheckpointIO)]
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"global_step": 5}, path)
    real_save = torch.save

    def disk_full_half_way(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            if surfaces_as == "OSError":
                raise
            # What torch.save raises on a real full disk: its zip writer fails on the way out.
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4290752 vs 4290640")

    monkeypatch.setattr(cluster_tools.torch, "save", disk_full_half_way)
    with pytest.raises(SystemExit) as stopped:
        io.save_checkpoint({"global_step": 10}, path)
    assert stop_message(stopped) == (f"error: saving {path} failed (No space left on device); the checkpoints "
                                     f"saved before are kept: free space (not by deleting them), then continue with --resume")
    monkeypatch.undo()
    assert torch.load(path, weights_only=False) == {"global_step": 5}
    assert os.listdir(path.parent) == ["last.ckpt"]  # no half-written file left behind


def test_resume_passes_over_a_cut_short_checkpoint_to_the_next_furthest(mnist, mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(mnist, mnist_dir, out, "--max-epochs", 2)
    last = out / "checkpoints" / "last.ckpt"
    with open(last, "r+b") as f:  # what a full disk used to leave
        f.truncate(last.stat().st_size // 2)
    [best] = (out / "checkpoints").glob("best-*.ckpt")
    best_step = torch.load(best, weights_only=False)["global_step"]
    capsys.readouterr()
    train(mnist, mnist_dir, out, "--max-epochs", 3, "--resume")
    printed = "".join(capsys.readouterr())
    assert f"--resume: passing over {last}: it cannot be read (a save cut short?)" in printed
    assert "finished after 15 training steps" in printed
    # It went on from the best checkpoint (epoch 0), not from scratch: it validated 1 and 2.
    assert best_step == 5
    with open(metrics_files(out)[1], newline="") as f:
        assert [int(row["epoch"]) for row in csv.DictReader(f) if row.get("val_acc")] == [1, 2]


def test_resume_takes_the_checkpoint_with_the_highest_step_not_the_newest_file(tmp_path):
    # A finished run's last.ckpt, and an hpc_ckpt file from an earlier requeue that was
    # copied (or touched) later: file times would pick the stale one and go back 7 steps.
    (tmp_path / "checkpoints").mkdir()
    last, stale = tmp_path / "checkpoints" / "last.ckpt", tmp_path / "hpc_ckpt_1.ckpt"
    torch.save({"global_step": 10}, last)
    torch.save({"global_step": 3}, stale)
    os.utime(last, (1_000_000, 1_000_000))
    assert stale.stat().st_mtime > last.stat().st_mtime
    assert cluster_tools.find_resume_checkpoint(tmp_path) == (str(last), [])
    stale.write_bytes(b"<html>not a checkpoint</html>")
    assert cluster_tools.find_resume_checkpoint(tmp_path) == (str(last), [str(stale)])


def test_resume_refuses_a_learning_rate_or_model_that_the_checkpoint_would_override(mnist, mnist_dir, tmp_path):
    # The restored optimizer keeps the checkpoint's learning rate, while hparams.yaml would
    # record the new one; a new --model would fail on a wall of missing state-dict keys.
    out = tmp_path / "run"
    train(mnist, mnist_dir, out, "--max-epochs", 1)
    with pytest.raises(SystemExit) as stopped:
        train(mnist, mnist_dir, out, "--max-epochs", 2, "--resume", "--lr", 0.01)
    assert stop_message(stopped) == (
        f"error: {out / 'checkpoints' / 'last.ckpt'} was trained with --lr 0.001, this run asks for --lr 0.01; "
        f"a resumed run keeps the checkpoint's model and optimizer: drop those flags, or start a new run "
        f"in another --output-dir")
    assert [p.name for p in (out / "logs").iterdir()] == ["version_0"]  # no empty version_1
    cifar = load_example("cifar10_lightning")
    torch.save({"global_step": 4, "hyper_parameters": dict(cifar.LitClassifier("cnn").hparams)},
               tmp_path / "hpc_ckpt_1.ckpt")
    with pytest.raises(SystemExit) as stopped:
        cluster_tools.resume_checkpoint(RANK0, cifar.LitClassifier("resnet18"), tmp_path, resume=True)
    assert "was trained with --model cnn, this run asks for --model resnet18;" in stop_message(stopped)


@pytest.fixture
def other_run():
    """A live process on this machine, standing for a run that holds a folder."""
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    yield process
    process.kill()
    process.wait()


def lock_of(pid: int, **more) -> str:
    import socket

    return json.dumps({"host": socket.gethostname(), "pid": pid, "parent": 1, "slurm_job": None,
                       "torchrun": None, "command": "python examples/mnist_lightning.py --output-dir run",
                       **more})


def test_a_second_run_in_a_folder_in_use_is_refused_and_a_dead_runs_claim_is_taken_over(tmp_path, other_run,
                                                                                           monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = tmp_path / "run.lock"
    lock.write_text(lock_of(other_run.pid))
    with pytest.raises(SystemExit) as stopped:
        cluster_tools.claim_output_dir(RANK0, tmp_path)
    assert stop_message(stopped).startswith(f"error: {tmp_path} is in use by another run (process {other_run.pid} on ")
    assert stop_message(stopped).endswith(f"give this run another --output-dir, or, if that run has ended: "
                                          f"rm {shlex.quote(str(lock))}")
    # That run was killed: its lock stays behind, and the next run takes the folder over.
    other_run.kill()
    other_run.wait()
    cluster_tools.claim_output_dir(RANK0, tmp_path)
    claim = json.loads(lock.read_text())
    assert claim["pid"] == os.getpid()
    cluster_tools.release_lock(lock, claim)  # what the run does when it ends
    assert not lock.exists()


def test_a_requeued_job_takes_over_its_own_claim(tmp_path, other_run, monkeypatch):
    # After a requeue the job starts again, maybe on another node, with its job id; another
    # rank of the same job (or of the same torchrun) shares the claim of rank 0.
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    (tmp_path / "run.lock").write_text(lock_of(other_run.pid, host="node7", slurm_job="4242"))
    cluster_tools.claim_output_dir(RANK0, tmp_path)
    assert json.loads((tmp_path / "run.lock").read_text())["slurm_job"] == "4242"
