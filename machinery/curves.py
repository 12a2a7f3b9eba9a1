"""curves.png: a run's curves, drawn from its own CSV record at the end of every launch.

Guarantees: drawn from the whole run's metrics.csv (resumed parts included): train/* and val/loss,
one panel per other validation metric, the LR; the monitored metric's best value is marked."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed on a cluster node
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from RUN_DIR/logs/csv/metrics.csv; rows cut short, or values
    that are not numbers, are left out."""
    from machinery.loggers import read_rows

    series: dict[str, list[tuple[int, float]]] = {}
    for row in read_rows(run_dir / "logs" / "csv" / "metrics.csv")[1]:
        for key, value in row.items():
            try:
                number = float(value)
            except ValueError:  # "" (not logged in this row), or junk
                continue
            if key != "step":
                series.setdefault(key, []).append((int(row["step"]), number))
    return series


def draw_curves(run_dir: Path, monitor: str | None = None, mode: str = "max") -> Path:
    """RUN_DIR/curves.png against the optimizer step."""
    series = read_metrics(run_dir)
    losses = sorted(k for k in series if k.startswith("train/")) + ["val/loss"] * (
        "val/loss" in series
    )
    others = sorted(k for k in series if k.startswith("val/") and k != "val/loss")
    fig, axes = plt.subplots(
        1, 2 + len(others), figsize=(5 * (2 + len(others)), 4), layout="constrained"
    )
    loss_ax, metric_axes, lr_ax = axes[0], dict(zip(others, axes[1:-1])), axes[-1]
    for key in losses:
        marker = "o" if key.startswith("val/") else None
        loss_ax.plot(*zip(*series[key]), label=key, marker=marker, markersize=3)
    positive = all(v > 0 for k in losses for _, v in series[k])
    loss_ax.set(title="loss", xlabel="step", yscale="log" if positive and losses else "linear")
    loss_ax.legend()
    for key, ax in metric_axes.items():
        ax.plot(*zip(*series[key]), marker="o", markersize=3, color="tab:green")
        ax.set(title=key, xlabel="step")
    if monitor in series:
        step, best = (max if mode == "max" else min)(series[monitor], key=lambda point: point[1])
        ax = metric_axes.get(monitor, loss_ax)
        ax.plot([step], [best], "r*", markersize=12, label=f"best {best:.4f} (step {step})")
        ax.legend(loc="best")
    if "lr" in series:
        lr_ax.plot(*zip(*series["lr"]), color="tab:purple")
    lr_ax.set(title="learning rate", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(run_dir.name)
    out = run_dir / "curves.png"
    out.unlink(missing_ok=True)  # never write through a planted link
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
