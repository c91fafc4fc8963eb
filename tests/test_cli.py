"""mnist_cli.py: the MNIST model and data module driven by LightningCLI and a YAML file,
run as a learner runs it, on CPU and tiny learnable data."""

import pytest
import yaml

from conftest import REPO, last_value, load_example, read_metrics, run_script

pytest.importorskip(
    "jsonargparse",
    reason="LightningCLI needs jsonargparse, which is not installed here "
           '(pip install "jsonargparse[signatures]", as in requirements.txt)',
)

CONFIG = REPO / "examples" / "mnist_cli.yaml"
# Added to the learner's commands: the CPU, whatever this machine has.
CPU = ("--trainer.accelerator", "cpu")


def cli_output(capsys, monkeypatch, *args) -> str:
    """What `python examples/mnist_cli.py ARGS` prints for a command that only prints (help,
    a configuration) and exits 0; run in this process, which has Lightning imported already.
    The runs that train start the script as a learner does, below."""
    monkeypatch.setattr("sys.argv", ["mnist_cli.py"])  # not pytest's own arguments
    with pytest.raises(SystemExit) as stopped:
        load_example("mnist_cli").main([str(a) for a in args])
    assert stopped.value.code in (0, None)
    return capsys.readouterr().out


def test_help_lists_the_subcommands_and_the_options_of_each_class(capsys, monkeypatch):
    assert "{fit,validate,test,predict}" in cli_output(capsys, monkeypatch, "--help")
    fit_help = cli_output(capsys, monkeypatch, "fit", "--help")
    for option in ("--config", "--print_config", "--trainer.max_epochs", "--trainer.devices",
                   "--model.lr", "--model.hidden", "--data.data_dir", "--data.batch_size"):
        assert option in fit_help, f"{option} missing from fit --help"


def test_fit_with_the_yaml_learns_keeps_the_override_and_its_checkpoint_tests(mnist_dir, tmp_path):
    result = run_script("mnist_cli.py", "fit", "--config", CONFIG, *CPU, "--data.data_dir", mnist_dir,
                        "--trainer.logger.init_args.save_dir", tmp_path,
                        "--trainer.max_epochs", 1, "--data.batch_size", 32, "--model.lr", 0.002)
    assert result.returncode == 0, result.stderr[-3000:]

    # The CSVLogger of the YAML wrote into the save_dir given on the command line.
    rows = read_metrics(tmp_path)
    assert last_value(rows, "val_acc") > 0.5  # chance is 0.1
    assert {int(r["epoch"]) for r in rows} == {0}  # --trainer.max_epochs 1 beat the YAML's 5
    run_dir = tmp_path / "logs" / "version_0"
    best = list((run_dir / "checkpoints").glob("best-epoch=0-val_acc=*.ckpt"))
    assert best, "no checkpoint from the YAML's callback"

    # The command-line value wins over the YAML's, and both records of the run say so.
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    assert hparams["lr"] == 0.002 and hparams["hidden"] == 512
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["lr"] == 0.002
    assert saved["data"]["data_dir"] == str(mnist_dir)
    assert saved["trainer"]["max_epochs"] == 1  # summary.md: "max_epochs: 1 from the command line"

    # The page's next command: test that checkpoint with the same file.
    result = run_script("mnist_cli.py", "test", "--config", CONFIG, *CPU,
                        "--data.data_dir", mnist_dir,
                        "--trainer.logger.init_args.save_dir", tmp_path, "--ckpt_path", best[0])
    assert result.returncode == 0, result.stderr[-3000:]
    assert last_value(read_metrics(tmp_path), "test_acc") > 0.5

    # validate, the other subcommand the page names, on the same checkpoint.
    result = run_script("mnist_cli.py", "validate", "--config", CONFIG, *CPU,
                        "--data.data_dir", mnist_dir,
                        "--trainer.logger.init_args.save_dir", tmp_path, "--ckpt_path", best[0])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert last_value(read_metrics(tmp_path), "val_acc") > 0.5


def test_print_config_gives_a_config_that_reads_back_the_same(capsys, monkeypatch, tmp_path):
    printed_text = cli_output(capsys, monkeypatch, "fit", "--config", CONFIG, "--model.lr", 0.01, "--print_config")
    printed = yaml.safe_load(printed_text)
    assert printed["model"] == {"lr": 0.01, "hidden": 512}
    assert printed["data"] == {"data_dir": "data", "batch_size": 128, "num_workers": 0}
    assert printed["trainer"]["max_epochs"] == 5
    assert printed["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.CSVLogger"

    # The printed file is a complete config: reading it back changes nothing.
    saved = tmp_path / "my_config.yaml"
    saved.write_text(printed_text)
    assert cli_output(capsys, monkeypatch, "fit", "--config", saved, "--print_config") == printed_text
