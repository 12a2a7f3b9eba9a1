"""train.py's bookkeeping: train/* are interval means at any world size; a checkpoint before a
stop; one CPU sync per log step."""

import contextlib
import math
import os
import time
from dataclasses import asdict
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.throughput import ThroughputMonitor
from tqdm import tqdm

import task
from machinery import debug
from machinery.checkpoints import newest_checkpoint, save_checkpoint, wait_for_checkpoints
from machinery.errors import NonFiniteLoss, UsageError
from machinery.rundir import create_run_dir
from machinery.signals import StopSignals, stop_after_signal


class Run(contextlib.ExitStack):
    """`with Run(...) as run:` around the loop; `steps` per epoch."""

    def __init__(self, fabric: Fabric, cfg: Any, state: dict, steps: int):
        super().__init__()
        self.fabric, self.cfg, self.state, self.steps_per_epoch = fabric, cfg, state, steps
        self.batch_size, self.accum_steps = cfg.optim.micro_batching(fabric.world_size)
        # A resume after running out of patience only finishes the run.
        self.stopped_early = out_of_patience(state, cfg.log) if state["sample_offset"] == 0 else ""
        self.last_epoch = state["epoch"] if self.stopped_early else cfg.epochs()
        self.run_dir = create_run_dir(fabric, cfg, state["global_step"], state["schedule"])
        self.ckpt_dir, best = self.run_dir / "checkpoints", state["best"]
        state["config"] = asdict(cfg)
        # offset 0: the checkpoint came after its epoch's validation
        resumed_at = (state["global_step"], state["sample_offset"] == 0) if cfg.resume else None
        fabric.logger.open(self.run_dir, resumed_at)
        self.log_every = cfg.log_every_n_steps()
        if self.log_every > (self.last_epoch - state["epoch"]) * steps:
            fabric.print(
                f"note: fewer steps than --log_interval {self.log_every}: no train/* logged"
            )
        if not cfg.resume:
            derived = dict(world_size=fabric.world_size, lr_used=cfg.optim.learning_rate())
            derived.update(batch_size_per_device=self.batch_size, grad_accum_steps=self.accum_steps)
            derived.update(monitor_used=best["metric"], monitor_mode_used=best["mode"])
            fabric.logger.log_hyperparams(asdict(cfg) | derived)
        fabric.print(self.banner())
        self.throughput = ThroughputMonitor(fabric, window_size=3)  # over 2 log intervals
        self.start, self.start_step = time.perf_counter(), state["global_step"]
        total = cfg.epochs() * steps
        devnull = self.enter_context(open(os.devnull, "w"))  # noqa: SIM115 - for the ETA
        self.bar = self.enter_context(tqdm(total=total, initial=state["global_step"], file=devnull))
        self.stop = self.enter_context(StopSignals(cfg.time_budget(), self.log_every))

    def track(self, **scalars: torch.Tensor) -> None:
        """Per micro-batch with value / accum_steps, or once per optimizer step."""
        sums = self.state["sums"]
        for name, value in scalars.items():
            sums[name] = sums[name] + value if name in sums else value.clone()

    def log_step(self, epoch: int, lr: float) -> None:
        state, fabric = self.state, self.fabric
        state["summed_steps"] += 1
        self.bar.update()
        step = state["global_step"]
        if step % self.log_every:
            return
        names = sorted(state["sums"])
        means = torch.stack([state["sums"][n] for n in names]) / state["summed_steps"]
        logged = dict(zip(names, fabric.all_reduce(means).tolist()))  # the CPU sync
        for name, value in logged.items():
            if not math.isfinite(value):
                problem = f"the training {name} is {value} at step {step}"
                raise NonFiniteLoss(problem, newest_checkpoint(self.ckpt_dir))
        steps, seconds = step - self.start_step, time.perf_counter() - self.start
        samples = steps * self.batch_size * self.accum_steps
        # The window drops the first update (short after a resume).
        self.throughput.update(time=seconds, batches=steps, samples=samples)
        speed = self.throughput.compute().items()
        speed = {k: v for k, v in speed if k.endswith("_per_sec")}
        logged = {f"train/{name}": value for name, value in logged.items()}
        fabric.log_dict({**logged, "lr": lr, "epoch": epoch + 1, **speed}, step=step)
        rate = speed.get("device/samples_per_sec", samples / seconds) * fabric.world_size
        eta = self.bar.format_meter(**{**self.bar.format_dict, "bar_format": "{remaining}"})
        loss = logged.get("train/loss", math.nan)
        line = f"epoch {epoch + 1} step {step}/{self.bar.total} loss {loss:.4f} lr {lr:.3g}"
        fabric.print(f"{line} {rate:.0f} samples/s eta {eta}", flush=True)
        state["sums"], state["summed_steps"] = {}, 0

    def save_if_due(self) -> None:
        step, every = self.state["global_step"], self.cfg.log.checkpoint_every_n_steps
        signum = self.stop.agreed(self.fabric, step)
        if signum or (every and step % every == 0):
            self.save(f"step-{step:08d}.ckpt", signum=signum)

    def end_epoch(self, epoch: int, val: dict[str, Any]) -> bool:
        """True when out of patience."""
        state, cfg, fabric, best = self.state, self.cfg, self.fabric, self.state["best"]
        state["epoch"], state["sample_offset"], step = epoch + 1, 0, state["global_step"]
        val = scalars(val)
        fabric.log_dict({**{f"val/{k}": v for k, v in val.items()}, "epoch": epoch + 1}, step=step)
        shown = " ".join(f"val {name} {value:.4f}" for name, value in val.items())
        fabric.print(f"epoch {epoch + 1}/{cfg.epochs()} step {step} {shown}", flush=True)
        score = val[best["metric"].removeprefix("val/")]
        count_patience(state["patience"], score, best["mode"], cfg.log.early_stopping_min_delta)
        self.stopped_early = fabric.broadcast(out_of_patience(state, cfg.log))
        signum = self.stop.agreed(fabric)
        names = []
        if signum or self.stopped_early or state["epoch"] % cfg.log.checkpoint_frequency == 0:
            names.append(f"step-{step:08d}.ckpt")
        if improves(score, best["value"], best["mode"]):
            best.update(value=score, epoch=epoch + 1)
            names.append("best.ckpt")
        self.save(*names, signum=signum)
        return bool(self.stopped_early)

    def save(self, *names: str, signum: int = 0) -> None:
        # The mean of the ranks' sums: a resume at any world size logs the same.
        fabric, sums = self.fabric, self.state["sums"]
        self.state["sums"] = {k: fabric.all_reduce(v, reduce_op="mean") for k, v in sums.items()}
        paths = [self.ckpt_dir / name for name in names]
        save_checkpoint(fabric, self.state, *paths, keep=self.cfg.log.num_checkpoint_keep)
        if signum:
            stop_after_signal(fabric, signum, paths[0])

    def finish(self) -> None:
        state, fabric, best = self.state, self.fabric, self.state["best"]
        # The record's end first: a stop before final.ckpt redoes it.
        memory = debug.memory_per_process(state["model"], state["optimizer"], fabric.device)
        fabric.log_dict({f"memory/{k}": v for k, v in memory.items()}, step=state["global_step"])
        self.save("final.ckpt")
        wait_for_checkpoints(fabric)
        step, seconds = state["global_step"], time.perf_counter() - self.start
        steps = step - self.start_step
        summary = f"no best {best['metric']} yet"  # a resume changed --monitor, trained no epoch
        if best["value"] is not None:
            summary = f"best {best['metric']} {best['value']:.4f} at epoch {best['epoch']}"
        if self.stopped_early:
            summary += f"\n  stopped early after epoch {state['epoch']}: {self.stopped_early}"
        saved = ", ".join(sorted(p.name for p in self.ckpt_dir.glob("*.ckpt")))
        fabric.print(
            f"Finished {steps} steps in {seconds:.1f}s ({steps / seconds:.1f} steps/s, "
            f"{steps * self.cfg.optim.eff_batch_size / seconds:.0f} samples/s, with validation "
            f"and checkpoints)\n  {summary}\n"
            f"  memory on rank 0: {', '.join(f'{k} {v:.1f} MiB' for k, v in memory.items())}\n"
            f"  checkpoints: {saved}\nRun dir: {self.run_dir}\n"
            f"Evaluate: python test.py --out_dir {self.run_dir}"
        )

    def banner(self) -> str:
        cfg, fabric, optim, best = self.cfg, self.fabric, self.cfg.optim, self.state["best"]
        where = f"{fabric.device}, {cfg.hardware.precision}"
        if fabric.device.type == "cpu":
            where += f", {torch.get_num_threads()} thread(s) per process"
        if cfg.debug.overfit_batches:
            samples = self.steps_per_epoch * optim.eff_batch_size
            where += f" | --overfit_batches: the same {samples} samples to train and validate on"
        if "stream" in self.state:
            where += " | streamed: the batches depend on the world size and --num_workers"
        params = sum(p.numel() for p in self.state["model"].parameters())
        ema = f" of the EMA weights (decay {optim.ema_decay:g})" if optim.ema_decay else ""
        return (
            f"Run dir: {self.run_dir}\n"
            f"  {fabric.world_size} device(s) x {self.batch_size} samples x {self.accum_steps} "
            f"accumulation step(s) = {optim.eff_batch_size} per optimizer step | "
            f"lr {optim.learning_rate():.4g} ({optim.lr_rule()})\n"
            f"  {cfg.arch.model}, {params:,} parameters | {cfg.data.dataset}, "
            f"{self.steps_per_epoch} steps/epoch x {cfg.epochs()} epochs | {where}\n"
            f"  best.ckpt: {best['mode']} {best['metric']}{ema}"
        )


