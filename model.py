"""The task's models. A fork edits this file, with task_config.py.

Add a model: write a function `NAME(cfg, info) -> nn.Module` here and name it in MODELS in
task_config.py, with its one-line help; `--model NAME` runs it. Flags that only some models use
(like `--pretrained`) are fields of ArchConfig in task_config.py, checked in `ArchConfig.problems`.

What the machinery uses from here: build_model, and `parallelize(model, mesh)` if defined
(--strategy fsdp)."""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from data import DataInfo
from machinery.errors import UsageError
from task_config import MODELS, ArchConfig


def build_model(cfg: ArchConfig, info: DataInfo, pretrained: bool = True) -> nn.Module:
    """The model that --model names, for the data that `info` describes. `pretrained=False` where
    the weights come from elsewhere (test.py's checkpoint) or do not matter (FLOPs on the meta
    device): nothing is downloaded."""
    if cfg.model in MODELS:
        build = globals().get(cfg.model)  # --model NAME is the function NAME below
        if not callable(build):
            raise UsageError(
                f"--model {cfg.model!r} is in task_config.MODELS, but model.py has no such function"
            )
        return build(cfg, info)
    return TorchvisionClassifier(cfg.model, info, cfg.dropout, cfg.pretrained and pretrained)


class SmallCNN(nn.Module):
    """Three 3x3 conv layers and a two-layer classifier. Works for 8x8, 28x28 and 32x32 inputs
    alike: adaptive pooling brings every input to 4x4 before the classifier. No batch norm, so with
    dropout 0 the result does not depend on how a batch is split across devices."""

    def __init__(
        self, in_channels: int, num_classes: int, dropout: float, augment: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.augment = (
            augment or nn.Identity()
        )  # the dataset's (DataInfo.augment): training batches only
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.augment(x)))


def cnn(cfg: ArchConfig, info: DataInfo) -> nn.Module:
    """A small CNN (~190k parameters, no batch norm) for any of the image datasets."""
    return SmallCNN(info.in_channels, info.num_classes, cfg.dropout, info.augment)


def resnet18_cifar(cfg: ArchConfig, info: DataInfo) -> nn.Module:
    """torchvision's ResNet-18 with the stem CIFAR ResNets use: its 7x7 stride-2 conv and max-pool
    would shrink a 32x32 image to 8x8 before the first block; a 3x3 stride-1 conv without the pool
    keeps 32x32 there."""
    model = TorchvisionClassifier("resnet18", info, cfg.dropout, pretrained=False)
    model.net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(
        model.net.conv1.weight, mode="fan_out", nonlinearity="relu"
    )  # as torchvision's own
    model.net.maxpool = nn.Identity()
    return model


class TorchvisionClassifier(nn.Module):
    """A torchvision classification model with a new `num_classes` head (dropout + linear).

    Grey images are repeated to the 3 channels these models expect, and models that need a fixed
    input size (the ViTs) get their images resized to it."""

    def __init__(self, name: str, info: DataInfo, dropout: float, pretrained: bool) -> None:
        super().__init__()
        import torchvision

        self.augment = (
            info.augment or nn.Identity()
        )  # the dataset's (DataInfo.augment): training batches only
        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        try:
            self.net = torchvision.models.get_model(name, weights=weights)
        except (OSError, RuntimeError) as err:  # typically: offline
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise UsageError(
                f"--pretrained: could not download the {name} weights "
                f"({str(err).splitlines()[0]}). "
                f"Without internet, copy {weights.url} to {cache}"
            ) from None
        parent, attr, head = _last_linear(self.net)
        setattr(
            parent,
            attr,
            nn.Sequential(nn.Dropout(dropout), nn.Linear(head.in_features, info.num_classes)),
        )
        self.image_size = getattr(self.net, "image_size", None)  # set on torchvision ViTs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.augment(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(
                x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False
            )
        return self.net(x)


def _last_linear(net: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent module, attribute name, layer) of the last nn.Linear: the classification head."""
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, attr = name.rpartition(".")
    return net.get_submodule(parent_name), attr, net.get_submodule(name)
