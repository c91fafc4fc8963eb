"""Where does the time go? Training throughput of cifar10_lightning.py against a plain loop.

Every number comes from one process on one device, after warm-up, on synthetic data of
CIFAR-10's shape (the speed does not depend on what the pixels show):

- a plain PyTorch loop over images already on the GPU: the reference;
- the Lightning script's own path (training images on the GPU, batch augmentation there),
  run in turns with the reference (--rounds), because the comparison rests on these two;
- the same pair at larger batches: Lightning's Python costs the same per step whatever the
  batch, so a batch that gives the GPU more work per step shows how much of the gap is
  the host's;
- the knobs the lesson discusses: fp32 vs bf16, channels_last, the progress bar, a training
  loss shown on it, the logger, self.log itself, the data in host memory, DDP and FSDP on one
  device, the classic per-image PIL pipeline, torch.compile (default, max-autotune, and
  reduce-overhead for the plain loop too);
- the MNIST script's epoch time against a plain loop over GPU tensors.

    python benchmark.py                     # on a GPU: the full set, a few minutes
    python benchmark.py --small             # anywhere: a tiny model and a few steps
    python benchmark.py --out results/      # results.json, results.csv, results.svg
    python benchmark.py --only larger-batches   # only the pair: batch 512, 1024, 2048

Keep it next to cifar10_lightning.py, mnist_lightning.py and cluster_tools.py: it imports them.
"""

import argparse
import csv
import json
import platform
import statistics
import sys
import tempfile
import time
import types
from datetime import date
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cifar10_lightning as cifar  # noqa: E402  (the script under test)
import mnist_lightning as mnist  # noqa: E402
from cluster_tools import loader_workers, usable_cpus  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------- plain PyTorch

