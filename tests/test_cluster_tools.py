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
        (("--lr", "inf"), "--lr must be positive and finite, not inf"),
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


@pytest.fixture
def job(monkeypatch):
    """A clean slate of launcher variables; returns a function that sets some."""
    for name in list(os.environ):
        if name.startswith(("SLURM_", "SLURMD_", "TORCHELASTIC_")) or name in (
                "RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK"):
            monkeypatch.delenv(name)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
    return set_env


def stop_line(devices, num_nodes=1) -> str:
    with pytest.raises(SystemExit) as stopped:
        cluster_tools.check_launch(devices, num_nodes)
    return stopped.value.code


def test_several_slurm_tasks_without_srun_are_refused(job):
    # A job script's own shell has no step id; every task that srun starts has one.
    job(SLURM_NTASKS=2, SLURM_JOB_NAME="train", SLURM_JOB_ID=7, SLURMD_NODENAME="n1")
    # The counts match: only the missing srun is wrong.
    assert stop_line(2).startswith("error: this SLURM job has 2 tasks but the script was not started by srun")
    job(SLURM_STEP_ID=0)  # started by srun
    cluster_tools.check_launch(2, 1)
    job(SLURM_NTASKS=1)  # one task needs no srun
    os.environ.pop("SLURM_STEP_ID")
    cluster_tools.check_launch(1, 1)


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, "lightning"),  # a laptop
        ({"SLURM_NTASKS": 2, "SLURM_JOB_NAME": "train"}, "slurm"),  # a batch job
        # An interactive job: Lightning starts the processes of one task itself ...
        ({"SLURM_NTASKS": 2, "SLURM_JOB_NAME": "interactive"}, "lightning"),
        ({"SLURM_NTASKS": 1, "SLURM_JOB_NAME": "bash", "SLURM_STEP_ID": 0}, "lightning"),
        # ... but srun started several: one process each (Lightning issue #20776).
        ({"SLURM_NTASKS": 2, "SLURM_JOB_NAME": "interactive", "SLURM_STEP_ID": 0}, "slurm"),
        # torchrun, in a SLURM job or not.
        ({"TORCHELASTIC_RUN_ID": 5, "RANK": 1, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1, "WORLD_SIZE": 2}, "torchrun"),
        ({"TORCHELASTIC_RUN_ID": 5, "RANK": 1, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 1, "WORLD_SIZE": 2,
          "SLURM_NTASKS": 2, "SLURM_JOB_NAME": "train", "SLURM_STEP_ID": 0}, "torchrun"),
    ],
    ids=["laptop", "batch", "interactive-shell", "srun-bash", "interactive-srun", "torchrun", "torchrun-in-slurm"],
)
def test_the_launcher_is_who_started_the_processes(job, env, expected):
    job(**env)
    assert cluster_tools.launcher() == expected


