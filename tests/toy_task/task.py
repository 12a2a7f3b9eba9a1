"""A toy task, as a fork writes it: regression on dict batches, model selection by the lowest mean absolute
error, and no classification code anywhere."""

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection

from data import DataInfo

MONITOR = "val/mae"  # MeanAbsoluteError.higher_is_better is False: the lowest is best


def forward(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    preds = model(batch["features"]).squeeze(-1)
    target = batch["target"].to(preds.dtype)
    return F.mse_loss(preds, target), preds, target


def metrics(info: DataInfo, report: bool = False) -> MetricCollection:
    return MetricCollection({"mse": MeanSquaredError(), "mae": MeanAbsoluteError()})


def report(
    fabric: Fabric,
    model: nn.Module,
    loader: Any,
    dataset: Any,
    info: DataInfo,
    results: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    """No extras beyond the metrics."""
    return {}
