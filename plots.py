"""Figures drawn from a run's own records. Redraw a run's curves with:  python plots.py RUN_DIR"""

import csv
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from RUN_DIR/logs/csv/metrics.csv, which every run keeps."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def draw_curves(run_dir: Path) -> Path:
    """RUN_DIR/curves.png: train and val loss, val accuracy and learning rate against the optimizer step."""
    series = read_metrics(run_dir)
    fig, (loss_ax, acc_ax, lr_ax) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for key, label in [("train/loss", "train"), ("val/loss", "val")]:
        if key in series:
            loss_ax.plot(*zip(*series[key]), label=label, marker="o" if key == "val/loss" else None, markersize=3)
    loss_ax.set(title="loss", xlabel="step", yscale="log")
    loss_ax.legend()
    if "val/acc" in series:
        acc_ax.plot(*zip(*series["val/acc"]), marker="o", markersize=3, color="tab:green")
        best_step, best = max(series["val/acc"], key=lambda point: point[1])
        acc_ax.annotate(f"best {best:.4f}", (best_step, best), textcoords="offset points", xytext=(-40, -15))
    acc_ax.set(title="validation accuracy", xlabel="step")
    if "lr" in series:
        lr_ax.plot(*zip(*series["lr"]), color="tab:purple")
    lr_ax.set(title="learning rate", xlabel="step")
    for ax in (loss_ax, acc_ax, lr_ax):
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def draw_confusion_matrix(matrix: list[list[int]], class_names: tuple[str, ...], out: Path) -> Path:
    """Counts of (true class, predicted class), with each row's recall in the labels."""
    counts = torch.tensor(matrix)
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.6 * n), constrained_layout=True)
    ax.imshow(counts, cmap="Blues")
    for i in range(n):
        for j in range(n):
            color = "white" if counts[i, j] > counts.max() / 2 else "black"
            ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", color=color, fontsize=8)
    ax.set(xticks=range(n), yticks=range(n), xticklabels=class_names, yticklabels=class_names,
           xlabel="predicted", ylabel="true", title=f"confusion matrix ({int(counts.sum())} test samples)")
    plt.setp(ax.get_xticklabels(), rotation=45 if max(map(len, class_names)) > 2 else 0, ha="right")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def draw_misclassified(images: torch.Tensor, true: list[int], predicted: list[int], class_names: tuple[str, ...],
                       out: Path) -> Path:
    """A grid of wrongly classified images (N, C, H, W in [0, 1]), each titled `true -> predicted`."""
    cols = min(8, len(images))
    rows = math.ceil(len(images) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False, constrained_layout=True)
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


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "logs" / "csv" / "metrics.csv").is_file():
        sys.exit("usage: python plots.py RUN_DIR   (a run directory with logs/csv/metrics.csv)")
    print(f"Wrote {draw_curves(Path(sys.argv[1]))}")
