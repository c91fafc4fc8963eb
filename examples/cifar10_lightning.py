"""Train a CNN, a ResNet-18 or a small ViT on CIFAR-10 with PyTorch Lightning.

One file for a laptop CPU, one GPU, several GPUs (DDP), sharded training (FSDP)
and several nodes: the hardware and the strategy are flags, not code changes.

    python cifar10_lightning.py --accelerator cpu --max-epochs 1   # a quick look
    python cifar10_lightning.py --model resnet18 --max-epochs 30  # one GPU
    python cifar10_lightning.py --model resnet18 --devices 4 --strategy ddp
    python cifar10_lightning.py --model vit --devices 4 --strategy fsdp2
    python cifar10_lightning.py --download-only        # fetch the data, then stop

Run ``python cifar10_lightning.py --help`` for every flag. It needs cluster_tools.py and
cifar10_models.py next to it.
"""

import argparse
import pickle
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import (EarlyStopping, LearningRateMonitor,
                                         TQDMProgressBar)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import cluster_tools  # the cluster plumbing, in cluster_tools.py next to this file
from cifar10_models import BLOCKS, MODELS, shard_units, wrap_policy  # the networks

# Per-channel mean and standard deviation of the CIFAR-10 training images (0-255 scale).
CIFAR10_MEAN = (125.3, 123.0, 113.9)
CIFAR10_STD = (63.0, 62.1, 66.7)




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
        # False if a file is missing. One that is there but corrupt (a cut-off
        # download) stops at once, with one line naming it and the command (this
        # script's --download-only) that fixes it.
        return cluster_tools.check_data_files("CIFAR-10", self.data_dir,
                                              Path(__file__).name)

    def prepare_data(self):
        # Once per node, before setup(): torchvision downloads and checks the archive.
        # Nodes that share a file system: set self.prepare_data_per_node = False in
        # __init__ (global rank 0 only), or run --download-only on a login node first.
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
                 label_smoothing: float = 0.0, vit_width: int = 128, vit_depth: int = 4,
                 wrap_policy: str = "block", min_params: int = 100_000):
        super().__init__()
        self.save_hyperparameters()
        size = {"width": vit_width, "depth": vit_depth} if model == "vit" else {}
        self.net = MODELS[model](**size)
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
        # For the logger only, which reads it every 20 steps: a progress-bar value is
        # read back from the GPU after every step, and the CPU waits for it each time
        # (the "Making it fast" episode measured it).
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.evaluate(batch, "val", self.val_acc)

    def test_step(self, batch, batch_idx):
        self.evaluate(batch, "test", self.test_acc)

    def evaluate(self, batch, stage: str, accuracy: MulticlassAccuracy):
        images, labels = batch
        logits = self(images)
        # The mean over all processes' images (sync_dist); the metric counts them all.
        self.log(f"{stage}_loss", F.cross_entropy(logits, labels), prog_bar=True,
                 sync_dist=True)
        accuracy(logits, labels)
        self.log(f"{stage}_acc", accuracy, prog_bar=True)

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
                     f"original --max-epochs and effective batch (--batch-size x "
                     f"devices x nodes), or start a new run in another --output-dir")

    def on_fit_start(self):
        # Every process was seeded alike: the weights start identical. From here, each
        # rank gets a seed of its own, or its crops and flips would repeat the others'.
        torch.manual_seed(torch.initial_seed() + self.global_rank)
        if self.trainer.world_size > 1:
            cluster_tools.print_rank_line(self.trainer)
    # [/docs:module]

    def configure_model(self):
        # --strategy fsdp2: Lightning calls this once the ranks are up and the device
        # mesh is made. Shard each unit, then the root, which takes what is left.
        if self.device_mesh is None or isinstance(self.net, FSDPModule):
            return  # another strategy, or sharded already (test after fit)
        mesh = self.device_mesh["data_parallel"]
        self.net.to(memory_format=torch.contiguous_format)  # FSDP2 shards no other
        units = shard_units(self.net, self.hparams.wrap_policy, self.hparams.min_params)
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


# [docs:fsdp]
def build_strategy(args):
    if args.strategy == "fsdp2":
        # Lightning's ModelParallelStrategy runs FSDP2 (configure_model shards), by
        # default on a 2-D mesh; one data-parallel dimension over all ranks is FSDP.
        devices = args.devices
        if devices == "auto":
            on_cpu = cluster_tools.uses_cpu(args.accelerator)
            devices = 1 if on_cpu else torch.cuda.device_count()
        return ModelParallelStrategy(
            data_parallel_size=devices * args.num_nodes, tensor_parallel_size=1,
            save_distributed_checkpoint=args.checkpoint_format != "full")
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
        activation_checkpointing_policy=(ModuleWrapPolicy(set(BLOCKS))
                                         if args.activation_checkpointing else None),
        # "full": one file; "sharded" (fsdp2's auto): a folder with one piece per rank.
        state_dict_type="sharded" if args.checkpoint_format == "sharded" else "full",
    )
