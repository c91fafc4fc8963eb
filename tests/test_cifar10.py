"""The CIFAR-10 script on CPU and tiny learnable data, and its FSDP wrap policies."""

import csv
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

import cluster_tools
from conftest import (EXAMPLES, TINY_CIFAR_TRAIN, assert_offline_stop, finished_steps, last_value, learner_environ,
                      load_example, metrics_files, read_metrics, run_script)
from tiny_data import write_tiny_cifar10

BATCH = 32
STEPS_PER_EPOCH = TINY_CIFAR_TRAIN // BATCH  # the training loader drops the last partial batch
CPU = ("--accelerator", "cpu", "--no-progress-bar")


def test_cnn_learns_on_cpu(cifar_dir, tmp_path):
    out = tmp_path / "cnn"
    result = run_script("cifar10_lightning.py", "--data-dir", cifar_dir, "--output-dir", out, *CPU,
                        "--model", "cnn", "--max-epochs", 3, "--batch-size", BATCH)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    assert last_value(rows, "test_acc") > 0.5  # chance is 0.1
    assert finished_steps(result.stdout) == 3 * STEPS_PER_EPOCH
    assert "lr-SGD" in rows[0]  # the LearningRateMonitor logs the schedule
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert (out / "checkpoints" / "last.ckpt").exists()


def test_resnet18_learns_on_cpu(tmp_path):
    # ResNet-18 costs ~20x the CNN per image, so it gets an even tinier data set.
    data = write_tiny_cifar10(tmp_path / "data", per_batch=20, n_test=50)
    out = tmp_path / "resnet"
    result = run_script("cifar10_lightning.py", "--data-dir", data, "--output-dir", out, *CPU,
                        "--model", "resnet18", "--max-epochs", 4, "--batch-size", 10)
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_value(read_metrics(out), "test_acc") > 0.3


