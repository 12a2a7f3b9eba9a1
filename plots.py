"""Figures drawn from a run's own records. Redraw a run's curves with:  python plots.py RUN_DIR"""

import csv
import sys
from pathlib import Path

import matplotlib
import yaml

matplotlib.use("Agg")  # files only: no display needed on a cluster node
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from RUN_DIR/logs/csv/metrics.csv, which every run keeps. A row cut short (a
    kill or a full disk in the middle of writing it) is left out."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(run_dir / "logs" / "csv" / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            if None in row or None in row.values() or not (row["step"] or "").isdigit():
                continue
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


def draw_curves(run_dir: Path, monitor: str | None = None, mode: str = "max") -> Path:
    """RUN_DIR/curves.png against the optimizer step: train and val loss, then one panel per other validation
    metric the run logged, then the learning rate. With `monitor`, its best value (`mode` min or max) is marked."""
    series = read_metrics(run_dir)
    others = sorted(key for key in series if key.startswith("val/") and key != "val/loss")
    fig, axes = plt.subplots(1, 2 + len(others), figsize=(5 * (2 + len(others)), 4), constrained_layout=True)
    loss_ax, metric_axes, lr_ax = axes[0], dict(zip(others, axes[1:-1])), axes[-1]
    for key, label in [("train/loss", "train"), ("val/loss", "val")]:
        if key in series:
            loss_ax.plot(*zip(*series[key]), label=label, marker="o" if key == "val/loss" else None, markersize=3)
    loss_ax.set(title="loss", xlabel="step", yscale="log" if _positive(series, "train/loss", "val/loss") else "linear")
    loss_ax.legend()
    for key, ax in metric_axes.items():
        ax.plot(*zip(*series[key]), marker="o", markersize=3, color="tab:green")
        ax.set(title=key, xlabel="step")
    if monitor in series:
        best_step, best = (max if mode == "max" else min)(series[monitor], key=lambda point: point[1])
        ax = metric_axes.get(monitor, loss_ax)
        ax.plot([best_step], [best], marker="*", markersize=12, color="tab:red", linestyle="none",
                label=f"best {best:.4f} (step {best_step})")
        ax.legend(loc="best")  # placed where it covers the fewest points
    if "lr" in series:
        lr_ax.plot(*zip(*series["lr"]), color="tab:purple")
    lr_ax.set(title="learning rate", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def _positive(series: dict[str, list[tuple[int, float]]], *keys: str) -> bool:
    return all(value > 0 for key in keys for _, value in series.get(key, []))


def logged_monitor(run_dir: Path) -> tuple[str | None, str]:
    """The metric that picked the run's best.ckpt, and its mode, as train.py logged them in hparams.yaml."""
    path = run_dir / "logs" / "csv" / "hparams.yaml"
    hparams = yaml.safe_load(path.read_text()) if path.is_file() else {}
    return hparams.get("monitor_used"), hparams.get("monitor_mode_used", "max")


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "logs" / "csv" / "metrics.csv").is_file():
        sys.exit("usage: python plots.py RUN_DIR   (a run directory with logs/csv/metrics.csv)")
    print(f"Wrote {draw_curves(Path(sys.argv[1]), *logged_monitor(Path(sys.argv[1])))}")
