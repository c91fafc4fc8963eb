"""Train a small MLP on MNIST with PyTorch Lightning.

The same file runs on a laptop CPU, one GPU, several GPUs (DDP) and several nodes:
the hardware is chosen by command-line flags, never by editing the code.

    python mnist_lightning.py                         # whatever this machine has
    python mnist_lightning.py --accelerator cpu --devices 2 --strategy ddp
    python mnist_lightning.py --download-only         # fetch the data, then stop

Run ``python mnist_lightning.py --help`` for every flag.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.environments import (SLURMEnvironment,
                                                    TorchElasticEnvironment)
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from torchvision.datasets import MNIST


# [docs:model]
class MLP(nn.Module):
    """784 -> 512 -> 512 -> 10 with dropout. Takes raw uint8 images."""

    def __init__(self, hidden: int = 512, dropout: float = 0.2):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Scaling inside the model keeps the data as compact uint8 until it is on
        # the device, and means every data path (CPU, GPU, DDP) feeds the model the
        # same way.
        x = (images.float() / 255.0 - 0.1307) / 0.3081
        return self.layers(x)
# [/docs:model]


# [docs:datamodule]
class MNISTDataModule(L.LightningDataModule):
    """MNIST as two in-memory uint8 tensors: 60,000 images are only 47 MB."""

    def __init__(self, data_dir: str, batch_size: int, num_workers: int):
        super().__init__()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.num_workers = num_workers

    def is_downloaded(self) -> bool:
        try:
            MNIST(self.data_dir, train=True)
            MNIST(self.data_dir, train=False)
        except RuntimeError:  # torchvision's "Dataset not found"
            return False
        return True

    def prepare_data(self):
        # Lightning calls this on one process per node, before setup(): the place to
        # download. (Nodes that share a file system would each download: there, run
        # --download-only on a login node first.)
        if self.is_downloaded():
            return
        try:
            MNIST(self.data_dir, train=True, download=True)
            MNIST(self.data_dir, train=False, download=True)
        except Exception as err:
            sys.exit(f"error: downloading MNIST into {self.data_dir} failed ({err})")

    def setup(self, stage: str):
        # Called on every process. The split must be the same on every process, so it
        # uses its own fixed seed rather than the training seed.
        if stage in ("fit", "validate"):
            full = MNIST(self.data_dir, train=True)
            order = torch.randperm(len(full),
                                   generator=torch.Generator().manual_seed(0))
            n_val = len(full) // 12  # 5,000 of the 60,000 training images
            val_idx, train_idx = order[:n_val], order[n_val:]
            self.train_set = TensorDataset(full.data[train_idx],
                                           full.targets[train_idx])
            self.val_set = TensorDataset(full.data[val_idx], full.targets[val_idx])
        if stage == "test":
            test = MNIST(self.data_dir, train=False)
            self.test_set = TensorDataset(test.data, test.targets)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        # No need for a DistributedSampler here: under DDP Lightning adds one for us.
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self):
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self):
        return self._loader(self.test_set, shuffle=False)
# [/docs:datamodule]


# [docs:module]
class LitMLP(L.LightningModule):
    def __init__(self, lr: float = 1e-3, hidden: int = 512):
        super().__init__()
        self.save_hyperparameters()  # kept in every checkpoint: the run can be rebuilt
        self.model = MLP(hidden)
        # TorchMetrics sums correct/seen over all processes; "micro" = plain accuracy.
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, images):
        return self.model(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        # sync_dist averages the loss over all processes: all ranks log the same value.
        loss = F.cross_entropy(logits, labels)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.val_acc(logits, labels)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        images, labels = batch
        self.test_acc(self(images), labels)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def on_fit_start(self):
        if self.trainer.world_size > 1:
            # Every process was seeded alike; a seed of its own gives each rank its own
            # dropout masks (the weights are already identical).
            torch.manual_seed(torch.initial_seed() + self.global_rank)
            # One line per process: a multi-process or multi-node run shows who is who.
            print(
                f"rank {self.global_rank}/{self.trainer.world_size} "
                f"(local rank {self.local_rank}) on {socket.gethostname()} "
                f"uses {self.device}\n",
                # One write: lines of ranks that share a log never run together.
                end="", flush=True,
            )
# [/docs:module]


# [docs:requeue]
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
        if trainer.is_global_zero:
            job = os.environ["SLURM_JOB_ID"]
            subprocess.run(["scontrol", "requeue", job], check=True)
            print(f"saved {path} and requeued SLURM job {job}", flush=True)
        # Leave at once, on every rank: a stop through Lightning would first
        # validate the half epoch, which only delays the requeue (and writes
        # another checkpoint).
        raise SystemExit(0)
# [/docs:requeue]


# [docs:helpers]
def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by SLURM's allocation."""
    if hasattr(os, "sched_getaffinity"):
        n = len(os.sched_getaffinity(0))
    else:
        n = os.cpu_count()
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        n = min(n, int(os.environ["SLURM_CPUS_PER_TASK"]))
    return max(n or 1, 1)


