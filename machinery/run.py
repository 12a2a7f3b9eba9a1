"""The bookkeeping around train.py's loop: run dir, logs, checkpoints, best.ckpt, stops, summary.

Guarantees: nothing is written before `Run` starts (every check has passed); train/<name> is the
mean over the log interval of what the loop tracked, the same at any world size and across a resume;
checkpoints every --checkpoint_frequency epochs and --checkpoint_every_n_steps steps, best.ckpt when
the monitored metric improves, and one before any stop; one CPU sync per log interval, none a step.
"""

import contextlib
import math
import time
from dataclasses import asdict
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.throughput import ThroughputMonitor

import task
from machinery import debug
from machinery.checkpoints import newest_checkpoint, save_checkpoint, wait_for_checkpoints
from machinery.curves import draw_curves
from machinery.errors import NonFiniteLoss, UsageError
from machinery.progress import Progress
from machinery.rundir import create_run_dir
from machinery.signals import StopSignals, stop_after_signal
from model import build_model


class Run:
    """`with Run(...) as run:` around the loop. Each method is one plain call of the loop."""

    def __init__(self, fabric: Fabric, cfg: Any, state: dict, steps: int, batch: Any, info: Any):
        """`steps`: optimizer steps per epoch; `batch` and `info`: for the FLOPs of a step."""
        steps_per_epoch = steps
        self.fabric, self.cfg, self.state = fabric, cfg, state
        self.epochs, self.steps_per_epoch = cfg.epochs(), steps_per_epoch
        self.batch_size, self.accum_steps = cfg.optim.micro_batching(fabric.world_size)
        # A resume at an epoch's end that had run out of patience only finishes the run.
        self.stopped_early = out_of_patience(state, cfg.log) if state["sample_offset"] == 0 else ""
        self.last_epoch = state["epoch"] if self.stopped_early else self.epochs
        self.run_dir = create_run_dir(fabric, cfg, state["global_step"], state["schedule"])
        self.ckpt_dir = self.run_dir / "checkpoints"
        state["config"] = asdict(cfg)  # after a resume's load: this launch's config
        # A checkpoint at an epoch's end (offset 0) comes after that epoch's validation.
        resumed_at = (state["global_step"], state["sample_offset"] == 0) if cfg.resume else None
        fabric.logger.open(self.run_dir, resumed_at)
        flops = debug.training_flops(
            lambda: build_model(cfg.arch, info, False), task.forward, batch
        )
        self.flops_per_step = flops and flops * self.accum_steps
        if not cfg.resume:
            fabric.logger.log_hyperparams(self.hparams())
        fabric.print(self.banner())
        self.log_every = cfg.log_every_n_steps(steps_per_epoch)
        if self.log_every > (self.last_epoch - state["epoch"]) * steps_per_epoch:
            fabric.print(
                f"note: fewer steps than --log_interval {self.log_every}: no train/* logged"
            )
        self.throughput = ThroughputMonitor(fabric, window_size=3)  # over the last 2 log intervals
        self.start, self.start_step = time.perf_counter(), state["global_step"]

    def __enter__(self) -> "Run":
        total, done = self.epochs * self.steps_per_epoch, self.state["global_step"]
        self.exit_stack = stack = contextlib.ExitStack()
        self.progress = stack.enter_context(Progress(self.fabric, total, done))
        profile = debug.step_profiler(
            self.cfg.debug.profile, self.run_dir, self.fabric, total - done
        )
        self.profile = stack.enter_context(profile)
        self.stop = stack.enter_context(StopSignals(self.cfg.time_budget(), self.log_every))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.exit_stack.__exit__(*exc)

    def track(self, **scalars: torch.Tensor) -> None:
        """Sum each scalar on the device (no sync); the log step logs its mean per optimizer step
        since the last log as train/<name>. Call it once per micro-batch with value / accum_steps,
        or once per optimizer step."""
        sums = self.state["sums"]
        for name, value in scalars.items():
            sums[name] = sums[name] + value if name in sums else value.clone()

    def log_step(self, epoch: int, lr: float) -> None:
        """After an optimizer step: the progress bar; every log interval, the tracked means (checked
        finite), the LR and the throughput, logged and shown. The log interval's only CPU sync."""
        state, fabric = self.state, self.fabric
        state["summed_steps"] += 1
        self.progress.update()
        self.profile.step()
        step = state["global_step"]
        if step % self.log_every:
            return
        names = sorted(state["sums"])
        means = torch.stack([state["sums"][n] for n in names]) / state["summed_steps"]
        means = fabric.all_reduce(means).tolist()  # the CPU sync
        logged = {f"train/{name}": value for name, value in zip(names, means)}
        for name, value in logged.items():
            if not math.isfinite(value):
                problem = f"the training {name.removeprefix('train/')} is {value} at step {step}"
                raise NonFiniteLoss(problem, newest_checkpoint(self.ckpt_dir))
        steps, seconds = step - self.start_step, time.perf_counter() - self.start
        samples = steps * self.batch_size * self.accum_steps  # per device
        flops = self.flops_per_step and steps * self.flops_per_step
        self.throughput.update(time=seconds, batches=steps, samples=samples, flops=flops)
        speed = self.throughput.compute()
        speed = {k: v for k, v in speed.items() if k.endswith(("_per_sec", "mfu"))}
        fabric.log_dict({**logged, "lr": lr, "epoch": epoch + 1, **speed}, step=step)
        samples_per_s = speed.get("device/samples_per_sec", samples / seconds) * fabric.world_size
        self.progress.log(epoch + 1, step, logged.get("train/loss", math.nan), lr, samples_per_s)
        state["sums"], state["summed_steps"] = {}, 0

    def save_if_due(self) -> None:
        """A periodic checkpoint every --checkpoint_every_n_steps; on a stop signal (agreed by every
        rank at a log step) or --max_time, one, then every rank exits (Preempted)."""
        step, every = self.state["global_step"], self.cfg.log.checkpoint_every_n_steps
        signum = self.stop.agreed(self.fabric, step)
        if signum or (every and step % every == 0):
            self.save(f"step-{step:08d}.ckpt")
        if signum:
            stop_after_signal(
                self.fabric, self.cfg, signum, self.ckpt_dir / f"step-{step:08d}.ckpt"
            )

    def end_epoch(self, epoch: int, val: dict[str, Any]) -> bool:
        """After an epoch's validation: log it, count patience, save best.ckpt if it improved and
        the epoch's checkpoint when due; stop on a signal. True when out of patience."""
        state, cfg, fabric = self.state, self.cfg, self.fabric
        scalars = {k: v for k, v in val.items() if isinstance(v, float) and k != "num_samples"}
        state["epoch"], state["sample_offset"] = epoch + 1, 0
        logged = {f"val/{name}": value for name, value in scalars.items()}
        fabric.log_dict({**logged, "epoch": epoch + 1}, step=state["global_step"])
        shown = " ".join(f"val {name} {value:.4f}" for name, value in scalars.items())
        self.progress.write(f"epoch {epoch + 1}/{self.epochs} step {state['global_step']} {shown}")
        best = state["best"]
        score = scalars[best["metric"].removeprefix("val/")]
        count_patience(state["patience"], score, best["mode"], cfg.log.early_stopping_min_delta)
        self.stopped_early = fabric.broadcast(out_of_patience(state, cfg.log))  # rank 0's decision
        signum = self.stop.agreed(fabric)
        names = []
        if signum or self.stopped_early or state["epoch"] % cfg.log.checkpoint_frequency == 0:
            names.append(f"step-{state['global_step']:08d}.ckpt")
        if improves(score, best["value"], best["mode"]):
            best.update(value=score, epoch=epoch + 1)
            names.append("best.ckpt")
        self.save(*names)
        if signum:
            stop_after_signal(fabric, cfg, signum, self.ckpt_dir / names[0])
        return bool(self.stopped_early)

    def save(self, *names: str) -> None:
        """Written once; further names are hard links. Periodic ones (step-N) rotate."""
        state, fabric = self.state, self.fabric
        # The ranks' partial sums become their mean: the same log at any world size after a resume.
        state["sums"] = {
            k: fabric.all_reduce(v, reduce_op="mean") for k, v in state["sums"].items()
        }
        paths = [self.ckpt_dir / name for name in names]
        save_checkpoint(fabric, state, *paths, keep=self.cfg.log.num_checkpoint_keep)

    def finish(self) -> None:
        """final.ckpt, on disk on every rank's word; curves.png; memory; the summary."""
        state, fabric, cfg = self.state, self.fabric, self.cfg
        self.save("final.ckpt")
        wait_for_checkpoints(fabric)
        seconds, steps = time.perf_counter() - self.start, state["global_step"] - self.start_step
        best = state["best"]
        if fabric.is_global_zero:
            draw_curves(self.run_dir, best["metric"], best["mode"])  # from the whole run's CSV log
        memory = debug.memory_per_process(state["model"], state["optimizer"], fabric.device)
        if steps:  # once per launch that trained
            fabric.log_dict(
                {f"memory/{k}": v for k, v in memory.items()}, step=state["global_step"]
            )
        early = f"  stopped early after epoch {state['epoch']}: {self.stopped_early}\n"
        saved = ", ".join(sorted(p.name for p in self.ckpt_dir.glob("*.ckpt")))
        fabric.print(
            f"Finished {steps} steps in {seconds:.1f}s ({steps / seconds:.1f} steps/s, "
            f"{steps * cfg.optim.eff_batch_size / seconds:.0f} samples/s, with validation and "
            "checkpoints)\n"
            f"  {best_summary(best)}\n{early if self.stopped_early else ''}"
            f"  memory on rank 0: {', '.join(f'{k} {v:.1f} MiB' for k, v in memory.items())}\n"
            f"  checkpoints: {saved}\n"
            f"  curves: {self.run_dir / 'curves.png'} | logs: {self.run_dir / 'logs'}\n"
            f"Run dir: {self.run_dir}\nEvaluate: python test.py --out_dir {self.run_dir}"
        )

    def hparams(self) -> dict[str, Any]:
        """What hparams.yaml records: the config and the numbers derived from it."""
        return {
            **asdict(self.cfg),
            "world_size": self.fabric.world_size,
            "lr_used": self.cfg.optim.learning_rate(),
            "batch_size_per_device": self.batch_size,
            "grad_accum_steps": self.accum_steps,
            "monitor_used": self.state["best"]["metric"],
            "monitor_mode_used": self.state["best"]["mode"],
        }

    def banner(self) -> str:
        cfg, fabric, optim = self.cfg, self.fabric, self.cfg.optim
        where = f"{fabric.device}, {cfg.hardware.precision}"
        if fabric.device.type == "cpu":
            where += f", {torch.get_num_threads()} thread(s) per process"
        if cfg.debug.overfit_batches:
            samples = self.steps_per_epoch * optim.eff_batch_size
            where += f" | --overfit_batches: the same {samples} samples to train and validate on"
        params = sum(p.numel() for p in self.state["model"].parameters())
        best = self.state["best"]
        ema = f" of the EMA weights (decay {optim.ema_decay:g})" if optim.ema_decay else ""
        return (
            f"Run dir: {self.run_dir}\n"
            f"  {fabric.world_size} device(s) x {self.batch_size} samples x {self.accum_steps} "
            f"accumulation step(s) = {optim.eff_batch_size} per optimizer step | "
            f"lr {optim.learning_rate():.4g} ({optim.lr_rule()})\n"
            f"  {cfg.arch.model}, {params:,} parameters | {cfg.data.dataset}, "
            f"{self.steps_per_epoch} steps/epoch x {self.epochs} epochs | {where}\n"
            f"  best.ckpt: {best['mode']} {best['metric']}{ema}"
        )


