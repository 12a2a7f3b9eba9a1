"""Train a classifier with Lightning Fabric. `python train.py --help` lists every flag.

main() reads top to bottom: data, model and optimizer, resume, run directory and loggers, then the loop.
Everything that can fail on bad input fails before the run directory is created.
"""

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.utilities.throughput import ThroughputMonitor
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric, MetricCollection, SumMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

import utils
from config import OptimConfig, TrainConfig, UsageError, parse_train_config
from data import GlobalBatchSampler, load_splits, make_eval_loader, make_train_loader
from model import build_model
from plots import draw_curves

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

    fabric.seed_everything(cfg.seed)
    with fabric.rank_zero_first(local=True), fabric.init_module():  # --pretrained weights: one download per node
        model = build_model(cfg.arch, info)
    if cfg.hardware.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fabric.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    optimizer = make_optimizer(model, cfg.optim, lr, fused=fabric.device.type in ("cuda", "cpu"))
    model, optimizer = fabric.setup(torch.compile(model) if cfg.hardware.compile else model, optimizer)
    steps_per_epoch, epochs = sampler.steps_per_epoch, cfg.epochs()
    scheduler = warmup_cosine(optimizer, round(cfg.optim.warmup * steps_per_epoch), epochs * steps_per_epoch)
    # Everything fabric.save/fabric.load touch: objects with a state_dict, tensors and plain Python values.
    # sample_offset is the position in the current epoch, in samples, so it holds at any world size.
    state = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "epoch": 0, "sample_offset": 0,
             "global_step": 0, "best_val_acc": -1.0, "best_epoch": 0, "loss_sum": torch.zeros((), device=fabric.device),
             "loss_count": 0}
    if cfg.resume:
        checkpoint = utils.load_newest_checkpoint(fabric, Path(cfg.resume), state)
        state["loss_sum"] = state["loss_sum"].to(fabric.device)  # checkpoints load onto the CPU
        fabric.print(f"Resuming {cfg.resume} from {checkpoint.name}: epoch {state['epoch']}, "
                     f"step {state['global_step']}")
        if state["epoch"] >= epochs:
            fabric.print(f"The run already finished its {epochs} epochs; pass a larger --epochs to train further.")
            return

    run_dir = utils.create_run_dir(fabric, cfg)  # only now, when nothing above can fail
    ckpt_dir = run_dir / "checkpoints"
    # Set after loading, so that a resumed run's checkpoints carry this run's config, not the checkpoint's.
    state["config"], state["logger_ids"] = asdict(cfg), {"wandb": utils.wandb_run_id(run_dir)}
    # Loggers need RUN_DIR, known only after launch, and the step a resumed run continues from.
    fabric._loggers = utils.make_loggers(cfg, run_dir, state["global_step"] if cfg.resume else None)
    if not cfg.resume:
        for logger in fabric.loggers:
            logger.log_hyperparams({**asdict(cfg), "world_size": fabric.world_size, "lr_used": lr,
                                    "batch_size_per_device": batch_size, "grad_accum_steps": accum_steps})
    fabric.print(f"Run dir: {run_dir}\n"
                 f"  {fabric.world_size} device(s) x {batch_size} samples x {accum_steps} accumulation step(s) "
                 f"= {cfg.optim.eff_batch_size} per optimizer step | lr {lr:.4g} ({cfg.optim.lr_scaling_rule} rule)\n"
                 f"  {cfg.arch.model}, {sum(p.numel() for p in model.parameters()):,} parameters | {cfg.data.dataset}, "
                 f"{steps_per_epoch} steps/epoch x {epochs} epochs | {fabric.device}, {cfg.hardware.precision}")

    def save_checkpoint(*names: str) -> None:
        """Written once; further names are hard links to the same file. Periodic ones (step-N) rotate."""
        # The ranks' partial loss sums become their mean: the same logged value, at any world size after a resume.
        state["loss_sum"] = fabric.all_reduce(state["loss_sum"], reduce_op="mean")
        utils.save_checkpoint(fabric, state, *(ckpt_dir / name for name in names),
                              keep=cfg.log.num_checkpoint_keep if names and names[0].startswith("step-") else None)

    log_every, ckpt_every = cfg.log.log_every_n_steps(steps_per_epoch), cfg.log.checkpoint_every_n_steps
    throughput = ThroughputMonitor(fabric, window_size=3)  # samples/s over the last 2 log intervals; MFU on GPUs
    flops_per_step = utils.training_flops_per_step(cfg.arch, info, batch_size) * accum_steps
    stop = utils.StopSignals()
    start_time, start_step = time.perf_counter(), state["global_step"]
    with utils.Progress(fabric, epochs * steps_per_epoch, state["global_step"]) as progress:
        for epoch in range(state["epoch"], epochs):
            model.train()
            sampler.set_position(epoch, state["sample_offset"])  # we own the epoch, not Fabric's dataloader wrapper
            for micro_step, (x, y) in enumerate(train_loader):
                is_accumulating = (micro_step + 1) % accum_steps != 0
                with fabric.no_backward_sync(model, enabled=is_accumulating):  # all-reduce only on the last micro-batch
                    loss = F.cross_entropy(model(x), y)
                    fabric.backward(loss / accum_steps)
                state["loss_sum"] += loss.detach()  # summed on the device: no sync per step
                state["loss_count"] += 1
                if is_accumulating:
                    continue
                if cfg.optim.grad_clip > 0:
                    fabric.clip_gradients(model, optimizer, max_norm=cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state["global_step"] += 1
                state["sample_offset"] += cfg.optim.eff_batch_size
                progress.update()

                if state["global_step"] % log_every == 0:
                    train_loss = fabric.all_reduce(state["loss_sum"] / state["loss_count"]).item()  # the CPU sync
                    if not math.isfinite(train_loss):
                        raise utils.NonFiniteLoss(f"the training loss is {train_loss} at step {state['global_step']}")
                    steps, lr_now = state["global_step"] - start_step, scheduler.get_last_lr()[0]
                    throughput.update(time=time.perf_counter() - start_time, batches=steps,
                                      samples=steps * batch_size * accum_steps, flops=steps * flops_per_step)
                    speed = {k: v for k, v in throughput.compute().items() if k.endswith(("_per_sec", "mfu"))}
                    fabric.log_dict({"train/loss": train_loss, "lr": lr_now, "epoch": epoch, **speed},
                                    step=state["global_step"])
                    samples_per_s = speed.get("device/samples_per_sec", 0.0) * fabric.world_size
                    progress.log(epoch + 1, state["global_step"], train_loss, lr_now, samples_per_s)
                    state["loss_sum"].zero_()
                    state["loss_count"] = 0
                signum = stop.agreed(fabric)
                if signum or (ckpt_every and state["global_step"] % ckpt_every == 0):
                    save_checkpoint(f"step-{state['global_step']:08d}.ckpt")
                if signum:
                    raise utils.Preempted(signum, run_dir)

            val = evaluate(fabric, model, val_loader, info.num_classes, FAST_RUN_BATCHES if cfg.fast_run else None)
            state["epoch"], state["sample_offset"] = epoch + 1, 0
            fabric.log_dict({"val/loss": val["loss"], "val/acc": val["acc"], "epoch": epoch}, step=state["global_step"])
            progress.write(f"epoch {epoch + 1}/{epochs} step {state['global_step']} val loss {val['loss']:.4f} "
                           f"val acc {val['acc']:.4f}")
            names, signum = [], stop.agreed(fabric)
            if signum or state["epoch"] % cfg.log.checkpoint_frequency == 0:
                names.append(f"step-{state['global_step']:08d}.ckpt")
            if val["acc"] > state["best_val_acc"]:
                state["best_val_acc"], state["best_epoch"] = val["acc"], epoch + 1
                names.append("best.ckpt")
            save_checkpoint(*names)
            if signum:
                raise utils.Preempted(signum, run_dir)

    save_checkpoint("final.ckpt")
    utils.wait_for_checkpoints()  # on disk before the run says it is finished
    seconds, steps = time.perf_counter() - start_time, state["global_step"] - start_step
    if fabric.is_global_zero:
        draw_curves(run_dir)  # from the whole run's CSV log, resumed parts included
    checkpoints = ", ".join(sorted(p.name for p in ckpt_dir.glob("*.ckpt")))
    fabric.print(f"Finished {steps} steps in {seconds:.1f}s ({steps / seconds:.1f} steps/s, "
                 f"{steps * cfg.optim.eff_batch_size / seconds:.0f} samples/s, validation and checkpoints included)\n"
                 f"  best val acc {state['best_val_acc']:.4f} at epoch {state['best_epoch']}\n"
                 f"  checkpoints: {checkpoints}\n  curves: {run_dir / 'curves.png'} | logs: {run_dir / 'logs'}\n"
                 f"Run dir: {run_dir}\nEvaluate: python test.py --out_dir {run_dir}")

    if cfg.fast_run:  # check the test-split plumbing too; the real evaluation is test.py's job
        test_loader = fabric.setup_dataloaders(
            make_eval_loader(test_set, batch_size, fabric.global_rank, fabric.world_size, cfg.data.num_workers),
            use_distributed_sampler=False)
        test = evaluate(fabric, model, test_loader, info.num_classes, FAST_RUN_BATCHES)
        fabric.print(f"fast_run test batches: loss {test['loss']:.4f}, acc {test['acc']:.4f}")


@torch.no_grad()
def evaluate(fabric: Fabric, model: torch.nn.Module, loader: torch.utils.data.DataLoader, num_classes: int,
             max_batches: int | None = None, confusion_matrix: bool = False) -> dict[str, Any]:
    """Loss, accuracy and macro-F1 (and the confusion matrix, as lists) over every sample of `loader`,
    summed exactly over all ranks."""
    model.eval()
    loss, num_samples = MeanMetric().to(fabric.device), SumMetric().to(fabric.device)
    metrics = MetricCollection({
        "acc": MulticlassAccuracy(num_classes, average="micro"),
        "macro_f1": MulticlassF1Score(num_classes, average="macro"),
        **({"confusion_matrix": MulticlassConfusionMatrix(num_classes)} if confusion_matrix else {}),
    }).to(fabric.device)
    for i, (x, y) in enumerate(loader):
        if i == max_batches:
            break
        logits = model(x)
        loss.update(F.cross_entropy(logits, y), weight=len(y))
        num_samples.update(len(y))
        metrics.update(logits, y)
    model.train()
    results = {name: value.tolist() for name, value in metrics.compute().items()}  # compute() syncs across ranks
    return {"loss": loss.compute().item(), **results, "num_samples": int(num_samples.compute().item())}


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig, lr: float, fused: bool) -> torch.optim.Optimizer:
    """`fused`: one kernel for the whole update (measured 8% faster steps on a CPU, see the README)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay,
                               fused=fused or None)
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=fused or None)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup over `warmup_steps` optimizer steps, then cosine decay to zero at `total_steps`."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return LambdaLR(optimizer, factor)


def cli(argv: list[str] | None = None) -> None:
    """`python train.py ...`: exit code 0 when done, 2 for bad input, 3 for a non-finite loss, and 128 + N
    after a checkpoint asked for by signal N (143 SIGTERM, 138 SIGUSR1, 130 Ctrl-C)."""
    with utils.exit_on_usage_error():
        cfg = parse_train_config(argv)
        hw = cfg.hardware
        fabric = utils.make_fabric(hw.accelerator, hw.devices, hw.num_nodes, hw.strategy, hw.precision)
        cfg.optim.micro_batching(fabric.world_size)  # a batch size that does not divide fails before launch
        status = "failed"
        try:
            utils.launch(fabric, main, cfg)
            status = "success"
        except utils.Preempted as stopped:
            fabric.print(f"Stopped by {stopped.signal_name}: checkpoint saved. Continue with: "
                         f"python train.py --resume {stopped.run_dir}")
            utils.exit_after_preemption(fabric, cfg, stopped.signum)
        finally:
            for logger in fabric.loggers:  # flush what is buffered, whatever happened
                logger.finalize(status)


if __name__ == "__main__":
    cli()
