"""Check that this machine is ready for the lesson: packages, accelerators, data and SLURM.

Run it before the workshop on your laptop, and on the cluster inside a small job on a
compute node (a login node has no GPUs and is not what your jobs will see):

    python check_setup.py                                  # data in ./data
    python check_setup.py --data-dir /path/to/project/data

It prints what it finds and, for every problem, the command or setting that fixes it.
The exit status is 0 when everything the lesson needs is in place, 1 when something is
missing. No GPU is not a problem: most episodes run on a CPU.
"""

import argparse
import importlib
import importlib.metadata
import os
import platform
import re
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Next to examples/ in the lesson repository; a downloaded copy of this file has none.
REQUIREMENTS = HERE.parent / "requirements.txt"
MIN_PYTHON = (3, 10)
# Import names; pip's names are the same. tensorboard: the CIFAR-10 script logs to it.
# jsonargparse: LightningCLI (mnist_cli.py) builds its parser with it.
PACKAGES = ["torch", "torchvision", "lightning", "torchmetrics", "tensorboard", "jsonargparse"]
# pip's extras that LightningCLI needs too, as requirements.txt writes them.
EXTRAS = {"jsonargparse": "[signatures]"}
# torchvision's own layouts, uncompressed: what the scripts read.
MNIST_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


class Report:
    """Prints each finding as it is made, and counts the problems."""

    def __init__(self):
        self.problems = 0

    def section(self, title: str):
        print(f"\n{title}")

    def ok(self, text: str):
        print(f"  ok       {text}")

    def note(self, text: str, fix: str = ""):
        print(f"  note     {text}")
        if fix:
            print(f"           -> {fix}")

    def problem(self, text: str, fix: str):
        self.problems += 1
        print(f"  PROBLEM  {text}")
        print(f"           -> {fix}")


# ------------------------------------------------------------ Python and packages