def plain_cifar_loop(cfg, images, labels, precision="bf16", compile_mode=None,
                     channels_last=True) -> float:
    """The reference: the same model, augmentation, optimiser and schedule, written by hand."""
    device = cfg.device
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    net = cifar.MODELS[cfg.model]().to(device, memory_format=layout)
    if compile_mode:
        torch._dynamo.reset()  # compile afresh, not from an earlier row's cache
        net.compile(mode=compile_mode)
    mean = torch.tensor(cifar.CIFAR10_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(cifar.CIFAR10_STD, device=device).view(1, 3, 1, 1)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total = cfg.warmup + cfg.steps
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.05, total_steps=total, pct_start=0.25)
    images, labels = images.to(device), labels.to(device)  # resident: no loader at all
    order = torch.randperm(len(labels), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    net.train()
    for step in range(total):
        if step == cfg.warmup:
            sync(device)
            start = time.perf_counter()
        idx = order[(step * cfg.batch) % (len(order) - cfg.batch):][: cfg.batch]
        x = cifar.random_crop_flip(images[idx])
        x = ((x.float() - mean) / std).contiguous(memory_format=layout)
        with autocast:
            loss = F.cross_entropy(net(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    sync(device)
    return cfg.steps * cfg.batch / (time.perf_counter() - start)


# ------------------------------------------------------------------- Lightning

class SyntheticCIFAR10(cifar.CIFAR10DataModule):
    """The script's data module with random images instead of files: same loaders, same hooks."""

    def __init__(self, images, labels, batch_size, num_workers, data_on_device=None):
        super().__init__("unused", batch_size, num_workers, data_on_device)
        self.images, self.labels = images, labels

    def prepare_data(self):
        pass

    def setup(self, stage):
        self.train_set = TensorDataset(self.images, self.labels)
        self.place_train_set()


class Throughput(Callback):
    """Times training steps warmup .. warmup+steps, waiting for the GPU at both ends only."""

    def __init__(self, warmup, batch):
        self.warmup, self.batch = warmup, batch
        self.train_start = self.start = self.end = None
        self.steps = 0

    def on_train_start(self, trainer, pl_module):
        self.train_start = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        sync(pl_module.device)
        self.end = time.perf_counter()
        self.steps = trainer.global_step - self.warmup

    @property
    def images_per_s(self):
        return self.steps * self.batch / (self.end - self.start)

    @property
    def warmup_seconds(self):
        """The warm-up steps, with whatever they include (compiling, cuDNN's autotuning)."""
        return self.start - self.train_start


class LossOnProgressBar(cifar.LitClassifier):
    """The script's module with the training loss on the progress bar too, as mnist_lightning.py
    shows it: Lightning then reads a number back from the GPU after every step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("loss", loss, prog_bar=True)
        return loss


class NothingLogged(cifar.LitClassifier):
    """The script's module with self.log switched off: what logging one value per step costs
    the host (Lightning stores and checks every logged value, whether the logger writes it or not)."""

    def log(self, *args, **kwargs):
        pass


def lightning_cifar(cfg, images, labels, precision="bf16-mixed", strategy="auto", progress=None,
                    logger=True, compile_mode=None, wrap="block", num_workers=None, data_on_device=None,
                    timer=None, module=cifar.LitClassifier) -> float:
    """The script's LightningModule (or a variant: module) and data module under a Trainer, as
    cifar10_lightning.py builds them. Pass a Throughput as timer to read more than the images/s."""
    L.seed_everything(0, verbose=False)
    model = module(cfg.model, lr=0.05)
    if compile_mode:
        torch._dynamo.reset()  # compile afresh: the warm-up then includes all of it
        model.net.compile(mode=compile_mode)
    workers = cfg.workers if num_workers is None else num_workers
    data = SyntheticCIFAR10(images, labels, cfg.batch, workers, data_on_device)
    timer = timer or Throughput(cfg.warmup, cfg.batch)
    callbacks = [timer] + ([TQDMProgressBar(refresh_rate=progress)] if progress else [])
    if strategy == "fsdp":
        strategy = cifar.build_strategy(types.SimpleNamespace(
            strategy="fsdp", wrap_policy=wrap, min_params=100_000, sharding="FULL_SHARD",
            activation_checkpointing=False, checkpoint_format="full"))
    trainer = L.Trainer(
        accelerator=cfg.device.type if cfg.device.type == "cuda" else "cpu", devices=1, strategy=strategy,
        precision=precision, max_steps=cfg.warmup + cfg.steps, limit_val_batches=0, num_sanity_val_steps=0,
        benchmark=True, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=bool(progress), callbacks=callbacks, log_every_n_steps=20,
        logger=L.pytorch.loggers.CSVLogger(cfg.tmp, name="bench") if logger else False,
    )
    trainer.fit(model, datamodule=data)
    return timer.images_per_s


def loader_alone(cfg, images, labels) -> float:
    """The script's DataLoader without any training: how fast can it deliver batches?"""
    loader = DataLoader(TensorDataset(images, labels), batch_size=cfg.batch, shuffle=True, drop_last=True,
                        num_workers=cfg.workers, persistent_workers=cfg.workers > 0,
                        pin_memory=cfg.device.type == "cuda")
    def endless():
        while True:  # more steps than one epoch holds: start another epoch
            yield from loader

    batches = endless()
    # Workers prepare prefetch_factor (2) batches each before the first is asked for:
    # take those first, so that the clock sees only batches made while it runs.
    for _ in range(max(5, 2 * cfg.workers)):
        next(batches)
    start, n = time.perf_counter(), 0
    for _ in range(cfg.steps):
        x, _ = next(batches)
        x = x.to(cfg.device, non_blocking=True)
        n += len(x)
    sync(cfg.device)
    return n / (time.perf_counter() - start)


class PILImages(torch.utils.data.Dataset):
    """The classic path: one PIL image at a time through torchvision transforms."""

    def __init__(self, images, labels):
        self.images = images.permute(0, 2, 3, 1).numpy()  # HWC, as torchvision's CIFAR10 keeps them
        self.labels = labels
        T = torchvision.transforms
        self.transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize([m / 255 for m in cifar.CIFAR10_MEAN],
                                                [s / 255 for s in cifar.CIFAR10_STD])])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def classic_pipeline(cfg, images, labels, workers) -> float:
    loader = DataLoader(PILImages(images, labels), batch_size=cfg.batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, drop_last=True)

    def endless():
        while True:
            yield from loader

    batches = endless()
    # Start the workers and take the batches they prefetched (2 each) outside the timing:
    # counting those would overstate the pipeline's speed by up to a fifth with 15 workers.
    for _ in range(1 + 2 * workers):
        next(batches)
    steps = max(cfg.steps // 4, 4 * workers, 3)  # several rounds of every worker
    start = time.perf_counter()
    for _ in range(steps):
        next(batches)
    return steps * cfg.batch / (time.perf_counter() - start)


# ----------------------------------------------------------------------- MNIST

def mnist_epoch_seconds(cfg, lightning: bool, workers=None) -> float:
    """Seconds for one MNIST epoch (55,000 images, batch 128, Adam), second epoch timed."""
    device = cfg.device
    n = cfg.mnist_images
    images = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,))
    if lightning:
        class Synthetic(mnist.MNISTDataModule):
            def prepare_data(self):
                pass

            def setup(self, stage):
                self.train_set = TensorDataset(images, labels)

        class EpochTimer(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                sync(device)
                self.start = time.perf_counter()

            def on_train_epoch_end(self, trainer, pl_module):
                sync(device)
                self.seconds = time.perf_counter() - self.start

        timer = EpochTimer()
        if workers is None:
            workers = loader_workers("auto", "auto", most=2)  # mnist_lightning.py's default here
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, max_epochs=2,
                            limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                            enable_model_summary=False, callbacks=[timer, TQDMProgressBar(refresh_rate=10)],
                            log_every_n_steps=20, logger=L.pytorch.loggers.CSVLogger(cfg.tmp, name="mnist"))
        trainer.fit(mnist.LitMLP(), datamodule=Synthetic("unused", 128, workers))
        return timer.seconds

    torch.manual_seed(0)
    model = mnist.MLP().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images, labels = images.to(device), labels.to(device)
    for epoch in range(2):
        sync(device)
        start = time.perf_counter()
        for idx in torch.randperm(n, device=device).split(128):
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
    return time.perf_counter() - start


