"""The config: dataclasses whose field docstrings are the `--help` text. Resolved and checked once
(every problem together), saved as RUN_DIR/config.yaml, never mutated. No torch here."""

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import simple_parsing

from machinery.errors import UsageError
from task_config import ArchConfig, DataConfig

Accelerator = Literal["auto", "cpu", "cuda", "gpu", "mps", "tpu"]
Precision = Literal["32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true"]
Logger = Literal["csv", "tensorboard", "wandb"]


def choice(default: str) -> Any:
    """A Literal field: `validate` checks it with every other problem (argparse: the first only)."""
    return simple_parsing.field(default=default, type=str, choices=None)


# What a --resume may not change: the checkpoint or the data split would no longer fit.
RESUME_LOCKED = (
    *("seed", "fast_run", "init_from", "optim.optimizer", "optim.eff_batch_size"),
    "debug.overfit_batches",
    *(f"data.{n}" for n in getattr(DataConfig, "RESUME_LOCKED", ())),
    *(f"arch.{n}" for n in getattr(ArchConfig, "RESUME_LOCKED", ())),
)


@dataclass(frozen=True)
class HardwareConfig:
    """Where and how to run (lightning.fabric.Fabric)."""

    accelerator: Accelerator = choice("auto")
    """auto, cpu, cuda, gpu, mps or tpu."""
    devices: str = "auto"
    """Devices per node: a count, ids (0,1), -1 (all) or auto."""
    num_nodes: int = 1
    """Number of machines."""
    strategy: Literal["auto", "ddp", "fsdp"] = choice("auto")
    """auto, ddp or fsdp (FSDP2, sharded)."""
    precision: Precision = choice("32-true")
    """32-true, 16-mixed, bf16-mixed, 16-true, bf16-true or 64-true."""
    compile: bool = False
    """torch.compile the model."""
    channels_last: bool = False
    """Conv weights in channels_last memory format."""
    num_workers: int = 0
    """DataLoader workers per device; 0: the main process."""


