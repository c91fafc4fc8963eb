"""Train a small MLP on MNIST with plain PyTorch: the "before" picture.

This is the same model, data and recipe as mnist_lightning.py, written as a classic
PyTorch loop. Everything Lightning does for you is spelled out here by hand.

    python mnist_pytorch.py --data-dir data --epochs 5

Run ``python mnist_pytorch.py --help`` for every flag.
"""

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import MNIST


# [docs:model]
class MLP(nn.Module):
    """784 -> 512 -> 512 -> 10 with dropout. Takes raw uint8 images."""

    def __init__(self, hidden: int = 512, dropout: float = 0.2):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() / 255.0 - 0.1307) / 0.3081
        return self.layers(x)
# [/docs:model]


# [docs:data]
def load_mnist(data_dir: str, batch_size: int):
    """Train, validation and test loaders over MNIST held as uint8 tensors."""
    try:
        full = MNIST(data_dir, train=True, download=True)
        test = MNIST(data_dir, train=False, download=True)
    except RuntimeError as err:  # offline and the files are missing
        reason = [line for line in str(err).splitlines() if line.strip()][-1].strip()
        sys.exit(f"error: MNIST is not in {data_dir} and could not be downloaded "
                 f"({reason}); run this script once on a machine with internet, "
                 f"e.g. a login node")
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
    n_val = len(full) // 12  # 5,000 of the 60,000 training images
    val_idx, train_idx = order[:n_val], order[n_val:]
    train_set = TensorDataset(full.data[train_idx], full.targets[train_idx])
    val_set = TensorDataset(full.data[val_idx], full.targets[val_idx])
    test_set = TensorDataset(test.data, test.targets)
    return (
        DataLoader(train_set, batch_size=batch_size, shuffle=True),
        DataLoader(val_set, batch_size=batch_size),
        DataLoader(test_set, batch_size=batch_size),
    )
# [/docs:data]


# [docs:loops]
def train_one_epoch(model, loader, optimizer, device):
    model.train()  # dropout on
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
    return loss.item()


@torch.no_grad()
def evaluate(model, loader, device):
    model.eval()  # dropout off
    total_loss, correct, seen = 0.0, 0, 0
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        logits = model(images)
        total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += len(labels)
    return total_loss / seen, correct / seen
# [/docs:loops]


def pick_device(name: str) -> torch.device:
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            sys.exit(f"error: --device {name}: not a device name "
                     "(auto, cpu, cuda, cuda:1, mps)")
        if device.type == "cuda" and not torch.cuda.is_available():
            sys.exit(f"error: --device {name}: PyTorch sees no GPU on this machine")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# [docs:main]
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="data",
                        help="folder holding MNIST/raw/ (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=5, help="default: %(default)s")
    parser.add_argument("--batch-size", type=int, default=128,
                        help="default: %(default)s")
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Adam learning rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="default: %(default)s")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:1, mps (default: %(default)s)")
    parser.add_argument("--output-dir", default="runs/mnist_pytorch",
                        help="the checkpoint goes here (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be at least 1")

    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    train_loader, val_loader, test_loader = load_mnist(args.data_dir, args.batch_size)
    model = MLP().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    best_acc = 0.0
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(args.epochs):
        start = time.perf_counter()
        train_loss = train_one_epoch(model, train_loader, optimizer, device)
        val_loss, val_acc = evaluate(model, val_loader, device)
        print(f"epoch {epoch}: train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
              f"val_acc {val_acc:.4f}  ({time.perf_counter() - start:.1f} s)")
        if val_acc > best_acc:  # the best model and the optimizer state a resume needs
            best_acc = val_acc
            torch.save({"epoch": epoch, "model": model.state_dict(),
                        "optimizer": optimizer.state_dict()}, output_dir / "best.pt")

    best = torch.load(output_dir / "best.pt", map_location=device)
    model.load_state_dict(best["model"])
    _, test_acc = evaluate(model, test_loader, device)
    print(f"test_acc {test_acc:.4f} (best checkpoint: {output_dir / 'best.pt'})")
# [/docs:main]


if __name__ == "__main__":
    main()