def best_checkpoint_rule(cfg: Any, metrics: Any, logged: dict[str, Any]) -> tuple[str, str]:
    """(metric, "min" or "max") that best.ckpt follows: --monitor, else the task's MONITOR; its mode
    is --monitor_mode, else min for the loss and, for a metric, what its higher_is_better says."""
    if "loss" in metrics:
        raise UsageError(
            "task.metrics has a metric named 'loss': val/loss is the task's; rename it"
        )
    monitor = cfg.log.monitor or task.MONITOR
    name = monitor.removeprefix("val/")
    names = [k for k, v in logged.items() if isinstance(v, float) and k != "num_samples"]
    if name not in names:
        raise UsageError(
            f"--monitor {monitor!r} is not one of: {', '.join('val/' + k for k in names)}"
        )
    if cfg.log.monitor_mode != "auto":
        return monitor, cfg.log.monitor_mode
    higher = getattr(metrics[name], "higher_is_better", None) if name in metrics else None
    higher = False if name == "loss" else higher  # a logged value may have no metric object
    if higher is None:
        raise UsageError(
            f"--monitor_mode auto: {monitor} says not whether higher is better; pass min or max"
        )
    return monitor, "max" if higher else "min"


def best_summary(best: dict[str, Any]) -> str:
    if best["value"] is None:  # a resume that changed --monitor and trained no further epoch
        return f"no best {best['metric']} yet"
    return f"best {best['metric']} {best['value']:.4f} at epoch {best['epoch']}"


def count_patience(patience: dict[str, Any], score: float, mode: str, min_delta: float) -> None:
    """An epoch whose score beats the reference by more than `min_delta` (or any after a NaN)
    becomes the new reference; any other, a NaN included, is one more stale epoch."""
    ref = patience["value"]
    if (
        ref is None
        or math.isnan(ref)
        or (score - ref if mode == "max" else ref - score) > min_delta
    ):
        patience.update(value=score, stale_epochs=0)
    else:
        patience["stale_epochs"] += 1


def out_of_patience(state: dict[str, Any], cfg: Any) -> str:
    """Why the run stops early, in words, or "" to go on."""
    stale, patience = state["patience"]["stale_epochs"], cfg.early_stopping_patience
    if not 0 < patience <= stale:
        return ""
    return (
        f"{state['best']['metric']} has not improved by more than {cfg.early_stopping_min_delta:g} "
        f"for {stale} epochs (--early_stopping_patience {patience})"
    )


def improves(score: float, best: float | None, mode: str) -> bool:
    """Whether `score` beats `best` (None: nothing yet). A NaN never beats a number; any beats a
    NaN."""
    if best is None or math.isnan(best):
        return True
    return score > best if mode == "max" else score < best