def scalars(logged: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in logged.items() if isinstance(v, float) and k != "num_samples"}


def best_checkpoint_rule(cfg: Any, metrics: Any, logged: dict[str, Any]) -> tuple[str, str]:
    if "loss" in metrics:
        problem = "task.metrics has a metric named 'loss': val/loss is the task's; rename it"
        raise UsageError(problem)
    monitor, names = cfg.log.monitor or task.MONITOR, list(scalars(logged))
    name = monitor.removeprefix("val/")
    if name not in names:
        raise UsageError(f"--monitor {monitor!r} is not one of: val/{', val/'.join(names)}")
    if cfg.log.monitor_mode != "auto":
        return monitor, cfg.log.monitor_mode
    default = False if name == "loss" else None  # a logged value may have no metric object
    higher = getattr(metrics[name], "higher_is_better", None) if name in metrics else default
    if higher is None:
        problem = f"--monitor_mode auto: {monitor} does not say whether higher is better"
        raise UsageError(f"{problem}; pass min or max")
    return monitor, "max" if higher else "min"


def count_patience(patience: dict[str, Any], score: float, mode: str, min_delta: float) -> None:
    if improves(score, patience["value"], mode, min_delta):
        patience.update(value=score, stale_epochs=0)
    else:
        patience["stale_epochs"] += 1


def out_of_patience(state: dict[str, Any], cfg: Any) -> str:
    """Why the run stops early, or ""."""
    stale, patience = state["patience"]["stale_epochs"], cfg.early_stopping_patience
    if not 0 < patience <= stale:
        return ""
    return (
        f"{state['best']['metric']} has not improved by more than {cfg.early_stopping_min_delta:g} "
        f"for {stale} epochs (--early_stopping_patience {patience})"
    )


def improves(score: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    """Anything beats None or NaN, NaN nothing."""
    if best is None or math.isnan(best):
        return True
    return (score - best if mode == "max" else best - score) > min_delta