# ------------------------------------------------------------------------ main

def environment(device) -> dict:
    return {
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpus": usable_cpus(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightning": L.__version__,
    }


# Groups of rows for --skip and --only. The pair at the top always runs: every ratio needs it.
GROUPS = ["larger-batches", "knobs", "fsdp", "loader", "classic", "mnist",
          "compile", "plain-compile", "reduce-overhead", "max-autotune"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true",
                        help="the small CNN, a few steps, no compile and no FSDP: runs anywhere in seconds")
    parser.add_argument("--model", choices=sorted(cifar.MODELS), default=None,
                        help="default: resnet18, or cnn with --small")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 512, or 32 with --small")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default: 150, or 5 with --small)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="runs of the plain loop and of the script's path, alternately (default: 3, or 2 with --small)")
    parser.add_argument("--larger-batches", type=int, nargs="*", default=None,
                        help="batch sizes for the pair again (default: 2 and 4 times --batch-size, "
                             "or 2 times with --small)")
    parser.add_argument("--skip", nargs="*", default=[], choices=GROUPS, help="leave out these groups of rows")
    parser.add_argument("--only", nargs="*", default=[], choices=GROUPS,
                        help="after the pair, run only these groups of rows")
    parser.add_argument("--out", default="benchmark-results", help="folder for results.json/.csv/.svg")
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error("--rounds must be at least 1")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = args.small or device.type != "cuda"
    cfg = types.SimpleNamespace(
        device=device,
        model=args.model or ("cnn" if small else "resnet18"),
        batch=args.batch_size or (32 if small else 512),
        warmup=3 if small else 30,
        steps=args.steps or (5 if small else 150),
        rounds=args.rounds or (2 if small else 3),
        workers=loader_workers("auto", "auto", most=4),  # cifar10_lightning.py's default here
        mnist_images=2_000 if small else 55_000,
        tmp=Path(tempfile.mkdtemp(prefix="benchmark-logs-")),  # the Trainers' logs are not results
    )
    cfg.larger_batches = (args.larger_batches if args.larger_batches is not None
                          else [2 * cfg.batch] if small else [2 * cfg.batch, 4 * cfg.batch])
    n_images = 2_000 if small else 50_000
    # The plain loop slices its batches out of the synthetic images: each batch needs fewer.
    if not all(0 < b < n_images for b in [cfg.batch, *cfg.larger_batches]):
        parser.error(f"--batch-size and --larger-batches must be between 1 and {n_images - 1:,} "
                     f"(the number of synthetic images{' in the small mode' if small else ''}, less one)")
    skip = set(args.skip) | ({"compile", "fsdp"} if small else set())
    if device.type != "cuda":
        skip.add("fsdp")
    only = set(args.only)

    def wanted(*groups):
        """A group of rows runs unless one of its names is skipped, or --only names none of them."""
        return not skip & set(groups) and (not only or bool(only & set(groups)))

    torch.manual_seed(0)
    images = torch.randint(0, 256, (n_images, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (n_images,))
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.benchmark = True

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"environment": environment(device), "config": {"model": cfg.model, "batch_size": cfg.batch,
              "timed_steps": cfg.steps, "warmup_steps": cfg.warmup, "workers": cfg.workers,
              "rounds": cfg.rounds, "larger_batches": cfg.larger_batches},
              "results": [], "ratios": {}}
    results = report["results"]

    last_row = [time.perf_counter()]

    def record(group, name, value, unit="images/s", runs=None):
        row = {"group": group, "name": name, "value": round(value, 3 if unit == "s" else 0), "unit": unit}
        if runs:  # a row measured several times: value is their median, runs keeps each one
            row["runs"] = [round(r) for r in runs]
        results.append(row)
        took, last_row[0] = time.perf_counter() - last_row[0], time.perf_counter()  # to plan a GPU booking
        print(f"{group:<10} {name:<46} {value:>12,.{3 if unit == 's' else 0}f} {unit:<8} (row took {took:.0f} s)",
              flush=True)
        report["ratios"] = ratios_of(results)
        write_results(report, out)  # after every row: a run that is cut short keeps what it measured

    bf16 = "bf16-mixed" if device.type == "cuda" else "32-true"
    # The two rows that the lesson's claim rests on. One run of a row can differ from the next by
    # a tenth or more on a shared machine, and a single run of each, minutes apart, can decide
    # the comparison by chance. So they take turns, and each row shows its median: a slow
    # moment of the machine falls on both, and one odd run moves neither median far.
    def pair(cfg):
        plain_runs, script_runs = [], []
        for _ in range(cfg.rounds):
            plain_runs.append(plain_cifar_loop(cfg, images, labels, "bf16" if device.type == "cuda" else "fp32"))
            script_runs.append(lightning_cifar(cfg, images, labels, bf16, progress=10))
        return plain_runs, script_runs

    plain_runs, script_runs = pair(cfg)
    record("reference", "plain loop, data on device, bf16" if device.type == "cuda" else "plain loop, fp32",
           statistics.median(plain_runs), runs=plain_runs)
    record("lightning", "script path (progress bar every 10 steps)", statistics.median(script_runs),
           runs=script_runs)
    if wanted("larger-batches"):
        # Lightning's hooks and self.log cost the CPU the same time per step at any batch size;
        # with more images per step the GPU's share grows, and the CPU can stay ahead of it.
        for batch in cfg.larger_batches:
            plain_runs, script_runs = pair(types.SimpleNamespace(**{**vars(cfg), "batch": batch}))
            record("batch", f"plain loop, batch {batch}", statistics.median(plain_runs), runs=plain_runs)
            record("batch", f"script path, batch {batch}", statistics.median(script_runs), runs=script_runs)
    if wanted("knobs"):
        if device.type == "cuda":
            record("precision", "plain loop, fp32 (TF32 matmuls)", plain_cifar_loop(cfg, images, labels, "fp32"))
            record("layout", "plain loop, bf16, without channels_last",
                   plain_cifar_loop(cfg, images, labels, "bf16", channels_last=False))
        record("lightning", "no progress bar", lightning_cifar(cfg, images, labels, bf16))
        record("lightning", "progress bar every step (Lightning default)",
               lightning_cifar(cfg, images, labels, bf16, progress=1))
        record("lightning", "no progress bar, no logger", lightning_cifar(cfg, images, labels, bf16, logger=False))
        record("lightning", "nothing logged (self.log switched off)",
               lightning_cifar(cfg, images, labels, bf16, progress=10, module=NothingLogged))
        record("lightning", "loss on the progress bar, read back every step",
               lightning_cifar(cfg, images, labels, bf16, progress=10, module=LossOnProgressBar))
        record("data", "script with --no-data-on-device (host memory)",
               lightning_cifar(cfg, images, labels, bf16, progress=10, data_on_device=False))
        record("strategy", "DDP on one device", lightning_cifar(cfg, images, labels, bf16, strategy="ddp"))
    if wanted("fsdp"):
        for wrap in ("none", "block", "size"):
            record("strategy", f"FSDP on one device (runs as NO_SHARD), wrap policy {wrap}",
                   lightning_cifar(cfg, images, labels, bf16, strategy="fsdp", wrap=wrap))
    if wanted("loader"):
        record("data", "script's DataLoader alone (uint8, no training)", loader_alone(cfg, images, labels))
    if wanted("classic"):
        for workers in sorted({min(w, usable_cpus()) for w in ((0,) if small else (4, 8, 15))}):
            record("data", f"classic PIL pipeline alone, {workers} workers",
                   classic_pipeline(cfg, images, labels, workers))
    # The slowest group, compiling, comes last: a run that is cut short still has the rest.
    if wanted("mnist"):
        record("mnist", "plain loop over tensors on the device, one epoch", mnist_epoch_seconds(cfg, False), "s")
        record("mnist", "mnist_lightning.py path, one epoch", mnist_epoch_seconds(cfg, True), "s")
        record("mnist", "mnist_lightning.py path, no loader workers", mnist_epoch_seconds(cfg, True, 0), "s")
    if wanted("compile"):
        timer = Throughput(cfg.warmup, cfg.batch)
        record("compile", "script path + --compile", lightning_cifar(cfg, images, labels, bf16, progress=10,
                                                                      compile_mode="default", timer=timer))
        record("compile", f"script path + --compile: first {cfg.warmup} steps incl. compiling",
               timer.warmup_seconds, "s")
    if wanted("compile", "plain-compile"):
        record("compile", "plain loop + torch.compile", plain_cifar_loop(cfg, images, labels, "bf16", "default"))
    if wanted("compile", "reduce-overhead"):
        # CUDA graphs: the GPU replays a recorded pass, and the CPU no longer launches every kernel.
        # The plain loop gets them too, so that the two compiled rows also do the same work.
        timer = Throughput(cfg.warmup, cfg.batch)
        record("compile", "script path + --compile --compile-mode reduce-overhead",
               lightning_cifar(cfg, images, labels, bf16, progress=10, compile_mode="reduce-overhead", timer=timer))
        record("compile", f"script path + reduce-overhead: first {cfg.warmup} steps incl. compiling",
               timer.warmup_seconds, "s")
        record("compile", "plain loop + torch.compile reduce-overhead",
               plain_cifar_loop(cfg, images, labels, "bf16", "reduce-overhead"))
    if wanted("compile", "max-autotune"):  # the slowest row of all: last
        timer = Throughput(cfg.warmup, cfg.batch)
        record("compile", "script path + --compile --compile-mode max-autotune",
               lightning_cifar(cfg, images, labels, bf16, progress=10, compile_mode="max-autotune", timer=timer))
        record("compile", f"script path + max-autotune: first {cfg.warmup} steps incl. compiling",
               timer.warmup_seconds, "s")

    for name, ratio in report["ratios"].items():
        print(f"ratio      {name:<46} {ratio:>12.2f}")
    plot(report, out / "results.svg")
    print(f"wrote {out / 'results.json'}, results.csv and results.svg")


