"""Train a model with Lightning Fabric. `python train.py --help` lists every flag.

main() is the recipe, top to bottom. The training step is plain code in the loop; the bookkeeping
around it is one call each to `run` (machinery/run.py). task.forward makes the loss."""

import contextlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from machinery.cli import parse_train_config
from machinery.errors import exit_on_usage_error

if __name__ == "__main__":  # before the imports below (~5 s): --help and bad input answer at once
    with exit_on_usage_error(ctrl_c=True):  # and Ctrl-C is one line from here on
        CLI_CONFIG = parse_train_config()

import torch  # noqa: E402
from lightning.fabric import Fabric, seed_everything  # noqa: E402
from torchmetrics import MeanMetric, MetricCollection, SumMetric  # noqa: E402

import task  # noqa: E402
from config import OptimConfig, TrainConfig  # noqa: E402
from data import load_splits  # noqa: E402
from machinery import launch  # noqa: E402
from machinery.checkpoints import init_weights  # noqa: E402
from machinery.ema import EMA  # noqa: E402
from machinery.resume import resume  # noqa: E402
from machinery.run import Run, best_checkpoint_rule  # noqa: E402
from machinery.sampler import first_samples, make_loaders  # noqa: E402
from machinery.schedule import lr_factor, lr_schedule  # noqa: E402
from model import build_model  # noqa: E402

FAST_RUN_BATCHES = 2  # --fast_run: optimizer steps per epoch, and validation batches


def main(fabric: Fabric, cfg: TrainConfig) -> None:
    accum_steps = cfg.optim.micro_batching(fabric.world_size)[1]  # micro-batches per step
    lr = cfg.optim.learning_rate()  # scaled to eff_batch_size by --lr_scaling_rule
    with fabric.rank_zero_first(local=True):  # a download happens once per node
        train_set, val_set, _, info = load_splits(cfg.data, cfg.seed)
    if overfit := cfg.debug.overfit_batches:  # the same few batches to train and validate on
        train_set = val_set = first_samples(train_set, overfit * cfg.optim.eff_batch_size)
    # Map-style data: the same global batches at any world size (each rank takes its slice),
    # resumable anywhere. Streamed data: litdata's loader; its position is in every checkpoint.
    fast = FAST_RUN_BATCHES if cfg.fast_run else None
    sampler, train_loader, val_loader = make_loaders(fabric, cfg, train_set, val_set, fast)

    fabric.seed_everything(cfg.seed)  # the same initial weights on every rank
    with fabric.rank_zero_first(local=True), fabric.init_module():  # a download once per node
        model = build_model(cfg.arch, info)
    if cfg.init_from and not cfg.resume:  # fine-tuning: a new run from other weights
        fabric.print(init_weights(model, Path(cfg.init_from)))
    if fabric.global_rank > 0:  # each rank its own random stream from here (dropout, augmentation)
        seed_everything(cfg.seed + fabric.global_rank, verbose=False)
    model = launch.setup_model(fabric, model, cfg.hardware)  # --compile, --channels_last, FSDP
    # Made from the parameters after setup: under FSDP they are replaced by their shards.
    optimizer = fabric.setup_optimizers(make_optimizer(model, cfg.optim, lr))
    ema = EMA(model, cfg.optim.ema_decay) if cfg.optim.ema_decay else None  # validation judges it
    metrics = task.metrics(info).to(fabric.device)  # the task's validation metrics: val/<name>

    # The task's code meets a real batch before any file is written: a bug there costs no run dir.
    first_batch = next(iter(train_loader))
    rule = best_checkpoint_rule(cfg, metrics, evaluate(fabric, model, [first_batch], metrics))
    epochs, steps_per_epoch = cfg.epochs(), sampler.steps_per_epoch
    # Everything a checkpoint holds: objects with a state_dict, tensors and plain Python values.
    state = {
        "model": model,
        "optimizer": optimizer,
        "epoch": 0,
        "sample_offset": 0,  # the position in the epoch, in samples: it holds at any world size
        "global_step": 0,
        "schedule": lr_schedule(cfg.optim, epochs, steps_per_epoch),  # warmup, then cosine to 0
        "best": {"metric": rule[0], "mode": rule[1], "value": None, "epoch": 0},
        "patience": {"value": None, "stale_epochs": 0},  # early stopping's count
        "sums": {},  # what run.track summed on the device since the last log step
        "summed_steps": 0,
        **({"ema": ema} if ema else {}),
        **({"stream": sampler} if hasattr(sampler, "state_dict") else {}),  # litdata's position
    }
    if cfg.resume and not resume(fabric, cfg, state, steps_per_epoch, lr):  # loaded: any left?
        return

    with Run(fabric, cfg, state, steps_per_epoch) as run:  # run dir, logs
        for epoch in range(state["epoch"], run.last_epoch):
            model.train()
            sampler.set_position(epoch, state["sample_offset"])  # the epoch is ours, not Fabric's
            for micro_step, batch in enumerate(train_loader):
                is_accumulating = (micro_step + 1) % accum_steps != 0
                # Gradients are all-reduced on the last micro-batch only.
                with fabric.no_backward_sync(model, enabled=is_accumulating):
                    loss, _, _ = task.forward(model, batch)
                    fabric.backward(loss / accum_steps)
                run.track(loss=loss.detach() / accum_steps)  # train/loss: the step's mean loss
                if is_accumulating:
                    continue
                if clip := cfg.optim.grad_clip:  # a non-finite norm is caught at the log step
                    fabric.clip_gradients(model, optimizer, max_norm=clip, error_if_nonfinite=False)
                lr_now = lr * lr_factor(state["global_step"], state["schedule"])
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if ema:
                    ema.update(state["global_step"])
                state["global_step"] += 1
                state["sample_offset"] += cfg.optim.eff_batch_size
                run.log_step(epoch, lr_now)  # every --log_interval steps: train/*, lr, samples/s
                run.save_if_due()  # --checkpoint_every_n_steps, or a stop signal: save, then exit

            with ema.swapped_in() if ema else contextlib.nullcontext():  # validation judges the EMA
                val = evaluate(fabric, model, val_loader, metrics, fast)
            if run.end_epoch(epoch, val):  # log, best.ckpt, checkpoints; True: out of patience
                break
        run.finish()  # final.ckpt and the summary


