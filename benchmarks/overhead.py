"""What this template's training loop costs per step, next to a raw PyTorch loop and the Lightning Trainer.

    python benchmarks/overhead.py                      # ~4 min on a 2-core CPU
    python benchmarks/overhead.py --speed_options      # also --channels_last, --compile, an unfused optimizer

Reported: steps/s and ms/step of each (median over the repeats, with min and max), the template's and the
Trainer's overhead over raw in ms/step (round by round), the data wait and the checkpoint cost (on the training
thread, and the background write apart), and the whole-process time of `train.py --help`, of a bad flag and of
the default run (start-up).

Same model (the default CNN), data (digits, in memory), batch size (64) and precision (32-true) for each
contender, in one process. The contenders alternate within each repeat, so that drift of the machine hits them
all alike. Steady-state steps/s counts only the optimizer steps inside an epoch, after the first epoch: the
first step of an epoch also pays for the previous validation and checkpoints, which are reported apart.

  raw      a minimal PyTorch loop with the same math (fused AdamW, gradient clipping at 1.0, warmup-cosine
           LR): no Fabric, no logging, no progress bar
  template train.py's own main(), unmodified: Fabric, logging, tqdm and throughput at their default cadence
  trainer  lightning.Trainer with an equivalent LightningModule (same math), progress bar and logging at
           their defaults

Writes benchmarks/results/<name>.json.
"""

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import machinery.run  # noqa: E402
import machinery.sampler  # noqa: E402
import train  # noqa: E402
from config import OptimConfig  # noqa: E402
from data import load_splits  # noqa: E402
from machinery import checkpoints, launch  # noqa: E402
from machinery.cli import parse_train_config  # noqa: E402
from machinery.sampler import make_eval_loader, make_train_loader  # noqa: E402
from machinery.schedule import lr_factor, lr_schedule  # noqa: E402
from model import SmallCNN  # noqa: E402
from task_config import DataConfig  # noqa: E402

BATCH_SIZE, LR, SEED = 64, 2e-3, 42


def steady_steps_per_sec(stamps: list[float], steps_per_epoch: int) -> float:
    """Steps/s from the time of each optimizer step's end, counting neither the first epoch nor the first step
    of any epoch (which includes the previous epoch's validation and checkpoints)."""
    intervals = [
        b - a
        for i, (a, b) in enumerate(zip(stamps, stamps[1:]), start=1)
        if i >= steps_per_epoch and i % steps_per_epoch != 0
    ]
    return len(intervals) / sum(intervals)


def run_raw(epochs: int, fused: bool = True) -> dict[str, Any]:
    train_set, _, _, info = load_splits(DataConfig(), SEED)
    torch.manual_seed(SEED)
    model = SmallCNN(info.in_channels, info.num_classes, dropout=0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, fused=fused or None)
    steps_per_epoch = len(train_set) // BATCH_SIZE
    schedule = lr_schedule(OptimConfig(epochs=epochs), epochs, steps_per_epoch)
    stamps = []
    for epoch in range(epochs):
        order = torch.randperm(len(train_set))
        for step in range(steps_per_epoch):
            x, y = train_set.__getitems__(order[step * BATCH_SIZE : (step + 1) * BATCH_SIZE])
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
            for group in optimizer.param_groups:
                group["lr"] = LR * lr_factor(epoch * steps_per_epoch + step, schedule)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stamps.append(time.perf_counter())
    return {"steps_per_sec": steady_steps_per_sec(stamps, steps_per_epoch)}


