"""The task: what a batch holds, the loss, the metrics and test.py's report (here: image
classification). The machinery never names a task; train.py and test.py call these:

    forward(model, batch) -> (loss, preds, target)  every training and evaluation batch
    metrics(info, report) -> MetricCollection       updated with (preds, target); logs val/<name>
    report(...) -> dict                             test.py's extras: printed, drawn, saved
    MONITOR                                         the metric best.ckpt follows (or --monitor)
"""

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from matplotlib.figure import Figure
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from data import DataInfo
from machinery.rundir import save_figure

MONITOR = "val/acc"  # best.ckpt follows it; the metric's higher_is_better gives the direction


def forward(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    images, labels = batch
    logits = model(images)
    return F.cross_entropy(logits, labels), logits, labels


def metrics(info: DataInfo, report: bool = False) -> MetricCollection:
    """With `report`, also test.py's per-class metrics, which are not scalars."""
    n = info.num_classes
    found = {"acc": MulticlassAccuracy(n, average="micro")}
    found["macro_f1"] = MulticlassF1Score(n, average="macro")
    if report:
        found["precision"] = MulticlassPrecision(n, average=None)
        found["recall"] = MulticlassRecall(n, average=None)
        found["confusion_matrix"] = MulticlassConfusionMatrix(n)
    return MetricCollection(found)


def report(
    fabric: Fabric, model: Any, loader: Any, data: Any, info: DataInfo, results: dict, out_dir: Path
) -> dict[str, Any]:
    """Per-class precision, recall and support (printed), and the confusion matrix (drawn)."""
    names, matrix = info.class_names, torch.tensor(results["confusion_matrix"])
    support = matrix.sum(1).tolist()
    per_class = {
        name: {"precision": p, "recall": r, "support": s}
        for name, p, r, s in zip(names, results["precision"], results["recall"], support)
    }
    fabric.print(f"\n  {'class':>12}  precision  recall  support")
    for name, c in per_class.items():
        fabric.print(f"  {name:>12}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['support']:7d}")
    if fabric.is_global_zero:
        ax = Figure(figsize=(2 + 0.6 * len(names),) * 2, layout="constrained").subplots()
        MulticlassConfusionMatrix(len(names)).plot(matrix, ax=ax, labels=list(names), cmap="Blues")
        save_figure(ax.figure, out_dir / "confusion_matrix.png")
    return {"confusion_matrix": results["confusion_matrix"], "per_class": per_class}
