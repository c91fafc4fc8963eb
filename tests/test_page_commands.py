"""Every command a learner is asked to run in an exercise or a solution runs here.

The pages show commands as `$ ...` lines of ```console blocks inside :::{exercise} and
:::{solution}; a long command goes on over indented lines after a line that ends in a
backslash. Each page's commands run in the order the page shows them (a solution often
continues the exercise's run) with bash, in a fresh folder that looks like the repository
to the learner: examples/, slurm/ and tests/ are links, and both data/ (the scripts'
default --data-dir) and tiny/ hold the tiny data sets.

- A command exits 0 without a traceback, and prints every output line the page shows for it
  (a line "…" stands for output left out, a "…" within a line for any text). Where the page
  shows an `error:` line, the command must fail, with that line.
- A command that differs from an earlier one on its page only in --data-dir and --output-dir
  (the real-data and tiny-data versions of one step) is run once, for both.
- CIFAR-10 commands without `--accelerator cpu`, and benchmark.py without --small, are the
  pages' GPU commands: they run where PyTorch sees as many GPUs as they ask for.
- On the tiny data, a CIFAR-10 command without `--batch-size` gets `--batch-size 32`, as the
  pages tell learners to do.
- `sbatch` commands run in test_slurm.py, in the tests named in SBATCH_TESTS; programs that
  wait for a person (an editor, a web server, a log that never ends) are listed in NOT_RUN
  with the reason. A command of any other kind fails the test until it is sorted in.
"""

import csv
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import test_slurm
from conftest import REPO, finished_steps, learner_environ, metrics_files, read_metrics, run_command
from tiny_data import write_tiny_cifar10, write_tiny_mnist

RUN_IN = {"exercise", "solution"}
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*(\S*)")  # the info string: console, {tabs}, ...
COLON_FENCE = re.compile(r"^\s*(:{3,})\s*(\{[\w-]+\})?")
ELLIPSIS = {"…", "...", "[...]"}
TINY_MNIST_TRAIN = 600 - 600 // 12  # write_tiny_mnist's 600 images less the validation split

# sbatch commands from the SLURM episode, and the test_slurm.py test that runs each one on
# the test cluster (with its overrides for a machine without GPUs).
SBATCH_TESTS = {
    "sbatch slurm/mnist-cpu-ddp.sbatch --max-epochs 1": "test_cpu_template_trains_with_two_ranks_on_one_node",
    "sbatch --ntasks=1 slurm/mnist-cpu-ddp.sbatch --max-epochs 1":
        "test_task_count_that_does_not_match_devices_stops_with_one_clear_line",
    "sbatch slurm/mnist-cpu-ddp.sbatch --max-epochs 1 --devices 1":
        "test_task_count_that_does_not_match_devices_stops_with_one_clear_line",
    "sbatch slurm/mnist-cpu-ddp.sbatch --max-epochs 30 --batch-size 32":
        "test_preempted_job_saves_requeues_and_finishes_with_the_planned_steps",
}
NOT_RUN = {
    "nano": "an editor: the learner changes the file by hand",
    "tensorboard": "a web server that runs until it is stopped",
    "tail": "follows a log until it is stopped",
    "squeue": "watches jobs of a real cluster; test_slurm.py polls its own",
    "scontrol": "watches jobs of a real cluster; test_slurm.py polls its own",
    "scancel": "signals a job of a real cluster; test_slurm.py sends USR1 itself",
}


@dataclass
class Command:
    page: str
    line: int
    text: str  # as shown, without the "$ ", its continued lines joined into one
    shown_output: list[str] = field(default_factory=list)

    @property
    def words(self) -> list[str]:
        """The command's own words: those before its first redirection (2>&1, >) or pipe."""
        words = []
        for word in shlex.split(self.text):
            if re.match(r"\d*>|&>|\|", word):
                break
            words.append(word)
        return words[1:] if words[:1] == ["time"] else words

    @property
    def program(self) -> str:
        return self.words[0]

    @property
    def script(self) -> str | None:
        w = self.words
        if w[0] in ("python", "python3") and len(w) > 1 and w[1].startswith("examples/"):
            return Path(w[1]).name
        return None

    @property
    def gpus_needed(self) -> int:
        """0 for a CPU command; else the GPUs the command asks for (--devices, at least 1)."""
        if self.script == "benchmark.py":
            return 0 if "--small" in self.text else 1  # without a GPU the full run falls back to --small
        if self.script != "cifar10_lightning.py" or "--accelerator cpu" in self.text:
            return 0
        devices = re.search(r"--devices (\d+)", self.text)
        return int(devices.group(1)) if devices else 1

    @property
    def same_run(self) -> tuple:
        """The command less its data and output folders: what it does on the tiny data."""
        words, kept = self.words, []
        skip = False
        for word in words:
            if skip:
                skip = False
            elif word in ("--data-dir", "--output-dir"):
                skip = True
            else:
                kept.append(word)
        return tuple(kept)

    @property
    def output_dir(self) -> str | None:
        words = self.words
        return words[words.index("--output-dir") + 1] if "--output-dir" in words[:-1] else None

    @property
    def expects_error(self) -> bool:
        return any("error:" in line for line in self.shown_output)

    @property
    def id(self) -> str:
        return f"{self.page.removesuffix('.md')}-{self.line}"  # the "$ " line, e.g. ddp-311: usable in pytest -k


