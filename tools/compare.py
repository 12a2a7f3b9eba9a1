"""Compare runs: a tool, not part of training.

    python tools/compare.py RUN_DIR                        # redraw RUN_DIR/curves.png
    # one figure (F, comparison.png) and a table
    python tools/compare.py RUN_DIR RUN_DIR ... [--out F]

Runs whose configs differ only in --seed (and in where and how they ran: devices, paths, loggers)
are one recipe: its curves are the mean over the seeds with a band of +-1 standard deviation, its
numbers mean +- std."""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the template's root, from anywhere

from machinery.curves import draw_curves, plt, read_metrics  # noqa: E402
from machinery.errors import exit_on_usage_error  # noqa: E402
from machinery.loggers import hparams  # noqa: E402


def logged_monitor(run_dir: Path) -> tuple[str | None, str]:
    """The metric that picked the run's best.ckpt and its mode, as train.py logged them."""
    logged = hparams(run_dir)
    return logged.get("monitor_used"), logged.get("monitor_mode_used", "max")


# Config fields that say where and how a run ran, logged and checkpointed, not what it computed:
# runs that differ
# only in these (and the seed) are seeds of one recipe. (The same math on any devices and micro-
# batch split.)
NOT_THE_RECIPE = (
    "seed",
    "root_dir",
    "out_dir",
    "comment",
    "project",
    "resume",
    "requeue",
    "logger_name",
    "max_time",
    "hardware.",
    "optim.max_batch_size_per_device",
    "data.data_dir",
    "log.log_interval",
    "log.log_per_epoch",
    "log.checkpoint_frequency",
    "log.checkpoint_every_n_steps",
    "log.num_checkpoint_keep",
    "debug.profile",
    "debug.detect_anomaly",
    "debug.deterministic",
)


def recipes(run_dirs: list[Path]) -> dict[str, list[Path]]:
    """The runs grouped by recipe (their config without NOT_THE_RECIPE), each named by the fields in
    which the recipes differ (or by the out_dir, for a single recipe)."""
    from machinery.cli import flatten, load_train_config

    configs = {
        run: flatten(load_train_config(run / "config.yaml", validated=False)) for run in run_dirs
    }
    recipe_of = {
        run: tuple(
            sorted(
                (key, repr(value))
                for key, value in config.items()
                if not key.startswith(NOT_THE_RECIPE)
            )
        )
        for run, config in configs.items()
    }
    groups: dict[tuple, list[Path]] = {}
    for run in run_dirs:
        groups.setdefault(recipe_of[run], []).append(run)
    differing = sorted(
        {
            key
            for recipe in groups
            for key, value in recipe
            if any((key, value) not in other for other in groups)
        }
    )
    named = {}
    for recipe, runs in groups.items():
        values = dict(recipe)
        name = ", ".join(f"{key.split('.')[-1]}={values.get(key, '-')}" for key in differing) or (
            runs[0].name if len(runs) == 1 else runs[0].name.split("-", 2)[-1]
        )  # one recipe: its --out_dir
        seeds = len({configs[run]["seed"] for run in runs})
        count = f"{seeds} seeds" if seeds == len(runs) else f"{len(runs)} runs, {seeds} seed(s)"
        named[f"{name} ({count})" if len(runs) > 1 else name] = runs
    return named


def compare(run_dirs: list[Path], out: Path) -> str:
    """Overlay the runs' curves in `out` (one panel per logged loss and validation metric, seeds of
    one recipe as their mean with a +-1 std band) and return a table of each recipe's best monitored
    value and final numbers."""
    groups = recipes(run_dirs)
    series = {run: read_metrics(run) for run in run_dirs}
    keys = [k for k in ("train/loss", "val/loss") if any(k in s for s in series.values())]
    keys += sorted(
        {k for s in series.values() for k in s if k.startswith("val/") and k != "val/loss"}
    )
    fig, axes = plt.subplots(
        1, len(keys), figsize=(5 * len(keys), 4), constrained_layout=True, squeeze=False
    )
    for (name, runs), color in zip(
        groups.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10
    ):
        for key, ax in zip(keys, axes[0]):
            curves = [dict(series[run][key]) for run in runs if key in series[run]]
            steps = sorted(
                {step for curve in curves for step in curve}
            )  # seeds that stopped early end sooner
            if not steps:
                continue
            at = {step: [curve[step] for curve in curves if step in curve] for step in steps}
            mean = [statistics.fmean(at[step]) for step in steps]
            ax.plot(
                steps,
                mean,
                color=color,
                label=name,
                marker="o" if key.startswith("val/") else None,
                markersize=3,
            )
            if len(curves) > 1:
                std = [statistics.stdev(at[step]) if len(at[step]) > 1 else 0.0 for step in steps]
                ax.fill_between(
                    steps,
                    [m - d for m, d in zip(mean, std)],
                    [m + d for m, d in zip(mean, std)],
                    color=color,
                    alpha=0.2,
                    linewidth=0,
                )
    for key, ax in zip(keys, axes[0]):
        ax.set(title=key, xlabel="step")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"{len(run_dirs)} runs, {len(groups)} recipe(s)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return _table(groups, series)


def _table(groups: dict[str, list[Path]], series: dict[Path, dict]) -> str:
    """Per recipe: its runs, the best value of the metric that picked best.ckpt, and every number's
    last value."""
    monitor, mode = logged_monitor(next(iter(series)))
    columns = [f"best {monitor}"] if monitor else []
    columns += sorted(
        {k for s in series.values() for k in s if k.startswith(("val/", "train/loss"))}
    )

    def value(run: Path, column: str) -> float | None:
        if column.startswith("best "):
            points = [v for _, v in series[run].get(monitor, [])]
            return (max if mode == "max" else min)(points) if points else None
        return series[run][column][-1][1] if column in series[run] else None

    rows = [["recipe", "runs", *columns]]
    for name, runs in groups.items():
        cells = [name, str(len(runs))]
        for column in columns:
            values = [v for run in runs if (v := value(run, column)) is not None]
            cells.append(
                "-"
                if not values
                else f"{values[0]:.4f}"
                if len(values) == 1
                else f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"
            )
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "best: over each run's validations; the rest: the last value logged\n" + "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows
    )


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="python tools/compare.py RUN_DIR [RUN_DIR ...] [--out FILE]",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument(
        "--out", type=Path, default=Path("comparison.png"), help="the comparison figure"
    )
    args = parser.parse_args(argv)
    run_dirs = list(
        dict.fromkeys(run.resolve() for run in args.run_dirs)
    )  # a run given twice is one run
    missing = [
        str(run)
        for run in run_dirs
        if not (run / "logs" / "csv" / "metrics.csv").is_file()
        or not (run / "config.yaml").is_file()
    ]
    if missing:
        print(
            "error: not a run directory with config.yaml and logs/csv/metrics.csv: "
            f"{', '.join(missing)}",
            file=sys.stderr,
        )
        sys.exit(2)
    if len(run_dirs) == 1:
        print(f"Wrote {draw_curves(run_dirs[0], *logged_monitor(run_dirs[0]))}")
        return
    with exit_on_usage_error():  # a hand-edited config.yaml that does not parse: one line
        print(compare(run_dirs, args.out))
    print(f"Wrote {args.out}")


if __name__ == "__main__":
    cli()
