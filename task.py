"""The task: what a batch holds, the loss, the metrics, and test.py's report. Here: image
classification.

A fork that learns something else edits this file, with its data in data.py and its model in
model.py. The machinery (the loop, checkpoints, resume, distribution, logging, plots) never names a
task; train.py and test.py call these plain functions and read one constant:

    forward(model, batch) -> (loss, preds, target)   on every training and evaluation batch
    metrics(info, report) -> MetricCollection        updated with (preds, target): each scalar is
                                                     logged as val/<name>, plotted, and tested
    report(...) -> dict                              test.py's extras: printed, drawn, saved
    MONITOR                                          the metric that picks best.ckpt (or --monitor)
"""

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display needed on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.fabric import Fabric  # noqa: E402
from torch import nn  # noqa: E402
from torchmetrics import MetricCollection  # noqa: E402
from torchmetrics.classification import (  # noqa: E402
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from data import DataInfo, ImageTensorDataset  # noqa: E402

# best.ckpt follows this validation metric; whether higher is better comes from the metric
# (higher_is_better).
MONITOR = "val/acc"


def forward(model: nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's mean loss, and the (predictions, targets) that the metrics are updated with."""
    images, labels = batch
    logits = model(images)
    return F.cross_entropy(logits, labels), logits, labels


def metrics(info: DataInfo, report: bool = False) -> MetricCollection:
    """Validation and test metrics. With `report`, also test.py's per-class ones, which are not
    scalars."""
    n = info.num_classes
    scalars = {
        "acc": MulticlassAccuracy(n, average="micro"),
        "macro_f1": MulticlassF1Score(n, average="macro"),
    }
    if not report:
        return MetricCollection(scalars)
    return MetricCollection(
        {
            **scalars,
            "precision": MulticlassPrecision(n, average=None),
            "recall": MulticlassRecall(n, average=None),
            "confusion_matrix": MulticlassConfusionMatrix(n),
        }
    )


def report(
    fabric: Fabric,
    model: nn.Module,
    loader: Any,
    dataset: Any,
    info: DataInfo,
    results: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    """test.py's extras: per-class precision, recall and support (printed, and returned for
    metrics.json), the confusion matrix, and for images the first misclassified ones of the test
    split (drawn into out_dir by rank 0, listed in metrics.json)."""
    support = torch.tensor(results["confusion_matrix"]).sum(1).tolist()
    per_class = {
        name: {"precision": p, "recall": r, "support": s}
        for name, p, r, s in zip(info.class_names, results["precision"], results["recall"], support)
    }
    fabric.print(
        f"\n  {'class':>12}  precision  recall  support\n"
        + "\n".join(
            f"  {name:>12}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['support']:7d}"
            for name, c in per_class.items()
        )
    )
    extras = {"confusion_matrix": results["confusion_matrix"], "per_class": per_class}
    if fabric.is_global_zero:
        draw_confusion_matrix(
            results["confusion_matrix"], info.class_names, out_dir / "confusion_matrix.png"
        )
    if isinstance(dataset, ImageTensorDataset):
        index, images, true, predicted = misclassified(fabric, model, loader, dataset)
        extras["misclassified"] = [
            {"index": i, "true": info.class_names[t], "predicted": info.class_names[p]}
            for i, t, p in zip(index, true, predicted)
        ]
        if fabric.is_global_zero and index:
            draw_misclassified(
                images, true, predicted, info.class_names, out_dir / "misclassified.png"
            )
    return extras


@torch.no_grad()
def misclassified(
    fabric: Fabric, model: nn.Module, loader: Any, dataset: ImageTensorDataset, limit: int = 32
) -> tuple[list[int], torch.Tensor, list[int], list[int]]:
    """The first `limit` wrongly classified images of the test split, gathered from every rank in
    the split's order, so that 1 or N devices find the same ones: (indices in the split, images in
    [0, 1], true, predicted)."""
    model.eval()
    found, seen = [], 0  # (index in the split, image, true, predicted)
    for (
        x,
        y,
    ) in (
        loader
    ):  # this rank's shard: samples rank, rank + world_size, ... (loaders.make_eval_loader)
        guesses = model(x).argmax(1)
        for i in (guesses != y).nonzero().flatten()[: limit - len(found)].tolist():
            image = x[i].float().cpu() * dataset.std[0] + dataset.mean[0]  # undo the normalisation
            found.append(
                (
                    fabric.global_rank + (seen + i) * fabric.world_size,
                    image,
                    int(y[i]),
                    int(guesses[i]),
                )
            )
        seen += len(y)
        if len(found) >= limit:
            break
    if (
        fabric.world_size > 1
    ):  # the first `limit` of the split are among the first `limit` of some ranks
        every = [None] * fabric.world_size
        torch.distributed.all_gather_object(every, found)
        found = [item for rank in every for item in rank]
    found = sorted(found, key=lambda item: item[0])[:limit]
    if not found:
        return [], torch.empty(0), [], []
    index, images, true, predicted = zip(*found)
    return list(index), torch.stack(images), list(true), list(predicted)


def draw_confusion_matrix(matrix: list[list[int]], class_names: tuple[str, ...], out: Path) -> Path:
    """Counts of (true class, predicted class)."""
    counts = torch.tensor(matrix)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n), constrained_layout=True)
    ax.imshow(counts, cmap="Blues")
    for i in range(n):
        for j in range(n):
            color = "white" if counts[i, j] > counts.max() / 2 else "black"
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color=color, fontsize=8)
    ax.set(
        xticks=range(n),
        yticks=range(n),
        xticklabels=class_names,
        yticklabels=class_names,
        xlabel="predicted",
        ylabel="true",
        title=f"confusion matrix ({int(counts.sum())} test samples)",
    )
    plt.setp(ax.get_xticklabels(), rotation=45 if max(map(len, class_names)) > 2 else 0, ha="right")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def draw_misclassified(
    images: torch.Tensor,
    true: list[int],
    predicted: list[int],
    class_names: tuple[str, ...],
    out: Path,
) -> Path:
    """A grid of wrongly classified images (N, C, H, W in [0, 1]), titled `true -> predicted`."""
    cols = min(8, len(images))
    rows = math.ceil(len(images) / cols)
    width = max(1.6 * cols, 5.0)  # room for the title, however few images
    fig, axes = plt.subplots(
        rows, cols, figsize=(width, 1.8 * rows + 0.4), squeeze=False, constrained_layout=True
    )
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p in zip(axes.flat, images, true, predicted):
        picture = image.permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy()
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None, interpolation="nearest")
        ax.set_title(f"{class_names[t]} -> {class_names[p]}", fontsize=8, color="tab:red")
    fig.suptitle("misclassified test images: true -> predicted")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