@torch.no_grad()
def evaluate(
    fabric: Fabric,
    model: torch.nn.Module,
    loader: Iterable,
    metrics: MetricCollection,
    max_batches: int | None = None,
) -> dict[str, Any]:
    """The mean loss and the task's metrics over every sample of `loader`, exact over all ranks, and
    `num_samples` (the first dimension of the target, or of its first tensor)."""
    model.eval()
    loss, num_samples = MeanMetric().to(fabric.device), SumMetric().to(fabric.device)
    metrics.reset()
    for i, batch in enumerate(loader):
        if i == max_batches:
            break
        batch_loss, preds, target = task.forward(model, batch)
        first = next(iter(target.values())) if isinstance(target, dict) else target
        n = len(first[0] if isinstance(first, (list, tuple)) else first)
        loss.update(batch_loss, weight=n)
        num_samples.update(n)
        metrics.update(preds, target)
    model.train()
    results = {"loss": loss.compute(), **metrics.compute(), "num_samples": num_samples.compute()}
    return {name: float(v) if v.numel() == 1 else v.tolist() for name, v in results.items()}


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    fused = next(model.parameters()).device.type in ("cuda", "cpu") or None  # one kernel per update
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(), lr, 0.9, weight_decay=cfg.weight_decay, fused=fused
        )
    return torch.optim.AdamW(model.parameters(), lr, weight_decay=cfg.weight_decay, fused=fused)


def cli(argv: list[str] | None = None, cfg: TrainConfig | None = None) -> None:
    """`python train.py ...`. Exit codes: 0 done, 2 bad input, 3 a non-finite loss, 4 the filesystem
    refused, 128 + N after the checkpoint signal N asked for (143 SIGTERM, 138 SIGUSR1, 130 Ctrl-C),
    75 after the one saved before --max_time ran out."""
    with exit_on_usage_error():
        cfg = cfg or parse_train_config(argv)
        launch.run(main, cfg, cfg.hardware)


if __name__ == "__main__":
    cli(cfg=CLI_CONFIG)