def page_commands(page: Path) -> list[Command]:
    """The commands of console blocks inside exercises and solutions, with the output shown after each.

    MyST nests directives in fences of backticks (```{tab} inside ````{tabs}) or colons
    (:::{solution}); a code block nests nothing, so only its own closing fence matters.
    A line after one that ends in a backslash continues the command: it is joined to it
    with one space, as bash reads it, and the command keeps the line number of its "$ ".
    """
    commands, open_blocks = [], []  # open_blocks: (fence marker, name, first line)
    continued = False  # the line before is part of a command and ends in a backslash
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        stripped = line.strip()
        joins, continued = continued, False
        top = open_blocks[-1] if open_blocks else None
        in_code = top is not None and not top[1].startswith("{")
        if m := (FENCE.match(line) or COLON_FENCE.match(line)):
            marker, info = m.group(1), m.group(2)
            closes = (top is not None and not info and marker[0] == top[0][0] and len(marker) >= len(top[0]))
            if closes:
                open_blocks.pop()
                continue
            if not in_code and info:
                open_blocks.append((marker, info, number))
                continue
        if not in_code or top[1] != "console":
            continue
        names = {name.strip("{}") for _, name, _ in open_blocks}
        if not RUN_IN & names:
            continue
        if joins or stripped.startswith("$ "):
            continued = stripped.endswith("\\")
            words = stripped.removesuffix("\\").rstrip()
            if joins:
                commands[-1].text += " " + words
            else:
                commands.append(Command(page.name, number, words[2:]))
        elif stripped and stripped not in ELLIPSIS and commands and commands[-1].line > top[2]:
            commands[-1].shown_output.append(stripped)
    # An exercise shows a command, its solution the same command with what it prints.
    for command in commands:
        for twin in commands:
            if twin.text == command.text and twin is not command:
                command.shown_output += [line for line in twin.shown_output if line not in command.shown_output]
    return commands


PAGES = sorted((REPO / "content").glob("*.md"))
COMMANDS = [c for page in PAGES for c in page_commands(page)]
RUNNABLE = [c for c in COMMANDS if c.program not in NOT_RUN and c.program != "sbatch"]


def params() -> list:
    # A page's commands, and the checks of what its solutions say, run in one process
    # (pytest-xdist's group), in the page's order: a solution often continues an exercise's run.
    return [pytest.param(c, id=c.id, marks=[pytest.mark.xdist_group(c.page)] + ([pytest.mark.gpu] if c.gpus_needed else []))
            for c in RUNNABLE]


# ------------------------------------------------------------------- running them

