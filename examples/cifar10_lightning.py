"""Train a CNN or a ResNet-18 on CIFAR-10 with PyTorch Lightning.

One file for a laptop CPU, one GPU, several GPUs (DDP), sharded training (FSDP)
and several nodes: the hardware and the strategy are flags, not code changes.

    python cifar10_lightning.py --accelerator cpu --max-epochs 1   # a quick look
    python cifar10_lightning.py --model resnet18 --max-epochs 30  # one GPU
    python cifar10_lightning.py --model resnet18 --devices 4 --strategy ddp
    python cifar10_lightning.py --model resnet18 --devices 4 --strategy fsdp
    python cifar10_lightning.py --download-only        # fetch the data, then stop

Run ``python cifar10_lightning.py --help`` for every flag.
"""

import argparse
import functools
import os
import signal
import pickle
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import (EarlyStopping, LearningRateMonitor,
                                         ModelCheckpoint, TQDMProgressBar)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.environments import (SLURMEnvironment,
                                                    TorchElasticEnvironment)
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, size_based_auto_wrap_policy
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from torchvision.models.resnet import BasicBlock

# Per-channel mean and standard deviation of the CIFAR-10 training images (0-255 scale).
CIFAR10_MEAN = (125.3, 123.0, 113.9)
CIFAR10_STD = (63.0, 62.1, 66.7)


# [docs:models]
class ConvBlock(nn.Sequential):
    """3x3 convolution, batch norm, ReLU: the repeating unit of the small CNN."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def small_cnn(num_classes: int = 10) -> nn.Module:
    """0.4 M parameters, 90 MFLOP per training image: an epoch in minutes on a CPU."""
    return nn.Sequential(
        ConvBlock(3, 32), nn.MaxPool2d(2),     # 32x32 -> 16x16
        ConvBlock(32, 64), nn.MaxPool2d(2),    # -> 8x8
        ConvBlock(64, 128), nn.MaxPool2d(2),   # -> 4x4
        ConvBlock(128, 256), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(256, num_classes),
    )


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 (11 M parameters) adapted to 32x32 images.

    The ImageNet stem (7x7 stride-2 convolution, then max-pool) would shrink a CIFAR
    image to 8x8 before the first residual block; a 3x3 stride-1 stem keeps 32x32.
    """
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS = {"cnn": small_cnn, "resnet18": resnet18_cifar}
# [/docs:models]


# [docs:data]
def read_cifar10(folder: Path, train: bool):
    """Read the pickled python batches into (N, 3, 32, 32) uint8 images and labels.

    torchvision's CIFAR10 class would do this too, but it keeps the images as a
    NumPy array for per-image PIL transforms; we want one tensor for batch transforms.
    """
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(batch["data"].reshape(-1, 3, 32, 32))
        labels += batch["labels"]
    return torch.from_numpy(np.concatenate(images)), torch.tensor(labels)


