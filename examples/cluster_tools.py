"""What lets one Lightning script run unchanged on a laptop, in a SLURM job and after a
requeue: the plumbing that the lesson's scripts share and the lesson does not teach line
by line.

- the flags both scripts take, and one clear line for every impossible combination;
- DataLoader workers that fit the CPUs a job was given;
- a stop with the command that fixes it when data is missing on an offline machine;
- who starts the processes (srun, torchrun or Lightning itself), and one clear line
  when their number cannot match --devices x --num-nodes;
- saving and requeueing before a job's time limit (RequeueOnSignal), and --resume;
- what a run prints: one line per rank at the start (and, from held_bytes, what each
  rank holds of the model), where the results went at the end.

Reuse it in your own project: copy this file next to your training script and import
what you need, for example

    from cluster_tools import RequeueOnSignal, cluster_plugins, check_launch

It needs only PyTorch and Lightning. The lesson's tests/test_cluster_tools.py tests it.
"""

import argparse
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import (SLURMEnvironment,
                                                    TorchElasticEnvironment)
from torch.distributed.tensor import DTensor

# Lightning ignores SLURM in a job with one of these names: an interactive shell.
INTERACTIVE_JOB_NAMES = ("bash", "interactive")


# ----------------------------------------------------------------------------- flags

def add_shared_flags(parser: argparse.ArgumentParser,
                     accelerators=("auto", "cpu", "gpu", "cuda", "mps"),
                     strategies=("auto", "ddp", "fsdp")):
    """The flags every lesson script takes, with the same meaning and defaults."""
    hw = parser.add_argument_group("hardware (passed to the Trainer)")
    hw.add_argument("--accelerator", default="auto", choices=accelerators,
                    help="default: %(default)s (a GPU if there is one)")
    hw.add_argument("--devices", default="auto",
                    help="devices per node: a number or 'auto' (default: %(default)s)")
    hw.add_argument("--num-nodes", type=int, default=1,
                    help="nodes (default: %(default)s)")
    hw.add_argument("--strategy", default="auto", choices=strategies,
                    help="how to use several devices (default: %(default)s)")
    run = parser.add_argument_group("runs")
    run.add_argument("--num-workers", default="auto",
                     help="DataLoader worker processes per device; auto: none on a "
                          "CPU, a few on a GPU, one CPU left for training "
                          "(default: %(default)s)")
    run.add_argument("--seed", type=int, default=42, help="default: %(default)s")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest checkpoint in --output-dir")
    run.add_argument("--fast-dev-run", action="store_true",
                     help="run one batch of each stage as a smoke test")
    run.add_argument("--no-progress-bar", action="store_true",
                     help="no progress bar (for batch jobs' log files)")


def uses_cpu(accelerator: str) -> bool:
    """Whether a run with this --accelerator trains without a CUDA GPU."""
    return accelerator == "cpu" or not torch.cuda.is_available()