class PageFolder:
    """A learner's working folder for one page; runs the page's commands in order, once each."""

    def __init__(self, root: Path, page: str):
        self.root = root
        for name in ("examples", "slurm", "tests"):
            (root / name).symlink_to(REPO / name)
        for data in ("data", "tiny"):
            write_tiny_mnist(root / data)
            write_tiny_cifar10(root / data)
        self.page_commands = [c for c in RUNNABLE if c.page == page]
        self.results: dict[int, subprocess.CompletedProcess] = {}

    def continues_earlier(self, command: Command) -> bool:
        """Whether a command may build on the page's earlier ones: it does unless it writes
        to an output folder that no earlier command uses, and resumes nothing."""
        if command.output_dir is None or "--resume" in command.words:
            return True
        return any(c.output_dir == command.output_dir for c in self.page_commands if c.line < command.line)

    def run(self, command: Command) -> subprocess.CompletedProcess:
        # Run the page's earlier commands first: a later one may continue their runs. (When
        # one command is picked, e.g. a GPU command by -m gpu, a run of its own skips them.)
        for earlier in self.page_commands:
            if earlier.line > command.line:
                break
            if earlier is not command and not self.continues_earlier(command):
                continue
            if earlier.line not in self.results and earlier.gpus_needed <= gpus():
                # Pages often show a command for the real data and then the same one for the
                # tiny data; here both folders hold the tiny data, so run it once.
                twin = next((c for c in self.page_commands if c.line < earlier.line and c.same_run == earlier.same_run
                             and c.line in self.results), None)
                self.results[earlier.line] = self.results[twin.line] if twin else self._run(earlier)
        return self.results[command.line]

    def result_of(self, fragment: str) -> subprocess.CompletedProcess:
        """The result of the page's one command that ends with fragment, or else contains it."""
        found = [c for c in self.page_commands if c.text.endswith(fragment)]
        if len(found) != 1:
            found = [c for c in self.page_commands if fragment in c.text]
        assert len(found) == 1, f"{len(found)} commands contain {fragment!r}"
        result = self.run(found[0])
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        return result

    def _run(self, command: Command) -> subprocess.CompletedProcess:
        text = command.text
        if command.script == "cifar10_lightning.py" and "--batch-size" not in text:
            # What the pages say to use with the tiny data; right after the script's name, so
            # it stays on the script's command line even when the output is piped on.
            text = text.replace("cifar10_lightning.py", "cifar10_lightning.py --batch-size 32", 1)
        env = {**learner_environ(), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
               # `python` in a command is the interpreter running these tests.
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        # pipefail: a script that fails in `python … | grep …` fails the command, as it should.
        return run_command(["bash", "-o", "pipefail", "-c", text], self.root, env, timeout=300)


def matches(shown: str, printed: str) -> bool:
    """A line as the page shows it, where "…" stands for any text (a job id, a step count)."""
    pattern = ".*".join(re.escape(part) for part in shown.split("…"))
    return re.fullmatch(pattern, printed) is not None


def gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


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

def read_metrics_file(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def steps(result) -> int:
    return finished_steps(result.stdout)


@pytest.mark.xdist_group("pytorch-to-lightning.md")
def test_mnist_exercises_batch_size_ddp_and_resume_relations(folders):
    page = folders("pytorch-to-lightning.md")
    one_epoch = steps(page.result_of("mnist_lightning.py --max-epochs 1"))
    # Exercise 2: the last, smaller batch counts as a step.
    train_images = TINY_MNIST_TRAIN
    assert steps(page.result_of("--batch-size 64")) == math.ceil(train_images / 64)
    assert steps(page.result_of("--batch-size 256")) == math.ceil(train_images / 256)
    # Exercise 3: two processes, each on half of the data, announce themselves.
    ddp = page.result_of("--devices 2 --strategy ddp")
    assert "rank 0/2" in ddp.stdout and "rank 1/2" in ddp.stdout
    assert steps(ddp) == math.ceil(train_images / 2 / 128) < one_epoch
    # Exercise 4: --max-epochs is the total; the second log carries the step count on.
    first = page.result_of("--output-dir runs/resume --max-epochs 2")
    second = page.result_of("--output-dir runs/resume --max-epochs 4 --resume")
    assert steps(first) == 2 * one_epoch and steps(second) == 4 * one_epoch
    assert "Restoring states from the checkpoint path at runs/resume/checkpoints/last.ckpt" in second.stderr + second.stdout
    out = page.root / "runs" / "resume"
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4 * one_epoch
    versions = metrics_files(out)
    assert [p.parent.name for p in versions] == ["version_0", "version_1"]
    assert int(read_metrics_file(versions[1])[0]["step"]) > max(int(r["step"]) for r in read_metrics_file(versions[0]))
    # Together the two logs validate each epoch exactly once.
    assert [int(r["epoch"]) for r in read_metrics(out) if r.get("val_acc")] == [0, 1, 2, 3]


@pytest.mark.xdist_group("ddp.md")
def test_ddp_exercise_1_step_counts_and_rank_lines(folders):
    page = folders("ddp.md")
    one, two = page.result_of("--output-dir runs/one-tiny"), page.result_of("--output-dir runs/two-tiny")
    assert (steps(one), steps(two)) == (14, 7)  # the solution's numbers for the tiny data
    assert "effective batch size: 32 per device x 1 devices = 32" in one.stdout
    assert two.stdout.count("effective batch size: 32 per device x 2 devices = 64") == 1  # rank 0 only
    assert len([line for line in two.stdout.splitlines() if line.startswith("rank ")]) == 2


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
def test_refused_resume_leaves_an_almost_empty_log_folder(folders):
    page = folders("training-pipeline.md")
    [refused] = [c for c in page.page_commands if "--max-epochs 6 --output-dir runs/ex2 --resume" in c.text]
    assert page.run(refused).returncode != 0
    assert (page.root / "runs" / "ex2" / "logs" / "version_2").is_dir()  # as the solution says


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


def test_benchmark_batch_larger_than_its_data_stops_with_one_clear_line(tmp_path):
    done = subprocess.run([sys.executable, REPO / "examples" / "benchmark.py", "--small",
                           "--larger-batches", "64", "5000", "--out", tmp_path / "bad"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert ("error: --batch-size and --larger-batches must be between 1 and 1,999 "
            "(the number of synthetic images in the small mode, less one)") in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "bad").exists()


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
    missing = sorted(set(SBATCH_TESTS.values()) - set(dir(test_slurm)))
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
    found = page_commands(page)
    assert [(c.line, c.text, c.shown_output) for c in found] == [
        (7, "python examples/a.py --x 1", ["hello"]),
        (10, "time python examples/b.py", []),
        (11, "python examples/c.py --x 1 --y 2 --out runs/c 2>&1 | grep done", ["done"]),
        (22, "nano notes.txt", []),
    ]
    assert found[1].script == "b.py" and found[3].program == "nano"
    assert found[2].script == "c.py" and found[2].words[2:] == ["--x", "1", "--y", "2", "--out", "runs/c"]
