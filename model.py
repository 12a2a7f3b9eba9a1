"""`--model NAME` runs `NAME(cfg, info)` below, else a torchvision classifier with a new head."""

import torch
import torch.nn.functional as F
from torch import nn

from data import DataInfo
from machinery.errors import UsageError
from task_config import MODELS, ArchConfig


def build_model(cfg: ArchConfig, info: DataInfo, pretrained: bool = True) -> nn.Module:
    """`pretrained=False` downloads nothing."""
    if cfg.model in MODELS:
        return globals()[cfg.model](cfg, info)
    return TorchvisionClassifier(cfg.model, info, cfg.dropout, cfg.pretrained and pretrained)


class SmallCNN(nn.Module):
    """No batch norm: the result does not depend on how a batch is split on devices."""

    def __init__(
        self, in_channels: int, num_classes: int, dropout: float, augment: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.augment = augment or nn.Identity()
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
    return SmallCNN(info.in_channels, info.num_classes, cfg.dropout, info.augment)


def resnet18_cifar(cfg: ArchConfig, info: DataInfo) -> nn.Module:
    model = TorchvisionClassifier("resnet18", info, cfg.dropout, pretrained=False)
    model.net.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(model.net.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.net.maxpool = nn.Identity()
    return model


class TorchvisionClassifier(nn.Module):
    """Its last linear layer becomes dropout + one for our classes."""

    def __init__(self, name: str, info: DataInfo, dropout: float, pretrained: bool) -> None:
        super().__init__()
        import torchvision

        self.augment = info.augment or nn.Identity()
        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        try:
            self.net = torchvision.models.get_model(name, weights=weights)
        except (OSError, RuntimeError) as err:
            raise UsageError(
                f"--pretrained: could not download the {name} weights ({str(err).splitlines()[0]})"
                f"; offline, copy {weights.url} into {torch.hub.get_dir()}/checkpoints"
            ) from None
        head, last = [(n, m) for n, m in self.net.named_modules() if isinstance(m, nn.Linear)][-1]
        new = nn.Linear(last.in_features, info.num_classes)
        self.net.set_submodule(head, nn.Sequential(nn.Dropout(dropout), new))
        self.image_size = getattr(self.net, "image_size", None)  # ViTs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.augment(x)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.image_size and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
        return self.net(x)
