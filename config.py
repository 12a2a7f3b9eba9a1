"""The config: dataclasses whose field docstrings are the `--help` text.

Resolved once (defaults < the task's DEFAULTS < --config_path < flags, machinery/cli.py), checked
once with every problem reported together (`validate`), saved as RUN_DIR/config.yaml and never
mutated. Numbers that depend on the world size are methods. No torch here: `--help` and bad input
answer at once."""

import math
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import simple_parsing

from machinery.errors import UsageError
from task_config import ArchConfig, DataConfig

LOGGERS = ("csv", "tensorboard", "wandb")
Precision = Literal[
    "32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "transformer-engine"
]
# What a --resume may not change: the checkpoint or the data split would no longer fit the run. The
# task's
# groups name theirs in RESUME_LOCKED (task_config.py).
RESUME_LOCKED = (
    "seed",
    "fast_run",
    "optim.optimizer",
    "optim.eff_batch_size",
    "debug.overfit_batches",
    *(f"data.{name}" for name in getattr(DataConfig, "RESUME_LOCKED", ())),
    *(f"arch.{name}" for name in getattr(ArchConfig, "RESUME_LOCKED", ())),
)


def choice(default: str) -> Any:
    """A field typed `Literal[...]`: `validate` checks it along with every other problem (argparse's
    own check would stop at the first)."""
    return simple_parsing.field(default=default, type=str, choices=None)


@dataclass(frozen=True)
class HardwareConfig:
    """Where and how to run: passed to lightning.fabric.Fabric."""

    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps", "tpu"] = choice("auto")
    """Accelerator: auto, cpu, cuda, gpu, mps or tpu."""
    devices: str = "auto"
    """Devices per node: a count (2), a list of ids (0,1), -1 for all, or auto."""
    num_nodes: int = 1
    """Number of nodes (machines)."""
    strategy: Literal["auto", "ddp", "fsdp", "fsdp1", "deepspeed"] = choice("auto")
    """Distribution strategy: auto, ddp, fsdp (FSDP2, sharded; CPUs too), fsdp1 (FSDP1, GPUs) or
    deepspeed."""
    precision: Precision = choice("32-true")  # one line: --help reads the docstring below it
    """Numerical precision: 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true or 64-true."""
    compile: bool = False
    """torch.compile the model. Pays off on GPUs and long runs; compiling takes a while."""
    channels_last: bool = False
    """Keep conv weights in channels_last memory format (faster convolutions on recent GPUs)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, more compute, the same
    gradients."""
    num_workers: int = 0
    """DataLoader worker processes per device. 0 loads in the main process, best for in-memory
    tensors."""


