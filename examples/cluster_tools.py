"""What lets one Lightning script run unchanged on a laptop, in a SLURM job and after a
requeue: the plumbing that the lesson's scripts share and the lesson does not teach line
by line.

- the flags both scripts take, and one clear line for every impossible combination;
- DataLoader workers that fit the CPUs a job was given;
- a stop with the command that fixes it when data is missing on an offline machine,
  or when a data file is there but unreadable or corrupt (before training starts);
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
import atexit
import json
import math
import os
import pickle
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from lightning.pytorch.plugins.environments import (SLURMEnvironment,
                                                    TorchElasticEnvironment)
from lightning.pytorch.utilities.exceptions import SIGTERMException
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
    if args.fast_dev_run and args.resume:
        # Resumed, a fast-dev-run trains nothing, or Lightning fails. The job templates
        # always pass --resume: in a new job's empty --output-dir it resumes nothing.
        out = getattr(args, "output_dir", None)
        if out is None or any(find_resume_checkpoint(Path(out))):
            where = f" ({out} holds a run's checkpoints)" if out else ""
            parser.error("--fast-dev-run runs one batch and saves no checkpoint; it "
                         f"cannot be combined with --resume{where}: drop --resume"
                         + (", or give another --output-dir" if out else ""))
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


def download_command(data_dir: str, script: str | None = None) -> str:
    """The command that downloads the data: the running script with --download-only,
    as it was named on the command line; or the script called `script` next to it (a
    data module's own script, when another one, such as mnist_cli.py, imported it)."""
    if script is not None:
        script = os.path.join(os.path.dirname(sys.argv[0]), script)
    return shlex.join(["python", script or sys.argv[0], "--data-dir", data_dir,
                       "--download-only"])


def stop_if_data_unreachable(dataset: str, data_dir: str, downloaded: bool, url: str):
    """Data missing on a machine that cannot download it (a compute node): stop at
    once with the command that fixes it, rather than hang or fail in a download."""
    if downloaded or can_reach(url):
        return
    sys.exit(f"error: {dataset} is not in {data_dir} and this machine cannot "
             f"download it; on a machine with internet (e.g. a login node) run: "
             f"{download_command(data_dir)}")


# The files the scripts read, in the folder under --data-dir that torchvision makes.
DATA_FILES = {
    "MNIST": ("MNIST/raw", ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                            "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]),
    "CIFAR-10": ("cifar-10-batches-py",
                 [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]),
}


def _looks_like(start: bytes) -> str | None:
    """What a file that starts with these bytes is, where it is clearly not data."""
    if not start:
        return "it is empty"
    if start.startswith(b"\x1f\x8b"):
        return "it is gzip-compressed"
    if start.lstrip().startswith(b"<"):
        return "it is a web page (HTML)"
    return None


def _read_mnist_file(path: Path) -> tuple[int, str | None]:
    """(the number of images or labels, what is wrong) for one of torchvision's
    uncompressed MNIST files: an IDX header (a big-endian magic number 0x0803 for
    images, 0x0801 for labels, then each dimension) that must match the file's size.
    Reads only the header of an image file; the labels, to see they are 0 to 9."""
    dims = 3 if "images" in path.name else 1
    header = 4 + 4 * dims
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        start = f.read(header)
        labels = f.read() if dims == 1 else b""
    if (what := _looks_like(start)) or size < header:
        return 0, what or f"{size} bytes, shorter than its header"
    magic = int.from_bytes(start[:4], "big")
    if magic != 0x0800 + dims:
        return 0, f"magic number {magic:#06x}, not {0x0800 + dims:#06x}"
    shape = [int.from_bytes(start[i:i + 4], "big") for i in range(4, header, 4)]
    if shape[1:] not in ([], [28, 28]):
        return 0, f"images of {shape[1]}x{shape[2]} pixels, not 28x28"
    if size != (expected := header + math.prod(shape)):
        return 0, f"{size:,} bytes where its header promises {expected:,}"
    if labels and max(labels) > 9:
        return 0, f"a label {max(labels)}, not 0 to 9"
    return shape[0], None


def _read_cifar10_batch(path: Path) -> tuple[int, str | None]:
    """(the number of images, what is wrong) for one pickled CIFAR-10 batch: a dict
    with 'data', an (N, 3072) uint8 array, and N 'labels' from 0 to 9."""
    with open(path, "rb") as f:
        if what := _looks_like(f.read(64)):
            return 0, what
        f.seek(0)
        try:
            batch = pickle.load(f, encoding="latin1")
            data = batch["data"]
            labels = torch.as_tensor(batch["labels"])
        except OSError:
            raise  # a read error: the file is unreadable, not corrupt
        except Exception as err:  # unpickling garbage can raise almost anything
            return 0, str(err).rstrip(".") or type(err).__name__
    if str(getattr(data, "dtype", "")) != "uint8" or getattr(data, "ndim", 0) != 2 \
            or data.shape[1] != 3 * 32 * 32:
        return 0, "its 'data' is not an (N, 3072) array of uint8"
    if labels.shape != (len(data),) or labels.is_floating_point() \
            or (len(labels) and not 0 <= labels.min() <= labels.max() <= 9):
        return 0, f"its 'labels' are not {len(data)} classes from 0 to 9"
    return len(data), None


def data_file_problems(dataset: str,
                       data_dir: str) -> tuple[list[Path], list[str], list[str]]:
    """Check the files a script reads for `dataset` ("MNIST" or "CIFAR-10") in data_dir:
    their structure and that it is consistent (the tiny data sets of tiny_data.py pass,
    as the real ones do), not checksums. Returns three lists: the files that are
    missing; one line for each that cannot be read ('cannot read PATH (Permission
    denied)'); one line for each that is there but corrupt ('PATH is not a CIFAR-10
    batch (truncated or corrupt: pickle data was truncated)').

    It unpickles every CIFAR-10 batch: the real 180 MB take about 0.4 s once they are
    in the page cache (longer the first time from a slow shared file system). Of MNIST
    it reads the headers and the labels only, in milliseconds."""
    subfolder, names = DATA_FILES[dataset]
    folder = Path(data_dir, subfolder)
    read, kind = ((_read_mnist_file, "an MNIST file") if dataset == "MNIST"
                  else (_read_cifar10_batch, "a CIFAR-10 batch"))
    try:
        present = set(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return [folder / name for name in names], [], []
    except OSError as err:  # e.g. a folder this user may not list: name the outermost
        parts = Path(subfolder).parts
        chain = [Path(data_dir, *parts[:i]) for i in range(len(parts) + 1)]
        blocked = next((p for p in chain if not os.access(p, os.R_OK | os.X_OK)), folder)
        return [], [f"cannot read {blocked} ({err.strerror or err})"], []
    missing, unreadable, corrupt, counts = [], [], [], {}
    for path in (folder / name for name in names):
        if path.name not in present:
            missing.append(path)
            continue
        try:
            counts[path.name], reason = read(path)
        except FileNotFoundError:  # a link to nowhere
            missing.append(path)
            continue
        except IsADirectoryError:
            reason = "it is a folder"
        except OSError as err:
            unreadable.append(f"cannot read {path} ({err.strerror or err})")
            continue
        if reason:
            corrupt.append(f"{path} is not {kind} (truncated or corrupt: {reason})")
    for prefix in ("train", "t10k") if dataset == "MNIST" else ():
        images = counts.get(f"{prefix}-images-idx3-ubyte")
        labels = counts.get(f"{prefix}-labels-idx1-ubyte")
        if images and labels and images != labels:
            corrupt.append(f"{folder / f'{prefix}-labels-idx1-ubyte'} holds {labels:,} "
                           f"labels for the {images:,} images of "
                           f"{prefix}-images-idx3-ubyte")
    return missing, unreadable, corrupt


def check_data_files(dataset: str, data_dir: str, script: str | None = None) -> bool:
    """True when every file a script reads for `dataset` is in data_dir and sound,
    False when one is missing (download it). A file that is there but unreadable or
    corrupt (a cut-off download, a web page saved in its place) stops the script at
    once with one line naming it: before training, not when the test set is read
    after the last epoch. It reads the files: see data_file_problems. `script`: as for
    download_command."""
    missing, unreadable, corrupt = data_file_problems(dataset, data_dir)
    if unreadable:
        stop(f"error: {unreadable[0]}; make it readable, or pass another --data-dir")
    if corrupt:
        stop(f"error: {corrupt[0]}; delete it and run: "
             f"{download_command(data_dir, script)}")
    return not missing


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
        failed = None
        if trainer.is_global_zero:
            job = os.environ["SLURM_JOB_ID"]
            if reason := self.requeue(job):
                failed = (f"error: saved {path}, but scontrol requeue {job} failed "
                          f"({reason}); submit the job again with --resume "
                          f"--output-dir {shlex.quote(str(root))} to continue from it")
            else:
                print(f"saved {path} and requeued SLURM job {job}", flush=True)
        # Leave at once, on every rank: a stop through Lightning would first
        # validate the half epoch, which only delays the requeue (and writes
        # another checkpoint). If the requeue failed, all ranks exit with status 1.
        if failed := trainer.strategy.broadcast(failed):
            stop(failed)
        raise SystemExit(0)

    @staticmethod
    def requeue(job: str):
        """Ask SLURM to requeue the job: None if it did, else why not."""
        try:
            subprocess.run(["scontrol", "requeue", job], check=True,
                           capture_output=True, text=True)
        except FileNotFoundError:
            return "scontrol: command not found"
        except subprocess.CalledProcessError as err:
            said = err.stderr.strip().splitlines()
            return said[-1] if said else f"exit status {err.returncode}"
        except OSError as err:
            return err.strerror or str(err)
        return None


def cluster_callbacks() -> list:
    """SIGTERMExitCode and NoEmptyLogs, in every run; in a SLURM batch job (started by
    srun or torchrun) RequeueOnSignal too, but not in an interactive job."""
    batch_job = ("SLURM_JOB_ID" in os.environ
                 and os.environ.get("SLURM_JOB_NAME") not in INTERACTIVE_JOB_NAMES)
    requeue = [RequeueOnSignal()] if batch_job and launcher() != "lightning" else []
    return [*requeue, SIGTERMExitCode(), NoEmptyLogs()]


class SIGTERMExitCode(L.Callback):
    """A run stopped by SIGTERM (scancel, a time limit without a requeue, a preemption)
    exits with status 143, as a process that SIGTERM kills does, and rank 0 says how to
    continue: `python ... && next_step` must not go on as if training had finished.

    Lightning stops between two steps and raises SIGTERMException on every rank: a
    SystemExit without a status, which exits with 0 (Lightning issue #19916; pull
    request #21623 gives it 143). Lightning calls on_exception before it raises the
    exception again: here it gets its status. (After RequeueOnSignal's requeue SIGTERM
    is ignored, and every rank leaves with status 0.)
    """

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, SIGTERMException):
            return
        exception.code = 128 + signal.SIGTERM
        if trainer.is_global_zero:
            print("error: SIGTERM stopped the run before it finished; to continue from its "
                  "last checkpoint (saved after each validation), run it again with "
                  f"--resume --output-dir {shlex.quote(str(trainer.default_root_dir))}",
                  file=sys.stderr, flush=True)


class NoEmptyLogs(L.Callback):
    """A run that stops before its first training step (a refused resume, say) leaves no
    logs/version_N folder behind: the loggers start before the model's own checks run,
    and a folder with nothing logged would pass for a run."""

    def __init__(self):
        self.trained = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trained = True

    def on_exception(self, trainer, pl_module, exception):
        if self.trained or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            folder = Path(logger.log_dir or "")
            if folder.name.startswith("version_") and folder.is_dir():  # this run's alone
                shutil.rmtree(folder, ignore_errors=True)


def cluster_plugins() -> list:
    """Whose ranks the run uses, and how checkpoints are written.

    Started by srun: SLURM's ranks, with Lightning's own requeue handler off, because
    RequeueOnSignal answers the signal (both would, otherwise). Started by torchrun:
    torchrun's, even inside a SLURM job (there is one task per node, not per process).
    Elsewhere Lightning's default. Always WholeCheckpointIO: a failed save leaves the
    previous checkpoint whole.
    """
    how = launcher()
    if how == "torchrun":
        return [TorchElasticEnvironment(), WholeCheckpointIO()]
    if how == "slurm":
        return [SLURMEnvironment(auto_requeue=False), WholeCheckpointIO()]
    return [WholeCheckpointIO()]


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


class WholeCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint file next to its target and renames it into place, so a
    full disk, a quota or a kill during a save leaves the previous checkpoint whole.

    Lightning 2.6 writes into a temporary file in /tmp and moves it over the target:
    across file systems that move is a copy, which a full disk cuts short, leaving a
    truncated last.ckpt; and it ignores a PermissionError, so nothing is saved and
    nothing said. Here a failed save stops the run with one line.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        part = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(part, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(part, path)  # atomic within one file system
        except (OSError, RuntimeError) as err:
            part.unlink(missing_ok=True)
            # A full disk inside torch.save surfaces as a RuntimeError of its zip
            # writer, raised while handling the OSError.
            cause = err if isinstance(err, OSError) else err.__context__
            if not isinstance(cause, OSError):
                raise
            sys.exit(f"error: saving {path} failed ({cause.strerror or cause}); the "
                     f"checkpoints saved before are kept: free space (not by deleting them), "
                     f"then continue with --resume")


def claim_output_dir(trainer: L.Trainer, output_dir: Path):
    """Before training: stop at once if checkpoints cannot be written to output_dir, or
    if another run is using it (two runs would overwrite each other's last.ckpt).

    Rank 0 claims the folder with output_dir/run.lock, which names its host, process and
    SLURM job, and goes when the run ends. Every rank checks the lock, so all stop
    together. A lock left by a killed run is taken over: its process is gone (same
    host), or its SLURM job is this one (a requeue) or has ended. A fast-dev-run saves
    nothing, and claims nothing.
    """
    if trainer.fast_dev_run:
        return
    folder = output_dir / "checkpoints"
    probe = folder / f".write-test.{socket.gethostname()}.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        reason = "a file is in the way" if isinstance(err, FileExistsError) else err.strerror
        stop(f"error: cannot write checkpoints to {folder} ({reason or err}); "
             f"choose another --output-dir")
    lock = output_dir / "run.lock"
    me = {"host": socket.gethostname(), "pid": os.getpid(), "parent": os.getppid(),
          "slurm_job": os.environ.get("SLURM_JOB_ID"),
          "torchrun": os.environ.get("TORCHELASTIC_RUN_ID"), "command": shlex.join(sys.argv)}
    other = read_lock(lock)
    if other is not None and not same_run(other, me) and still_running(other, me):
        job = f", SLURM job {other['slurm_job']}" if other.get("slurm_job") else ""
        stop(f"error: {output_dir} is in use by another run (process {other.get('pid')} on "
             f"{other.get('host')}{job}: {other.get('command', '?')}); give this run another "
             f"--output-dir, or, if that run has ended: rm {shlex.quote(str(lock))}")
    if trainer.is_global_zero:
        lock.unlink(missing_ok=True)  # none, this run's own, or one left by a run now gone
        lock.write_text(json.dumps(me))
        atexit.register(release_lock, lock, me)


def read_lock(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None  # no lock, or one half written by a run that was killed


def same_run(other: dict, me: dict) -> bool:
    """Did this run write the lock: this process (main() run again), the process that
    started this one (Lightning's launcher), or another rank of this SLURM job or
    torchrun? (A requeued job restarts with its job id.)"""
    if other.get("host") == me["host"] and other.get("pid") in (me["pid"], me["parent"]):
        return True
    return any(other.get(key) and other.get(key) == me[key] and other[key] != "none"
               for key in ("slurm_job", "torchrun"))


def still_running(other: dict, me: dict) -> bool:
    """Is the run that wrote the lock still running? When that cannot be told: yes."""
    if other.get("host") == me["host"] and isinstance(other.get("pid"), int):
        try:
            os.kill(other["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # another user's process
        return True
    if other.get("slurm_job"):
        try:
            state = subprocess.run(["squeue", "-h", "-j", str(other["slurm_job"]), "-o", "%T"],
                                   capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return True
        # squeue fails, or prints nothing, for a job that has ended.
        return state.returncode == 0 and bool(state.stdout.strip())
    return True


def release_lock(lock: Path, me: dict):
    if read_lock(lock) == me:
        lock.unlink(missing_ok=True)


def find_resume_checkpoint(output_dir: Path) -> tuple[str | None, list[str]]:
    """The checkpoint --resume continues from, and those passed over as unreadable.

    Of last.ckpt (written after each validation), hpc_ckpt_N.ckpt (written when a
    SLURM job is warned) and the best checkpoint, the one with the highest step: file
    times mislead after a copy, or when a stale hpc_ckpt file lies next to a finished
    run. A checkpoint that cannot be read, such as a save cut short, is passed over.
    """
    candidates = [output_dir / "checkpoints" / "last.ckpt",
                  *output_dir.glob("hpc_ckpt_*.ckpt"),
                  *(output_dir / "checkpoints").glob("best-*.ckpt")]
    found, unreadable = [], []
    for path in filter(Path.exists, candidates):
        saved = saved_state(path)
        if saved is None or "global_step" not in saved:
            unreadable.append(str(path))
        else:
            found.append((saved["global_step"], saved_at(path), str(path)))
    return (max(found)[2] if found else None), unreadable


def saved_state(checkpoint: Path) -> dict | None:
    """A checkpoint's counters and hyperparameters, without its tensors; None if it
    cannot be read. A sharded checkpoint is a folder; its meta.pt holds them."""
    try:
        if checkpoint.is_dir():
            return torch.load(checkpoint / "meta.pt", map_location="cpu", weights_only=False)
        return torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # truncated, corrupt, or not a checkpoint at all
        return None


def saved_at(checkpoint: Path) -> float:
    """When a checkpoint was written: a file's time, or the newest time of the files in
    a folder (a sharded checkpoint: saving over one leaves the folder's own time)."""
    files = [f for f in checkpoint.rglob("*") if f.is_file()] or [checkpoint]
    return max(f.stat().st_mtime for f in files)


def resume_checkpoint(trainer: L.Trainer, model: L.LightningModule, output_dir: Path,
                      resume: bool):
    """The ckpt_path for trainer.fit: with --resume the checkpoint furthest on in
    output_dir (if there is one), else None: a fresh start.

    A resumed run continues the checkpoint's model and optimizer, so it stops if the
    model's hyperparameters (--lr, --model, ...) differ from the checkpoint's: the new
    values would be recorded but not used.
    """
    if not resume:
        return None
    path, unreadable = find_resume_checkpoint(output_dir)
    for bad in unreadable:
        if trainer.is_global_zero:
            print(f"--resume: passing over {bad}: it cannot be read (a save cut short?)")
    if path is None:
        if trainer.is_global_zero:
            print(f"--resume: no checkpoint in {output_dir}, starting from scratch")
        return None
    saved = saved_state(Path(path)).get("hyper_parameters", {})
    changed = [name for name, value in model.hparams.items()
               if name in saved and saved[name] != value]
    if changed:
        stop(f"error: {path} was trained with {as_flags(saved, changed)}, this run asks "
             f"for {as_flags(model.hparams, changed)}; a resumed run keeps the checkpoint's "
             f"model and optimizer: drop those flags, or start a new run in another "
             f"--output-dir")
    return path


def as_flags(values, names) -> str:
    return " ".join(f"--{name.replace('_', '-')} {values[name]}" for name in names)


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
