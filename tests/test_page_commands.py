"""Every command a learner is asked to run in an exercise or a solution runs here, and what
the solutions say about their results holds on the tiny data.

page_commands.py finds the commands on the pages and runs them in a folder that looks like
the repository to the learner; its docstring says how, and what counts as passing.
"""

import ast
import csv
import json
import math
import re
import statistics
import subprocess
import sys

import pytest
import torch

from conftest import REPO, TINY_CIFAR_TRAIN, TINY_MNIST_TRAIN, finished_steps, load_example, read_metrics
from page_commands import COMMANDS, NOT_RUN, RUNNABLE, SBATCH_TESTS, PageFolder, commands_on, gpus, matches, params


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    made = {}

    def folder(page: str) -> PageFolder:
        if page not in made:
            made[page] = PageFolder(tmp_path_factory.mktemp(page.removesuffix(".md")), page)
        return made[page]

    return folder


@pytest.mark.parametrize("command", params())
def test_command_shown_in_an_exercise_or_solution_works(folders, command):
    if command.gpus_needed > gpus():
        pytest.skip(f"asks for {command.gpus_needed} GPUs; PyTorch sees {gpus()}")
    result = folders(command.page).run(command)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output[-4000:]
    if command.expects_error:
        assert result.returncode != 0, output[-3000:]
    else:
        assert result.returncode == 0, output[-3000:]
    printed = [line.strip() for line in output.splitlines()]
    missing = [shown for shown in command.shown_output if not any(matches(shown, line) for line in printed)]
    assert not missing, f"the page shows lines the command did not print: {missing}\n{output[-3000:]}"


# ------------------------------------------- what the solutions say, on the tiny data
# The tiny data sets are smaller than the real ones, so the solutions' step counts for the
# real data cannot show up here; where a solution gives the tiny data's numbers, or a
# relation between two runs, that is checked.

def steps(result) -> int:
    return finished_steps(result.stdout)


@pytest.mark.xdist_group("pytorch-to-lightning.md")
def test_mnist_exercises_steps_follow_batch_size_and_smoke_run_writes_nothing(folders):
    page = folders("pytorch-to-lightning.md")
    train_images = TINY_MNIST_TRAIN
    # Exercises 1 and 2: one step per batch, the last, smaller batch included.
    assert steps(page.result_of("mnist_lightning.py --max-epochs 1")) == math.ceil(train_images / 128)
    assert steps(page.result_of("--batch-size 64")) == math.ceil(train_images / 64)
    assert steps(page.result_of("--batch-size 256")) == math.ceil(train_images / 256)
    # Exercise 3: one batch of each split, and no log or checkpoint folder.
    smoke = page.result_of("--fast-dev-run --output-dir runs/smoke")
    assert steps(smoke) == 1
    assert "Logging and checkpointing is suppressed" in smoke.stdout + smoke.stderr
    assert not (page.root / "runs" / "smoke").exists()


