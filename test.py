"""Evaluate a finished run on its test split, with the run's own saved config.

    python test.py --out_dir RUN_DIR [--checkpoint best|last|final|PATH] [--devices N]

Prints loss, accuracy and macro-F1, and writes RUN_DIR/test/metrics.json.
"""

import json
from dataclasses import replace
from pathlib import Path

import torch
from lightning.fabric import Fabric
from torch.utils.data import DataLoader

import utils
from config import CHECKPOINT_CHOICES, TestConfig, UsageError, load_train_config, parse_test_config
from data import ImageTensorDataset, load_splits, make_eval_loader
from model import build_model
from plots import draw_confusion_matrix, draw_misclassified
from train import evaluate


def main(fabric: Fabric, cfg: TestConfig) -> None:
    run_dir = Path(cfg.out_dir)
    train_cfg = load_train_config(run_dir / "config.yaml")
    checkpoint = find_checkpoint(run_dir, cfg.checkpoint)

    with fabric.rank_zero_first(local=True):
        _, _, test_set, info = load_splits(train_cfg.data, train_cfg.seed)
    loader = make_eval_loader(test_set, cfg.batch_size, fabric.global_rank, fabric.world_size,
                              train_cfg.data.num_workers)
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    with fabric.init_module():
        model = build_model(replace(train_cfg.arch, pretrained=False), info)  # the checkpoint has the weights
    model = fabric.setup(model)
    state = {"model": model, "epoch": 0, "global_step": 0}
    utils.load_checkpoint(fabric, checkpoint, state)

    results = {"checkpoint": str(checkpoint), "epoch": state["epoch"], "global_step": state["global_step"],
               "dataset": train_cfg.data.dataset,
               **evaluate(fabric, model, loader, info.num_classes, confusion_matrix=True)}
    results["per_class"] = per_class(results["confusion_matrix"], info.class_names)
    fabric.print(f"Test split of {train_cfg.data.dataset}: {results['num_samples']} samples, "
                 f"{checkpoint} (epoch {state['epoch']}, step {state['global_step']})\n"
                 f"  loss      {results['loss']:.4f}\n"
                 f"  accuracy  {results['acc']:.4f}\n"
                 f"  macro_f1  {results['macro_f1']:.4f}\n\n"
                 f"  {'class':>12}  precision  recall  support\n" +
                 "\n".join(f"  {name:>12}  {c['precision']:9.4f}  {c['recall']:6.4f}  {c['support']:7d}"
                           for name, c in results["per_class"].items()))
    wrong = misclassified(fabric, model, loader, test_set) if isinstance(test_set, ImageTensorDataset) else None
    if fabric.is_global_zero:
        out = run_dir / "test"
        out.mkdir(exist_ok=True)
        utils.atomic_write_text(out / "metrics.json", json.dumps(results, indent=2) + "\n")
        draw_confusion_matrix(results["confusion_matrix"], info.class_names, out / "confusion_matrix.png")
        written = ["metrics.json", "confusion_matrix.png"]
        if wrong:
            draw_misclassified(*wrong, info.class_names, out / "misclassified.png")
            written.append("misclassified.png")
        print(f"Wrote {', '.join(written)} to {out}")


def per_class(confusion_matrix: list[list[int]], class_names: tuple[str, ...]) -> dict[str, dict]:
    """Precision, recall and support of each class, from the (true, predicted) counts."""
    counts = torch.tensor(confusion_matrix, dtype=torch.float64)
    hits, predicted, actual = counts.diag(), counts.sum(0), counts.sum(1)
    return {name: {"precision": (hits[i] / predicted[i]).nan_to_num().item(),
                   "recall": (hits[i] / actual[i]).nan_to_num().item(), "support": int(actual[i])}
            for i, name in enumerate(class_names)}


@torch.no_grad()
def misclassified(fabric: Fabric, model: torch.nn.Module, loader: DataLoader, dataset: ImageTensorDataset,
                  limit: int = 32) -> tuple[torch.Tensor, list[int], list[int]] | None:
    """Up to `limit` wrongly classified images of this rank's shard, as (images in [0, 1], true, predicted)."""
    model.eval()
    indices, true, predicted = [], [], []
    sample_ids = iter(range(fabric.global_rank, len(dataset), fabric.world_size))  # the shard make_eval_loader made
    for x, y in loader:
        ids = [next(sample_ids) for _ in range(len(y))]
        for i, t, p in zip(ids, y.tolist(), model(x).argmax(1).tolist()):
            if t != p and len(indices) < limit:
                indices.append(i)
                true.append(t)
                predicted.append(p)
        if len(indices) >= limit:
            break
    return (dataset.images[indices].float() / dataset.scale, true, predicted) if indices else None


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
        periodic = utils.periodic_checkpoints(ckpt_dir)
        path = periodic[-1] if periodic else ckpt_dir / "step-*.ckpt"
    else:
        path = Path(which)
    if not path.is_file():
        raise UsageError(f"--checkpoint {which!r}: no checkpoint at {path} "
                         f"(use {', '.join(CHECKPOINT_CHOICES)} or a path to a .ckpt file)")
    return path


def cli(argv: list[str] | None = None) -> None:
    """`python test.py ...`: exit code 0 when done, 2 for bad input."""
    with utils.exit_on_usage_error():
        cfg = parse_test_config(argv)
        find_checkpoint(Path(cfg.out_dir), cfg.checkpoint)  # fail before any process starts
        precision = load_train_config(Path(cfg.out_dir) / "config.yaml").hardware.precision
        utils.launch(utils.make_fabric(cfg.accelerator, cfg.devices, precision=precision), main, cfg)


if __name__ == "__main__":
    cli()