def random_crop_flip(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Pad by 4, crop a random 32x32 window, flip half: a whole batch at once."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)  # zero padding, as torchvision's RandomCrop
    dev = images.device
    top = torch.randint(0, 2 * padding + 1, (n, 1), device=dev)
    left = torch.randint(0, 2 * padding + 1, (n, 1), device=dev)
    rows = top + torch.arange(h, device=dev)   # (n, h): the rows each image keeps
    cols = left + torch.arange(w, device=dev)  # (n, w)
    flip = torch.rand(n, 1, device=dev) < 0.5
    cols = torch.where(flip, cols.flip(1), cols)  # read backwards: a mirror image
    batch_idx = torch.arange(n, device=dev)[:, None, None, None]
    channel_idx = torch.arange(3, device=dev)[None, :, None, None]
    return padded[batch_idx, channel_idx,
                  rows[:, None, :, None], cols[:, None, None, :]]


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 as uint8 tensors in memory (150 MB), augmented per batch on the device.

    On a GPU the training images are copied there once and the loader deals out only
    indices; elsewhere DataLoader workers slice the batches from host memory.
    """

    def __init__(self, data_dir: str, batch_size: int, num_workers: int,
                 data_on_device=None):
        super().__init__()
        self.data_dir = data_dir
        self.folder = Path(data_dir) / "cifar-10-batches-py"
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.data_on_device = data_on_device  # None: yes on a GPU, no on a CPU

    def is_downloaded(self) -> bool:
        names = ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]
        return all((self.folder / name).exists() for name in names)

    def prepare_data(self):
        # Once per node, before setup(): torchvision downloads and checks the archive.
        # (Nodes that share a file system: run --download-only on a login node first.)
        if self.is_downloaded():
            return
        try:
            torchvision.datasets.CIFAR10(self.data_dir, train=True, download=True)
        except Exception as err:
            reason = str(err).splitlines()[0]
            sys.exit(f"error: downloading CIFAR-10 into {self.data_dir} failed "
                     f"({reason})")

    def setup(self, stage: str):
        if stage in ("fit", "validate"):
            images, labels = read_cifar10(self.folder, train=True)
            # The same split on every process: a fixed generator, not the training seed.
            order = torch.randperm(len(labels),
                                   generator=torch.Generator().manual_seed(0))
            n_val = len(labels) // 10  # 5,000 of the 50,000 training images
            val_idx, train_idx = order[:n_val], order[n_val:]
            self.train_set = TensorDataset(images[train_idx], labels[train_idx])
            self.val_set = TensorDataset(images[val_idx], labels[val_idx])
            self.place_train_set()
        if stage == "test":
            self.test_set = TensorDataset(*read_cifar10(self.folder, train=False))

    def place_train_set(self):
        device = self.trainer.strategy.root_device
        if self.data_on_device is None:
            self.data_on_device = device.type == "cuda"
        if self.data_on_device:
            # 45,000 images are 138 MB: one copy per GPU, made once, not one per batch.
            self.train_on_device = [t.to(device) for t in self.train_set.tensors]

    def _loader(self, dataset, train: bool) -> DataLoader:
        # Workers only slice uint8 tensors and stack them: no per-image decoding or PIL.
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,  # equal batches keep BatchNorm and compiled graphs happy
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),  # so copies to the GPU are async
        )

    def train_dataloader(self):
        if self.data_on_device:
            # The loader only shuffles and batches indices (and shards them under DDP).
            return DataLoader(range(len(self.train_set)), batch_size=self.batch_size,
                              shuffle=True, drop_last=True)
        return self._loader(self.train_set, train=True)

    def val_dataloader(self):
        return self._loader(self.val_set, train=False)

    def test_dataloader(self):
        return self._loader(self.test_set, train=False)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        # Lightning calls this once the batch is on the device: augmenting here means
        # the device does the work for a whole batch at once, not a CPU image by image.
        if not self.trainer.training:
            return batch
        if self.data_on_device:
            images, labels = (t[batch] for t in self.train_on_device)  # batch: indices
        else:
            images, labels = batch
        return random_crop_flip(images), labels
# [/docs:data]


# [docs:module]
class LitClassifier(L.LightningModule):
    def __init__(self, model: str = "cnn", lr: float = 0.05, weight_decay: float = 5e-4,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        self.net = MODELS[model]()
        # channels_last lets cuDNN use its fastest convolution kernels on tensor cores.
        self.net = self.net.to(memory_format=torch.channels_last)
        # Buffers follow the model to its device; persistent=False: not in checkpoints.
        mean, std = torch.tensor(CIFAR10_MEAN), torch.tensor(CIFAR10_STD)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std  # uint8 in, normalised float out
        return self.net(x.contiguous(memory_format=torch.channels_last))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels,
                               label_smoothing=self.hparams.label_smoothing)
        # Not on the progress bar: Lightning reads bar values back from the GPU after
        # every step, and the CPU waits each time. The logger reads it every 20 steps.
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.val_acc(logits, labels)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch, batch_idx):
        images, labels = batch
        self.test_acc(self(images), labels)
        self.log("test_acc", self.test_acc)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr,
                                    momentum=0.9, nesterov=True,
                                    weight_decay=self.hparams.weight_decay)
        # One-cycle: warm up for 25% of the steps (longer in a very short run:
        # OneCycleLR fails when its warm-up is exactly one step), then anneal to ~0.
        total = self.trainer.estimated_stepping_batches
        if total < 1:  # drop_last: a device with fewer images than a batch gets none
            sys.exit("error: each device gets fewer training images than --batch-size; "
                     "use a smaller --batch-size or fewer devices")
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=total,
            pct_start=min(0.75, max(0.25, 1.5 / total)),
        )
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self):
        # A resumed run restores the one-cycle schedule, which was planned for the
        # original number of steps: it cannot be stretched to more epochs.
        planned = self.lr_schedulers().total_steps
        if planned != self.trainer.estimated_stepping_batches:
            sys.exit(f"error: the checkpoint's learning-rate schedule was planned for "
                     f"{planned} steps, this run for "
                     f"{self.trainer.estimated_stepping_batches}; resume with the "
                     f"original --max-epochs, --batch-size, --devices and --num-nodes, "
                     f"or start a new run in another --output-dir")

    def on_fit_start(self):
        # Every process was seeded alike, so the crops and flips drawn on each device
        # would repeat across ranks; the weights are already identical, so now give
        # each rank a seed of its own.
        torch.manual_seed(torch.initial_seed() + self.global_rank)
        if self.trainer.world_size > 1:
            print(
                f"rank {self.global_rank}/{self.trainer.world_size} "
                f"(local rank {self.local_rank}) on {socket.gethostname()} "
                f"uses {self.device}\n",
                # One write: lines of ranks that share a log never run together.
                end="", flush=True,
            )
# [/docs:module]


# [docs:fsdp]
def wrap_policy(name: str, min_params: int):
    """Which submodules FSDP turns into separately sharded units.

    none:  the whole model is one unit; every parameter is gathered at once.
    block: each residual block (ResNet-18) or conv block (CNN) is a unit.
    size:  any subtree holding at least min_params parameters becomes a unit.
    """
    if name == "none":
        return None
    if name == "block":
        return ModuleWrapPolicy({BasicBlock, ConvBlock})
    return functools.partial(size_based_auto_wrap_policy, min_num_params=min_params)


def build_strategy(args):
    if args.strategy != "fsdp":
        return args.strategy
    mesh = None
    if args.sharding == "HYBRID_SHARD":
        # Shard within a node, replicate across nodes. Name the layout: otherwise torch
        # takes every GPU it can see for one node, whatever --devices says.
        devices = torch.cuda.device_count() if args.devices == "auto" else args.devices
        mesh = (args.num_nodes, devices)
    return FSDPStrategy(
        auto_wrap_policy=wrap_policy(args.wrap_policy, args.min_params),
        sharding_strategy=args.sharding,
        device_mesh=mesh,
        activation_checkpointing_policy=(ModuleWrapPolicy({BasicBlock, ConvBlock})
                                         if args.activation_checkpointing else None),
        # "full": one file; "sharded": a folder with one piece per rank.
        state_dict_type=args.checkpoint_format,
    )
# [/docs:fsdp]


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
    or if the SLURM allocation cannot match --devices x --num-nodes.

    Lightning checks the second itself for DDP, but not for FSDP, where a mismatch hangs.
    """
    ntasks = os.environ.get("SLURM_NTASKS")
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
                      help="folder holding cifar-10-batches-py/ (default: %(default)s)")
    data.add_argument("--download-only", action="store_true",
                      help="download CIFAR-10 into --data-dir and exit")
    data.add_argument("--data-on-device", action=argparse.BooleanOptionalAction,
                      default=None,
                      help="keep the training images on the device and feed it indices "
                           "(default: on a GPU)")
    data.add_argument("--num-workers", type=int, default=None,
                      help="DataLoader worker processes per device (default: none on a "
                           "CPU; on a GPU up to 4, fewer if this process may use fewer "
                           "CPUs)")

    hw = parser.add_argument_group("hardware (passed to the Trainer)")
    hw.add_argument("--accelerator", default="auto",
                    choices=["auto", "cpu", "gpu", "cuda"],
                    help="default: %(default)s (a GPU if there is one)")
    hw.add_argument("--devices", default="auto",
                    help="devices per node: a number or 'auto' (default: %(default)s)")
    hw.add_argument("--num-nodes", type=int, default=1,
                    help="nodes (default: %(default)s)")
    hw.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp"],
                    help="how to use several devices (default: %(default)s)")
    hw.add_argument("--precision", default=None,
                    choices=["32-true", "16-mixed", "bf16-mixed"],
                    help="default: bf16-mixed on a GPU that computes in bfloat16, "
                         "16-mixed on older GPUs, 32-true on a CPU")

    model = parser.add_argument_group("model and training")
    model.add_argument("--model", default="cnn", choices=sorted(MODELS),
                       help="default: %(default)s")
    model.add_argument("--max-epochs", type=int, default=10,
                       help="default: %(default)s")
    model.add_argument("--batch-size", type=int, default=256,
                       help="per device (default: %(default)s)")
    model.add_argument("--lr", type=float, default=0.05,
                       help="peak SGD learning rate (default: %(default)s)")
    model.add_argument("--weight-decay", type=float, default=5e-4,
                       help="default: %(default)s")
    model.add_argument("--label-smoothing", type=float, default=0.0,
                       help="default: %(default)s")
    model.add_argument("--grad-clip", type=float, default=None,
                       help="clip the gradient norm to this value (default: off)")
    model.add_argument("--early-stop-patience", type=int, default=None,
                       help="stop after this many epochs without a better val_acc "
                            "(default: off)")
    model.add_argument("--compile", action="store_true",
                       help="compile the network with torch.compile")
    model.add_argument("--compile-mode", default="default",
                       choices=["default", "reduce-overhead", "max-autotune"],
                       help="torch.compile mode (default: %(default)s)")
    model.add_argument("--seed", type=int, default=42, help="default: %(default)s")

    fsdp = parser.add_argument_group("FSDP (only with --strategy fsdp)")
    fsdp.add_argument("--wrap-policy", choices=["none", "block", "size"],
                      help="what FSDP shards as one unit (default: block)")
    fsdp.add_argument("--min-params", type=int,
                      help="with --wrap-policy size: parameters per unit "
                           "(default: 100000)")
    fsdp.add_argument("--sharding",
                      choices=["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD",
                               "HYBRID_SHARD"],
                      help="default: FULL_SHARD")
    fsdp.add_argument("--activation-checkpointing", action="store_true",
                      help="recompute block activations in the backward pass, "
                           "to save memory")
    fsdp.add_argument("--checkpoint-format", choices=["full", "sharded"],
                      help="default: full")

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="runs/cifar10",
                     help="logs/, tensorboard/ and checkpoints/ go here "
                          "(default: %(default)s)")
    out.add_argument("--resume", action="store_true",
                     help="continue from the last checkpoint in --output-dir")
    out.add_argument("--fast-dev-run", action="store_true",
                     help="run one batch of each stage as a smoke test")
    out.add_argument("--no-progress-bar", action="store_true",
                     help="no progress bar (for batch jobs' log files)")
    out.add_argument("--profiler", choices=["simple", "advanced"], default=None,
                     help="print where the time went, per Lightning hook (simple) or "
                          "per function (advanced)")
    args = parser.parse_args(argv)

    if args.devices != "auto":
        if not args.devices.isdigit() or int(args.devices) < 1:
            parser.error("--devices must be 'auto' or a whole number >= 1, "
                         f"not {args.devices!r}")
        args.devices = int(args.devices)
    # FSDP's flags mean nothing to other strategies: say so rather than ignore them.
    fsdp_defaults = {"wrap_policy": "block", "min_params": 100_000,
                     "sharding": "FULL_SHARD", "activation_checkpointing": False,
                     "checkpoint_format": "full"}
    given = [name for name in fsdp_defaults if getattr(args, name) not in (None, False)]
    if given and args.strategy != "fsdp":
        flag = given[0].replace("_", "-")
        parser.error(f"--{flag} only applies with --strategy fsdp")
    for name, default in fsdp_defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.strategy == "fsdp" and args.grad_clip:
        # Lightning 2.6 clips by norm through the precision plugin, which under FSDP
        # raises at the first step: the norm needs every rank's shard.
        parser.error("--grad-clip does not work with --strategy fsdp in Lightning 2.6")
    for flag in ("num_nodes", "max_epochs", "batch_size", "min_params"):
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
    on_cpu = args.accelerator == "cpu" or not torch.cuda.is_available()
    if args.strategy == "fsdp" and on_cpu:
        parser.error("--strategy fsdp needs GPUs (Lightning refuses FSDP on CPU); "
                     "use --strategy ddp on CPU")
    if args.precision is None and on_cpu:
        args.precision = "32-true"
    elif args.precision is None:
        # bfloat16 needs an Ampere GPU (A100) or newer; older ones (V100) get float16.
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        args.precision = "bf16-mixed" if bf16 else "16-mixed"
    if args.num_workers is None:
        # Workers prepare batches while a GPU computes. On a CPU they would compete
        # with the training for the same cores, and starting them next to DDP's
        # threads can hang.
        args.num_workers = 0 if on_cpu else min(4, usable_cpus() - 1)
    return args