# [/docs:fsdp]


# [docs:precision]
def choose_precision(precision: str, accelerator: str, strategy: str) -> str:
    """--precision auto: bfloat16 mixed precision on a GPU that computes in it (A100,
    H100 and newer), float16 on older GPUs (V100; fsdp2 takes no float16: 32-bit
    there), plain 32-bit floats on a CPU."""
    if precision != "auto":
        return precision
    if cluster_tools.uses_cpu(accelerator):
        return "32-true"
    if torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16-mixed"
    return "32-true" if strategy == "fsdp2" else "16-mixed"
# [/docs:precision]


# [docs:main]
def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    workers = cluster_tools.loader_workers(args.num_workers, args.accelerator, most=4)
    datamodule = CIFAR10DataModule(args.data_dir, args.batch_size, workers,
                                   args.data_on_device)
    if args.download_only:
        datamodule.prepare_data()
        print(f"CIFAR-10 is ready in {args.data_dir}")
        return
    cluster_tools.stop_if_data_unreachable("CIFAR-10", args.data_dir,
                                           datamodule.is_downloaded(),
                                           torchvision.datasets.CIFAR10.url)
    cluster_tools.check_launch(args.devices, args.num_nodes)

    L.seed_everything(args.seed, workers=True)
    torch.set_float32_matmul_precision("high")  # TF32 matrix units for any float32 work
    model = LitClassifier(args.model, lr=args.lr, weight_decay=args.weight_decay,
                          label_smoothing=args.label_smoothing,
                          vit_width=args.vit_width, vit_depth=args.vit_depth,
                          wrap_policy=args.wrap_policy, min_params=args.min_params)
    if args.compile:  # in place, so checkpoints keep the plain parameter names
        model.net.compile(mode=args.compile_mode)

    best_ckpt, last_ckpt = cluster_tools.checkpoint_callbacks(output_dir)
    callbacks = [best_ckpt, last_ckpt, LearningRateMonitor(logging_interval="step"),
                 cluster_tools.HeldMemoryLine()]  # what each rank holds of the model
    if args.early_stop_patience:
        # Checked after validation, where val_acc is: checked at the end of the
        # training epoch (the default), a run resumed from last.ckpt would crash.
        callbacks.append(EarlyStopping(monitor="val_acc", mode="max",
                                       patience=args.early_stop_patience,
                                       check_on_train_epoch_end=False))
    if not args.no_progress_bar:
        # Redrawn every 10 steps: a batch job's log file grows by a line at each redraw.
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    callbacks += cluster_tools.cluster_callbacks()  # requeue in time; a SIGTERM fails

    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=build_strategy(args),
        precision=choose_precision(args.precision, args.accelerator, args.strategy),
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
        plugins=cluster_tools.cluster_plugins(),  # whose ranks; checkpoints saved whole
    )
    if trainer.is_global_zero:
        print(f"effective batch size: {args.batch_size} per device x "
              f"{trainer.world_size} devices = {args.batch_size * trainer.world_size}",
              flush=True)

    cluster_tools.claim_output_dir(trainer, output_dir)  # writable, and no other run in it
    ckpt_path = cluster_tools.resume_checkpoint(trainer, model, output_dir, args.resume)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    # Read first: test() restores the callbacks' state from the checkpoint it loads.
    best, last = best_ckpt.best_model_path, last_ckpt.best_model_path
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None)

    if torch.cuda.is_available() and trainer.strategy.root_device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(trainer.strategy.root_device) / 2**30
        print(f"rank {trainer.global_rank}: peak GPU memory {peak:.2f} GiB\n",
              end="", flush=True)
    cluster_tools.print_summary(trainer, best, last)