def test_ddp_on_cpu_splits_the_data_between_two_processes(cifar_dir, tmp_path):
    out = tmp_path / "ddp"
    result = run_script("cifar10_lightning.py", "--data-dir", cifar_dir, "--output-dir", out, *CPU,
                        "--devices", 2, "--strategy", "ddp", "--max-epochs", 1, "--batch-size", BATCH,
                        "--data-on-device")  # the GPU default: the loader deals out indices
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 0/2" in result.stdout and "rank 1/2" in result.stdout
    assert "effective batch size: 32 per device x 2 devices = 64" in result.stdout
    assert finished_steps(result.stdout) == (TINY_CIFAR_TRAIN // 2) // BATCH


def one_cycle_rate(cifar_script, total_steps: int, after: int) -> float:
    """The learning rate the script's schedule for total_steps gives after `after` steps,
    replayed with its own configure_optimizers and the script's default --lr."""
    args = cifar_script.parse_args(["--accelerator", "cpu"])
    model = cifar_script.LitClassifier("cnn", lr=args.lr, weight_decay=args.weight_decay)
    model._trainer = types.SimpleNamespace(estimated_stepping_batches=total_steps)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    for _ in range(after):
        optimizer.step()
        scheduler.step()
    return optimizer.param_groups[0]["lr"]


def test_killed_run_resumes_from_last_checkpoint_with_its_schedule(cifar_script, cifar_dir, tmp_path):
    out = tmp_path / "resume"
    # Early stopping as well: resumed from last.ckpt it once crashed (no val_acc yet).
    # Patience 3 cannot end a 4-epoch run early.
    args = ["--data-dir", cifar_dir, "--output-dir", out, *CPU, "--batch-size", BATCH, "--data-on-device",
            "--max-epochs", 4, "--early-stop-patience", 3]
    # Kill the run the way a time limit or a node failure would, once it has
    # written its first end-of-epoch checkpoint (Lightning writes it atomically).
    run = subprocess.Popen([sys.executable, EXAMPLES / "cifar10_lightning.py", *map(str, args)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**learner_environ(), "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "checkpoints" / "last.ckpt").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.kill()
    killed_output = run.communicate()[0]
    assert "finished after" not in killed_output, "the run ended before it could be killed"

    # Where the killed run stopped: resuming overwrites last.ckpt.
    killed = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    killed_step, killed_epoch = killed["global_step"], killed["epoch"]
    assert 0 < killed_step < 4 * STEPS_PER_EPOCH

    resumed = run_script("cifar10_lightning.py", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # (The test after fit restores the best checkpoint with a line of the same kind.)
    restored = f"Restoring states from the checkpoint path at {out / 'checkpoints' / 'last.ckpt'}"
    assert restored in resumed.stdout + resumed.stderr
    assert finished_steps(resumed.stdout) == 4 * STEPS_PER_EPOCH
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4 * STEPS_PER_EPOCH
    # The resumed run logs to a new file and trains only the steps and epochs still to do.
    assert [p.parent.name for p in metrics_files(out)] == ["version_0", "version_1"]
    with open(metrics_files(out)[1], newline="") as f:
        rows = list(csv.DictReader(f))
    assert all(int(r["step"]) >= killed_step for r in rows), (killed_step, [r["step"] for r in rows])
    val_epochs = [int(r["epoch"]) for r in rows if r.get("val_acc")]
    assert val_epochs == list(range(killed_epoch + 1, 4)), (killed_epoch, val_epochs)
    # The learning rate carries on along the schedule planned for all four epochs.
    first_lr = next(r for r in rows if r.get("lr-SGD"))
    assert float(first_lr["lr-SGD"]) == pytest.approx(
        one_cycle_rate(cifar_script, 4 * STEPS_PER_EPOCH, after=int(first_lr["step"])))
    # (Resuming with more epochs than planned is refused: test_page_commands.py runs the
    # training-pipeline exercise that shows it.)


# ------------------------------------------------------- FSDP2: two ranks on the CPU

VIT = ("--model", "vit", "--vit-width", 64)  # 0.2 M parameters: a few seconds an epoch


def held_megabytes(output: str) -> dict[int, float]:
    """{rank: MB} from the lines 'rank R/W: parameters, gradients and optimizer state: X MB'."""
    found = re.findall(r"^rank (\d+)/\d+: parameters, gradients and optimizer state: ([\d.]+) MB$", output, re.M)
    return {int(rank): float(mb) for rank, mb in found}


def run_until_epoch_saved(args: list, checkpoint: Path, epoch: int) -> str:
    """Start the script as a learner would, and stop it (all its ranks) as a time limit or a
    node failure would, once `checkpoint` (a sharded folder) holds the end of `epoch`."""
    run = subprocess.Popen([sys.executable, EXAMPLES / "cifar10_lightning.py", *map(str, args)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env={**learner_environ(), "OMP_NUM_THREADS": "1"})

    def saved_epoch() -> int:
        try:  # rank 0 writes meta.pt last; a half-written one does not load yet
            return torch.load(checkpoint / "meta.pt", map_location="cpu", weights_only=False)["epoch"]
        except (OSError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError):
            return -1

    deadline = time.monotonic() + 120
    while saved_epoch() < epoch and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    output = run.communicate()[0]
    assert saved_epoch() == epoch and "finished after" not in output, output[-3000:]
    return output


def test_fsdp2_shards_on_two_cpu_ranks_and_a_stopped_run_continues_on_one(cifar_dir, tmp_path):
    # (fsdp.md's Exercise 3 compares what a rank holds under DDP and FSDP2, and its Exercise 4
    # continues a one-process checkpoint on two processes; test_page_commands.py runs both.)
    out = tmp_path / "fsdp2"
    last = out / "checkpoints" / "last.ckpt"
    # One effective batch of 32 on either count (2 x 16, then 1 x 32): the one-cycle schedule
    # planned for 2 epochs of 14 steps holds.
    common = ["--data-dir", cifar_dir, "--output-dir", out, *CPU, *VIT, "--strategy", "fsdp2", "--max-epochs", 2]
    first = run_until_epoch_saved([*common, "--devices", 2, "--batch-size", 16], last, epoch=0)
    # Each rank holds half of every parameter, gradient and momentum buffer, and saved its half.
    held = held_megabytes(first)
    assert set(held) == {0, 1} and abs(held[0] - held[1]) <= 0.15, held  # halves of 2.5 MB
    assert {p.name for p in last.iterdir()} == {".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"}

    # Stopped after epoch 0 on two ranks; one rank reads both halves and trains epoch 1 (with
    # the gradient norm clipped, which FSDP2 allows and Lightning's FSDP1 does not).
    second = run_script("cifar10_lightning.py", *common, "--devices", 1, "--batch-size", 32, "--resume",
                        "--grad-clip", 1.0)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in second.stdout + second.stderr
    assert held_megabytes(second.stdout)[0] == pytest.approx(held[0] + held[1], abs=0.15)  # all of it
    assert finished_steps(second.stdout) == 2 * (TINY_CIFAR_TRAIN // 32)
    rows = read_metrics(out)
    assert [int(r["epoch"]) for r in rows if r.get("val_acc")] == [0, 1]
    assert last_value(rows, "test_acc") > 0.5


@pytest.fixture(scope="module")
def cifar_script():
    return load_example("cifar10_lightning")


# --num-nodes 2 asks Lightning whether SLURM runs this; on a machine with srun it warns.
@pytest.mark.filterwarnings("ignore:The `srun` command is available")
@pytest.mark.parametrize(
    "flags, expected",
    [
        # The shared flags' checks are tested once, in test_cluster_tools.py.
        (("--model", "vgg"), "invalid choice: 'vgg'"),
        (("--accelerator", "mps"), "invalid choice: 'mps'"),
        (("--precision", "64-true"), "invalid choice: '64-true'"),
        (("--wrap-policy", "layer"), "invalid choice: 'layer'"),
        (("--strategy", "fsdp", "--min-params", "0"), "--min-params must be at least 1"),
        # This script offers fsdp2, which runs on CPUs; the MNIST script suggests ddp alone.
        (("--strategy", "fsdp", "--accelerator", "cpu"), "use --strategy fsdp2 or ddp on CPU"),
        (("--wrap-policy", "size"), "--wrap-policy only applies with --strategy fsdp"),
        (("--checkpoint-format", "sharded", "--strategy", "ddp"),
         "--checkpoint-format only applies with --strategy fsdp"),
        (("--strategy", "fsdp", "--grad-clip", "1"),
         "--grad-clip clips the gradient norm, which Lightning 2.6 refuses under --strategy fsdp"),
        (("--vit-depth", "8"), "--vit-depth only applies with --model vit"),
        (("--model", "vit", "--vit-width", "100"), "--vit-width must be a multiple of 32"),
        (("--strategy", "fsdp2", "--sharding", "NO_SHARD"),
         "--sharding NO_SHARD does not work with --strategy fsdp2"),
        (("--strategy", "fsdp2", "--compile"), "--compile does not work with --strategy fsdp2"),
        (("--strategy", "fsdp2", "--precision", "16-mixed"),
         "--precision 16-mixed does not work with --strategy fsdp2"),
    ],
)
def test_bad_flags_give_one_clear_line(cifar_script, capsys, flags, expected):
    # In-process: the command-line runs below show the same errors reach a learner's
    # terminal as one line without a traceback.
    with pytest.raises(SystemExit) as stopped:
        cifar_script.parse_args(list(flags))
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and expected in errors[0], errors


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_a_gpu_without_one_is_refused(cifar_dir, tmp_path):
    result = run_script("cifar10_lightning.py", "--data-dir", cifar_dir, "--output-dir", tmp_path, "--accelerator", "gpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "PyTorch sees no GPU" in result.stderr.splitlines()[-1]


def test_offline_missing_data_names_the_download_command(tmp_path):
    if cluster_tools.can_reach(load_example("cifar10_lightning").torchvision.datasets.CIFAR10.url):
        pytest.skip("this machine can reach the CIFAR-10 server, so the offline path cannot be shown")
    result = run_script("cifar10_lightning.py", "--data-dir", tmp_path / "none", "--output-dir", tmp_path, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"--data-dir {tmp_path / 'none'} --download-only" in result.stderr


def test_offline_missing_data_stops_with_the_download_command_in_process(cifar_script, monkeypatch, capsys,
                                                                        tmp_path):
    assert_offline_stop(cifar_script, "cifar10_lightning.py", "CIFAR-10", tmp_path, monkeypatch, capsys)


def test_random_crop_flip_moves_and_mirrors_each_image_independently():
    module = load_example("cifar10_lightning")
    torch.manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    out = module.random_crop_flip(images)
    assert out.shape == images.shape and out.dtype == torch.uint8
    # Every output image is some crop (possibly mirrored) of its own padded input.
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    kinds = set()
    for i in range(len(images)):
        matches = [(top, left, flip) for top in range(9) for left in range(9) for flip in (False, True)
                   if torch.equal(out[i], (lambda c: c.flip(-1) if flip else c)(padded[i, :, top:top + 32, left:left + 32]))]
        assert matches, f"image {i} is not a crop of its input"
        kinds.add(matches[0])
    assert len(kinds) > 10  # offsets and flips differ from image to image


@pytest.mark.parametrize("total_steps", [1, 2, 3, 4, 5, 8, 100])
def test_one_cycle_schedule_survives_very_short_runs(cifar_script, total_steps):
    # Tiny data with a big batch gives a handful of steps; with exactly four, a 25% warm-up
    # lasts one step and OneCycleLR divided by zero (found by running a page's command).
    model = cifar_script.LitClassifier("cnn", lr=0.1)
    model._trainer = types.SimpleNamespace(estimated_stepping_batches=total_steps)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for step in range(total_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if step < total_steps - 1:  # the last step's schedule update is never used
            scheduler.step()
    assert all(0 < r <= 0.1 + 1e-9 for r in rates), rates
    if total_steps >= 8:
        assert max(rates) == pytest.approx(0.1, rel=0.05) and rates[-1] < rates[0]  # up, then down


# ----------------------------------------------------------------- FSDP wrap policies

@pytest.fixture(scope="module")
def gloo_group():
    """A one-process gloo group, so torch's FSDP can wrap a model on the CPU."""
    import torch.distributed as dist

    # A store of its own on a free port, given directly: setting MASTER_PORT in os.environ
    # instead leaked into every later script run by this pytest process, and their DDP ranks
    # then met on that one port (two-rank runs hung, a requeued SLURM job failed to start).
    store = dist.TCPStore("127.0.0.1", 0, world_size=1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    del store


def fsdp_units(model, policy) -> dict[str, torch.nn.Module]:
    """Wrap with torch's FSDP and return {qualified name: module} of every sharded unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with warnings.catch_warnings():
        # With one process there is nothing to shard; FSDP says so, and that is expected here.
        warnings.filterwarnings("ignore", "FSDP is switching to use `NO_SHARD`", UserWarning)
        wrapped = FSDP(model, auto_wrap_policy=policy, device_id=torch.device("cpu"))
    return {
        name.replace("_fsdp_wrapped_module.", "").removesuffix("_fsdp_wrapped_module").rstrip("."): unit.module
        for name, unit in wrapped.named_modules()
        if isinstance(unit, FSDP)
    }


@pytest.mark.parametrize("model_name", ["cnn", "resnet18"])
def test_wrap_policy_none_makes_one_unit(gloo_group, model_name):
    module = load_example("cifar10_lightning")
    assert list(fsdp_units(module.MODELS[model_name](), module.wrap_policy("none", 1))) == [""]


@pytest.mark.parametrize("model_name, block, count", [("cnn", "ConvBlock", 4), ("resnet18", "BasicBlock", 8)])
def test_wrap_policy_block_wraps_every_block_and_nothing_else(gloo_group, model_name, block, count):
    module = load_example("cifar10_lightning")
    units = fsdp_units(module.MODELS[model_name](), module.wrap_policy("block", 1))
    inner = [type(m).__name__ for name, m in units.items() if name]
    assert inner == [block] * count


def smallest_subtrees_with(model, min_params: int) -> set[str]:
    """The size rule in plain words: bottom up, a submodule becomes a unit as soon as
    the parameters it holds outside smaller units reach min_params."""
    units = set()

    def unwrapped_params(name, module):
        count = sum(p.numel() for p in module.parameters(recurse=False))
        for child_name, child in module.named_children():
            count += unwrapped_params(f"{name}.{child_name}" if name else child_name, child)
        if name and count >= min_params:
            units.add(name)
            return 0
        return count

    unwrapped_params("", model)
    return units


@pytest.mark.parametrize("model_name", ["cnn", "resnet18"])
def test_wrap_policy_size_wraps_the_smallest_large_enough_subtrees(gloo_group, model_name):
    module = load_example("cifar10_lightning")
    min_params = 100_000
    expected = smallest_subtrees_with(module.MODELS[model_name](), min_params)
    units = fsdp_units(module.MODELS[model_name](), module.wrap_policy("size", min_params))
    assert set(units) - {""} == expected
    assert expected  # the rule does pick something in both models
    if model_name == "resnet18":
        # fsdp.md's solution: a BasicBlock of layer1 is too small, so layer1 is one unit.
        assert "layer1" in units and "layer1.0" not in units


@pytest.mark.parametrize("policy", ["none", "block", "size"])
@pytest.mark.parametrize("model_name", ["cnn", "resnet18", "vit"])
def test_fsdp2_shards_the_units_that_fsdp1_wraps(gloo_group, model_name, policy):
    # --wrap-policy means the same with both: FSDP1's auto-wrap policy picks the units it
    # wraps, FSDP2's shard_units the modules that get a fully_shard call of their own.
    module = load_example("cifar10_lightning")
    wrapped = set(fsdp_units(module.MODELS[model_name](), module.wrap_policy(policy, 100_000))) - {""}
    net = module.MODELS[model_name]()
    names = {unit: name for name, unit in net.named_modules()}
    sharded = [names[unit] for unit in module.shard_units(net, policy, 100_000)]
    assert set(sharded) == wrapped and len(sharded) == len(wrapped)
    assert bool(sharded) == (policy != "none")


@pytest.mark.parametrize("wrap", ["none", "block"])
def test_hybrid_shard_is_told_the_nodes_by_devices_layout(wrap):
    # Without a device mesh, Lightning refuses HYBRID_SHARD with no wrap policy (a raw
    # RuntimeError), and torch takes every visible GPU for one node.
    module = load_example("cifar10_lightning")
    # (parse_args refuses FSDP on this CPU, and two nodes outside SLURM: set them after.)
    args = module.parse_args(["--accelerator", "cpu", "--devices", "4"])
    args.strategy, args.wrap_policy, args.sharding = "fsdp", wrap, "HYBRID_SHARD"
    args.num_nodes = 2
    strategy = module.build_strategy(args)
    assert strategy.kwargs["device_mesh"] == (2, 4)  # (replicas: nodes, shards: devices)
    args.sharding = "FULL_SHARD"
    assert "device_mesh" not in module.build_strategy(args).kwargs


@pytest.mark.parametrize("bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")])
def test_default_precision_follows_what_the_gpu_computes_in(monkeypatch, bf16, expected):
    # A GPU without bfloat16 arithmetic (a V100) gets float16; the check runs without a GPU
    # by answering torch's two questions here.
    module = load_example("cifar10_lightning")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert module.parse_args([]).precision == "auto"  # the flag's default, as --help says
    assert module.choose_precision("auto", "auto", "ddp") == expected
    assert module.choose_precision("32-true", "auto", "ddp") == "32-true"
    assert module.choose_precision("auto", "cpu", "ddp") == "32-true"
    # Lightning's FSDP2 strategy takes no float16: 32-bit floats on such a GPU.
    assert module.choose_precision("auto", "auto", "fsdp2") == ("bf16-mixed" if bf16 else "32-true")


def test_batch_larger_than_a_devices_share_stops_with_one_line(cifar_dir, tmp_path):
    # The training loader drops an incomplete batch: with fewer images than one batch
    # there is no step at all, and the schedule would divide by zero.
    result = run_script("cifar10_lightning.py", "--data-dir", cifar_dir, "--output-dir", tmp_path / "big",
                        *CPU, "--batch-size", 1024, "--max-epochs", 1, "--no-progress-bar")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: each device gets fewer training images than --batch-size" in result.stderr


def test_training_steps_do_not_wait_for_the_device(cifar_script, cifar_dir, tmp_path, monkeypatch):
    # Each .item() copies a number back from the GPU and makes the CPU wait for it to finish
    # its queue. Lightning calls it after every step for each progress-bar value: train_loss
    # must go only to the logger, which reads it every 20 steps (here never: 14 steps).
    import lightning as L

    reads = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: reads.append(1) or item(t))
    data = cifar_script.CIFAR10DataModule(str(cifar_dir), BATCH, 0, data_on_device=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_val_batches=0, num_sanity_val_steps=0,
                        log_every_n_steps=20, logger=L.pytorch.loggers.CSVLogger(tmp_path),
                        callbacks=[L.pytorch.callbacks.TQDMProgressBar(refresh_rate=10)],
                        enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(cifar_script.LitClassifier("cnn"), datamodule=data)
    assert trainer.global_step == STEPS_PER_EPOCH
    assert len(reads) <= 2, f"{len(reads)} reads back in {STEPS_PER_EPOCH} steps"