@dataclass(frozen=True)
class OptimConfig:
    """Batch size, learning rate and optimizer."""

    epochs: int = 10
    """Number of training epochs."""
    eff_batch_size: int = 64
    """Global batch size per optimizer step, summed over all devices and accumulation steps."""
    max_batch_size_per_device: int = 256
    """Largest micro-batch one device runs; beyond it, gradients are accumulated."""
    base_batch_size: int = 64
    """The batch size that base_lr was tuned for."""
    base_lr: float = 2e-3
    """Learning rate at base_batch_size; scaled to eff_batch_size by lr_scaling_rule."""
    lr: Optional[float] = None
    """Learning rate to use as is, overriding base_lr and lr_scaling_rule."""
    lr_scaling_rule: Literal["none", "linear", "sqrt"] = choice("linear")
    """How the learning rate follows eff_batch_size: none, linear or sqrt."""
    warmup: float = 1.0
    """Linear warmup length in epochs (may be fractional); cosine decay to zero follows."""
    optimizer: Literal["adamw", "sgd"] = choice("adamw")
    """Optimizer: adamw or sgd (momentum 0.9)."""
    weight_decay: float = 0.01
    """Weight decay."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value; 0 disables clipping."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999), warmed up as
    min(decay, (1 + step) / (10 + step)); validation, best.ckpt and test.py then use it. 0: off."""

    def learning_rate(self) -> float:
        """The learning rate used: `lr` when given, else base_lr scaled by the rule."""
        if self.lr is not None:
            return self.lr
        ratio = self.eff_batch_size / self.base_batch_size
        scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling_rule]
        return self.base_lr * scale

    def lr_rule(self) -> str:
        """Where learning_rate() comes from, in words, for the banner."""
        if self.lr is not None:
            return "--lr, as given"
        return f"--base_lr {self.base_lr:g} at {self.base_batch_size}, {self.lr_scaling_rule} rule"

    def micro_batching(self, world_size: int) -> tuple[int, int]:
        """(batch_size_per_device, grad_accum_steps), whose product with world_size is
        eff_batch_size exactly: the fewest accumulation steps that split the per-device share evenly
        within max_batch_size_per_device. Micro-batches under half of that maximum are refused:
        slow."""
        per_device, remainder = divmod(self.eff_batch_size, world_size)
        if remainder or per_device == 0:
            raise UsageError(
                f"--eff_batch_size {self.eff_batch_size} is not divisible by the world size "
                f"{world_size} (devices x nodes); use a multiple of {world_size}"
            )
        accum = math.ceil(per_device / self.max_batch_size_per_device)
        # The divisors of per_device up to 2 x the fewest steps: larger ones make tiny micro-
        # batches.
        accum = next((a for a in range(accum, 2 * accum + 1) if per_device % a == 0), 2 * accum + 1)
        if accum > 1 and 2 * (per_device // accum) < self.max_batch_size_per_device:
            step = world_size * self.max_batch_size_per_device
            nearby = [
                n
                for n in (
                    self.eff_batch_size // step * step,
                    self.eff_batch_size // step * step + step,
                )
                if n
            ]
            raise UsageError(
                f"--eff_batch_size {self.eff_batch_size} on {world_size} device(s) does not split "
                "into "
                f"micro-batches of {self.max_batch_size_per_device // 2} to "
                f"{self.max_batch_size_per_device} (--max_batch_size_per_device); "
                f"use e.g. {' or '.join(map(str, nearby))}"
            )
        return per_device // accum, accum


@dataclass(frozen=True)
class LogConfig:
    """Logging and checkpoint cadence."""

    log_interval: int = 10
    """Log training metrics every N optimizer steps."""
    log_per_epoch: int = 0
    """If > 0, log this many times per epoch instead of every log_interval steps."""
    checkpoint_frequency: int = 1
    """Save a periodic checkpoint every N epochs."""
    checkpoint_every_n_steps: int = 0
    """Also save a periodic checkpoint every N optimizer steps, mid-epoch included; 0 disables."""
    num_checkpoint_keep: int = 3
    """How many periodic checkpoints to keep (best.ckpt and final.ckpt are kept besides)."""
    monitor: str = ""
    """Validation metric that picks best.ckpt: val/loss or val/<a metric of the task>; empty: the
    task's choice (MONITOR in task.py)."""
    monitor_mode: Literal["auto", "min", "max"] = choice("auto")
    """Whether best.ckpt has the monitored metric's min or max; auto: min for a loss, else the
    metric's higher_is_better."""
    early_stopping_patience: int = 0
    """Stop once the monitored metric has not improved by more than early_stopping_min_delta for
    this many epochs in a row (a checkpoint and final.ckpt are saved); 0: never stop early."""
    early_stopping_min_delta: float = 0.0
    """The smallest change of the monitored metric that counts as an improvement for early stopping.
    """


@dataclass(frozen=True)
class DebugConfig:
    """Tools for finding bugs; all off by default."""

    overfit_batches: int = 0
    """Train and validate on the same N batches (N x eff_batch_size training samples): a model and
    loss that cannot drive their loss to about 0 have a bug. 0: off."""
    profile: bool = False
    """Profile optimizer steps 3 to 5 with torch.profiler: a trace per rank in RUN_DIR/profile
    (TensorBoard, or https://ui.perfetto.dev) and the top ops printed."""
    detect_anomaly: bool = False
    """torch.autograd's anomaly mode: a NaN or Inf made in the backward pass stops the run with the
    traceback of the forward op behind it. Slow."""
    deterministic: bool = False
    """PyTorch's deterministic algorithms (an op without one is an error), cuDNN without autotuning,
    and the cuBLAS workspace setting they need: bitwise the same numbers on every run on one
    machine."""


@dataclass(frozen=True)
class TrainConfig:
    """Train a model with Lightning Fabric. RUN_DIR = ROOT_DIR/YYYYmmdd-HHMMSS-OUT_DIR."""

    seed: int = 42
    """Random seed for initialisation, data splits and data order."""
    project: str = "fabric-template"
    """Project name (the wandb project)."""
    comment: str = ""
    """Free text describing this run; saved in config.yaml and logged."""
    root_dir: str = "runs"
    """Directory that holds all runs."""
    out_dir: str = "run"
    """Name suffix of this run's directory."""
    resume: str = ""
    """RUN_DIR of an earlier run to continue from its newest checkpoint, with its saved config; or
    auto: the newest unfinished run under root_dir named *-OUT_DIR, else a new run; or a checkpoint
    file of a run (RUN_DIR/checkpoints/step-N.ckpt): a new run dir continues from it."""
    init_from: str = ""
    """Start a new run from these weights (fine-tuning): a checkpoint file, a RUN_DIR (its
    best.ckpt) or a state dict file. Tensors load where name and shape match; optimizer, step and
    schedule start fresh."""
    max_time: str = ""
    """Time budget DD:HH:MM:SS (e.g. 00:04:00:00), counted from the process's start: the run saves a
    checkpoint and exits with code 75 before it is spent; --resume continues it. Empty: none."""
    requeue: bool = False
    """Under SLURM, after a signal-triggered checkpoint, requeue the job (scontrol requeue)."""
    logger_name: list[str] = field(default_factory=lambda: ["csv"])
    """Loggers, one or more of: csv, tensorboard, wandb. The CSV log is always kept: the run's
    record."""
    fast_run: bool = False
    """Check the plumbing: 1 epoch of 2 optimizer steps, 2 validation batches, a log line every
    step."""
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def epochs(self) -> int:
        return 1 if self.fast_run else self.optim.epochs

    def log_every_n_steps(self, steps_per_epoch: int) -> int:
        if self.fast_run:  # the smoke test goes through the training log too
            return 1
        if self.log.log_per_epoch > 0:
            return max(1, steps_per_epoch // self.log.log_per_epoch)
        return self.log.log_interval

    def time_budget(self) -> Optional[float]:
        """--max_time in seconds, None if not given."""
        if not self.max_time:
            return None
        days, hours, minutes, seconds = (int(part) for part in self.max_time.split(":"))
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass(frozen=True)
class TestConfig:
    """Evaluate a finished run on its test split, with the run's own saved config."""

    __test__ = False  # not a pytest test class

    out_dir: str = ""
    """RUN_DIR of the run to evaluate (required)."""
    checkpoint: str = "best"
    """Which checkpoint: best, last (newest periodic), final, or a path to a .ckpt file."""
    weights: Literal["auto", "ema", "raw"] = choice("auto")
    """Which weights: ema (the average --ema_decay kept), raw (the trained ones), or auto: those
    validation judged (ema when the run kept one)."""
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps", "tpu"] = choice("auto")
    """Accelerator: auto, cpu, cuda, gpu, mps or tpu."""
    devices: str = "1"
    """Devices to evaluate on; the test split is sharded without padding, so results do not change.
    """
    batch_size: int = 256
    """Batch size per device."""


# The smallest value each numeric flag allows.
AT_LEAST = dict(seed=0, num_nodes=1, num_workers=0, epochs=1, eff_batch_size=1, batch_size=1)
AT_LEAST |= dict(max_batch_size_per_device=1, base_batch_size=1, weight_decay=0, grad_clip=0)
AT_LEAST |= dict(
    log_interval=1, log_per_epoch=0, checkpoint_frequency=1, checkpoint_every_n_steps=0
)
AT_LEAST |= dict(num_checkpoint_keep=1, early_stopping_patience=0, early_stopping_min_delta=0)
AT_LEAST |= dict(overfit_batches=0)


def validate(cfg: Any) -> list[str]:
    """Every problem with a config, one line each; empty when it is usable."""
    problems = [p for name, value, kind in walk(cfg) if (p := not_one_of(name, value, kind))]
    low = [(n, v, AT_LEAST[n]) for n, v, _ in walk(cfg) if n in AT_LEAST and v < AT_LEAST[n]]
    problems += [f"--{name} {value} must be >= {least}" for name, value, least in low]
    if isinstance(cfg, TestConfig):
        return problems + ["--out_dir is required: the RUN_DIR of the run to evaluate"] * (
            not cfg.out_dir
        )
    hw, opt, log = cfg.hardware, cfg.optim, cfg.log
    budget = re.fullmatch(r"\d+:\d+:\d+:\d+", cfg.max_time) and cfg.time_budget()
    devices = hw.devices == "auto" or all(
        d.strip().lstrip("-").isdigit() for d in hw.devices.split(",")
    )
    root = Path(cfg.root_dir)
    sixteen_bit = hw.precision in ("bf16-true", "16-true")
    wrong = [
        (cfg.seed >= 2**32, f"--seed {cfg.seed} must be < 2**32"),
        (root.exists() and not root.is_dir(), f"--root_dir {cfg.root_dir!r} is not a directory"),
        (cfg.out_dir in ("", ".", "..") or "/" in cfg.out_dir,
         f"--out_dir {cfg.out_dir!r} must be a plain, non-empty directory name"),
        (cfg.max_time and not budget,
         f"--max_time {cfg.max_time!r} must be DD:HH:MM:SS, longer than 0"),
        (not cfg.logger_name, "--logger_name needs at least one of: " + ", ".join(LOGGERS)),
        (not devices or hw.devices in ("0", "-0"),
         f"--devices {hw.devices!r} must be a count, ids like 0,1, -1 or auto"),
        (opt.base_lr <= 0, f"--base_lr {opt.base_lr} must be > 0"),
        (opt.lr is not None and opt.lr <= 0, f"--lr {opt.lr} must be > 0"),
        (not 0 <= opt.warmup <= opt.epochs,
         f"--warmup {opt.warmup} must be between 0 and --epochs {opt.epochs}"),
        (not 0 <= opt.ema_decay < 1, f"--ema_decay {opt.ema_decay} must be in [0, 1)"),
        (opt.ema_decay and sixteen_bit,
         f"--ema_decay with --precision {hw.precision}: 16-bit weights lose the average's small "
         "updates; use bf16-mixed or 16-mixed"),
        (opt.ema_decay and hw.strategy == "fsdp1",
         "--ema_decay with --strategy fsdp1 is not supported; use --strategy fsdp"),
        (log.monitor != "" and not log.monitor.startswith("val/"),
         f"--monitor {log.monitor!r} must be val/loss or val/<metric>"),
    ]  # fmt: skip
    problems += [message for bad, message in wrong if bad]
    problems += [
        f"--logger_name {name!r} is not one of: {', '.join(LOGGERS)}"
        for name in cfg.logger_name
        if name not in LOGGERS
    ]
    return problems + cfg.data.problems() + cfg.arch.problems()  # the task's flags check themselves


def walk(cfg: Any) -> list[tuple[str, Any, Any]]:
    """(name, value, type) of every field of a (nested) config dataclass."""
    out = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        out += walk(value) if is_dataclass(value) else [(f.name, value, f.type)]
    return out


def not_one_of(name: str, value: Any, kind: Any) -> str:
    """The problem with a Literal field's value, or ""."""
    allowed = get_args(kind) if get_origin(kind) is Literal else (value,)
    return "" if value in allowed else f"--{name} {value!r} is not one of: {', '.join(allowed)}"
