"""curves.png, from the whole run's metrics.csv; the monitored metric's best is marked."""

import contextlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from machinery.rundir import save_figure  # noqa: E402


def read_metrics(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from machinery.loggers import read_rows

    series: dict[str, list[tuple[int, float]]] = {}
    for row in read_rows(run_dir / "logs" / "csv" / "metrics.csv")[1]:
        step = int(row.pop("step"))
        for key, value in row.items():
            with contextlib.suppress(ValueError):
                number = float(value)
                series.setdefault(key, []).append((step, number))
    return series


def draw_curves(run_dir: Path, monitor: str | None = None, mode: str = "max") -> Path:
    series = read_metrics(run_dir)
    others = sorted(k for k in series if k.startswith("val/") and k != "val/loss")
    size = (10 + 5 * len(others), 4)
    fig, axes = plt.subplots(1, 2 + len(others), figsize=size, layout="constrained")
    panels = dict(zip(["loss", *others, "lr"], axes))
    for key, points in sorted(series.items()):
        panel = "loss" if key.startswith("train/") or key == "val/loss" else key
        if panel in panels:
            marker = "o" if key.startswith("val/") else None
            panels[panel].plot(*zip(*points), label=key, marker=marker, markersize=3)
    if axes[0].lines and axes[0].dataLim.y0 > 0:
        axes[0].set_yscale("log")
    if monitor in series:
        step, best = (max if mode == "max" else min)(series[monitor], key=lambda point: point[1])
        label = f"best {best:.4f} (step {step})"
        panels.get(monitor, axes[0]).plot([step], [best], "r*", markersize=12, label=label)
    for title, ax in panels.items():
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(run_dir.name)
    out = run_dir / "curves.png"
    save_figure(fig, out)
    plt.close(fig)
    return out