def check_flags(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """Turn impossible flag values into one clear line (argparse's error, exit status 2)
    instead of a deep traceback or a hang. Makes --devices and --num-workers numbers."""
    if args.devices != "auto":
        if not args.devices.isdigit() or int(args.devices) < 1:
            parser.error("--devices must be 'auto' or a whole number >= 1, "
                         f"not {args.devices!r}")
        args.devices = int(args.devices)
    if args.num_workers != "auto":
        if not args.num_workers.isdigit():
            parser.error("--num-workers must be 'auto' or 0 or more, "
                         f"not {args.num_workers!r}")
        args.num_workers = int(args.num_workers)
    for flag in ("num_nodes", "max_epochs", "batch_size"):  # those the script has
        if getattr(args, flag, 1) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if hasattr(args, "lr") and not (args.lr > 0 and math.isfinite(args.lr)):
        parser.error(f"--lr must be positive and finite, not {args.lr}")
    # Lightning starts the processes of one machine only; on several nodes something
    # else must start them everywhere, or rank 0 waits for ranks that never come.
    if (args.num_nodes > 1 and launcher() == "lightning"
            and "NODE_RANK" not in os.environ):
        parser.error("--num-nodes above 1 needs a launcher that starts the processes "
                     "on every node: srun in a SLURM job, or torchrun")
    if args.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        parser.error(f"--accelerator {args.accelerator}: "
                     "PyTorch sees no GPU on this machine")
    if args.strategy == "fsdp" and uses_cpu(args.accelerator):
        offered = parser._option_string_actions["--strategy"].choices
        instead = "fsdp2 or ddp" if "fsdp2" in offered else "ddp"
        parser.error("--strategy fsdp needs GPUs (Lightning refuses FSDP on CPU); "
                     f"use --strategy {instead} on CPU")


# ------------------------------------------------------------------ CPUs and workers

def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by SLURM's allocation, and
    under torchrun its share of them (one task, and its cores, for all of a node's
    processes)."""
    if hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    else:
        n = os.cpu_count()
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        n = min(n, int(os.environ["SLURM_CPUS_PER_TASK"]))
    if launcher() == "torchrun":
        n = n // int(os.environ["LOCAL_WORLD_SIZE"])
    return max(n or 1, 1)


def loader_workers(num_workers, accelerator: str, most: int) -> int:
    """--num-workers as a number. auto: workers prepare batches while a GPU computes;
    on a CPU they would compete with the training for the same cores (and starting
    them next to DDP's threads can hang), so none there."""
    if num_workers != "auto":
        return num_workers
    return 0 if uses_cpu(accelerator) else min(most, usable_cpus() - 1)


# ------------------------------------------------------------------------------ data

def can_reach(url: str, timeout: float = 5.0) -> bool:
    """True if a TCP connection to the URL's host opens within the timeout."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def stop_if_data_unreachable(dataset: str, data_dir: str, downloaded: bool, url: str):
    """Data missing on a machine that cannot download it (a compute node): stop at
    once with the command that fixes it, rather than hang or fail in a download."""
    if downloaded or can_reach(url):
        return
    command = shlex.join(["python", sys.argv[0], "--data-dir", data_dir,
                          "--download-only"])
    sys.exit(f"error: {dataset} is not in {data_dir} and this machine cannot "
             f"download it; on a machine with internet (e.g. a login node) run: "
             f"{command}")


# ------------------------------------------------------- launchers and SLURM checks

def launcher() -> str:
    """Who starts the processes of a run:

    - "torchrun": torchrun started this one and its siblings (in a SLURM job too);
    - "slurm": srun started one process per task (a batch job, or srun with several
      tasks in an interactive allocation);
    - "lightning": this is the only process, and Lightning starts one per device
      itself (a laptop, or a job named "bash" or "interactive" without such an srun).
    """
    if TorchElasticEnvironment.detect():
        return "torchrun"
    if "SLURM_NTASKS" not in os.environ:
        return "lightning"
    if os.environ.get("SLURM_JOB_NAME") in INTERACTIVE_JOB_NAMES:
        # Lightning ignores SLURM in such a job, and then each of several tasks that
        # srun started would start its own processes: runs on top of each other
        # (Lightning issue #20776). One task, or no srun: Lightning's own processes.
        several = "SLURM_STEP_ID" in os.environ and int(os.environ["SLURM_NTASKS"]) > 1
        return "slurm" if several else "lightning"
    return "slurm"


def tasks_on_each_node() -> list[int]:
    """How many of this job step's tasks run on each of its nodes: SLURM writes
    '2(x3)' for three nodes with two, or '3,1'."""
    layout = (os.environ.get("SLURM_STEP_TASKS_PER_NODE")
              or os.environ.get("SLURM_TASKS_PER_NODE", ""))
    counts = []
    for part in filter(None, layout.split(",")):
        number, _, repeat = part.partition("(x")
        counts += [int(number)] * int(repeat.rstrip(")") or 1)
    return counts


def stop(message: str):
    """Exit with status 1; only the first process prints the message (all of them
    would otherwise print the same line)."""
    first = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
    sys.exit(message if first else 1)


def check_launch(devices, num_nodes: int):
    """Stop at once, with one line, when the processes that were started cannot form
    the run that --devices x --num-nodes asks for: otherwise some wait for others that
    never come, or train on top of each other. Lightning checks some of this itself,
    but with a traceback, after the start, or not under FSDP."""
    how, env = launcher(), os.environ
    if how == "torchrun":
        world, here = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        if isinstance(devices, int) and (here != devices or world != devices * num_nodes):
            stop(f"error: torchrun started {here} processes per node, {world} in all, "
                     f"but --devices {devices} x --num-nodes {num_nodes} = "
                     f"{devices * num_nodes}; give torchrun --nproc-per-node {devices} "
                     f"--nnodes {num_nodes}")
        return
    if how == "lightning":
        # An allocation's shell may run on the login node, not on the job's nodes.
        if "SLURM_JOB_ID" in env and "SLURMD_NODENAME" not in env:
            stop(f"error: this shell holds SLURM job {env['SLURM_JOB_ID']} but runs "
                     f"outside it, on {socket.gethostname()}; start the script on the "
                     f"job's nodes with srun python ...")
        return
    ntasks = int(env["SLURM_NTASKS"])
    # srun gives every task it starts a step id; the job script itself has none. Run
    # without srun, only this one process starts, and it waits for the others until
    # the job's time runs out.
    if ntasks > 1 and "SLURM_STEP_ID" not in env:
        stop(f"error: this SLURM job has {ntasks} tasks but the script was not "
                 f"started by srun, so only one of them runs; start it with srun "
                 f"python ..., as the lesson's job templates do")
    if isinstance(devices, int) and ntasks != devices * num_nodes:
        stop(f"error: SLURM started {ntasks} tasks but --devices {devices} x "
                 f"--num-nodes {num_nodes} = {devices * num_nodes}; set "
                 f"--ntasks-per-node to the devices per node and --nodes to the "
                 f"number of nodes")
    per_node, nodes = env.get("SLURM_NTASKS_PER_NODE"), int(env.get("SLURM_NNODES", 1))
    if per_node and ntasks != int(per_node) * nodes:
        # Lightning would take --ntasks-per-node for the truth (issue #20391).
        stop(f"error: SLURM started {ntasks} tasks but the job asks for "
                 f"--ntasks-per-node={per_node} on {nodes} node(s); ask for tasks "
                 f"with --ntasks-per-node alone, and start them all: srun without -n")
    layout = tasks_on_each_node()
    if isinstance(devices, int) and any(n != devices for n in layout):
        stop(f"error: SLURM placed {','.join(map(str, layout))} tasks on the "
                 f"job's nodes but --devices {devices} needs {devices} on each; ask "
                 f"for --ntasks-per-node={devices} instead of --ntasks")
    if not per_node and layout:
        # Lightning refuses a job of several tasks without --ntasks-per-node, as the
        # tasks might be spread unevenly; they are not (checked above).
        env["SLURM_NTASKS_PER_NODE"] = str(layout[0])


class RequeueOnSignal(L.Callback):
    """Under SLURM: when the job is warned (SIGUSR1, shortly before its time limit),
    save a checkpoint, requeue the job and exit.

    Lightning can do this itself, but it saves inside the signal handler, which can
    run while this rank is half-way through exchanging gradients with the others:
    with several processes that can hang (Lightning issue #21406). Here the handler
    only raises a flag, and every few steps all ranks agree on it and act together.
    """

    def __init__(self, check_every_n_steps: int = 10):
        self.check_every_n_steps = check_every_n_steps
        self.signalled = False
        self.check_due = False

    def setup(self, trainer, pl_module, stage):
        # Before any DataLoader worker starts: SLURM signals every process of the job
        # step, and a worker forked without this handler would die of SIGUSR1.
        signal.signal(signal.SIGUSR1,
                      lambda signum, frame: setattr(self, "signalled", True))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.check_every_n_steps == 0:
            self.check_due = True
        # Not at an epoch's last step: resumed from there, training would go on with
        # the next epoch, and this one would never be validated. Wait one step.
        if not self.check_due or trainer.is_last_batch:
            return
        self.check_due = False
        # A collective (all ranks call it at this step): True if any was signalled.
        if not trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            return
        root = Path(trainer.default_root_dir)
        # One name for all ranks: rank 0 counts the earlier checkpoints.
        n = trainer.strategy.broadcast(1 + len(list(root.glob("hpc_ckpt_*.ckpt"))))
        path = root / f"hpc_ckpt_{n}.ckpt"
        trainer.save_checkpoint(path)  # every rank takes part (FSDP: its shard)
        # The requeue ends this job step with SIGTERM to every process. Lightning's
        # handler for it would wait for the other ranks, which may have left: the
        # checkpoint is saved, so let SIGTERM pass while this rank leaves.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if trainer.is_global_zero:
            job = os.environ["SLURM_JOB_ID"]
            subprocess.run(["scontrol", "requeue", job], check=True)
            print(f"saved {path} and requeued SLURM job {job}", flush=True)
        # Leave at once, on every rank: a stop through Lightning would first
        # validate the half epoch, which only delays the requeue (and writes
        # another checkpoint).
        raise SystemExit(0)


def cluster_callbacks() -> list:
    """In a SLURM batch job (started by srun or torchrun): RequeueOnSignal. Elsewhere,
    an interactive job included, none."""
    batch_job = ("SLURM_JOB_ID" in os.environ
                 and os.environ.get("SLURM_JOB_NAME") not in INTERACTIVE_JOB_NAMES)
    return [RequeueOnSignal()] if batch_job and launcher() != "lightning" else []


def cluster_plugins():
    """Whose ranks the run uses. Started by srun: SLURM's, with Lightning's own requeue
    handler off, because RequeueOnSignal answers the signal (both would, otherwise).
    Started by torchrun: torchrun's, even inside a SLURM job (there is one task per
    node, not per process). Elsewhere None: Lightning's default."""
    how = launcher()
    if how == "torchrun":
        return [TorchElasticEnvironment()]
    if how == "slurm":
        return [SLURMEnvironment(auto_requeue=False)]
    return None


# ------------------------------------------------------------ checkpoints and resume

def checkpoint_callbacks(output_dir: Path) -> tuple[ModelCheckpoint, ModelCheckpoint]:
    """The best epoch so far (what a run tests) and the latest (what --resume resumes).

    Both save right after validation, best first: last.ckpt then records this epoch's
    best, which a resumed run needs to keep the true best checkpoint. (A fast-dev-run
    saves neither.)
    """
    best = ModelCheckpoint(dirpath=output_dir / "checkpoints",
                           filename="best-{epoch}-{val_acc:.4f}",
                           monitor="val_acc", mode="max", save_on_train_epoch_end=False)
    last = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="last",
                           enable_version_counter=False, save_on_train_epoch_end=False)
    return best, last


def find_resume_checkpoint(output_dir: Path):
    """The newest checkpoint in output_dir, for --resume; None if there is none.

    checkpoints/last.ckpt is written after each validation, hpc_ckpt_N.ckpt when a
    SLURM job was requeued: after a requeue the second is newer, after a finished
    epoch the first.
    """
    candidates = [output_dir / "checkpoints" / "last.ckpt",
                  *output_dir.glob("hpc_ckpt_*.ckpt")]
    found = [p for p in candidates if p.exists()]
    if not found:
        return None
    return str(max(found, key=saved_at))


def saved_at(checkpoint: Path) -> float:
    """When a checkpoint was written: a file's time, or the newest time of the files in
    a folder (a sharded checkpoint: saving over one leaves the folder's own time)."""
    files = [f for f in checkpoint.rglob("*") if f.is_file()] or [checkpoint]
    return max(f.stat().st_mtime for f in files)


def resume_checkpoint(trainer: L.Trainer, output_dir: Path, resume: bool):
    """The ckpt_path for trainer.fit: with --resume the newest checkpoint in output_dir
    (if there is one), else None: a fresh start."""
    if not resume:
        return None
    path = find_resume_checkpoint(output_dir)
    if path is None and trainer.is_global_zero:
        print(f"--resume: no checkpoint in {output_dir}, starting from scratch")
    return path


# ----------------------------------------------------------------- what a run prints

def print_rank_line(trainer: L.Trainer):
    """One line per process: a multi-process or multi-node run shows who is who."""
    print(f"rank {trainer.global_rank}/{trainer.world_size} "
          f"(local rank {trainer.local_rank}) on {socket.gethostname()} "
          f"uses {trainer.strategy.root_device}\n",
          end="", flush=True)  # one write: lines of ranks sharing a log never mix


def held_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The bytes of parameters, gradients and optimizer state that this rank holds.
    Under FSDP2 each is a DTensor, of which this rank holds only a shard: to_local()."""
    tensors = list(module.parameters())
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    tensors += [value for state in optimizer.state.values() for value in state.values()
                if isinstance(value, torch.Tensor)]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return sum(t.numel() * t.element_size() for t in local)


class HeldMemoryLine(L.Callback):
    """After the first training step, when gradients and optimizer state exist, every
    rank prints what it holds of them: under DDP all of it, under FSDP its shard."""

    def on_train_start(self, trainer, pl_module):
        self.printed = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.printed:
            return
        self.printed = True
        held = held_bytes(pl_module, trainer.optimizers[0]) / 1e6
        line = (f"rank {trainer.global_rank}/{trainer.world_size}: parameters, "
                f"gradients and optimizer state: {held:.1f} MB")
        bar = trainer.progress_bar_callback
        if bar is not None and trainer.is_global_zero:
            bar.print(line)  # above the progress bar, which rank 0 is drawing
        else:  # after rank 0's half-drawn bar, in a terminal that all ranks share
            print(("\n" if bar is not None else "") + line + "\n", end="", flush=True)


def print_summary(trainer: L.Trainer, best: str, last: str):
    """On rank 0 only: the step count, where the metrics went, and the paths of the
    best and the latest checkpoint."""
    if not trainer.is_global_zero:
        return
    print(f"finished after {trainer.global_step} training steps")
    if not trainer.fast_dev_run:  # a smoke run writes no logs and no checkpoints
        # The logger's own log_dir: trainer.log_dir would broadcast, a collective.
        print(f"metrics:     {Path(trainer.loggers[0].log_dir) / 'metrics.csv'}")
        print(f"checkpoints: {best} (best), {last} (latest)")
