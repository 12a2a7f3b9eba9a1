"""Evaluate a finished run on its test split, with the run's own saved config.

    python test.py --out_dir RUN_DIR [--checkpoint best|last|final|PATH] [--devices N]

Prints the loss and every metric of the task, then the task's report (task.report), and writes
RUN_DIR/test/metrics.json with the same numbers.
"""

import json
from pathlib import Path

import yaml

from lightning.fabric import Fabric

import checkpoints
import task
import utils
from config import CHECKPOINT_CHOICES, TestConfig, TrainConfig, load_train_config, parse_test_config
from data import load_splits
from ema import EMA
from errors import UsageError, exit_on_usage_error
from loaders import make_eval_loader
from model import build_model
from train import evaluate, scalars


def main(fabric: Fabric, cfg: TestConfig) -> None:
    run_dir = Path(cfg.out_dir)
    train_cfg = load_train_config(run_dir / "config.yaml")
    checkpoint = find_checkpoint(run_dir, cfg.checkpoint)

    with fabric.rank_zero_first(local=True):
        _, _, test_set, info = load_splits(train_cfg.data, train_cfg.seed)
    loader = make_eval_loader(test_set, cfg.batch_size, fabric.global_rank, fabric.world_size,
                              train_cfg.hardware.num_workers)
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    with fabric.init_module(empty_init=True):  # the checkpoint has the weights: none are downloaded or initialised
        model = build_model(train_cfg.arch, info, pretrained=False)
    model = fabric.setup(model)
    ema = EMA(model, train_cfg.optim.ema_decay) if use_ema(cfg.weights, train_cfg) else None
    state = {"model": model, "epoch": 0, "global_step": 0, **({"ema": ema} if ema else {})}
    checkpoints.load_checkpoint(fabric, checkpoint, state)
    if ema:
        ema.swap()  # from here on the model holds the averaged weights: the numbers and the report are theirs

    results, num_samples = evaluate(fabric, model, loader, task.metrics(info, report=True).to(fabric.device))
    trained = provenance(run_dir)
    numbers, weights = scalars(results), "ema" if ema else "raw"
    fabric.print(f"Test split of {train_cfg.data.dataset}: {num_samples} samples, "
                 f"{checkpoint} (epoch {state['epoch']}, step {state['global_step']}, {weights} weights)\n" +
                 "\n".join(f"  {name:<9} {value:.4f}" for name, value in numbers.items()) +
                 f"\nTrained by: {trained.get('command', '?')} | commit {trained.get('git_commit', 'none')[:12]}"
                 f"{' + ' + trained['uncommitted_changes'] if 'uncommitted_changes' in trained else ''} | "
                 f"torch {trained.get('torch', '?')} on {trained.get('world_size', '?')} x "
                 f"{(trained.get('devices') or ['?'])[0]}, {trained.get('host', '?')}")
    out = run_dir / "test"
    if fabric.is_global_zero:
        out.mkdir(exist_ok=True)
    fabric.barrier()
    extras = task.report(fabric, model, loader, test_set, info, results, out)
    if fabric.is_global_zero:
        summary = {"checkpoint": str(checkpoint), "weights": weights, "epoch": state["epoch"],
                   "global_step": state["global_step"],
                   "dataset": train_cfg.data.dataset, "num_samples": num_samples, **numbers, **extras,
                   "provenance": trained}
        utils.atomic_write_text(out / "metrics.json", json.dumps(summary, indent=2) + "\n")
        print(f"Wrote {out / 'metrics.json'}; {out} holds: {', '.join(sorted(p.name for p in out.iterdir()))}")


def use_ema(weights: str, train_cfg: TrainConfig) -> bool:
    """Whether --weights asks for the EMA: ema, or auto on a run that kept one (the weights validation judged)."""
    if weights == "ema" and not train_cfg.optim.ema_decay:
        raise UsageError("--weights ema: the run kept no EMA of its weights (its --ema_decay is 0); use raw or auto")
    return weights == "ema" or (weights == "auto" and train_cfg.optim.ema_decay > 0)


def provenance(run_dir: Path) -> dict:
    """The newest entry of RUN_DIR/provenance.yaml: how the launch that trained last was run ({} if none)."""
    path = run_dir / "provenance.yaml"
    entries = yaml.safe_load(path.read_text()) if path.is_file() else None
    return entries[-1] if entries else {}


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """best, final, last (the newest periodic checkpoint), or a path."""
    if not run_dir.is_dir():
        raise UsageError(f"--out_dir {str(run_dir)!r}: no such run directory")
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"--out_dir {str(run_dir)!r} is not a run directory: it has no config.yaml")
    ckpt_dir = run_dir / "checkpoints"
    if which in ("best", "final"):
        path = ckpt_dir / f"{which}.ckpt"
    elif which == "last":
        periodic = checkpoints.periodic_checkpoints(ckpt_dir)
        path = periodic[-1] if periodic else ckpt_dir / "step-*.ckpt"
    else:
        path = Path(which)
    if not (path.is_file() or (path / "meta.pt").is_file()):  # a file, or a sharded checkpoint's directory
        raise UsageError(f"--checkpoint {which!r}: no checkpoint at {path} "
                         f"(use {', '.join(CHECKPOINT_CHOICES)} or a path to a .ckpt file)")
    return path


def cli(argv: list[str] | None = None) -> None:
    """`python test.py ...`: exit code 0 when done, 2 for bad input."""
    with exit_on_usage_error():
        cfg = parse_test_config(argv)
        checkpoint = find_checkpoint(Path(cfg.out_dir), cfg.checkpoint)  # fail before any process starts
        train_cfg = load_train_config(Path(cfg.out_dir) / "config.yaml")
        use_ema(cfg.weights, train_cfg)  # a run without an EMA fails here, before any process starts
        precision = train_cfg.hardware.precision
        strategy = "fsdp" if checkpoint.is_dir() else "auto"  # a sharded checkpoint loads into a sharded model
        utils.launch(utils.make_fabric(cfg.accelerator, cfg.devices, strategy=strategy, precision=precision), main, cfg)


if __name__ == "__main__":
    cli()
