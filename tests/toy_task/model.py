"""A toy task's models, as a fork writes them: MLPs for tabular regression, with a flag of their own."""

from dataclasses import dataclass
from typing import Callable, ClassVar

from torch import nn

from data import DataInfo


@dataclass(frozen=True)
class ArchConfig:
    """The network: models are the functions in MODELS (model.py)."""

    RESUME_LOCKED: ClassVar[tuple[str, ...]] = ("model", "hidden")  # the checkpoint would not fit

    model: str = "mlp"
    """Model: a name from MODELS in model.py (listed at the end of --help)."""
    hidden: int = 32
    """Hidden units of the MLP."""
    dropout: float = 0.1
    """Dropout probability after the hidden layer."""

    def problems(self) -> list[str]:
        problems = []
        if self.model not in MODELS:
            problems.append(f"--model {self.model!r} is not one of: {', '.join(MODELS)}")
        if self.hidden < 1:
            problems.append(f"--hidden {self.hidden} must be >= 1")
        return problems


def build_model(cfg: ArchConfig, info: DataInfo, pretrained: bool = True) -> nn.Module:
    return MODELS[cfg.model](cfg, info)  # nothing pretrained here


def mlp(cfg: ArchConfig, info: DataInfo) -> nn.Module:
    """Two linear layers with a tanh and dropout between them."""
    return nn.Sequential(nn.Linear(info.num_features, cfg.hidden), nn.Tanh(), nn.Dropout(cfg.dropout),
                         nn.Linear(cfg.hidden, 1))


def deeper(cfg: ArchConfig, info: DataInfo) -> nn.Module:
    """The MLP with a second hidden layer: the same first layer, a new head (what --init_from meets in fine-tuning)."""
    return nn.Sequential(nn.Linear(info.num_features, cfg.hidden), nn.Tanh(), nn.Dropout(cfg.dropout),
                         nn.Linear(cfg.hidden, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, 1))


def linear(cfg: ArchConfig, info: DataInfo) -> nn.Module:
    """Linear regression."""
    return nn.Linear(info.num_features, 1)


MODELS: dict[str, Callable[[ArchConfig, DataInfo], nn.Module]] = {
    "mlp": mlp,
    "deeper": deeper,
    "linear": linear,
}
