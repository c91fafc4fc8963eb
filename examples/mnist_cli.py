"""Train the MNIST MLP of mnist_lightning.py, configured by Lightning's LightningCLI.

There is no argparse code here: LightningCLI reads the arguments of Trainer,
LitMLP and MNISTDataModule (their names, type hints and defaults) and turns each
one into a command-line option and a key of a YAML configuration file.

Run it from the repository's top folder: train as the file says, change one value,
print the full configuration, list every option.

    python examples/mnist_cli.py fit --config examples/mnist_cli.yaml
    python examples/mnist_cli.py fit --config examples/mnist_cli.yaml --model.lr 0.01
    python examples/mnist_cli.py fit --config examples/mnist_cli.yaml --print_config
    python examples/mnist_cli.py fit --help

The data must already be in data_dir: python examples/mnist_lightning.py --download-only
LightningCLI needs jsonargparse: pip install "jsonargparse[signatures]"
"""

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning_utilities.core.imports import RequirementCache

# Keep this file next to mnist_lightning.py (and its cluster_tools.py): the model and
# the data module come from there.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist_lightning import LitMLP, MNISTDataModule  # noqa: E402


def main(args=None):
    # LightningCLI builds its parser with jsonargparse and its [signatures] extra.
    if not RequirementCache("jsonargparse[signatures]"):
        sys.exit("error: LightningCLI needs jsonargparse: "
                 'pip install "jsonargparse[signatures]"')
    # The subcommand (fit, validate or test) names the Trainer method to run.
    LightningCLI(LitMLP, MNISTDataModule, seed_everything_default=42, args=args)


if __name__ == "__main__":
    main()