# [docs:main]
def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    # --num-workers, if not given, was set by parse_args: none on a CPU, a few on a GPU.
    datamodule = CIFAR10DataModule(args.data_dir, args.batch_size, args.num_workers,
                                   args.data_on_device)

    if args.download_only:
        datamodule.prepare_data()
        print(f"CIFAR-10 is ready in {args.data_dir}")
        return
    cifar10_url = torchvision.datasets.CIFAR10.url
    if not datamodule.is_downloaded() and not can_reach(cifar10_url):
        sys.exit(
            f"error: CIFAR-10 is not in {args.data_dir} and this machine cannot "
            f"download it; on a machine with internet (e.g. a login node) run: "
            f"python {sys.argv[0]} --data-dir {args.data_dir} --download-only"
        )
    check_slurm_tasks(args.devices, args.num_nodes)

    L.seed_everything(args.seed, workers=True)
    torch.set_float32_matmul_precision("high")  # TF32 matrix units for any float32 work
    model = LitClassifier(args.model, lr=args.lr, weight_decay=args.weight_decay,
                          label_smoothing=args.label_smoothing)
    if args.compile:
        # In place, so checkpoints keep the plain parameter names.
        model.net.compile(mode=args.compile_mode)

    # The best epoch so far (what we test) and the latest one (what --resume resumes).
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
    callbacks.append(LearningRateMonitor(logging_interval="step"))
    if args.early_stop_patience:
        # Checked after validation, where val_acc is: checked at the end of the
        # training epoch (the default), a run resumed from last.ckpt would crash.
        callbacks.append(EarlyStopping(monitor="val_acc", mode="max",
                                       patience=args.early_stop_patience,
                                       check_on_train_epoch_end=False))
    if not args.no_progress_bar:
        # Redrawing the bar reads the loss back from the GPU, which makes the CPU wait;
        # every 10 steps costs little, every step costs about a tenth of the speed.
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    on_slurm = SLURMEnvironment.detect()
    if on_slurm:
        callbacks.append(RequeueOnSignal())

    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=build_strategy(args),
        precision=args.precision,
        max_epochs=args.max_epochs,
        gradient_clip_val=args.grad_clip,
        fast_dev_run=args.fast_dev_run,
        benchmark=True,  # images are always 32x32: cuDNN picks its fastest kernels once
        enable_progress_bar=not args.no_progress_bar,
        log_every_n_steps=20,
        profiler=args.profiler,
        default_root_dir=output_dir,  # where SLURM requeue checkpoints go
        logger=[CSVLogger(output_dir, name="logs"),
                TensorBoardLogger(output_dir, name="tensorboard")],
        callbacks=callbacks,
        # Under SLURM, RequeueOnSignal replaces Lightning's own requeue handling.
        plugins=[SLURMEnvironment(auto_requeue=False)] if on_slurm else None,
    )
    if trainer.is_global_zero:
        print(f"effective batch size: {args.batch_size} per device x "
              f"{trainer.world_size} devices = {args.batch_size * trainer.world_size}",
              flush=True)

    ckpt_path = find_resume_checkpoint(output_dir) if args.resume else None
    if args.resume and not ckpt_path and trainer.is_global_zero:
        print(f"--resume: no checkpoint in {output_dir}, starting from scratch")
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    # last_ckpt monitors nothing, so its "best" is simply the newest.
    best, last = best_ckpt.best_model_path, last_ckpt.best_model_path
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None)

    if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30
        print(f"rank {trainer.global_rank}: peak GPU memory {peak:.2f} GiB\n",
              end="", flush=True)
    if trainer.is_global_zero:
        print(f"finished after {trainer.global_step} training steps")
        if not args.fast_dev_run:
            print(f"metrics:     {Path(trainer.loggers[0].log_dir) / 'metrics.csv'}")
            print(f"checkpoints: {best} (best), {last} (latest)")
# [/docs:main]


if __name__ == "__main__":
    main()
