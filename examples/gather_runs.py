"""Gather the results of many runs, such as the tasks of a sweep, into one table.

    python examples/gather_runs.py runs/mnist-sweep-123456

Every run folder under the given folder (one with logs/version_N/metrics.csv, as the
lesson's scripts write) gives one row: the settings in which the runs differ (from
their hparams.yaml), the best validation accuracy, the test results, and how far the
run got. A run that was requeued has several versions; they are read together. The
table is printed, best validation accuracy first, and written to FOLDER/runs.csv.

Choose the best setting by its validation accuracy: the test set is for reporting the
chosen one, and choosing by it would make that report optimistic.
"""

import argparse
import csv
import sys
from pathlib import Path

import yaml

COLUMNS = ["best_val_acc", "test_acc", "test_loss", "epochs", "steps", "finished"]


def read_run(run_dir: Path) -> dict:
    """One run's settings and results, from all of its logs/version_N folders."""
    versions = sorted(run_dir.glob("logs/version_*"), key=lambda d: int(d.name.split("_")[1]))
    rows = []
    for version in versions:
        if (version / "metrics.csv").is_file():
            with open(version / "metrics.csv", newline="") as f:
                rows += list(csv.DictReader(f))
    hparams_file = versions[-1] / "hparams.yaml"
    hparams = yaml.safe_load(hparams_file.read_text()) if hparams_file.is_file() else {}

    def values(name):
        return [float(row[name]) for row in rows if row.get(name)]

    val_acc, test_acc, test_loss = values("val_acc"), values("test_acc"), values("test_loss")
    epochs = [float(row["epoch"]) for row in rows if row.get("val_acc")]  # validated ones
    return {
        "hparams": hparams or {},
        "best_val_acc": max(val_acc) if val_acc else None,
        "test_acc": test_acc[-1] if test_acc else None,
        "test_loss": test_loss[-1] if test_loss else None,
        "epochs": int(max(epochs)) + 1 if epochs else 0,
        "steps": int(max(values("step"), default=0)),
        "finished": "yes" if test_acc else "no",  # a run tests once, at its end
    }


def gather(folder: Path) -> tuple[list[str], list[dict]]:
    """The table's columns and rows, best validation accuracy first."""
    run_dirs = sorted({p.parent.parent.parent for p in folder.glob("**/logs/version_*/metrics.csv")})
    runs = {d: read_run(d) for d in run_dirs}
    # The settings worth a column: those that are not the same in every run.
    names = sorted({name for run in runs.values() for name in run["hparams"]})
    differ = [n for n in names if len({repr(r["hparams"].get(n)) for r in runs.values()}) > 1]
    rows = []
    for run_dir, run in runs.items():
        row = {"run": str(run_dir.relative_to(folder)) if run_dir != folder else "."}
        row |= {name: run["hparams"].get(name) for name in differ}
        row |= {name: run[name] for name in COLUMNS}
        rows.append(row)
    rows.sort(key=lambda r: -1 if r["best_val_acc"] is None else r["best_val_acc"], reverse=True)
    results = [c for c in COLUMNS if any(row[c] is not None for row in rows)]  # e.g. no test_loss
    return ["run", *differ, *results], rows


def show(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="the folder that holds the runs, e.g. runs/mnist-sweep-123456")
    args = parser.parse_args(argv)
    if not args.folder.is_dir():
        parser.error(f"{args.folder} is not a folder")
    columns, rows = gather(args.folder)
    if not rows:
        parser.error(f"no runs in {args.folder}: no logs/version_N/metrics.csv below it")
    table = [columns] + [[show(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    with open(args.folder / "runs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} runs; table written to {args.folder / 'runs.csv'}")


if __name__ == "__main__":
    sys.exit(main())
