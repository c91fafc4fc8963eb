"""Train a small MLP on MNIST with PyTorch Lightning.

The same file runs on a laptop CPU, one GPU, several GPUs (DDP) and several nodes:
the hardware is chosen by command-line flags, never by editing the code.

    python mnist_lightning.py                         # whatever this machine has
    python mnist_lightning.py --accelerator cpu --devices 2 --strategy ddp
    python mnist_lightning.py --download-only         # fetch the data, then stop

Run ``python mnist_lightning.py --help`` for every flag. Keep cluster_tools.py next to
this file: it holds the cluster plumbing (SLURM checks, requeue, --resume).
"""

import argparse
import sys
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from torchvision.datasets import MNIST

import cluster_tools  # the cluster plumbing, in cluster_tools.py next to this file


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
        # False if a file is missing. One that is there but corrupt (a cut-off
        # download) stops at once, with one line naming it and the command (this
        # script's --download-only) that fixes it.
        return cluster_tools.check_data_files("MNIST", self.data_dir,
                                              Path(__file__).name)

    def prepare_data(self):
        # Lightning calls this on one process per node (local rank 0), before setup():
        # the place to download. Nodes that share a file system would each download:
        # there, set self.prepare_data_per_node = False in __init__ (global rank 0
        # only), or run --download-only on a login node first.
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
        # On the bar, to watch it fall (on a GPU that costs a wait at every step: see
        # the "Making it fast" episode).
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
            # One line per process: "rank 1/2 (local rank 1) on HOST uses cpu".
            cluster_tools.print_rank_line(self.trainer)
# [/docs:module]


# [docs:main]
def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    workers = cluster_tools.loader_workers(args.num_workers, args.accelerator, most=2)
    datamodule = MNISTDataModule(args.data_dir, args.batch_size, workers)
    if args.download_only:
        datamodule.prepare_data()
        print(f"MNIST is ready in {args.data_dir}")
        return
    cluster_tools.stop_if_data_unreachable("MNIST", args.data_dir,
                                           datamodule.is_downloaded(), MNIST.mirrors[0])
    cluster_tools.check_launch(args.devices, args.num_nodes)

    L.seed_everything(args.seed, workers=True)
    model = LitMLP(lr=args.lr)
    # best-epoch=N-val_acc=X.ckpt (tested at the end) and last.ckpt (for --resume)
    best_ckpt, last_ckpt = cluster_tools.checkpoint_callbacks(output_dir)
    callbacks = [best_ckpt, last_ckpt, *cluster_tools.cluster_callbacks()]
    if not args.no_progress_bar:
        # Redrawn every 10 steps: a batch job's log file grows by a line at each redraw.
        callbacks.append(TQDMProgressBar(refresh_rate=10))
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
        plugins=cluster_tools.cluster_plugins(),  # whose ranks; checkpoints saved whole
    )
    # Checkpoints can be written, and no other run uses output_dir: or stop now.
    cluster_tools.claim_output_dir(trainer, output_dir)
    # --resume: the checkpoint furthest on in output_dir, if any; else a fresh start.
    ckpt_path = cluster_tools.resume_checkpoint(trainer, model, output_dir, args.resume)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    # Test the best weights seen in validation (a fast-dev-run saves none). Both paths
    # are read first: test() restores the callbacks' state from the checkpoint it loads.
    best, last = best_ckpt.best_model_path, last_ckpt.best_model_path
    trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
    cluster_tools.print_summary(trainer, best, last)
# [/docs:main]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default="data",
                      help="folder holding MNIST/raw/ (default: %(default)s)")
    data.add_argument("--download-only", action="store_true",
                      help="download MNIST into --data-dir and exit")
    train = parser.add_argument_group("training")
    train.add_argument("--max-epochs", type=int, default=5, help="default: %(default)s")
    train.add_argument("--batch-size", type=int, default=128,
                       help="per device (default: %(default)s)")
    train.add_argument("--lr", type=float, default=1e-3,
                       help="Adam learning rate (default: %(default)s)")
    train.add_argument("--precision", default="32-true",
                       choices=["32-true", "16-mixed", "bf16-mixed"],
                       help="passed to the Trainer (default: %(default)s)")
    train.add_argument("--output-dir", default="runs/mnist",
                       help="logs/version_N/metrics.csv and checkpoints/ go here "
                            "(default: %(default)s)")
    # --accelerator, --devices, --num-nodes, --strategy, --num-workers, --seed,
    # --resume, --fast-dev-run, --no-progress-bar: the flags both scripts share.
    cluster_tools.add_shared_flags(parser)
    args = parser.parse_args(argv)
    cluster_tools.check_flags(parser, args)
    return args


if __name__ == "__main__":
    main()
