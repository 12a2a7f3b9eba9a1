"""The task's models and the flags that shape them. A fork edits this file.

Add a model: write a function `(cfg, info) -> nn.Module` and put it in MODELS at the bottom; `--model` takes its
name, and `--help` lists it with the first line of its docstring. Flags that only some models use (like
`--pretrained`) are fields of ArchConfig, checked in `ArchConfig.problems`.

What the machinery uses from here: ArchConfig (with its `model` field and `problems()`), MODELS and build_model.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from data import DataInfo
from errors import UsageError


@dataclass(frozen=True)
class ArchConfig:
    """The network: models are the functions in MODELS (model.py)."""

    RESUME_LOCKED: ClassVar[tuple[str, ...]] = ("model",)  # a resume that changed them would not fit its checkpoint

    model: str = "cnn"
    """Model: a name from MODELS in model.py (listed at the end of --help), or any torchvision classification
    model (resnet18, vit_b_16, ...)."""
    dropout: float = 0.1
    """Dropout probability before the classifier layers."""
    pretrained: bool = False
    """Start a torchvision model from its default pretrained weights (downloaded on first use)."""

    def problems(self) -> list[str]:
        """What is wrong with these values, one line each; checked with the rest of the config."""
        problems = []
        if self.model not in MODELS and self.model not in _torchvision_models():
            problems.append(f"--model {self.model!r} is not one of: {', '.join(MODELS)}, or a torchvision "
                            "classification model (e.g. resnet18, vit_b_16)")
        if not 0 <= self.dropout < 1:
            problems.append(f"--dropout {self.dropout} must be in [0, 1)")
        if self.pretrained and self.model in MODELS:
            problems.append(f"--pretrained needs a torchvision --model, not {self.model}")
        return problems


def build_model(cfg: ArchConfig, info: DataInfo, pretrained: bool = True) -> nn.Module:
    """The model that --model names, for the data that `info` describes. `pretrained=False` where the weights
    come from elsewhere (test.py's checkpoint) or do not matter (FLOPs on the meta device): nothing is downloaded."""
    if cfg.model in MODELS:
        return MODELS[cfg.model](cfg, info)
    return TorchvisionClassifier(cfg.model, info.num_classes, cfg.dropout, cfg.pretrained and pretrained)


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


def cnn(cfg: ArchConfig, info: DataInfo) -> nn.Module:
    """A small CNN (~190k parameters, no batch norm) for any of the image datasets."""
    return SmallCNN(info.in_channels, info.num_classes, cfg.dropout)


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


def _torchvision_models() -> list[str]:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


# --model NAME: one line per model. Any other name is looked up among torchvision's classification models.
MODELS: dict[str, Callable[[ArchConfig, DataInfo], nn.Module]] = {
    "cnn": cnn,
}