@pytest.mark.xdist_group("ddp.md")
def test_ddp_exercise_1_step_counts_and_rank_lines(folders):
    page = folders("ddp.md")
    one, two = page.result_of("--output-dir runs/one-tiny"), page.result_of("--output-dir runs/two-tiny")
    # The solution's numbers for the tiny data: its training images in batches of 32, on 1 and 2 devices.
    assert (steps(one), steps(two)) == (14, 7) == (TINY_CIFAR_TRAIN // 32, TINY_CIFAR_TRAIN // 2 // 32)
    assert "effective batch size: 32 per device x 1 devices = 32" in one.stdout
    assert two.stdout.count("effective batch size: 32 per device x 2 devices = 64") == 1  # rank 0 only
    assert len(re.findall(r"^rank \d/2 \(local rank \d\) on ", two.stdout, re.M)) == 2  # one per process


@pytest.mark.xdist_group("ddp.md")
def test_ddp_exercise_2_keeps_or_scales_the_batch(folders):
    page = folders("ddp.md")
    same, scaled = page.result_of("--output-dir runs/same"), page.result_of("--output-dir runs/scaled")
    assert (steps(same), steps(scaled)) == (140, 70)  # 14 and 7 steps per epoch, 10 epochs
    peak = {name: max(float(r["lr-SGD"]) for r in read_metrics(page.root / "runs" / name) if r.get("lr-SGD"))
            for name in ("same", "scaled")}
    assert peak["same"] == pytest.approx(0.05, rel=0.03) and peak["scaled"] == pytest.approx(0.1, rel=0.03)


@pytest.mark.xdist_group("training-pipeline.md")
def test_resume_exercise_reports_four_epochs_of_tiny_data(folders):
    page = folders("training-pipeline.md")
    assert steps(page.result_of("--max-epochs 4 --output-dir runs/ex2 --resume")) == 56  # as the solution says


@pytest.mark.xdist_group("training-pipeline.md")
def test_refused_resume_leaves_no_empty_log_folder(folders):
    page = folders("training-pipeline.md")
    [refused] = [c for c in page.page_commands if "--max-epochs 6 --output-dir runs/ex2 --resume" in c.text]
    assert page.run(refused).returncode != 0
    # The loggers had started, but the refused run leaves the first two runs' logs alone.
    logs = page.root / "runs" / "ex2"
    assert sorted(p.name for p in (logs / "logs").iterdir()) == ["version_0", "version_1"]
    assert sorted(p.name for p in (logs / "tensorboard").iterdir()) == ["version_0", "version_1"]


@pytest.mark.xdist_group("training-pipeline.md")
def test_early_stopping_exercise_stops_two_epochs_after_full_accuracy(folders):
    page = folders("training-pipeline.md")
    curves = {}
    for name in ("ex3-clip", "ex3"):
        page.result_of(f"--output-dir runs/{name}")
        curves[name] = [float(r["val_acc"]) for r in read_metrics(page.root / "runs" / name) if r.get("val_acc")]
        assert 1.0 in curves[name], curves[name]
        # Nothing beats 1.0: patience 2 ends the run two epochs after it first gets there.
        assert len(curves[name]) == curves[name].index(1.0) + 3, curves[name]
    assert curves["ex3-clip"] != curves["ex3"]  # clipping changed the run


@pytest.mark.xdist_group("performance.md")
def test_profiler_exercise_reports_after_fit_and_after_test(folders):
    page = folders("performance.md")
    for fragment in ("--output-dir runs/prof 2>&1", "--output-dir runs/prof2 --num-workers 2 2>&1"):
        lines = page.result_of(fragment).stdout.splitlines()
        for row in ("run_training_batch", "train_dataloader_next"):
            assert sum(row in line for line in lines) == 2, lines  # once after fit, once after test


@pytest.mark.xdist_group("fsdp.md")
def test_fsdp_exercises_each_rank_holds_half_and_a_checkpoint_moves_to_two_ranks(folders):
    page = folders("fsdp.md")

    def result(ending: str):  # the exercise shows the command, its solution the same again
        command = next(c for c in page.page_commands if c.text.endswith(ending))
        return page.run(command)

    held = {strategy: [float(mb) for mb in re.findall(r"^rank \d/2: parameters, gradients and optimizer state: "
                                                       r"([\d.]+) MB$", result(f"--strategy {strategy}").stdout, re.M)]
            for strategy in ("ddp", "fsdp2")}
    assert len(held["ddp"]) == len(held["fsdp2"]) == 2
    assert max(held["fsdp2"]) <= 0.6 * min(held["ddp"]), held  # about 0.5: each holds half
    # Exercise 4: one process's checkpoint, continued on two; the step count carries on.
    resumed = result("--devices 2 --batch-size 16 --resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert finished_steps(resumed.stdout) == 2 * (TINY_CIFAR_TRAIN // 32)
    last = page.root / "runs" / "fsdp2" / "checkpoints" / "last.ckpt"
    assert torch.load(last / "meta.pt", map_location="cpu", weights_only=False)["global_step"] == 28


@pytest.mark.xdist_group("fsdp.md")
def test_wrap_policy_exercise_runs_the_six_tests_the_solution_names(folders):
    page = folders("fsdp.md")
    assert "6 passed" in page.result_of("-k wrap_policy -v").stdout


@pytest.mark.xdist_group("performance.md")
def test_benchmark_exercise_writes_complete_consistent_results(folders):
    page = folders("performance.md")
    page.result_of("benchmark.py --small --out bench-small")
    out = page.root / "bench-small"
    report = json.loads((out / "results.json").read_text())
    assert {"date", "device", "torch", "lightning"} <= set(report["environment"])
    names = [r["name"] for r in report["results"]]
    assert names[0].startswith("plain loop")  # the reference comes first
    assert "script path (progress bar every 10 steps)" in names
    assert all(r["value"] > 0 for r in report["results"])
    # The two rows the comparison rests on ran in turns, twice each in the small mode, and so
    # did the same pair at twice the batch; each shows the median of its runs, and no other
    # row claims more than one run.
    repeated = {r["name"]: r["runs"] for r in report["results"] if "runs" in r}
    assert set(repeated) == {names[0], "script path (progress bar every 10 steps)",
                             "plain loop, batch 64", "script path, batch 64"}
    for name, runs in repeated.items():
        assert len(runs) == report["config"]["rounds"] == 2
        assert abs(statistics.median(runs) - next(r["value"] for r in report["results"] if r["name"] == name)) <= 1
    # The ratios are what the page quotes: they must follow from the raw numbers.
    value = {r["name"]: r["value"] for r in report["results"]}
    expected = value["script path (progress bar every 10 steps)"] / report["results"][0]["value"]
    assert abs(report["ratios"]["lightning_script_vs_plain"] - expected) < 0.01
    expected = value["script path, batch 64"] / value["plain loop, batch 64"]
    assert abs(report["ratios"]["script_vs_plain_batch_64"] - expected) < 0.01
    with open(out / "results.csv", newline="") as f:
        assert [row["run"] for row in csv.DictReader(f)] == names
    assert (out / "results.svg").read_text().lstrip().startswith("<?xml")


def test_benchmark_only_runs_the_pair_and_the_groups_it_names(tmp_path):
    # --only larger-batches: the pair the page compares, then the same pair at the batches
    # asked for, and none of the other rows (a GPU booking measures what it came for).
    out = tmp_path / "pair"
    done = subprocess.run([sys.executable, REPO / "examples" / "benchmark.py", "--small", "--rounds", "1",
                           "--steps", "2", "--only", "larger-batches", "--larger-batches", "48", "--out", out],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in report["results"]] == [
        "plain loop, fp32", "script path (progress bar every 10 steps)",
        "plain loop, batch 48", "script path, batch 48"]
    assert set(report["ratios"]) == {"lightning_script_vs_plain", "script_vs_plain_batch_48"}
    assert report["config"]["larger_batches"] == [48]


def test_benchmark_batch_larger_than_its_data_stops_with_one_clear_line(tmp_path, capsys, monkeypatch):
    # In this process: the check comes before any measurement.
    monkeypatch.setattr(sys, "argv", ["benchmark.py"])  # the program name argparse prints
    with pytest.raises(SystemExit) as stopped:
        load_example("benchmark").main(["--small", "--larger-batches", "64", "5000", "--out", str(tmp_path / "bad")])
    assert stopped.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == ["benchmark.py: error: --batch-size and --larger-batches must be between 1 and 1,999 "
                      "(the number of synthetic images in the small mode, less one)"]
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------- the bookkeeping

def test_pages_have_commands_to_run():
    # A parser that silently found nothing would make the test above pass vacuously.
    pages_with_commands = {c.page for c in RUNNABLE}
    assert {"pytorch-to-lightning.md", "training-pipeline.md", "ddp.md", "fsdp.md", "summary.md"} <= pages_with_commands
    assert any(c.expects_error for c in RUNNABLE)  # the FSDP-on-CPU exercise shows its error


def test_every_command_is_run_somewhere():
    unknown = [f"{c.id}: {c.text}" for c in COMMANDS
               if c.program not in NOT_RUN and c.program != "sbatch"
               and not (c.script or c.program in ("grep", "python", "python3"))]
    assert not unknown, "commands of an unknown kind: run them here or add them to NOT_RUN with a reason"
    unmapped = [f"{c.id}: {c.text}" for c in COMMANDS if c.program == "sbatch" and c.text not in SBATCH_TESTS]
    assert not unmapped, "sbatch commands that no test in test_slurm.py runs (add one to SBATCH_TESTS)"
    # Read, not imported: a test file imports no other test file.
    tree = ast.parse((REPO / "tests" / "test_slurm.py").read_text(encoding="utf-8"))
    missing = sorted(set(SBATCH_TESTS.values()) - {node.name for node in tree.body if isinstance(node, ast.FunctionDef)})
    assert not missing, f"SBATCH_TESTS names tests that test_slurm.py does not have: {missing}"


def test_parser_reads_commands_and_their_output(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "```console\n$ python examples/outside.py\n```\n\n"
        ":::{exercise} Try\n```console\n$ python examples/a.py --x 1\nhello\n…\n$ time python examples/b.py\n"
        # A long command goes on over indented lines; the output after it is its own.
        "$ python examples/c.py --x 1 \\\n    --y 2 \\\n    --out runs/c 2>&1 \\\n    | grep done\ndone\n```\n:::\n\n"
        ":::{solution}\n````{tabs}\n```console\n$ nano notes.txt\n```\n````\n:::\n"
    )
    found = commands_on(page)
    assert [(c.line, c.text, c.shown_output) for c in found] == [
        (7, "python examples/a.py --x 1", ["hello"]),
        (10, "time python examples/b.py", []),
        (11, "python examples/c.py --x 1 --y 2 --out runs/c 2>&1 | grep done", ["done"]),
        (22, "nano notes.txt", []),
    ]
    assert found[1].script == "b.py" and found[3].program == "nano"
    assert found[2].script == "c.py" and found[2].words[2:] == ["--x", "1", "--y", "2", "--out", "runs/c"]