@dataclass(frozen=True)
class OptimConfig:
    """Batch size, learning rate and optimizer."""

    epochs: int = 10
    """Number of training epochs."""
    eff_batch_size: int = 64
    """Samples per optimizer step, over all devices and accumulation steps."""
    max_batch_size_per_device: int = 256
    """Largest micro-batch per device; beyond, gradients are accumulated."""
    base_batch_size: int = 64
    """The batch size base_lr was tuned for."""
    base_lr: float = 2e-3
    """LR at base_batch_size, scaled to eff_batch_size by lr_scaling_rule."""
    lr: Optional[float] = None
    """LR as is, overriding base_lr and lr_scaling_rule."""
    lr_scaling_rule: Literal["none", "linear", "sqrt"] = choice("linear")
    """How the LR follows eff_batch_size: none, linear or sqrt."""
    warmup: float = 1.0
    """Linear warmup in epochs (may be fractional), then cosine decay."""
    optimizer: Literal["adamw", "sgd"] = choice("adamw")
    """adamw or sgd (momentum 0.9)."""
    weight_decay: float = 0.01
    """Weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this; 0: off."""
    ema_decay: float = 0.0
    """Validate and test an EMA of the weights with this decay (e.g. 0.999); 0: off."""

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        ratio = self.eff_batch_size / self.base_batch_size
        scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling_rule]
        return self.base_lr * scale

    def lr_rule(self) -> str:
        if self.lr is not None:
            return "--lr, as given"
        return f"--base_lr {self.base_lr:g} at {self.base_batch_size}, {self.lr_scaling_rule} rule"

    def micro_batching(self, world_size: int) -> tuple[int, int]:
        """(batch_size_per_device, grad_accum_steps): the fewest steps that split eff_batch_size
        exactly; micro-batches under half the maximum are refused (slow)."""
        eff, most = self.eff_batch_size, self.max_batch_size_per_device
        per_device, remainder = divmod(eff, world_size)
        if remainder:
            raise UsageError(
                f"--eff_batch_size {eff} is not divisible by the world size {world_size} "
                f"(devices x nodes); use a multiple of {world_size}"
            )
        low = (most + 1) // 2
        accums = range(math.ceil(per_device / most), max(1, per_device // low) + 1)
        if len(accums) > most:  # bounded work: search the sizes instead
            accums = [per_device // b for b in range(most, low - 1, -1) if per_device % b == 0]
        accum = next((a for a in accums if per_device % a == 0), 0)
        if not accum:
            below = eff // (world_size * most) * world_size * most
            nearby = " or ".join(str(n) for n in (below, below + world_size * most) if n)
            raise UsageError(
                f"--eff_batch_size {eff} on {world_size} device(s) does not split into "
                f"micro-batches of {low} to {most} (--max_batch_size_per_device); "
                f"use e.g. {nearby}"
            )
        return per_device // accum, accum


@dataclass(frozen=True)
class LogConfig:
    """Logging and checkpoint cadence."""

    log_interval: int = 10
    """Log training metrics every N optimizer steps."""
    checkpoint_frequency: int = 1
    """Save a periodic checkpoint every N epochs."""
    checkpoint_every_n_steps: int = 0
    """Also save one every N optimizer steps; 0: off."""
    num_checkpoint_keep: int = 3
    """Periodic checkpoints to keep (besides best.ckpt and final.ckpt)."""
    monitor: str = ""
    """Metric that picks best.ckpt: val/loss or val/<metric>; empty: task.MONITOR."""
    monitor_mode: Literal["auto", "min", "max"] = choice("auto")
    """min or max is best; auto: min for a loss, else the metric's own."""
    early_stopping_patience: int = 0
    """Stop after N epochs without improvement; 0: off."""
    early_stopping_min_delta: float = 0.0
    """The smallest change that counts as an improvement."""


@dataclass(frozen=True)
class DebugConfig:
    """Tools for finding bugs."""

    overfit_batches: int = 0
    """Train and validate on the same N batches: the loss must reach ~0."""
    detect_anomaly: bool = False
    """Autograd's anomaly mode: stop at the backward op that makes a NaN. Slow."""
    deterministic: bool = False
    """Deterministic algorithms, no cuDNN autotuning."""


@dataclass(frozen=True)
class TrainConfig:
    """Train a model with Lightning Fabric. RUN_DIR = ROOT_DIR/YYYYmmdd-HHMMSS-OUT_DIR."""

    seed: int = 42
    """Random seed (initialisation, data split and order)."""
    project: str = "fabric-template"
    """The wandb project."""
    comment: str = ""
    """Free text describing the run."""
    root_dir: str = "runs"
    """Directory that holds the runs."""
    out_dir: str = "run"
    """Name suffix of this run's directory."""
    resume: str = ""
    """Continue a run: its RUN_DIR, a checkpoint, or auto: the newest unfinished *-OUT_DIR."""
    init_from: str = ""
    """A new run from the weights of a checkpoint, RUN_DIR (best.ckpt) or state dict."""
    max_time: str = ""
    """Time budget DD:HH:MM:SS: save, then exit with code 75."""
    logger_name: list[Logger] = simple_parsing.list_field("csv", type=str)
    """csv, tensorboard and/or wandb (the CSV log is always kept)."""
    fast_run: bool = False
    """Check the plumbing: 1 epoch of 2 steps, 2 validation batches."""
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def epochs(self) -> int:
        return 1 if self.fast_run else self.optim.epochs

    def log_every_n_steps(self) -> int:
        return 1 if self.fast_run else self.log.log_interval

    def time_budget(self) -> Optional[float]:
        if self.max_time:
            d, h, m, s = map(int, self.max_time.split(":"))
            return ((d * 24 + h) * 60 + m) * 60 + s
        return None


@dataclass(frozen=True)
class TestConfig:
    """Evaluate a run on its test split, with its saved config."""

    __test__ = False  # not a pytest test class

    out_dir: str = ""
    """RUN_DIR of the run to evaluate (required)."""
    checkpoint: str = "best"
    """best, last (newest periodic), final, or a .ckpt file."""
    weights: Literal["auto", "ema", "raw"] = choice("auto")
    """ema, raw, or auto (those validation judged)."""
    accelerator: Accelerator = choice("auto")
    """auto, cpu, cuda, gpu, mps or tpu."""
    devices: str = "1"
    """Devices (the results do not depend on it)."""
    batch_size: int = 256
    """Batch size per device."""


AT_LEAST = dict(seed=0, num_nodes=1, num_workers=0, epochs=1, eff_batch_size=1, batch_size=1,
    max_batch_size_per_device=1, base_batch_size=1, weight_decay=0, grad_clip=0, log_interval=1,
    checkpoint_frequency=1, overfit_batches=0, checkpoint_every_n_steps=0, num_checkpoint_keep=1,
    early_stopping_patience=0, early_stopping_min_delta=0)  # fmt: skip


def validate(cfg: Any) -> list[str]:
    """Every problem with a config, one line each; empty when it is usable."""
    problems = []
    for path, value, kind in walk(cfg):
        name = path.split(".")[-1]
        kind = get_args(kind)[0] if isinstance(value, list) else kind
        allowed = get_args(kind) if get_origin(kind) is Literal else ()
        for v in value if isinstance(value, list) else [value]:
            if allowed and v not in allowed:
                problems.append(f"--{name} {v!r} is not one of: {', '.join(allowed)}")
        if name in AT_LEAST and value < AT_LEAST[name]:
            problems.append(f"--{name} {value} must be >= {AT_LEAST[name]}")
    if isinstance(cfg, TestConfig):
        return problems + ([] if cfg.out_dir else ["--out_dir is required"])
    hw, opt, log = cfg.hardware, cfg.optim, cfg.log
    wrong = [
        (cfg.seed >= 2**32, f"--seed {cfg.seed} must be < 2**32"),
        (Path(cfg.root_dir).is_file(), f"--root_dir {cfg.root_dir!r} is not a directory"),
        (cfg.out_dir in ("", ".", "..") or "/" in cfg.out_dir,
         f"--out_dir {cfg.out_dir!r} must be a plain directory name"),
        (cfg.max_time and not (re.fullmatch(r"(\d+:){3}\d+", cfg.max_time) and cfg.time_budget()),
         f"--max_time {cfg.max_time!r} must be DD:HH:MM:SS, longer than 0"),
        (not re.fullmatch(r"auto|-1|[1-9]\d*|\d+(,\d+)+", hw.devices),
         f"--devices {hw.devices!r} must be a count, ids like 0,1, -1 or auto"),
        (opt.eff_batch_size > 2**40, f"--eff_batch_size {opt.eff_batch_size} must be <= 2**40"),
        (opt.base_lr <= 0, f"--base_lr {opt.base_lr} must be > 0"),
        (opt.lr is not None and opt.lr <= 0, f"--lr {opt.lr} must be > 0"),
        (not 0 <= opt.warmup <= opt.epochs,
         f"--warmup {opt.warmup} must be between 0 and --epochs {opt.epochs}"),
        (not 0 <= opt.ema_decay < 1, f"--ema_decay {opt.ema_decay} must be in [0, 1)"),
        (opt.ema_decay and hw.precision in ("bf16-true", "16-true"),
         f"--ema_decay with --precision {hw.precision}: 16-bit weights lose the average's small "
         "updates; use bf16-mixed or 16-mixed"),
        (log.monitor and not log.monitor.startswith("val/"),
         f"--monitor {log.monitor!r} must be val/loss or val/<metric>"),
    ]  # fmt: skip
    problems += [problem for bad, problem in wrong if bad]
    return problems + cfg.data.problems() + cfg.arch.problems()  # the task's own flags


def walk(cfg: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted name, value, type) of every leaf field."""
    out = []
    for f in fields(cfg):
        value, name = getattr(cfg, f.name), prefix + f.name
        out += walk(value, f"{name}.") if is_dataclass(value) else [(name, value, f.type)]
    return out
