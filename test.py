"""Evaluate a finished run on its test split, with the run's own saved config.

    python test.py --out_dir RUN_DIR [--checkpoint best|last|final|PATH] [--devices N]

Prints the loss and every metric of the task, then the task's report (task.report), and writes
RUN_DIR/test/metrics.json with the same numbers.
"""

import json
from pathlib import Path
from types import SimpleNamespace

from config import TestConfig
from machinery.cli import load_train_config, parse_test_config
from machinery.errors import exit_on_usage_error
from machinery.rundir import find_checkpoint

if __name__ == "__main__":  # before the imports below (~5 s): --help and bad input answer at once
    with exit_on_usage_error():
        CLI_CONFIG = parse_test_config()

from lightning.fabric import Fabric  # noqa: E402

import task  # noqa: E402
from data import load_splits  # noqa: E402
from machinery import launch  # noqa: E402
from machinery.checkpoints import load_checkpoint  # noqa: E402
from machinery.ema import EMA  # noqa: E402
from machinery.provenance import read_entries  # noqa: E402
from machinery.rundir import atomic_write_text  # noqa: E402
from machinery.sampler import make_eval_loader  # noqa: E402
from model import build_model  # noqa: E402
from train import evaluate  # noqa: E402


def main(fabric: Fabric, cfg: TestConfig) -> None:
    run_dir = Path(cfg.out_dir)
    train_cfg = load_train_config(run_dir / "config.yaml")
    checkpoint = find_checkpoint(run_dir, cfg.checkpoint)
    with fabric.rank_zero_first(local=True):
        _, _, test_set, info = load_splits(train_cfg.data, train_cfg.seed)
    loader = make_eval_loader(
        test_set,
        cfg.batch_size,
        fabric.global_rank,
        fabric.world_size,
        train_cfg.hardware.num_workers,
    )
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    with fabric.init_module(empty_init=True):  # the checkpoint has the weights: none downloaded
        model = fabric.setup(build_model(train_cfg.arch, info, pretrained=False))
    # --weights ema, or auto on a run that kept an EMA (the weights validation judged)
    use_ema = cfg.weights == "ema" or (cfg.weights == "auto" and train_cfg.optim.ema_decay > 0)
    ema = EMA(model, train_cfg.optim.ema_decay) if use_ema else None
    state = {"model": model, "epoch": 0, "global_step": 0, **({"ema": ema} if ema else {})}
    load_checkpoint(fabric, checkpoint, state)
    if ema:
        ema.swap()  # the model holds the averaged weights: the numbers and the report are theirs

    results = evaluate(fabric, model, loader, task.metrics(info, report=True).to(fabric.device))
    num_samples = int(results.pop("num_samples"))
    numbers = {name: value for name, value in results.items() if isinstance(value, float)}
    trained = (read_entries(run_dir) or [{}])[-1]  # how the launch that trained last was run
    weights = "ema" if ema else "raw"
    commit = trained.get("git_commit", "none")[:12]
    changes = f" + {trained['uncommitted_changes']}" if "uncommitted_changes" in trained else ""
    fabric.print(
        f"Test split of {train_cfg.data.dataset}: {num_samples} samples, {checkpoint} "
        f"(epoch {state['epoch']}, step {state['global_step']}, {weights} weights)\n"
        + "\n".join(f"  {name:<9} {value:.4f}" for name, value in numbers.items())
        + f"\nTrained by: {trained.get('command', '?')} | commit {commit}{changes} | "
        f"torch {trained.get('torch', '?')} on {trained.get('world_size', '?')} x "
        f"{(trained.get('devices') or ['?'])[0]}, {trained.get('host', '?')}"
    )
    out = run_dir / "test"
    if fabric.is_global_zero:
        out.mkdir(exist_ok=True)
    fabric.barrier()
    extras = task.report(fabric, model, loader, test_set, info, results, out)
    if fabric.is_global_zero:
        summary = {
            "checkpoint": str(checkpoint),
            "weights": weights,
            "epoch": state["epoch"],
            "global_step": state["global_step"],
            "dataset": train_cfg.data.dataset,
            "num_samples": num_samples,
            **numbers,
            **extras,
            "provenance": trained,
        }
        atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
        print(
            f"Wrote {out / 'metrics.json'}; {out} holds: "
            f"{', '.join(sorted(p.name for p in out.iterdir()))}"
        )


def cli(argv: list[str] | None = None, cfg: TestConfig | None = None) -> None:
    """`python test.py ...`: exit code 0 when done, 2 for bad input (found before any process
    starts)."""
    with exit_on_usage_error():
        cfg = cfg or parse_test_config(argv)
        precision = load_train_config(Path(cfg.out_dir) / "config.yaml").hardware.precision
        sharded = find_checkpoint(Path(cfg.out_dir), cfg.checkpoint).is_dir()  # a sharded model
        hw = SimpleNamespace(
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            num_nodes=1,
            strategy="fsdp" if sharded else "auto",
            precision=precision,
        )
        launch.run(main, cfg, hw)


if __name__ == "__main__":
    cli(cfg=CLI_CONFIG)