def run_template(epochs: int, extra_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """train.py's main() as it is. Only observed: Run.log_step marks each optimizer step's end,
    the training DataLoader's iterator is timed, and so are the checkpoint saves."""
    stamps, data_wait, saves = [], [0.0], []

    def clocked_log_step(run: machinery.run.Run, *args: Any) -> None:  # after each optimizer step
        stamps.append(time.perf_counter())
        log_step(run, *args)

    def timed_loader(*args: Any, **kwargs: Any) -> Any:
        loader = make_train_loader(*args, **kwargs)
        iterate = loader.__class__.__iter__

        class TimedLoader(loader.__class__):
            def __iter__(self):  # noqa: ANN204
                iterator = iterate(self)
                while True:
                    start = time.perf_counter()
                    try:
                        batch = next(iterator)
                    except StopIteration:
                        return
                    data_wait[0] += time.perf_counter() - start
                    yield batch

        loader.__class__ = TimedLoader
        return loader

    def timed_save(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        save_checkpoint(*args, **kwargs)
        saves.append(time.perf_counter() - start)

    def timed_write(
        *args: Any, **kwargs: Any
    ) -> None:  # in the background thread: serialise, flush, rename
        start = time.perf_counter()
        write(*args, **kwargs)
        writes.append(time.perf_counter() - start)

    save_checkpoint, write, log_step = (
        checkpoints.save_checkpoint,
        checkpoints.write_and_publish,
        machinery.run.Run.log_step,
    )
    writes: list[float] = []
    with (
        tempfile.TemporaryDirectory() as root,
        _patched(machinery.run.Run, "log_step", clocked_log_step),
        _patched(machinery.sampler, "make_train_loader", timed_loader),  # what make_loaders calls
        _patched(
            machinery.run, "save_checkpoint", timed_save
        ),  # what machinery/run's Run.save calls
        _patched(checkpoints, "write_and_publish", timed_write),
    ):
        cfg = parse_train_config(["--root_dir", root, "--epochs", str(epochs), *extra_args])
        train_start = time.perf_counter()
        launch.run(train.main, cfg, cfg.hardware)  # as train.py's cli() does: Fabric, its loggers
        train_seconds = time.perf_counter() - train_start
    steps_per_epoch = len(stamps) // epochs
    return {
        "steps_per_sec": steady_steps_per_sec(stamps, steps_per_epoch),
        "data_wait_fraction": data_wait[0] / (stamps[-1] - stamps[0]),
        "checkpoint_seconds": statistics.median(saves),
        "checkpoints": len(saves),
        "checkpoint_fraction": sum(saves) / train_seconds,
        "checkpoint_writer_seconds": statistics.median(writes),
        "checkpoint_writer_fraction": sum(writes) / train_seconds,
    }


def run_trainer(epochs: int) -> dict[str, Any]:
    import lightning.pytorch as pl

    train_set, val_set, _, info = load_splits(DataConfig(), SEED)
    stamps = []

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = SmallCNN(info.in_channels, info.num_classes, dropout=0.1)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("train/loss", loss)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            self.log("val/loss", F.cross_entropy(self.model(x), y))

        def configure_optimizers(self) -> dict:
            optimizer = torch.optim.AdamW(self.parameters(), lr=LR, weight_decay=0.01, fused=True)
            steps_per_epoch = len(train_set) // BATCH_SIZE
            schedule = lr_schedule(OptimConfig(epochs=epochs), epochs, steps_per_epoch)
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda step: lr_factor(step, schedule)
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

        def on_train_batch_end(self, *args: Any) -> None:
            stamps.append(time.perf_counter())

    sampler = torch.utils.data.BatchSampler(
        torch.utils.data.RandomSampler(train_set), BATCH_SIZE, drop_last=True
    )
    with tempfile.TemporaryDirectory() as root:
        pl.seed_everything(SEED, verbose=False)
        trainer = pl.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            devices=1,
            default_root_dir=root,
            gradient_clip_val=1.0,
        )
        trainer.fit(
            Module(),
            make_train_loader(train_set, sampler, 0),
            make_eval_loader(val_set, BATCH_SIZE, 0, 1, 0),
        )
    return {"steps_per_sec": steady_steps_per_sec(stamps, len(train_set) // BATCH_SIZE)}


@contextlib.contextmanager
def _patched(owner: Any, name: str, value: Any):  # noqa: ANN202
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def measure(contenders: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    """Each contender's numbers from each of `repeats` rounds, the contenders taking turns (order rotated each
    round). One round before them warms up the allocator, the caches and the lazy imports, and is not counted."""
    names = list(contenders)
    for name in names:
        _quietly(contenders[name])
    results: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            results[name].append(_quietly(contenders[name]))
            print(
                f"  repeat {repeat + 1}/{repeats} {name:<24} {results[name][-1]['steps_per_sec']:7.1f} steps/s",
                file=sys.__stderr__,
                flush=True,
            )
    return results


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def overhead_ms(runs: dict[str, list[dict]], name: str) -> dict[str, float]:
    """`name`'s ms/step minus raw's, round by round (the two ran back to back, on the same machine state)."""
    return spread(
        [
            1000 / a["steps_per_sec"] - 1000 / b["steps_per_sec"]
            for a, b in zip(runs[name], runs["raw"])
        ]
    )


def startup_seconds(command: list[str], repeats: int) -> float | None:
    """Median wall time of `command` as a whole process (interpreter start, imports and all), None if repeats is 0.
    Its exit code is not checked: a bad flag is meant to fail."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(
            command, capture_output=True, cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"}
        )
        times.append(time.perf_counter() - start)
    return statistics.median(times) if times else None


def _quietly(function: Callable[[], dict]) -> dict:
    """Progress bars and prints go to a buffer (for every contender alike): the terminal is not what is measured."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (20 steps each)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="runs per contender; the median is reported"
    )
    parser.add_argument(
        "--speed_options",
        action="store_true",
        help="also --channels_last, --compile, unfused AdamW",
    )
    parser.add_argument(
        "--startup_repeats",
        type=int,
        default=5,
        help="whole-process runs of train.py --help, of a "
        "bad flag and of the default run, each (median reported); 0 skips them",
    )
    parser.add_argument(
        "--name", default=f"{platform.machine()}-{os.cpu_count()}cpu", help="results file name"
    )
    parser.add_argument("--results_dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first epoch is warm-up")
    torch.set_num_threads(os.cpu_count() or 1)
    logging.getLogger("lightning.pytorch").setLevel(
        logging.WARNING
    )  # the Trainer's model summary, once per run

    contenders = {
        "raw": lambda: run_raw(args.epochs),
        "template": lambda: run_template(args.epochs),
        "trainer": lambda: run_trainer(args.epochs),
    }
    if args.speed_options:
        contenders |= {
            "raw, unfused AdamW": lambda: run_raw(args.epochs, fused=False),
            "template --channels_last": lambda: run_template(args.epochs, ("--channels_last",)),
            "template --compile": lambda: run_template(args.epochs, ("--compile",)),
        }
    runs = measure(contenders, args.repeats)
    results = {
        name: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for name, rounds in runs.items()
    }
    raw, template, trainer = results["raw"], results["template"], results["trainer"]
    with tempfile.TemporaryDirectory() as root:
        train_py = [sys.executable, str(REPO / "train.py")]
        startup = {
            "help": startup_seconds([*train_py, "--help"], args.startup_repeats),
            "bad_flag": startup_seconds([*train_py, "--epochs", "many"], args.startup_repeats),
            "default_run": startup_seconds([*train_py, "--root_dir", root], args.startup_repeats),
        }
    report = {
        "steps_per_sec": {name: r["steps_per_sec"] for name, r in results.items()},
        "ms_per_step": {
            name: spread([1000 / r["steps_per_sec"] for r in rounds])
            for name, rounds in runs.items()
        },
        "template_minus_raw_ms_per_step": overhead_ms(runs, "template"),
        "trainer_minus_raw_ms_per_step": overhead_ms(runs, "trainer"),
        "template_vs_raw": template["steps_per_sec"] / raw["steps_per_sec"],
        "template_vs_trainer": template["steps_per_sec"] / trainer["steps_per_sec"],
        "data_wait_fraction": template["data_wait_fraction"],
        "checkpoint_seconds": template["checkpoint_seconds"],
        "checkpoint_fraction": template["checkpoint_fraction"],
        "checkpoint_writer_seconds": template["checkpoint_writer_seconds"],
        "checkpoint_writer_fraction": template["checkpoint_writer_fraction"],
        "checkpoints_per_run": template["checkpoints"],
        "startup_seconds": startup,
        "setting": {
            "dataset": "digits",
            "model": "cnn",
            "batch_size": BATCH_SIZE,
            "precision": "32-true",
            "epochs": args.epochs,
            "repeats": args.repeats,
            "steps_per_epoch": 20,
            "startup_repeats": args.startup_repeats,
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightning": lightning.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    out = args.results_dir / f"{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(
        "\n| contender | steps/s | ms/step, median (min-max) | - raw, ms/step | vs raw |\n|---|---:|---:|---:|---:|"
    )
    for name, r in results.items():
        ms, minus = report["ms_per_step"][name], overhead_ms(runs, name) if name != "raw" else None
        print(
            f"| {name} | {r['steps_per_sec']:.1f} | {ms['median']:.2f} ({ms['min']:.2f}-{ms['max']:.2f}) | "
            + (
                f"{minus['median']:+.2f} ({minus['min']:+.2f} to {minus['max']:+.2f})"
                if minus
                else ""
            )
            + f" | {r['steps_per_sec'] / raw['steps_per_sec']:.3f} |"
        )
    print(
        f"\ntemplate/raw {report['template_vs_raw']:.3f}, template/Trainer {report['template_vs_trainer']:.3f}; "
        f"data wait {100 * report['data_wait_fraction']:.1f}% of template step time; checkpoint "
        f"{1000 * report['checkpoint_seconds']:.1f} ms each on the training thread, "
        f"{100 * report['checkpoint_fraction']:.1f}% of training time at the default cadence "
        f"({report['checkpoints_per_run']} per {args.epochs}-epoch run); the background write "
        f"{1000 * report['checkpoint_writer_seconds']:.1f} ms each "
        f"({100 * report['checkpoint_writer_fraction']:.1f}% of training time, overlapped)"
    )
    if args.startup_repeats:
        print(
            "whole process, median of {}: train.py --help {help:.2f} s, a bad flag {bad_flag:.2f} s, the default "
            "run {default_run:.2f} s".format(args.startup_repeats, **startup)
        )
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
