"""A toy task's models, as a fork writes them: MLPs for tabular regression, with a flag of their own."""

from torch import nn

from data import DataInfo
from task_config import ArchConfig


def build_model(cfg: ArchConfig, info: DataInfo, pretrained: bool = True) -> nn.Module:
    return globals()[cfg.model](cfg, info)  # nothing pretrained here


def mlp(cfg: ArchConfig, info: DataInfo) -> nn.Module:
    """Two linear layers with a tanh and dropout between them."""
    return nn.Sequential(
        nn.Linear(info.num_features, cfg.hidden),
        nn.Tanh(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden, 1),
    )


def deeper(cfg: ArchConfig, info: DataInfo) -> nn.Module:
    """The MLP with a second hidden layer: the same first layer, a new head (what --init_from meets in fine-tuning)."""
    return nn.Sequential(
        nn.Linear(info.num_features, cfg.hidden),
        nn.Tanh(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden, cfg.hidden),
        nn.Tanh(),
        nn.Linear(cfg.hidden, 1),
    )


def linear(cfg: ArchConfig, info: DataInfo) -> nn.Module:
    """Linear regression."""
    return nn.Linear(info.num_features, 1)
