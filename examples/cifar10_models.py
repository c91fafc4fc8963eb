"""The networks that cifar10_lightning.py trains, and the units FSDP cuts them into.

    cnn        a small CNN: four convolution blocks, 0.4 M parameters
    resnet18   torchvision's ResNet-18 with a stem for 32x32 images, 11 M parameters
    vit        a small Vision Transformer; --vit-width and --vit-depth set its size

Keep it next to cifar10_lightning.py, which imports it.
"""

import functools

import torch
import torchvision
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy, size_based_auto_wrap_policy
from torchvision.models.resnet import BasicBlock


# [docs:models]
class ConvBlock(nn.Sequential):
    """3x3 convolution, batch norm, ReLU: the repeating unit of the small CNN."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def small_cnn(num_classes: int = 10) -> nn.Module:
    """0.4 M parameters, 90 MFLOP per training image: an epoch in minutes on a CPU."""
    return nn.Sequential(
        ConvBlock(3, 32), nn.MaxPool2d(2),     # 32x32 -> 16x16
        ConvBlock(32, 64), nn.MaxPool2d(2),    # -> 8x8
        ConvBlock(64, 128), nn.MaxPool2d(2),   # -> 4x4
        ConvBlock(128, 256), nn.AdaptiveMaxPool2d(1),
        nn.Flatten(), nn.Linear(256, num_classes),
    )


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet-18 (11 M parameters) adapted to 32x32 images.

    The ImageNet stem (7x7 stride-2 convolution, then max-pool) would shrink a CIFAR
    image to 8x8 before the first residual block; a 3x3 stride-1 stem keeps 32x32.
    """
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
# [/docs:models]


# [docs:vit]
class ViTBlock(nn.Module):
    """Attention across the image's patches, then a per-patch MLP; each adds to x."""

    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, width // 32, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                 nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attention(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """A Vision Transformer for 32x32 images: 64 patches of 4x4 pixels, `depth` blocks
    of about 12 x width^2 parameters each (depth 4, width 128: 0.8 M in all)."""

    def __init__(self, width: int = 128, depth: int = 4, num_classes: int = 10):
        super().__init__()
        self.patches = nn.Conv2d(3, width, kernel_size=4, stride=4)  # -> 8x8 patches
        self.position = nn.Parameter(torch.zeros(1, 64, width))
        self.blocks = nn.Sequential(*[ViTBlock(width) for _ in range(depth)])
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patches(images).flatten(2).transpose(1, 2) + self.position
        return self.head(self.blocks(x).mean(dim=1))  # the mean over all patches


# [/docs:vit]


MODELS = {"cnn": small_cnn, "resnet18": resnet18_cifar, "vit": ViT}


# [docs:units]
BLOCKS = (ConvBlock, BasicBlock, ViTBlock)  # the repeating units of the three models


def wrap_policy(name: str, min_params: int):
    """Which submodules FSDP turns into separately sharded units.

    none:  the whole model is one unit; every parameter is gathered at once.
    block: each block (CNN, ResNet-18's residual blocks, ViT) is a unit.
    size:  any subtree holding at least min_params parameters becomes a unit.
    """
    if name == "none":
        return None
    if name == "block":
        return ModuleWrapPolicy(set(BLOCKS))
    return functools.partial(size_based_auto_wrap_policy, min_num_params=min_params)


def shard_units(net: nn.Module, name: str, min_params: int) -> list[nn.Module]:
    """FSDP2's wrapping: the same three choices as wrap_policy, as a list of modules,
    innermost first, that get a fully_shard call of their own before the root does."""
    if name == "block":
        return [m for m in net.modules() if isinstance(m, BLOCKS)]
    units = []

    def unsharded_params(module: nn.Module) -> int:  # the size rule, bottom up
        n = sum(p.numel() for p in module.parameters(recurse=False))
        n += sum(unsharded_params(child) for child in module.children())
        if name == "size" and module is not net and n >= min_params:
            units.append(module)
            return 0
        return n

    unsharded_params(net)
    return units
# [/docs:units]