# Each ratio divides one row by another, once both have been measured.
RATIOS = {
    "lightning_script_vs_plain": ("script path (progress bar every 10 steps)", "reference"),
    "lightning_no_bar_vs_plain": ("no progress bar", "reference"),
    "host_memory_loader_vs_data_on_device": ("script with --no-data-on-device (host memory)",
                                             "script path (progress bar every 10 steps)"),
    "loss_on_bar_vs_script": ("loss on the progress bar, read back every step",
                              "script path (progress bar every 10 steps)"),
    "nothing_logged_vs_script": ("nothing logged (self.log switched off)",
                                 "script path (progress bar every 10 steps)"),
    "compiled_script_vs_plain": ("script path + --compile", "reference"),
    "reduce_overhead_script_vs_plain": ("script path + --compile --compile-mode reduce-overhead", "reference"),
    "reduce_overhead_script_vs_plain_reduce_overhead": ("script path + --compile --compile-mode reduce-overhead",
                                                        "plain loop + torch.compile reduce-overhead"),
    "max_autotune_script_vs_plain": ("script path + --compile --compile-mode max-autotune", "reference"),
    "channels_last_vs_contiguous": ("reference", "plain loop, bf16, without channels_last"),
    "mnist_lightning_epoch_vs_plain": ("mnist_lightning.py path, one epoch",
                                       "plain loop over tensors on the device, one epoch"),
    "mnist_no_workers_epoch_vs_plain": ("mnist_lightning.py path, no loader workers",
                                        "plain loop over tensors on the device, one epoch"),
}


