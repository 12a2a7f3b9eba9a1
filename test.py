"""Evaluate a finished run on its test split: `python test.py --out_dir RUN_DIR`.

Guarantees: prints the loss, the task's metrics, how the run was trained and the task's report, and
writes them to RUN_DIR/test/metrics.json; 1 or N devices give the same numbers."""

# ruff: noqa: E402
import json
from pathlib import Path
from types import SimpleNamespace

from config import TestConfig
from machinery.cli import load_train_config, parse_test_config
from machinery.errors import exit_on_usage_error
from machinery.rundir import atomic_write_text, find_checkpoint

if __name__ == "__main__":  # before the imports below (~5 s): --help and bad input answer at once
    with exit_on_usage_error(ctrl_c=True):  # and Ctrl-C is one line from here on
        CLI_CONFIG = parse_test_config()

from lightning.fabric import Fabric

import task
from data import load_splits
from machinery import launch
from machinery.checkpoints import load_checkpoint
from machinery.ema import EMA
from machinery.provenance import read_entries
from machinery.sampler import make_eval_loader
from model import build_model
from train import evaluate


def main(fabric: Fabric, cfg: TestConfig) -> None:
    run_dir = Path(cfg.out_dir)
    train_cfg = load_train_config(run_dir / "config.yaml")
    checkpoint = find_checkpoint(run_dir, cfg.checkpoint)
    with fabric.rank_zero_first(local=True):
        _, _, test_set, info = load_splits(train_cfg.data, train_cfg.seed)
    workers = train_cfg.hardware.num_workers
    loader = make_eval_loader(
        test_set, cfg.batch_size, fabric.global_rank, fabric.world_size, workers
    )
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    with fabric.init_module(empty_init=True):  # the checkpoint has the weights: none downloaded
        model = fabric.setup(build_model(train_cfg.arch, info, pretrained=False))
    # auto: the weights validation judged
    use_ema = cfg.weights == "ema" or (cfg.weights == "auto" and train_cfg.optim.ema_decay > 0)
    ema = EMA(model, train_cfg.optim.ema_decay) if use_ema else None
    state = {"model": model, "epoch": 0, "global_step": 0, **({"ema": ema} if ema else {})}
    load_checkpoint(fabric, checkpoint, state)
    if ema:
        ema.swap()  # the numbers and the report are the averaged weights'

    results = evaluate(fabric, model, loader, task.metrics(info, report=True).to(fabric.device))
    summary = {
        "checkpoint": str(checkpoint),
        "weights": "ema" if ema else "raw",
        "epoch": state["epoch"],
        "global_step": state["global_step"],
        "dataset": train_cfg.data.dataset,
        "num_samples": int(results.pop("num_samples")),
    }
    fabric.print(
        "Test split of {dataset}: {num_samples} samples, {checkpoint} (epoch {epoch}, step "
        "{global_step}, {weights} weights)".format_map(summary)
    )
    for name, value in results.items():
        if isinstance(value, float):  # the scalars; the report shows the rest
            summary[name] = value
            fabric.print(f"  {name:<9} {value:.4f}")
    trained = (read_entries(run_dir) or [{}])[-1]  # how the launch that trained last was run
    patch = f" + {trained['uncommitted_changes']}" if "uncommitted_changes" in trained else ""
    commit = str(trained.get("git_commit", "none"))[:12]
    fabric.print(f"Trained by: {trained.get('command', '?')} | commit {commit}{patch}")
    out = run_dir / "test"
    out.mkdir(exist_ok=True)
    summary |= task.report(fabric, model, loader, test_set, info, results, out)
    if fabric.is_global_zero:
        summary["provenance"] = trained
        atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
        print(f"Wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")


def cli(argv: list[str] | None = None, cfg: TestConfig | None = None) -> None:
    """Exit code 0 when done, 2 for bad input (before any process starts)."""
    with exit_on_usage_error():
        cfg = cfg or parse_test_config(argv)
        run_dir = Path(cfg.out_dir)
        precision = load_train_config(run_dir / "config.yaml").hardware.precision
        # FSDP saves a checkpoint as a directory
        strategy = "fsdp" if find_checkpoint(run_dir, cfg.checkpoint).is_dir() else "auto"
        hw = SimpleNamespace(**vars(cfg), num_nodes=1, strategy=strategy, precision=precision)
        launch.run(main, cfg, hw)


if __name__ == "__main__":
    cli(cfg=CLI_CONFIG)