def read_ranges(path: Path) -> dict:
    """{'torch': '>=2.11,<2.15', ...} for the checked packages, from requirements.txt."""
    ranges = {}
    for line in path.read_text().splitlines():
        # The name, any extras ('jsonargparse[signatures]'), then the range.
        match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[[^\]]*\])?\s*([<>=!~][^#;]*)", line)
        if match and match.group(1).lower() in PACKAGES:
            ranges[match.group(1).lower()] = match.group(2).replace(" ", "")
    return ranges


def pip_name(name: str) -> str:
    """The name to give pip: 'jsonargparse' -> 'jsonargparse[signatures]'."""
    return name + EXTRAS.get(name, "")


def missing_extras(name: str) -> list:
    """The packages of `name`'s extras (EXTRAS) that are not installed, by pip name."""
    extras = re.findall(r"[\w.-]+", EXTRAS.get(name, ""))
    try:
        requires = importlib.metadata.requires(name) or []
    except importlib.metadata.PackageNotFoundError:
        return []  # imported but not installed by pip (e.g. a module's path): cannot tell
    missing = []
    for requirement in requires:
        # e.g. 'docstring-parser>=0.17; extra == "signatures"'
        marker = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if not marker or marker.group(1) not in extras:
            continue
        needed = re.match(r"\s*([A-Za-z0-9_.-]+)", requirement).group(1)
        if needed.lower() == name:
            continue  # the package itself with another extra
        try:
            importlib.metadata.distribution(needed)
        except importlib.metadata.PackageNotFoundError:
            missing.append(needed)
    return missing


def release(version: str) -> tuple:
    """'2.14.1+cu128' -> (2, 14, 1): enough to compare with the simple ranges we use."""
    numbers = [int(m.group()) for part in version.split("+")[0].split(".")
               if (m := re.match(r"\d+", part))]
    return tuple((numbers + [0, 0, 0])[:3])


def range_verdict(version: str, spec: str) -> str:
    """'ok', 'too old' or 'too new' for a version and a range such as '>=2.11,<2.15'."""
    have = release(version)
    for clause in spec.split(","):
        op, bound = re.match(r"([<>=!~]*)(.*)", clause).groups()
        bound = release(bound)
        if (op == ">=" and have < bound) or (op == ">" and have <= bound):
            return "too old"
        if (op == "<" and have >= bound) or (op == "<=" and have > bound):
            return "too new"
        if op == "==" and have != bound:
            return "too old" if have < bound else "too new"
    return "ok"


def check_packages(report: Report):
    """Import each package the examples need; return torch (or None) for the next checks."""
    report.section("Python and packages")
    python = f"Python {platform.python_version()} ({sys.executable})"
    if sys.version_info[:2] < MIN_PYTHON:
        report.problem(f"{python} is too old",
                       f"use Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer (on a cluster: module avail python)")
    else:
        report.ok(python)

    if REQUIREMENTS.is_file():
        ranges = read_ranges(REQUIREMENTS)
        install = f"pip install -r {os.path.relpath(REQUIREMENTS)}"
    else:
        ranges = {}
        install = "pip install " + " ".join(
            f'"{pip_name(name)}"' if name in EXTRAS else name for name in PACKAGES)
        report.note("no requirements.txt next to examples/: versions are not checked against the lesson's ranges")

    modules = {}
    for name in PACKAGES:
        try:
            modules[name] = importlib.import_module(name)
        except Exception as err:  # not installed, or installed but broken (e.g. a CUDA library)
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            report.problem(f"cannot import {name}: {reason}",
                           f"{install} (on a cluster: load the PyTorch module first, then activate your environment)")
            continue
        version = str(getattr(modules[name], "__version__", "unknown"))
        spec = ranges.get(name)
        verdict = range_verdict(version, spec) if spec and version != "unknown" else "ok"
        supported = f" (supported: {spec})" if spec else ""
        missing = missing_extras(name)
        if verdict == "too old":
            fix = f'pip install "{pip_name(name)}{spec}"'
            if name in ("torch", "torchvision"):  # pip's build would hide the module's
                fix += " (on a cluster with a PyTorch module: load a newer module instead)"
            report.problem(f"{name} {version} is older than the lesson supports{supported}", fix)
        elif missing:
            report.problem(f"{name} {version} lacks its {EXTRAS[name]} extra (missing: {', '.join(missing)})",
                           f'pip install "{pip_name(name)}{spec or ""}"')
        elif verdict == "too new":
            report.note(f"{name} {version} is newer than the lesson was tested with{supported}; it will probably work",
                        f'if something fails, install a tested version: pip install "{pip_name(name)}{spec}"')
        else:
            report.ok(f"{name} {version}{supported}")
    return modules.get("torch")


# ------------------------------------------------------------------- hardware

def lesson_tools(report: Report):
    """The scripts' cluster_tools.py (next to this file), or None where it cannot be imported."""
    try:
        import cluster_tools
    except ModuleNotFoundError as err:
        if err.name == "cluster_tools":
            report.problem(f"cluster_tools.py is not in {HERE}; the training scripts import it",
                           "keep it next to the scripts, as in the lesson zip")
        return None  # else a package it needs is missing: reported above
    except Exception:  # a package it needs is broken: reported above
        return None
    return cluster_tools


def check_accelerators(report: Report, torch) -> int:
    """Report the GPUs and CPUs PyTorch can use; return the number of CUDA GPUs."""
    report.section("Accelerators")
    tools = lesson_tools(report)
    if tools is None:
        report.note("the CPUs this process may use are counted by cluster_tools.py: not here")
    elif (cpus := tools.usable_cpus()) < 2:
        report.note(f"one CPU core usable by this process (this machine has {os.cpu_count()}): "
                    "data loading and training share it, so runs are slow",
                    "on a cluster, ask for more with --cpus-per-task")
    else:
        report.ok(f"{cpus} CPU cores usable by this process (this machine has {os.cpu_count()})")
    if torch is None:
        report.note("PyTorch is not installed, so GPUs cannot be checked")
        return 0

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(gpus):
        props = torch.cuda.get_device_properties(i)
        report.ok(f"cuda:{i} {props.name}, {props.total_memory / 2**30:.0f} GiB (CUDA {torch.version.cuda})")
    if gpus and not torch.cuda.is_bf16_supported():
        report.note("this GPU has no bfloat16: the CIFAR-10 script's default bf16-mixed will not work",
                    "pass --precision 16-mixed")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        report.ok("Apple GPU (MPS): use --accelerator mps with the MNIST script")
    if not gpus:
        report.note("PyTorch sees no CUDA GPU: fine for the CPU episodes; FSDP1 (--strategy fsdp) "
                    "and the speed measurements need a GPU node")
    return gpus


# ----------------------------------------------------------------------- data

def check_data(report: Report, data_dir: str):
    """Are the files there, and do they read as the training scripts read them?"""
    report.section(f"Data (--data-dir {data_dir})")
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        report.problem(f"{data_dir} is a file, not a folder",
                       "pass the folder that holds (or will hold) the data: --data-dir PATH")
        return
    try:
        import cluster_tools  # checks the files as the training scripts do
    except Exception:  # not next to this file, or a package it needs is broken: reported above
        cluster_tools = None
        report.note("without cluster_tools.py only the data files' names are checked, not their contents")
    datasets = [
        ("MNIST", Path(data_dir, "MNIST", "raw"), MNIST_FILES, "mnist_lightning.py"),
        ("CIFAR-10", Path(data_dir, "cifar-10-batches-py"), CIFAR10_FILES, "cifar10_lightning.py"),
    ]
    seen = set()
    for name, folder, files, script in datasets:
        download = ("on a machine with internet (your laptop, or a login node on a cluster) run: "
                    + shlex.join(["python", os.path.relpath(HERE / script), "--data-dir", data_dir,
                                  "--download-only"]))
        if cluster_tools is not None:
            missing, unreadable, corrupt = cluster_tools.data_file_problems(name, data_dir)
        else:  # os.path's checks never raise: an unreadable folder is a missing one here
            missing = [folder / f for f in files
                       if not os.path.isfile(folder / f) or os.path.getsize(folder / f) == 0]
            unreadable, corrupt = [], []
        for problem in unreadable:
            if problem not in seen:  # the data folder itself: once, not per data set
                seen.add(problem)
                report.problem(problem, "make it readable for you (ls -l shows who owns it), or pass another --data-dir")
        for problem in corrupt:
            report.problem(problem, f"delete it, then {download}")
        if missing:
            what = ("no such folder" if not os.path.isdir(folder)
                    else "missing: " + ", ".join(path.name for path in missing))
            report.problem(f"{name} is not in {folder} ({what})", download)
        elif not unreadable and not corrupt:
            report.ok(f"{name} in {folder}")


# ---------------------------------------------------------------------- SLURM

def count(value) -> int | None:
    """SLURM's '4', '4(x2)' or 'a100:4' -> 4; None when unset or empty."""
    if not value:
        return None
    match = re.match(r"(?:[\w-]+:)?(\d+)", value)
    return int(match.group(1)) if match else None


def check_slurm(report: Report, torch_gpus: int):
    """Does the allocation match what Lightning expects: one task per GPU, cores per task?"""
    report.section("SLURM")
    env = os.environ
    if not env.get("SLURM_JOB_ID"):
        report.ok("not inside a SLURM job (on a cluster, run this check inside a job on a compute node)")
        return

    nodes = count(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")) or 1
    # SLURM_NTASKS_PER_NODE is set only by --ntasks-per-node; SLURM_TASKS_PER_NODE always.
    tasks = count(env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")) or 1
    slurm_gpus = count(env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE"))
    gpus = slurm_gpus if slurm_gpus is not None else torch_gpus
    cpus = count(env.get("SLURM_CPUS_PER_TASK"))
    name = env.get("SLURM_JOB_NAME", "")
    report.ok(f"job {env['SLURM_JOB_ID']} ({name}): {nodes} node(s), {tasks} task(s) per node, "
              f"{gpus} GPU(s) per node, {cpus or 'no'} --cpus-per-task")

    if name in ("bash", "interactive"):
        # Lightning's SLURMEnvironment.detect() is False for these names: it would start
        # the processes itself, where the script runs (on the login node, for some salloc).
        report.note(f"Lightning ignores SLURM in a job named {name!r}; the lesson's scripts take "
                    f"SLURM's ranks when srun starts one task per device",
                    "start every run with srun python script.py ...; for scripts of your own, "
                    "ask for the session with --job-name=lesson")
    elif gpus and tasks != gpus:
        report.problem(f"{tasks} task(s) per node but {gpus} GPU(s) per node: Lightning runs one task per GPU",
                       f"ask for --ntasks-per-node={gpus} and pass --devices {gpus}, "
                       f"or ask for --gpus-per-node={tasks}")
    if slurm_gpus and torch_gpus < slurm_gpus:
        report.problem(f"SLURM gave this node {slurm_gpus} GPU(s) but PyTorch sees {torch_gpus}",
                       "load the centre's PyTorch module, or install a CUDA build of PyTorch")
    if cpus is None:
        report.problem("no --cpus-per-task: each task gets one core, too few to feed a GPU",
                       "add #SBATCH --cpus-per-task=8 (or what your centre gives per GPU), and "
                       "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK before srun, as the templates do")
    if nodes > 1:
        report.note(f"{nodes} nodes: pass --num-nodes {nodes} to the training script")


# ----------------------------------------------------------------------- main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data",
                        help="folder that should hold MNIST/raw/ and cifar-10-batches-py/ (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    report = Report()
    torch = check_packages(report)
    gpus = check_accelerators(report, torch)
    check_data(report, args.data_dir)
    check_slurm(report, gpus)

    print()
    if report.problems:
        print(f"{report.problems} problem(s) found: fix them and run this check again.")
        sys.exit(1)
    print("Ready for the lesson.")


if __name__ == "__main__":
    main()