def test_torchrun_inside_slurm_uses_torchruns_ranks_and_still_requeues(job, monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    # One task per node (torchrun's), two processes on each of two nodes.
    job(SLURM_NTASKS=2, SLURM_NTASKS_PER_NODE=1, SLURM_JOB_NAME="train", SLURM_JOB_ID=9, SLURM_STEP_ID=0,
        SLURM_CPUS_PER_TASK=8, TORCHELASTIC_RUN_ID=9, RANK=3, GROUP_RANK=1, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2, WORLD_SIZE=4)
    cluster_tools.check_launch(2, 2)  # SLURM's 2 tasks are not compared with 2 x 2 processes
    assert [type(p) for p in cluster_tools.cluster_plugins()] == [TorchElasticEnvironment,
                                                                  cluster_tools.WholeCheckpointIO]
    assert [type(c) for c in cluster_tools.cluster_callbacks()] == [cluster_tools.RequeueOnSignal,
                                                                    cluster_tools.SIGTERMExitCode,
                                                                    cluster_tools.NoEmptyLogs]
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert cluster_tools.usable_cpus() == 4  # the task's 8 cores, shared by its 2 processes
    assert stop_line(4, 2) == 1  # rank 3 stops quietly; rank 0 says why:
    job(RANK=0)
    assert stop_line(4, 2) == ("error: torchrun started 2 processes per node, 4 in all, but --devices 4 x "
                               "--num-nodes 2 = 8; give torchrun --nproc-per-node 4 --nnodes 2")
    # Without torchrun, the same job is SLURM's.
    for name in ("TORCHELASTIC_RUN_ID", "RANK", "GROUP_RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        os.environ.pop(name)
    assert [type(p) for p in cluster_tools.cluster_plugins()] == [SLURMEnvironment, cluster_tools.WholeCheckpointIO]


def test_only_the_first_process_prints_the_stop_line(job):
    job(SLURM_NTASKS=2, SLURM_JOB_NAME="train", SLURM_STEP_ID=0, SLURM_PROCID=1)
    assert stop_line(1) == 1  # exit status 1, nothing printed: rank 0 says it
    job(SLURM_PROCID=0)
    assert stop_line(1).startswith("error: SLURM started 2 tasks but --devices 1")


def test_task_layouts_that_lightning_would_misread_are_refused(job):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    # Lightning issue #20391: one task in a job of --ntasks-per-node=2 (devices "auto").
    job(SLURM_NTASKS=1, SLURM_NTASKS_PER_NODE=2, SLURM_NNODES=1, SLURM_JOB_NAME="train", SLURM_STEP_ID=0)
    assert stop_line("auto") == ("error: SLURM started 1 tasks but the job asks for --ntasks-per-node=2 on 1 "
                                 "node(s); ask for tasks with --ntasks-per-node alone, and start them all: "
                                 "srun without -n")
    # --ntasks alone: tasks spread 2 + 1 over two nodes.
    os.environ.pop("SLURM_NTASKS_PER_NODE")
    job(SLURM_NTASKS=3, SLURM_NNODES=2, SLURM_STEP_TASKS_PER_NODE="2,1")
    assert stop_line(1, 3).startswith("error: SLURM placed 2,1 tasks on the job's nodes but --devices 1 needs 1")
    # --ntasks alone, spread evenly: accepted, and Lightning, which would refuse it, is told
    # the tasks per node.
    job(SLURM_NTASKS=4, SLURM_STEP_TASKS_PER_NODE="2(x2)")
    cluster_tools.check_launch(2, 2)
    assert os.environ["SLURM_NTASKS_PER_NODE"] == "2"
    SLURMEnvironment(auto_requeue=False)  # no "You set --ntasks=4 ... not supported"


def test_python_in_an_allocations_shell_on_the_login_node_is_refused(job):
    # salloc's shell runs where salloc was typed; slurmd sets SLURMD_NODENAME on the job's nodes.
    job(SLURM_JOB_ID=12, SLURM_NTASKS=2, SLURM_JOB_NAME="interactive")
    assert stop_line(2).startswith("error: this shell holds SLURM job 12 but runs outside it, on ")
    job(SLURMD_NODENAME="n1")  # a shell on the job's node: Lightning starts the processes there
    cluster_tools.check_launch(2, 1)


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


def warn_at_step(monkeypatch, step: int):
    """RequeueOnSignal sends this process SLURM's warning (SIGUSR1, shortly before the time
    limit) once, at the end of the given step, just before it checks for one."""
    check = cluster_tools.RequeueOnSignal.on_train_batch_end

    def warned_then_check(self, trainer, *args):
        if trainer.global_step == step and not self.signalled:
            signal.raise_signal(signal.SIGUSR1)
        return check(self, trainer, *args)

    monkeypatch.setattr(cluster_tools.RequeueOnSignal, "on_train_batch_end", warned_then_check)


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
    warn_at_step(monkeypatch, 6)  # the first step of epoch 1
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


def test_a_run_stopped_by_sigterm_fails_with_one_line_that_says_how_to_continue(mnist_dir, tmp_path, monkeypatch,
                                                                               capsys):
    # scancel, or a time limit without a requeue, sends SIGTERM; Lightning stops between steps with
    # an exception that would exit with status 0, and `python ... && next_step` would carry on.
    import lightning as L
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class SIGTERMAtStep2(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                signal.raise_signal(signal.SIGTERM)

    script = load_example("mnist_lightning")
    out = tmp_path / "my run"
    callbacks = cluster_tools.cluster_callbacks
    monkeypatch.setattr(cluster_tools, "cluster_callbacks", lambda: [*callbacks(), SIGTERMAtStep2()])
    # Lightning's handler takes the signal during fit; should it not, this one keeps pytest alive.
    handler = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        with pytest.raises(SystemExit) as stopped:
            script.main(["--data-dir", str(mnist_dir), "--output-dir", str(out), *CPU, "--no-progress-bar",
                         "--num-workers", "0", "--batch-size", "128"])
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert stopped.value.code == 143  # 128 + SIGTERM, as a shell reports a process that SIGTERM ended
    output = capsys.readouterr()
    errors = [line for line in output.err.splitlines() if "error:" in line]
    assert errors == ["error: SIGTERM stopped the run before it finished; to continue from its last checkpoint "
                      f"(saved after each validation), run it again with --resume --output-dir '{out}'"]
    assert "Traceback" not in output.err + output.out
    # Under DDP every rank gets the exception and exits 143; only rank 0 prints the line.
    exception = SIGTERMException()
    cluster_tools.SIGTERMExitCode().on_exception(SimpleNamespace(is_global_zero=False, default_root_dir=out),
                                                 None, exception)
    assert exception.code == 143 and capsys.readouterr().err == ""


def test_a_failed_requeue_names_the_saved_checkpoint_in_one_line(tmp_path, monkeypatch):
    import lightning as L
    from lightning.pytorch.demos.boring_classes import BoringModel

    # A cluster that refuses the requeue (a job without --requeue), as its scontrol says it.
    refusing = tmp_path / "bin"
    refusing.mkdir()
    (refusing / "scontrol").write_text('#!/bin/sh\necho "Requested operation is presently disabled '
                                       'for job $2" >&2\nexit 1\n')
    (refusing / "scontrol").chmod(0o755)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    warn_at_step(monkeypatch, 2)
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        for path, reason in [(refusing, "Requested operation is presently disabled for job 4242"),
                             (tmp_path / "no-slurm", "scontrol: command not found")]:
            monkeypatch.setenv("PATH", str(path))
            out = tmp_path / path.name / "my run"
            trainer = L.Trainer(default_root_dir=out, accelerator="cpu", max_steps=5, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[cluster_tools.RequeueOnSignal(check_every_n_steps=1)])
            with pytest.raises(SystemExit) as stopped:
                trainer.fit(BoringModel())
            # A string: Python prints it as one line, no traceback, and exits with status 1.
            assert stopped.value.code == (f"error: saved {out / 'hpc_ckpt_1.ckpt'}, but scontrol requeue 4242 "
                                          f"failed ({reason}); submit the job again with --resume --output-dir "
                                          f"'{out}' to continue from it")
            assert torch.load(out / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 2
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_fast_dev_run_cannot_resume_a_run(tmp_path, capsys):
    # One batch, no checkpoint: resumed, it would train nothing, or fail inside Lightning.
    def parse_with_output_dir(*flags):
        parser = argparse.ArgumentParser()
        parser.add_argument("--output-dir")
        cluster_tools.add_shared_flags(parser)
        args = parser.parse_args(["--output-dir", str(tmp_path / "my run"), *flags])
        cluster_tools.check_flags(parser, args)
        return args

    # A job template always adds --resume; a new job's --output-dir holds nothing to resume.
    assert parse_with_output_dir("--fast-dev-run", "--resume").fast_dev_run
    (tmp_path / "my run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "my run" / "checkpoints" / "last.ckpt").touch()
    with pytest.raises(SystemExit) as stopped:
        parse_with_output_dir("--fast-dev-run", "--resume")
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].endswith(
        f"error: --fast-dev-run runs one batch and saves no checkpoint; it cannot be combined with --resume "
        f"({tmp_path / 'my run'} holds a run's checkpoints): drop --resume, or give another --output-dir")
    assert parse_with_output_dir("--resume").resume and parse_with_output_dir("--fast-dev-run").fast_dev_run