def ratios_of(results) -> dict:
    value = {r["name"]: r["value"] for r in results}
    value["reference"] = results[0]["value"]  # the first row, the plain loop
    pairs = dict(RATIOS)
    for r in results:  # the pair again at a larger batch: script_vs_plain_batch_1024 and so on
        if r["name"].startswith("script path, batch "):
            batch = r["name"].rsplit(" ", 1)[1]
            pairs[f"script_vs_plain_batch_{batch}"] = (r["name"], f"plain loop, batch {batch}")
    return {name: round(value[a] / value[b], 3) for name, (a, b) in pairs.items() if a in value and b in value}


def write_results(report, out: Path):
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["group", "run", "value", "unit", "separate runs (value: their median)"])
        writer.writerows([r["group"], r["name"], f"{r['value']:,.{3 if r['unit'] == 's' else 0}f}", r["unit"],
                          " / ".join(f"{v:,}" for v in r.get("runs", []))]
                         for r in report["results"])


def plot(report, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    rows = [r for r in report["results"] if r["unit"] == "images/s"]
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(rows) + 1.2))
    colours = {"reference": "#444444", "precision": "#8c6d31", "layout": "#8c6d31", "lightning": "#3b6ea5",
               "strategy": "#b5533c",
               "data": "#6b8e23", "compile": "#7b4ea3"}
    ax.barh([r["name"] for r in rows], [r["value"] for r in rows], color=[colours.get(r["group"], "grey") for r in rows])
    for y, r in enumerate(rows):  # the separate runs of a row measured in turns, as ticks on its bar
        ax.plot(r.get("runs", []), [y] * len(r.get("runs", [])), "|", color="black", markersize=9)
    ax.invert_yaxis()
    ax.set_xlabel("images per second: trained, or delivered by a data path alone (higher is better)")
    env = report["environment"]
    ax.set_title(f"{report['config']['model']}, batch {report['config']['batch_size']}, {env['device']}\n"
                 f"torch {env['torch']}, Lightning {env['lightning']}, {env['date']}", fontsize=9)
    for bar, r in zip(ax.patches, rows):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {r['value']:,.0f}", va="center", fontsize=8)
    ax.margins(x=0.15)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)


if __name__ == "__main__":
    main()
