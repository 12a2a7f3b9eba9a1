"""Compare runs: those that share an OUT_DIR are seeds of one recipe, shown as mean +- std.

python tools/compare.py RUN_DIR                        # redraw its curves.png
python tools/compare.py RUN_DIR RUN_DIR ... [--out F]  # one figure, a table"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the template's root, from anywhere

from machinery.curves import draw_curves, plt, read_metrics  # noqa: E402
from machinery.errors import exit_on_usage_error  # noqa: E402
from machinery.loggers import hparams  # noqa: E402
from machinery.rundir import save_figure  # noqa: E402


def monitor(run: Path) -> tuple[str, str]:
    metric, mode = map(hparams(run).get, ("monitor_used", "monitor_mode_used"))
    return metric if isinstance(metric, str) else "val/loss", mode if mode == "max" else "min"


def mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}" if values else "-"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def compare(runs: list[Path], out: Path) -> str:
    groups: dict[str, list[Path]] = {}
    for run in runs:
        groups.setdefault(run.name.split("-", 2)[-1], []).append(run)
    series = {run: read_metrics(run) for run in runs}
    logged = sorted({k for s in series.values() for k in s if k.startswith(("val/", "train/loss"))})
    fig, _ = plt.subplots(1, len(logged), figsize=(5 * len(logged), 4), layout="constrained")
    for ax, key in zip(fig.axes, logged):
        for i, (name, group) in enumerate(groups.items()):
            for j, run in enumerate(r for r in group if key in series[r]):
                ax.plot(*zip(*series[run][key]), f"C{i % 10}", label=None if j else name)
        ax.set(title=key, xlabel="step")
    fig.axes[0].legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out)
    plt.close(fig)

    best, mode = monitor(runs[0])
    pick = max if mode == "max" else min
    rows = [["recipe", "runs", f"best {best}", *logged]]
    for name, group in groups.items():
        ran = [series[run] for run in group]
        cells = [[pick(v for _, v in s[best]) for s in ran if best in s]]
        cells += [[s[key][-1][1] for s in ran if key in s] for key in logged]
        rows.append([name, str(len(group)), *map(mean_std, cells)])
    widths = [max(map(len, column)) for column in zip(*rows)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=Path("comparison.png"), help="the figure")
    args = parser.parse_args(argv)
    runs = list(dict.fromkeys(run.resolve() for run in args.runs))
    with exit_on_usage_error():
        if len(runs) == 1:
            print(f"Wrote {draw_curves(runs[0], *monitor(runs[0]))}")
        else:
            print(f"{compare(runs, args.out)}\nWrote {args.out}")


if __name__ == "__main__":
    cli()
