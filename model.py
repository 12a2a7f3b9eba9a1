"""Models. To use your own, return it from `build_model`: any nn.Module mapping images to class logits."""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from config import ArchConfig, UsageError
from data import DataInfo


class SmallCNN(nn.Module):
    """Three 3x3 conv layers and a two-layer classifier. Works for 8x8, 28x28 and 32x32 inputs alike:
    adaptive pooling brings every input to 4x4 before the classifier. No batch norm, so with dropout 0
    the result does not depend on how a batch is split across devices."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(64 * 4 * 4, 128), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TorchvisionClassifier(nn.Module):
    """A torchvision classification model with a new `num_classes` head (dropout + linear).

    Grey images are repeated to the 3 channels these models expect, and models that need a fixed input
    size (the ViTs) get their images resized to it.
    """

    def __init__(self, name: str, num_classes: int, dropout: float, pretrained: bool) -> None:
        super().__init__()
        import torchvision

        weights = torchvision.models.get_model_weights(name).DEFAULT if pretrained else None
        try:
            self.net = torchvision.models.get_model(name, weights=weights)
        except (OSError, RuntimeError) as err:  # typically: offline
            cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
            raise UsageError(f"--pretrained: could not download the {name} weights ({str(err).splitlines()[0]}). "
                             f"Without internet, copy {weights.url} to {cache}") from None
        parent, attr, head = _last_linear(self.net)
        setattr(parent, attr, nn.Sequential(nn.Dropout(dropout), nn.Linear(head.in_features, num_classes)))
        self.image_size = getattr(self.net, "image_size", None)  # set on torchvision ViTs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return self.net(x)


def _last_linear(net: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """(parent module, attribute name, layer) of the last nn.Linear: the classification head."""
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    parent_name, _, attr = name.rpartition(".")
    return net.get_submodule(parent_name), attr, net.get_submodule(name)


def build_model(cfg: ArchConfig, info: DataInfo) -> nn.Module:
    if cfg.model == "cnn":
        return SmallCNN(info.in_channels, info.num_classes, cfg.dropout)
    return TorchvisionClassifier(cfg.model, info.num_classes, cfg.dropout, cfg.pretrained)