# [/docs:main]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="data",
                      help="folder holding cifar-10-batches-py/ (default: %(default)s)")
    data.add_argument("--download-only", action="store_true",
                      help="download CIFAR-10 into --data-dir and exit")
    data.add_argument("--data-on-device", action=argparse.BooleanOptionalAction,
                      help="keep the training images on the device and feed it indices "
                           "(default: on a GPU)")

    model = parser.add_argument_group("model and training")
    model.add_argument("--model", default="cnn", choices=sorted(MODELS),
                       help="default: %(default)s")
    model.add_argument("--vit-width", type=int, default=128,
                       help="with --model vit: width (default: %(default)s)")
    model.add_argument("--vit-depth", type=int, default=4,
                       help="with --model vit: blocks (default: %(default)s)")
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
    model.add_argument("--precision", default="auto",
                       choices=["auto", "32-true", "16-mixed", "bf16-mixed"],
                       help="passed to the Trainer; auto: bf16-mixed on a GPU that "
                            "has bfloat16, 16-mixed on older GPUs, 32-true on a CPU "
                            "(default: %(default)s)")
    model.add_argument("--grad-clip", type=float,
                       help="clip the gradient norm to this value (default: off; "
                            "not with --strategy fsdp)")
    model.add_argument("--early-stop-patience", type=int,
                       help="stop after this many epochs without a better val_acc "
                            "(default: off)")
    model.add_argument("--compile", action="store_true",
                       help="compile the network with torch.compile")
    model.add_argument("--compile-mode", default="default",
                       choices=["default", "reduce-overhead", "max-autotune"],
                       help="torch.compile mode (default: %(default)s)")

    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default="runs/cifar10",
                     help="logs/, tensorboard/ and checkpoints/ go here "
                          "(default: %(default)s)")
    out.add_argument("--profiler", choices=["simple", "advanced"],
                     help="print where the time went, per Lightning hook (simple) or "
                          "per function (advanced)")

    fsdp = parser.add_argument_group("FSDP (only with --strategy fsdp or fsdp2)")
    fsdp.add_argument("--wrap-policy", default="block",
                      choices=["none", "block", "size"],
                      help="what FSDP shards as one unit (default: %(default)s)")
    fsdp.add_argument("--min-params", type=int, default=100_000,
                      help="with --wrap-policy size: parameters per unit "
                           "(default: %(default)s)")
    fsdp.add_argument("--sharding", default="FULL_SHARD",
                      choices=["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD",
                               "HYBRID_SHARD"],
                      help="default: %(default)s")
    fsdp.add_argument("--activation-checkpointing", action="store_true",
                      help="recompute block activations in the backward pass, "
                           "to save memory")
    fsdp.add_argument("--checkpoint-format", default="auto",
                      choices=["auto", "full", "sharded"],
                      help="full: one file; sharded: a folder, one piece per rank; "
                           "auto: full with fsdp, sharded with fsdp2 "
                           "(default: %(default)s)")

    # --accelerator, --devices, --num-nodes, --strategy, --num-workers, --seed,
    # --resume, --fast-dev-run, --no-progress-bar: the flags both scripts share.
    cluster_tools.add_shared_flags(parser, accelerators=("auto", "cpu", "gpu", "cuda"),
                                   strategies=("auto", "ddp", "fsdp", "fsdp2"))
    args = parser.parse_args(argv)
    # Flags that mean nothing to the model or strategy asked for: say so, never ignore.
    changed = [name for name in ("wrap_policy", "min_params", "sharding",
                                 "activation_checkpointing", "checkpoint_format")
               if getattr(args, name) != parser.get_default(name)]
    if changed and args.strategy not in ("fsdp", "fsdp2"):
        flag = changed[0].replace("_", "-")
        parser.error(f"--{flag} only applies with --strategy fsdp or fsdp2")
    for flag in ("vit_width", "vit_depth"):
        if getattr(args, flag) != parser.get_default(flag) and args.model != "vit":
            parser.error(f"--{flag.replace('_', '-')} only applies with --model vit")
    for flag in ("min_params", "vit_width", "vit_depth"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.vit_width % 32:
        parser.error("--vit-width must be a multiple of 32 (one attention head per 32)")
    if args.strategy == "fsdp2":
        # What this script's FSDP2 set-up leaves to FSDP1 (--strategy fsdp, GPUs only).
        unsupported = {"--compile": args.compile,
                       "--activation-checkpointing": args.activation_checkpointing,
                       f"--sharding {args.sharding}": args.sharding != "FULL_SHARD",
                       f"--precision {args.precision}": args.precision == "16-mixed"}
        for flag in (flag for flag, given in unsupported.items() if given):
            parser.error(f"{flag} does not work with --strategy fsdp2 in this script")
    if args.strategy == "fsdp" and args.grad_clip:
        # Lightning 2.6 clips by norm, and its FSDP1 precision plugin raises at the first
        # step: that norm spans every rank's shard, and only FSDP's root module computes
        # it. Under fsdp2 torch's clip_grad_norm_ takes the sharded (DTensor) gradients.
        parser.error("--grad-clip clips the gradient norm, which Lightning 2.6 refuses "
                     "under --strategy fsdp; use --strategy fsdp2")
    cluster_tools.check_flags(parser, args)
    return args


if __name__ == "__main__":
    main()
