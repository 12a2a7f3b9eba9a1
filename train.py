"""Train a classifier with Lightning Fabric. `python train.py --help` lists every flag.

Reads top to bottom: run directory and loggers, data, model and optimizer, resume, then the loop.
"""

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from tqdm import tqdm

import utils
from config import OptimConfig, TrainConfig, UsageError, parse_train_config
from data import GlobalBatchSampler, load_splits, make_eval_loader, make_train_loader
from model import build_model

FAST_RUN_BATCHES = 2  # --fast_run: optimizer steps per epoch, and validation/test batches


def main(fabric: Fabric, cfg: TrainConfig) -> None:
    batch_size, accum_steps = cfg.optim.micro_batching(fabric.world_size)  # per device, per optimizer step
    lr = cfg.optim.learning_rate()
    with fabric.rank_zero_first(local=True):  # a download happens once per node
        train_set, val_set, test_set, info = load_splits(cfg.data, cfg.seed)
    sampler = GlobalBatchSampler(len(train_set), cfg.optim.eff_batch_size, batch_size, fabric.global_rank,
                                 fabric.world_size, cfg.seed, FAST_RUN_BATCHES if cfg.fast_run else None)
    if sampler.steps_per_epoch == 0:
        raise UsageError(f"--eff_batch_size {cfg.optim.eff_batch_size} is larger than the {len(train_set)} "
                         "training samples: no full batch fits in an epoch")
    train_loader = make_train_loader(train_set, sampler, cfg.data.num_workers)
    val_loader = make_eval_loader(val_set, batch_size, fabric.global_rank, fabric.world_size, cfg.data.num_workers)
    # Our samplers already shard the data; Fabric only moves batches to the device.
    train_loader, val_loader = fabric.setup_dataloaders(train_loader, val_loader, use_distributed_sampler=False)

    checkpoint = utils.resume_checkpoint(Path(cfg.resume)) if cfg.resume else None
    run_dir = utils.create_run_dir(fabric, cfg)  # only now, when nothing above can fail
    ckpt_dir = run_dir / "checkpoints"
    fabric.seed_everything(cfg.seed)

    with fabric.rank_zero_first(local=True), fabric.init_module():  # --pretrained weights: one download per node
        model = build_model(cfg.arch, info)
    optimizer = make_optimizer(model, cfg.optim, lr)
    model, optimizer = fabric.setup(model, optimizer)
    steps_per_epoch, epochs = sampler.steps_per_epoch, cfg.epochs()
    scheduler = warmup_cosine(optimizer, round(cfg.optim.warmup * steps_per_epoch), epochs * steps_per_epoch)
    # Everything fabric.save/fabric.load touch: objects with a state_dict, tensors and plain Python values.
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 0, "global_step": 0,
             "best_val_acc": -1.0, "config": asdict(cfg), "logger_ids": {"wandb": utils.wandb_run_id(run_dir)}}

    if checkpoint is not None:
        utils.load_checkpoint(fabric, checkpoint, state)
        fabric.print(f"Resumed {run_dir} from {checkpoint.name}: epoch {state['epoch']}, step {state['global_step']}")
        if state["epoch"] >= epochs:
            fabric.print(f"The run already finished its {epochs} epochs; pass a larger --epochs to train further.")
            return
    # Loggers need RUN_DIR, which is known only after launch, and the step a resumed run continues from.
    fabric._loggers = utils.make_loggers(cfg, run_dir, state["global_step"] if checkpoint else None)
    if checkpoint is None:
        for logger in fabric.loggers:
            logger.log_hyperparams({**asdict(cfg), "world_size": fabric.world_size, "lr_used": lr,
                                    "batch_size_per_device": batch_size, "grad_accum_steps": accum_steps})

    num_params = sum(p.numel() for p in model.parameters())
    fabric.print(f"Run dir: {run_dir}\n"
                 f"{fabric.world_size} device(s) x {batch_size} samples x {accum_steps} accumulation step(s) "
                 f"= {cfg.optim.eff_batch_size} per optimizer step | lr {lr:.4g} | {fabric.device}, "
                 f"{cfg.hardware.precision} | {num_params:,} parameters")

    log_every = cfg.log.log_every_n_steps(steps_per_epoch)
    loss_sum, loss_count = torch.zeros((), device=fabric.device), 0  # summed on device: no sync per step
    pbar = tqdm(total=epochs * steps_per_epoch, initial=state["global_step"], disable=not fabric.is_global_zero,
                desc="train", unit="step", dynamic_ncols=True)
    start = time.perf_counter()
    for epoch in range(state["epoch"], epochs):
        model.train()
        sampler.set_position(epoch)
        for micro_step, (x, y) in enumerate(train_loader):
            is_accumulating = (micro_step + 1) % accum_steps != 0
            with fabric.no_backward_sync(model, enabled=is_accumulating):  # all-reduce only on the last micro-batch
                loss = F.cross_entropy(model(x), y)
                fabric.backward(loss / accum_steps)
            loss_sum += loss.detach()
            loss_count += 1
            if is_accumulating:
                continue
            if cfg.optim.grad_clip > 0:
                fabric.clip_gradients(model, optimizer, max_norm=cfg.optim.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state["global_step"] += 1
            pbar.update()

            if state["global_step"] % log_every == 0:
                train_loss = fabric.all_reduce(loss_sum / loss_count).item()  # the only CPU-device sync
                fabric.log_dict({"train/loss": train_loss, "lr": scheduler.get_last_lr()[0], "epoch": epoch},
                                step=state["global_step"])
                pbar.set_postfix(epoch=epoch + 1, loss=f"{train_loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
                loss_sum.zero_()
                loss_count = 0

        val = evaluate(fabric, model, val_loader, info.num_classes, FAST_RUN_BATCHES if cfg.fast_run else None)
        state["epoch"] = epoch + 1
        fabric.log_dict({"val/loss": val["loss"], "val/acc": val["acc"], "epoch": epoch}, step=state["global_step"])
        if fabric.is_global_zero:
            pbar.write(f"epoch {epoch + 1}/{epochs}  step {state['global_step']}  val loss {val['loss']:.4f}  "
                       f"val acc {val['acc']:.4f}")
        if val["acc"] > state["best_val_acc"]:
            state["best_val_acc"] = val["acc"]
            utils.save_checkpoint(fabric, ckpt_dir / "best.ckpt", state)
        if state["epoch"] % cfg.log.checkpoint_frequency == 0:
            utils.save_checkpoint(fabric, ckpt_dir / f"step-{state['global_step']:08d}.ckpt", state)
            utils.prune_checkpoints(fabric, ckpt_dir, cfg.log.num_checkpoint_keep)
    pbar.close()

    utils.save_checkpoint(fabric, ckpt_dir / "final.ckpt", state)
    for logger in fabric.loggers:
        logger.finalize("success")
    fabric.print(f"Finished in {time.perf_counter() - start:.1f}s: best val acc {state['best_val_acc']:.4f}\n"
                 f"Run dir: {run_dir}\nEvaluate: python test.py --out_dir {run_dir}")

    if cfg.fast_run:  # check the test-split plumbing too; the real evaluation is test.py's job
        test_loader = fabric.setup_dataloaders(
            make_eval_loader(test_set, batch_size, fabric.global_rank, fabric.world_size, cfg.data.num_workers),
            use_distributed_sampler=False)
        test = evaluate(fabric, model, test_loader, info.num_classes, FAST_RUN_BATCHES)
        fabric.print(f"fast_run test batches: loss {test['loss']:.4f}, acc {test['acc']:.4f}")


@torch.no_grad()
def evaluate(fabric: Fabric, model: torch.nn.Module, loader: torch.utils.data.DataLoader, num_classes: int,
             max_batches: int | None = None) -> dict[str, float]:
    """Loss, accuracy and macro-F1 over every sample of `loader`, summed exactly over all ranks."""
    model.eval()
    loss, num_samples = MeanMetric().to(fabric.device), SumMetric().to(fabric.device)
    metrics = MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "macro_f1": MulticlassF1Score(num_classes, average="macro"),
    }).to(fabric.device)
    for i, (x, y) in enumerate(loader):
        if i == max_batches:
            break
        logits = model(x)
        loss.update(F.cross_entropy(logits, y), weight=len(y))
        num_samples.update(len(y))
        metrics.update(logits, y)
    model.train()
    results = {name: value.item() for name, value in metrics.compute().items()}  # compute() syncs across ranks
    return {"loss": loss.compute().item(), **results, "num_samples": int(num_samples.compute().item())}


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup over `warmup_steps` optimizer steps, then cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


if __name__ == "__main__":
    with utils.exit_on_usage_error():
        config = parse_train_config()
        hw = config.hardware
        fabric = utils.make_fabric(hw.accelerator, hw.devices, hw.num_nodes, hw.strategy, hw.precision)
        config.optim.micro_batching(fabric.world_size)  # a batch size that does not divide fails before launch
        fabric.launch(main, config)