def can_reach(url: str, timeout: float = 5.0) -> bool:
    """True if a TCP connection to the URL's host opens within the timeout."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_slurm_tasks(devices, num_nodes: int):
    """Stop early if the script was started without srun in a job of several tasks,
    or if the SLURM allocation cannot match --devices x --num-nodes."""
    ntasks = os.environ.get("SLURM_NTASKS")
    # Lightning ignores SLURM for jobs named "bash" or "interactive" (an salloc shell).
    if ntasks is None or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return
    # srun gives every task it starts a step id; the job script itself has none. Run
    # without srun, only this one process starts, and it waits for the others until
    # the job's time runs out.
    if int(ntasks) > 1 and "SLURM_STEP_ID" not in os.environ:
        sys.exit(
            f"error: this SLURM job has {ntasks} tasks but the script was not started "
            f"by srun, so only one of them runs; start it with srun python ..., as "
            f"the lesson's job templates do"
        )
    if isinstance(devices, int) and int(ntasks) != devices * num_nodes:
        sys.exit(
            f"error: SLURM started {ntasks} tasks but --devices {devices} x "
            f"--num-nodes {num_nodes} = {devices * num_nodes}; set --ntasks-per-node "
            f"to the devices per node and --nodes to the number of nodes"
        )


def find_resume_checkpoint(output_dir: Path):
    """The newest checkpoint in output_dir, for --resume; None if there is none.

    checkpoints/last.ckpt is written after each validation, hpc_ckpt_N.ckpt when a
    SLURM job was requeued: after a requeue the second is newer, after a finished
    epoch the first.
    """
    candidates = [output_dir / "checkpoints" / "last.ckpt",
                  *output_dir.glob("hpc_ckpt_*.ckpt")]
    # A checkpoint is a file, or a folder for sharded FSDP checkpoints.
    found = [p for p in candidates if p.exists()]
    if not found:
        return None
    return str(max(found, key=lambda p: p.stat().st_mtime))


# [/docs:helpers]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="data",
                      help="folder holding MNIST/raw/ (default: %(default)s)")
    data.add_argument("--download-only", action="store_true",
                      help="download MNIST into --data-dir and exit")
    data.add_argument("--num-workers", type=int, default=None,
                      help="DataLoader worker processes per device (default: none on a "
                           "CPU; on a GPU up to 2, fewer if this process may use fewer "
                           "CPUs)")

    hw = parser.add_argument_group("hardware (passed to the Trainer)")
    hw.add_argument("--accelerator", default="auto",
                    choices=["auto", "cpu", "gpu", "cuda", "mps"],
                    help="default: %(default)s (a GPU if there is one)")
    hw.add_argument("--devices", default="auto",
                    help="devices per node: a number or 'auto' (default: %(default)s)")
    hw.add_argument("--num-nodes", type=int, default=1,
                    help="nodes (default: %(default)s)")
    hw.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp"],
                    help="how to use several devices (default: %(default)s)")
    hw.add_argument("--precision", default="32-true",
                    choices=["32-true", "16-mixed", "bf16-mixed"],
                    help="default: %(default)s")

    train = parser.add_argument_group("training")
    train.add_argument("--max-epochs", type=int, default=5, help="default: %(default)s")
    train.add_argument("--batch-size", type=int, default=128,
                       help="per device (default: %(default)s)")
    train.add_argument("--lr", type=float, default=1e-3,
                       help="Adam learning rate (default: %(default)s)")
    train.add_argument("--seed", type=int, default=42, help="default: %(default)s")
    train.add_argument("--output-dir", default="runs/mnist",
                       help="logs/version_N/metrics.csv and checkpoints/ go here "
                            "(default: %(default)s)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the last checkpoint in --output-dir")
    train.add_argument("--fast-dev-run", action="store_true",
                       help="run one batch of each stage as a smoke test")
    train.add_argument("--no-progress-bar", action="store_true",
                       help="no progress bar (for batch jobs' log files)")
    args = parser.parse_args(argv)

    # Turn impossible combinations into one clear line instead of a deep traceback.
    if args.devices != "auto":
        if not args.devices.isdigit() or int(args.devices) < 1:
            parser.error("--devices must be 'auto' or a whole number >= 1, "
                         f"not {args.devices!r}")
        args.devices = int(args.devices)
    for flag in ("num_nodes", "max_epochs", "batch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    # Lightning starts the processes of one machine only; on several nodes something
    # else must start them everywhere, or rank 0 waits for ranks that never come.
    if args.num_nodes > 1 and not (SLURMEnvironment.detect()
                                   or TorchElasticEnvironment.detect()
                                   or "NODE_RANK" in os.environ):
        parser.error("--num-nodes above 1 needs a launcher that starts the processes "
                     "on every node: srun in a SLURM job, or torchrun")
    if args.num_workers is not None and args.num_workers < 0:
        parser.error("--num-workers must be 0 or more")
    if args.lr <= 0:
        parser.error("--lr must be positive")
    if args.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        parser.error(f"--accelerator {args.accelerator}: "
                     "PyTorch sees no GPU on this machine")
    on_cpu = args.accelerator == "cpu" or (args.accelerator == "auto"
                                           and not torch.cuda.is_available())
    if args.strategy == "fsdp" and on_cpu:
        parser.error("--strategy fsdp needs GPUs (Lightning refuses FSDP on CPU); "
                     "use --strategy ddp on CPU")
    if args.num_workers is None:
        # Workers prepare batches while a GPU computes. On a CPU they would compete
        # with the training for the same cores, and starting them next to DDP's
        # threads can hang.
        args.num_workers = 0 if on_cpu else min(2, usable_cpus() - 1)
    return args


# [docs:main]
def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    # --num-workers, if not given, was set by parse_args: none on a CPU, a few on a GPU.
    datamodule = MNISTDataModule(args.data_dir, args.batch_size, args.num_workers)

    if args.download_only:
        datamodule.prepare_data()
        print(f"MNIST is ready in {args.data_dir}")
        return
    if not datamodule.is_downloaded() and not can_reach(MNIST.mirrors[0]):
        sys.exit(
            f"error: MNIST is not in {args.data_dir} and this machine cannot "
            f"download it; on a machine with internet (e.g. a login node) run: "
            f"python {sys.argv[0]} --data-dir {args.data_dir} --download-only"
        )
    check_slurm_tasks(args.devices, args.num_nodes)

    L.seed_everything(args.seed, workers=True)
    model = LitMLP(lr=args.lr)
    # Two checkpoints: the best epoch so far (what we test) and the latest epoch,
    # overwritten each time (what --resume continues from).
    # Both save right after validation, best first: last.ckpt then records this
    # epoch's best, which --resume needs to keep the true best checkpoint.
    best_ckpt = ModelCheckpoint(dirpath=output_dir / "checkpoints",
                                filename="best-{epoch}-{val_acc:.4f}",
                                monitor="val_acc", mode="max",
                                save_on_train_epoch_end=False)
    last_ckpt = ModelCheckpoint(dirpath=output_dir / "checkpoints", filename="last",
                                enable_version_counter=False,
                                save_on_train_epoch_end=False)
    callbacks = [best_ckpt, last_ckpt]  # (--fast-dev-run saves no checkpoint)
    if not args.no_progress_bar:
        # Redrawing the bar reads the loss back from the GPU: the CPU waits for it.
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    on_slurm = SLURMEnvironment.detect()
    if on_slurm:
        callbacks.append(RequeueOnSignal())
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        max_epochs=args.max_epochs,
        fast_dev_run=args.fast_dev_run,
        log_every_n_steps=20,
        default_root_dir=output_dir,  # where SLURM requeue checkpoints go
        # Each run, and each resumed run, writes logs/version_N/metrics.csv: a resumed
        # run continues the step count in a new file instead of overwriting the old one.
        logger=CSVLogger(output_dir, name="logs"),
        enable_progress_bar=not args.no_progress_bar,
        callbacks=callbacks,
        # Under SLURM, RequeueOnSignal replaces Lightning's own requeue handling.
        plugins=[SLURMEnvironment(auto_requeue=False)] if on_slurm else None,
    )
    ckpt_path = find_resume_checkpoint(output_dir) if args.resume else None
    if args.resume and not ckpt_path and trainer.is_global_zero:
        print(f"--resume: no checkpoint in {output_dir}, starting from scratch")
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    # last_ckpt monitors nothing, so its "best" is simply the newest.
    best, last = best_ckpt.best_model_path, last_ckpt.best_model_path
    # Test the best weights seen during validation (fast-dev-run saves no checkpoint).
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None)

    if trainer.is_global_zero:
        print(f"finished after {trainer.global_step} training steps")
        if not args.fast_dev_run:  # a smoke run writes no logs and no checkpoints
            print(f"metrics:     {Path(trainer.logger.log_dir) / 'metrics.csv'}")
            print(f"checkpoints: {best} (best), {last} (latest)")
# [/docs:main]


if __name__ == "__main__":
    main()
