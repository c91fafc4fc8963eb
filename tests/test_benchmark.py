"""benchmark.py's small mode runs anywhere and writes complete, consistent results."""

import csv
import json

from conftest import run_script


def test_small_benchmark_writes_json_csv_and_plot(tmp_path):
    result = run_script("benchmark.py", "--small", "--out", tmp_path, "--skip", "classic")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "results.json").read_text())
    assert {"date", "device", "torch", "lightning"} <= set(report["environment"])
    names = [r["name"] for r in report["results"]]
    assert names[0].startswith("plain loop")  # the reference comes first
    assert "script path (progress bar every 10 steps)" in names
    assert all(r["value"] > 0 for r in report["results"])
    # The ratios are what the lesson quotes: they must follow from the raw numbers.
    value = {r["name"]: r["value"] for r in report["results"]}
    expected = value["script path (progress bar every 10 steps)"] / report["results"][0]["value"]
    assert abs(report["ratios"]["lightning_script_vs_plain"] - expected) < 0.01
    with open(tmp_path / "results.csv", newline="") as f:
        assert [row["run"] for row in csv.DictReader(f)] == names
    assert (tmp_path / "results.svg").read_text().lstrip().startswith("<?xml")
