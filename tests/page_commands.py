"""The harness behind test_page_commands.py: it finds the commands that a learner is asked
to run in an exercise or a solution, and runs them as the learner would.

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
  with the reason. A command of any other kind fails a test until it is sorted in.
"""

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from conftest import REPO, learner_environ, run_command
from tiny_data import write_tiny_cifar10, write_tiny_mnist

RUN_IN = {"exercise", "solution"}
FENCE = re.compile(r"^\s*(`{3,}|~{3,})\s*(\S*)")  # the info string: console, {tabs}, ...
COLON_FENCE = re.compile(r"^\s*(:{3,})\s*(\{[\w-]+\})?")
ELLIPSIS = {"…", "...", "[...]"}

# sbatch commands from the SLURM episode, and the test_slurm.py test that runs each one on
# the test cluster (with its overrides for a machine without GPUs).
SBATCH_TESTS = {
    "sbatch slurm/mnist-cpu-ddp.sbatch --max-epochs 1": "test_cpu_template_trains_with_two_ranks_on_one_node",
    "sbatch --ntasks=1 slurm/mnist-cpu-ddp.sbatch --max-epochs 1":
        "test_task_count_that_does_not_match_devices_stops_with_one_clear_line",
    "sbatch slurm/mnist-cpu-ddp.sbatch --max-epochs 1 --devices 1":
        "test_task_count_that_does_not_match_devices_stops_with_one_clear_line",
    "sbatch slurm/mnist-cpu-ddp.sbatch --max-epochs 10 --batch-size 32":
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


def commands_on(page: Path) -> list[Command]:
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
COMMANDS = [c for page in PAGES for c in commands_on(page)]
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
