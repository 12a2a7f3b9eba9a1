"""Configuration: dataclasses whose field docstrings are the `--help` text.

Resolved once (defaults < --config_path YAML < command-line flags), validated once with every problem
reported together, saved to RUN_DIR/config.yaml, and never mutated afterwards. Numbers that depend on the
world size (per-device batch, accumulation steps) or on the data (log interval) are computed by methods.

Machinery: the task's own flags, DataConfig and ArchConfig, live in task_config.py and check themselves (their
`problems()`); --dataset and --model take the names in its DATASETS and MODELS. Nothing here imports torch, so
`--help` and bad input answer before train.py and test.py import it.
"""

import argparse
import contextlib
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, NoReturn, Optional, Sequence, Union, get_args, get_origin

import simple_parsing
import yaml

from errors import UsageError
from task_config import DATASETS, MODELS, ArchConfig, DataConfig

LOGGERS = ("csv", "tensorboard", "wandb")
LR_SCALING_RULES = ("none", "linear", "sqrt")
OPTIMIZERS = ("adamw", "sgd")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps", "tpu")
STRATEGIES = ("auto", "ddp", "ddp_spawn", "fsdp", "fsdp1", "deepspeed", "dp")
PRECISIONS = ("32-true", "16-mixed", "bf16-mixed", "16-true", "bf16-true", "64-true", "transformer-engine")
CHECKPOINT_CHOICES = ("best", "last", "final")
WEIGHTS = ("auto", "ema", "raw")

# Fields that a `--resume` may not change: the checkpoint or the data split would no longer fit the run (and
# --fast_run would turn a real run into a finished smoke test). The task's
# groups name theirs in a RESUME_LOCKED class attribute (DataConfig: dataset; ArchConfig: model).
RESUME_LOCKED = ("seed", "fast_run", "optim.optimizer", "optim.eff_batch_size", "debug.overfit_batches",
                 *(f"data.{name}" for name in getattr(DataConfig, "RESUME_LOCKED", ())),
                 *(f"arch.{name}" for name in getattr(ArchConfig, "RESUME_LOCKED", ())))
MONITOR_MODES = ("auto", "min", "max")


@dataclass(frozen=True)
class HardwareConfig:
    """Where and how to run: passed straight to lightning.fabric.Fabric."""

    accelerator: str = "auto"
    """Accelerator: auto, cpu, cuda, gpu, mps or tpu."""
    devices: str = "auto"
    """Devices per node: a count (2), a list of ids (0,1), -1 for all, or auto."""
    num_nodes: int = 1
    """Number of nodes (machines)."""
    strategy: str = "auto"
    """Distribution strategy: auto, ddp, ddp_spawn, fsdp (FSDP2, sharded; CPUs too), fsdp1 (Fabric's FSDP1, GPUs),
    deepspeed or dp."""
    precision: str = "32-true"
    """Numerical precision: 32-true, 16-mixed, bf16-mixed, 16-true, bf16-true or 64-true."""
    compile: bool = False
    """torch.compile the model (before fabric.setup). Pays off on GPUs and long runs; compiling takes a while."""
    channels_last: bool = False
    """Keep the model's conv weights in channels_last memory format (faster convolutions on recent GPUs)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: less memory, more
    compute, the same gradients."""
    num_workers: int = 0
    """DataLoader worker processes per device. 0 loads in the main process, best for in-memory tensors."""


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
    lr_scaling_rule: str = "linear"
    """How the learning rate follows eff_batch_size: none, linear or sqrt."""
    warmup: float = 1.0
    """Linear warmup length in epochs (may be fractional); cosine decay to zero follows."""
    optimizer: str = "adamw"
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
        return self.base_lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling_rule]

    def lr_rule(self) -> str:
        """Where learning_rate() comes from, in words, for the banner."""
        if self.lr is not None:
            return "--lr, as given"
        return f"--base_lr {self.base_lr:g} at {self.base_batch_size}, {self.lr_scaling_rule} rule"

    def micro_batching(self, world_size: int) -> tuple[int, int]:
        """(batch_size_per_device, grad_accum_steps), with batch_size_per_device * world_size *
        grad_accum_steps == eff_batch_size exactly. Accumulates only when needed to stay within
        max_batch_size_per_device, using the fewest steps that split the per-device share evenly. A split into
        micro-batches of less than half of max_batch_size_per_device (97 = 97 x 1) is refused: it would be slow."""
        per_device, remainder = divmod(self.eff_batch_size, world_size)
        if remainder or per_device == 0:
            raise UsageError(
                f"--eff_batch_size {self.eff_batch_size} is not divisible by the world size {world_size} "
                f"(devices x nodes); use a multiple of {world_size}"
            )
        accum = math.ceil(per_device / self.max_batch_size_per_device)
        while per_device % accum:
            accum += 1
        if accum > 1 and 2 * (per_device // accum) < self.max_batch_size_per_device:
            step = world_size * self.max_batch_size_per_device
            nearby = [n for n in (self.eff_batch_size // step * step, (self.eff_batch_size // step + 1) * step) if n]
            raise UsageError(
                f"--eff_batch_size {self.eff_batch_size} on {world_size} device(s) splits evenly only into {accum} "
                f"micro-batches of {per_device // accum} (--max_batch_size_per_device {self.max_batch_size_per_device})"
                f": that would be slow; use e.g. {' or '.join(map(str, nearby))}"
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
    """Validation metric that picks best.ckpt: val/loss or val/<a metric of the task>; empty: the task's choice
    (MONITOR in task.py)."""
    monitor_mode: str = "auto"
    """Whether best.ckpt has the monitored metric's min or max; auto: min for a loss, else the metric's
    higher_is_better."""
    early_stopping_patience: int = 0
    """Stop once the monitored metric has not improved by more than early_stopping_min_delta for this many
    epochs in a row (a checkpoint and final.ckpt are saved); 0: never stop early."""
    early_stopping_min_delta: float = 0.0
    """The smallest change of the monitored metric that counts as an improvement for early stopping."""

    def log_every_n_steps(self, steps_per_epoch: int) -> int:
        if self.log_per_epoch > 0:
            return max(1, steps_per_epoch // self.log_per_epoch)
        return self.log_interval


@dataclass(frozen=True)
class DebugConfig:
    """Tools for finding bugs; all off by default."""

    overfit_batches: int = 0
    """Train and validate on the same N batches (N x eff_batch_size samples of the training split): a model and
    loss that cannot drive their loss to about 0 have a bug. 0: off."""
    profile: bool = False
    """Profile optimizer steps 3 to 5 with torch.profiler: a trace per rank in RUN_DIR/profile (TensorBoard, or
    https://ui.perfetto.dev) and the top ops printed."""
    detect_anomaly: bool = False
    """torch.autograd's anomaly mode: a NaN or Inf made in the backward pass stops the run with the traceback of
    the forward op behind it. Slow."""
    deterministic: bool = False
    """PyTorch's deterministic algorithms (an op without one is an error), cuDNN without autotuning, and the cuBLAS
    workspace setting they need: bitwise the same numbers on every run on the same machine."""


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
    """RUN_DIR of an earlier run to continue from its newest checkpoint, with its saved config; or auto: the
    newest unfinished run under root_dir named *-OUT_DIR, else a new run; or a checkpoint file of a run
    (RUN_DIR/checkpoints/step-N.ckpt): a new run dir continues from it, and the run stays as it was."""
    init_from: str = ""
    """Start a new run from these weights (fine-tuning): a checkpoint file, a RUN_DIR (its best.ckpt) or a state
    dict file. Tensors load where name and shape match (a new head keeps its fresh initialisation); the optimizer,
    step and schedule start fresh."""
    max_time: str = ""
    """Time budget DD:HH:MM:SS (e.g. 00:04:00:00), counted from the process's start: the run saves a checkpoint and
    exits with code 75 before it is spent; --resume continues it. Empty: none."""
    requeue: bool = False
    """Under SLURM, after a signal-triggered checkpoint, requeue the job (scontrol requeue $SLURM_JOB_ID)."""
    logger_name: list[str] = field(default_factory=lambda: ["csv"])
    """Loggers, one or more of: csv, tensorboard, wandb. The CSV log is always kept: it is the run's record."""
    fast_run: bool = False
    """Check the plumbing: 1 epoch of 2 optimizer steps, 2 validation and 2 test batches."""
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    data: DataConfig = field(default_factory=DataConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    log: LogConfig = field(default_factory=LogConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def epochs(self) -> int:
        return 1 if self.fast_run else self.optim.epochs

    def time_budget(self) -> Optional[float]:
        """--max_time in seconds, None if not given."""
        if not self.max_time:
            return None
        days, hours, minutes, seconds = (int(part) for part in self.max_time.split(":"))
        return ((days * 24 + hours) * 60 + minutes) * 60 + seconds

    def log_every_n_steps(self, steps_per_epoch: int) -> int:
        """--fast_run logs every step, so that the smoke test goes through the training log too."""
        return 1 if self.fast_run else self.log.log_every_n_steps(steps_per_epoch)


@dataclass(frozen=True)
class TestConfig:
    """Evaluate a finished run on its test split, with the run's own saved config."""

    out_dir: str = ""
    """RUN_DIR of the run to evaluate (required)."""
    checkpoint: str = "best"
    """Which checkpoint: best, last (newest periodic), final, or a path to a .ckpt file."""
    weights: str = "auto"
    """Which of its weights: ema (the average that --ema_decay kept), raw (the trained weights themselves), or auto:
    the ones validation judged (ema when the run kept one)."""
    accelerator: str = "auto"
    """Accelerator: auto, cpu, cuda, gpu, mps or tpu."""
    devices: str = "1"
    """Devices to evaluate on; the test split is sharded without padding, so results do not change."""
    batch_size: int = 256
    """Batch size per device."""


# ---------------------------------------------------------------------------------------------- validation


def validate(cfg: TrainConfig) -> list[str]:
    """Every problem with a training config, one line each. Empty when the config is usable."""
    problems = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    def one_of(flag: str, value: str, allowed: Sequence[str]) -> None:
        check(value in allowed, f"--{flag} {value!r} is not one of: {', '.join(allowed)}")

    hw, opt, log = cfg.hardware, cfg.optim, cfg.log
    check(not Path(cfg.root_dir).exists() or Path(cfg.root_dir).is_dir(),
          f"--root_dir {cfg.root_dir!r} is not a directory")
    check(cfg.out_dir != "" and "/" not in cfg.out_dir and cfg.out_dir not in (".", ".."),
          f"--out_dir {cfg.out_dir!r} must be a plain, non-empty directory name")
    check(cfg.max_time == "" or (re.fullmatch(r"\d+:\d+:\d+:\d+", cfg.max_time) is not None and
                                 cfg.time_budget() > 0),
          f"--max_time {cfg.max_time!r} must be a time budget DD:HH:MM:SS longer than 0, e.g. 00:04:00:00")
    check(len(cfg.logger_name) > 0, "--logger_name needs at least one of: " + ", ".join(LOGGERS))
    for name in cfg.logger_name:
        one_of("logger_name", name, LOGGERS)
    one_of("accelerator", hw.accelerator, ACCELERATORS)
    devices_ok = hw.devices == "auto" or all(d.strip().lstrip("-").isdigit() for d in hw.devices.split(","))
    check(devices_ok and hw.devices not in ("0", "-0"),
          f"--devices {hw.devices!r} must be a positive count, a list of ids like 0,1, -1 or auto")
    check(hw.num_nodes >= 1, f"--num_nodes {hw.num_nodes} must be >= 1")
    one_of("strategy", hw.strategy, STRATEGIES)
    one_of("precision", hw.precision, PRECISIONS)
    check(hw.num_workers >= 0, f"--num_workers {hw.num_workers} must be >= 0")
    problems += cfg.data.problems() + cfg.arch.problems()  # the task's own flags check themselves
    check(opt.epochs >= 1, f"--epochs {opt.epochs} must be >= 1")
    check(opt.eff_batch_size >= 1, f"--eff_batch_size {opt.eff_batch_size} must be >= 1")
    check(opt.max_batch_size_per_device >= 1,
          f"--max_batch_size_per_device {opt.max_batch_size_per_device} must be >= 1")
    check(opt.base_batch_size >= 1, f"--base_batch_size {opt.base_batch_size} must be >= 1")
    check(opt.base_lr > 0, f"--base_lr {opt.base_lr} must be > 0")
    check(opt.lr is None or opt.lr > 0, f"--lr {opt.lr} must be > 0")
    one_of("lr_scaling_rule", opt.lr_scaling_rule, LR_SCALING_RULES)
    check(0 <= opt.warmup <= opt.epochs, f"--warmup {opt.warmup} must be between 0 and --epochs {opt.epochs}")
    one_of("optimizer", opt.optimizer, OPTIMIZERS)
    check(opt.weight_decay >= 0, f"--weight_decay {opt.weight_decay} must be >= 0")
    check(opt.grad_clip >= 0, f"--grad_clip {opt.grad_clip} must be >= 0 (0 disables clipping)")
    check(0 <= opt.ema_decay < 1, f"--ema_decay {opt.ema_decay} must be in [0, 1) (0 disables the EMA)")
    check(not opt.ema_decay or hw.precision not in ("bf16-true", "16-true"),
          f"--ema_decay with --precision {hw.precision}: an average held in 16 bits loses the small updates it is made "
          "of; use bf16-mixed or 16-mixed (float32 weights)")
    check(not opt.ema_decay or hw.strategy != "fsdp1",
          "--ema_decay with --strategy fsdp1 is not supported (never run); use --strategy fsdp")
    check(log.log_interval >= 1, f"--log_interval {log.log_interval} must be >= 1")
    check(log.log_per_epoch >= 0, f"--log_per_epoch {log.log_per_epoch} must be >= 0")
    check(log.checkpoint_frequency >= 1, f"--checkpoint_frequency {log.checkpoint_frequency} must be >= 1")
    check(log.checkpoint_every_n_steps >= 0,
          f"--checkpoint_every_n_steps {log.checkpoint_every_n_steps} must be >= 0 (0 disables)")
    check(log.num_checkpoint_keep >= 1, f"--num_checkpoint_keep {log.num_checkpoint_keep} must be >= 1")
    check(log.monitor == "" or log.monitor.startswith("val/"),
          f"--monitor {log.monitor!r} must name a validation metric: val/loss or val/<metric>")
    one_of("monitor_mode", log.monitor_mode, MONITOR_MODES)
    check(cfg.debug.overfit_batches >= 0, f"--overfit_batches {cfg.debug.overfit_batches} must be >= 0 (0: off)")
    check(log.early_stopping_patience >= 0,
          f"--early_stopping_patience {log.early_stopping_patience} must be >= 0 (0 disables early stopping)")
    check(log.early_stopping_min_delta >= 0, f"--early_stopping_min_delta {log.early_stopping_min_delta} must be >= 0")
    return problems


def validate_test(cfg: TestConfig) -> list[str]:
    problems = []
    if not cfg.out_dir:
        problems.append("--out_dir is required: the RUN_DIR of the run to evaluate")
    if cfg.accelerator not in ACCELERATORS:
        problems.append(f"--accelerator {cfg.accelerator!r} is not one of: {', '.join(ACCELERATORS)}")
    if cfg.batch_size < 1:
        problems.append(f"--batch_size {cfg.batch_size} must be >= 1")
    if cfg.weights not in WEIGHTS:
        problems.append(f"--weights {cfg.weights!r} is not one of: {', '.join(WEIGHTS)}")
    return problems


# ------------------------------------------------------------------------------------------------- parsing


class _Parser(simple_parsing.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line instead of argparse's usage block."""
        self.exit(2, f"error: {message} (see --help)\n")


def _parse(config_class: type, argv: Optional[Sequence[str]], defaults_file: Optional[Path] = None) -> Any:
    """Parse `argv` into `config_class`. Values from `defaults_file` (a resumed run's config.yaml), then from
    --config_path, replace the defaults; flags on the command line override all of them."""
    parser = _Parser(description=config_class.__doc__, epilog=registries() if config_class is TrainConfig else None)
    parser.add_arguments(config_class, dest="cfg")
    parser.add_argument("--debug", action="store_true", help="On an error, show the full traceback.")
    files = [defaults_file] if defaults_file else []
    if config_class is TrainConfig:
        parser.add_argument("--config_path", type=Path, help="YAML file of config values (the layout of a run's "
                            "config.yaml, or flat: epochs: 5); flags on the command line override it.")
        pre_parser = argparse.ArgumentParser(add_help=False)
        pre_parser.add_argument("--config_path", type=Path)
        files += [path] if (path := pre_parser.parse_known_args(argv)[0].config_path) else []
    values: dict[str, Any] = {}
    for path in files:  # the later file wins, field by field
        for key, value in _nested(_read_yaml(path), config_class, path).items():
            values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    try:
        if values:
            parser.set_defaults(cfg=values)
        return parser.parse_args(argv).cfg
    except RuntimeError as err:  # keys in a file that are not config fields
        raise UsageError(f"config file {files[-1]}: {' '.join(str(err).split())}") from None


def _read_yaml(path: Path) -> dict:
    try:
        values = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise UsageError(f"config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise UsageError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping of config fields, not {type(values).__name__}")
    return values


def _nested(values: dict, config_class: type, path: Path) -> dict:
    """The file's values in the layout of config.yaml, each checked against its field's type. A flat file
    (`epochs: 5`, as the flag is spelled) means the same as the nested one (`optim: {epochs: 5}`). Every key that
    is not a field and every value of the wrong type is reported, one line each."""
    top = {f.name: f.type for f in fields(config_class)}
    group_of = {g.name: f.name for f in fields(config_class) if is_dataclass(f.type) for g in fields(f.type)}
    nested: dict[str, Any] = {}
    unknown, problems = [], []
    for key, value in values.items():
        if key in top and is_dataclass(top[key]):
            if not isinstance(value, dict):
                problems.append(f"{key} must be a mapping of its fields, not {yaml.safe_dump(value).split(chr(10))[0]}")
                continue
            unknown += [f"{key}.{k}" for k in value if k not in {g.name for g in fields(top[key])}]
            nested.setdefault(key, {}).update(value)
        elif key in top:
            nested[key] = value
        elif key in group_of:
            nested.setdefault(group_of[key], {})[key] = value
        else:
            unknown.append(key)
    if unknown:
        problems.append(f"{', '.join(map(repr, unknown))} "
                        f"{'is not a config field' if len(unknown) == 1 else 'are not config fields'} (see --help)")
    for f in fields(config_class):
        group = nested.get(f.name)
        for name, kind, where in ([(g.name, g.type, group) for g in fields(f.type)] if is_dataclass(f.type)
                                  else [(f.name, f.type, nested)]):
            if isinstance(where, dict) and name in where:
                where[name], problem = _typed(where[name], kind)
                if problem:
                    shown = yaml.safe_dump(where[name], default_flow_style=True).split("\n")[0]  # as in the file
                    problems.append(f"{name if where is nested else f'{f.name}.{name}'}: {shown} {problem}")
    if problems:
        raise UsageError(*(f"config file {path}: {problem}" for problem in problems))
    return nested


def _typed(value: Any, kind: Any) -> tuple[Any, str]:
    """(value, "") when `value` read from YAML fits the field type `kind`, with an int or a YAML-1.1 string like
    2e-3 made a float for a float field; else (value, what is wrong)."""
    if get_origin(kind) is Union:  # Optional[float]
        options = get_args(kind)
        if value is None and type(None) in options:
            return value, ""
        return _typed(value, next(k for k in options if k is not type(None)))
    if kind is float and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value), ""
        with contextlib.suppress(TypeError, ValueError):
            return float(value), ""  # PyYAML reads 2e-3 (no dot) as a string
        return value, "must be a number"
    if get_origin(kind) is list:
        (item,) = get_args(kind)
        if isinstance(value, list) and all(_typed(v, item)[1] == "" for v in value):
            return value, ""
        return value, f"must be a list of {_type_names[item]}s, e.g. [{value}]" if isinstance(value, str) else (
            f"must be a list of {_type_names[item]}s")
    if kind in _type_names and not (type(value) is kind):  # bool is not an int here
        quote = f": write '{value}'" if kind is str and isinstance(value, (int, float)) else ""
        return value, f"must be {'an' if kind is int else 'a'} {_type_names[kind]}{quote}"
    return value, ""


_type_names = {int: "integer", str: "string", bool: "boolean (true or false)"}


def parse_train_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Resolve the training config: defaults < --config_path < flags. With --resume RUN_DIR, the run's
    saved config.yaml takes the place of the defaults, and the file and flags may override it where that is safe
    (a requeued job repeats its command line: `--config_path exp.yaml --resume auto` then changes nothing)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = _parse(TrainConfig, argv)
    if cfg.resume == "auto":
        run_dir = _auto_resume_dir(cfg)
        if not run_dir:
            return _validated(replace(cfg, resume=""))
        argv = argv + ["--resume", run_dir]  # the last occurrence of a flag wins
        cfg = replace(cfg, resume=run_dir)
    if cfg.resume:
        saved_path = resumed_run(cfg.resume) / "config.yaml"
        saved = load_train_config(saved_path)
        cfg = _parse(TrainConfig, argv, defaults_file=saved_path)
        locked = [f"--{key.split('.')[-1]} {old!r} -> {new!r}" for key, (old, new) in overrides(saved, cfg).items()
                  if key in RESUME_LOCKED]
        if locked:
            raise UsageError(f"--resume cannot change {', '.join(locked)}: the checkpoint would not fit. "
                             "Start a new run instead")
        if cfg.init_from != saved.init_from:
            raise UsageError(f"--init_from {cfg.init_from!r} with --resume: a resumed run continues from its own "
                             "checkpoint, while --init_from starts a new run from other weights; pass one of them")
        if cfg.optim.ema_decay and not saved.optim.ema_decay:
            raise UsageError(f"--ema_decay {cfg.optim.ema_decay}: the run was trained without an EMA, so its "
                             f"checkpoints hold none to continue; start a new run from its weights with "
                             f"--init_from {resumed_run(cfg.resume)} --ema_decay {cfg.optim.ema_decay}")
        if saved.optim.ema_decay and not cfg.optim.ema_decay:
            raise UsageError("--ema_decay 0: the run's validation and best.ckpt judge its EMA, and a resume cannot "
                             "switch that off; evaluate its raw weights with test.py --weights raw")
    return _validated(cfg)


def resumed_run(resume: str) -> Path:
    """The run that --resume continues: RUN_DIR itself, or the run whose checkpoints/ holds the file given."""
    path = Path(resume)
    if is_checkpoint(path):
        if path.parent.name != "checkpoints" or not (path.parent.parent / "config.yaml").is_file():
            raise UsageError(f"--resume {resume!r}: a checkpoint file must be in a run's checkpoints/ folder, next "
                             "to which the run's config.yaml is")
        return path.parent.parent
    if not path.is_dir():
        raise UsageError(f"--resume {resume!r}: no such run directory or checkpoint file")
    if not (path / "config.yaml").is_file():
        raise UsageError(f"--resume {resume!r} is not a run directory: it has no config.yaml")
    return path


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or the directory of a sharded one (FSDP), as opposed to a run directory."""
    return path.is_file() or (path / "meta.pt").is_file()


def _given(argv: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(f"{flag}=") for a in argv)


def _validated(cfg: TrainConfig) -> TrainConfig:
    problems = validate(cfg) + ([] if cfg.resume else _init_from_problems(cfg.init_from))
    if problems:
        raise UsageError(*problems)
    return cfg


def _init_from_problems(init_from: str) -> list[str]:
    """For a new run only: a resumed run continues from its own checkpoint, and the source may be gone by then."""
    path = Path(init_from)
    if not init_from:
        return []
    if not path.exists():
        return [f"--init_from {init_from!r}: no such checkpoint, run directory or state dict file"]
    if (path / "config.yaml").is_file() and not (path / "checkpoints" / "best.ckpt").exists():
        return [f"--init_from {init_from!r}: the run has no checkpoints/best.ckpt yet; pass one of its checkpoint files"]
    return []


AUTO_RESUME_ENV = "TEMPLATE_AUTO_RESUME_DIR"


def _auto_resume_dir(cfg: TrainConfig) -> str:
    """--resume auto: the newest run under root_dir named YYYYmmdd-HHMMSS-OUT_DIR that has not finished (its newest
    checkpoint is not final.ckpt) and has a periodic checkpoint, even when a later run has finished since; "" for a
    new run.

    Decided once, in the process that launches the others: Fabric's launcher passes the environment on to
    the processes it starts, which must not look again (rank 0 may have created a new run dir meanwhile)."""
    if AUTO_RESUME_ENV in os.environ:
        return os.environ[AUTO_RESUME_ENV]
    pattern = re.compile(rf"^\d{{8}}-\d{{6}}-{re.escape(cfg.out_dir)}$")
    root = Path(cfg.root_dir)
    runs = sorted(p for p in root.glob(f"*-{cfg.out_dir}") if pattern.match(p.name)) if root.is_dir() else []
    from checkpoints import is_finished  # reads final.ckpt's step: only here, the rest of config.py needs no torch

    unfinished = [run for run in runs if not is_finished(run / "checkpoints")
                  and list((run / "checkpoints").glob("step-*.ckpt"))]
    if unfinished:
        decision, message = str(unfinished[-1]), f"resuming the newest unfinished run {unfinished[-1]}"
    elif runs:
        decision, message = "", (f"every run named *-{cfg.out_dir} under {root} has finished or has no checkpoint "
                                 f"(the newest: {runs[-1]}): starting a new run")
    else:
        decision, message = "", f"no run named *-{cfg.out_dir} under {root}: starting a new run"
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":  # torchrun and SLURM start every rank
        print(f"--resume auto: {message}", flush=True)
    os.environ[AUTO_RESUME_ENV] = decision
    return decision


def load_train_config(path: Path, validated: bool = True) -> TrainConfig:
    """A run's saved config.yaml, with the defaults of fields it predates; validated (it may have been edited by
    hand), unless only read (plots.py compares finished runs, whose --init_from source may be gone)."""
    cfg = _parse(TrainConfig, [], defaults_file=path)
    problems = validate(cfg) if validated else []
    if problems:
        raise UsageError(*(f"{path}: {p}" for p in problems))
    return cfg


def parse_test_config(argv: Optional[Sequence[str]] = None) -> TestConfig:
    """test.py's config, checked against the run it evaluates too: its directory, the checkpoint asked for, and
    --weights ema on a run that kept no EMA."""
    cfg = _parse(TestConfig, argv)
    problems = validate_test(cfg)
    if problems:
        raise UsageError(*problems)
    find_checkpoint(Path(cfg.out_dir), cfg.checkpoint)
    if cfg.weights == "ema" and not load_train_config(Path(cfg.out_dir) / "config.yaml").optim.ema_decay:
        raise UsageError("--weights ema: the run kept no EMA of its weights (its --ema_decay is 0); use raw or auto")
    return cfg


def find_checkpoint(run_dir: Path, which: str) -> Path:
    """test.py --checkpoint: best, final, last (the newest periodic checkpoint), or a path."""
    if not run_dir.is_dir():
        raise UsageError(f"--out_dir {str(run_dir)!r}: no such run directory")
    if not (run_dir / "config.yaml").is_file():
        raise UsageError(f"--out_dir {str(run_dir)!r} is not a run directory: it has no config.yaml")
    ckpt_dir = run_dir / "checkpoints"
    if which in ("best", "final"):
        path = ckpt_dir / f"{which}.ckpt"
    elif which == "last":
        periodic = periodic_checkpoints(ckpt_dir)
        path = periodic[-1] if periodic else ckpt_dir / "step-*.ckpt"
    else:
        path = Path(which)
    if not is_checkpoint(path):
        raise UsageError(f"--checkpoint {which!r}: no checkpoint at {path} "
                         f"(use {', '.join(CHECKPOINT_CHOICES)} or a path to a .ckpt file)")
    return path


PERIODIC_CHECKPOINT = re.compile(r"^step-(\d+)\.ckpt$")


def periodic_checkpoints(ckpt_dir: Path) -> list[Path]:
    """The periodic checkpoints (step-N.ckpt), oldest first, ordered by the step number in their name."""
    found = [(int(m.group(1)), p) for p in ckpt_dir.glob("step-*.ckpt") if (m := PERIODIC_CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim.epochs": 10, ...} for a (nested) config dataclass."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update(flatten(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def overrides(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Fields that differ between two configs, ignoring `resume` itself."""
    a, b = flatten(old), flatten(new)
    return {k: (a[k], b[k]) for k in a if a[k] != b[k] and k != "resume"}


def flag_reference() -> str:
    """The README's flag tables, made from the fields' docstrings (the same text as --help), so they cannot
    drift: `python config.py` prints them, and a test checks the README against them."""
    from simple_parsing.docstring import get_attribute_docstring

    def rows(cls: type, instance: Any) -> list[str]:
        out = []
        for f in fields(cls):
            value = getattr(instance, f.name)
            if is_dataclass(value):
                out += rows(type(value), value)
            else:
                doc = " ".join(get_attribute_docstring(cls, f.name).docstring_below.split())
                shown = " ".join(value) if isinstance(value, list) else ("\"\"" if value == "" else value)
                out.append(f"| `--{f.name}` | `{shown}` | {doc} |")
        return out

    header = ["| flag | default | what it does |", "|---|---|---|"]
    return "\n".join(["**train.py**", "", *header, *rows(TrainConfig, TrainConfig()),
                      "| `--config_path` | | YAML file of config values (the layout of a run's config.yaml, or flat: "
                      "epochs: 5); flags on the command line override it. |",
                      "| `--debug` | | On an error, show the full traceback. |", "",
                      "The names `--dataset` and `--model` take (the end of `train.py --help`):", "", "```",
                      registries(), "```", "", "**test.py**", "", *header,
                      *rows(TestConfig, TestConfig())])


def registries() -> str:
    """What --dataset and --model take: the names in task_config.DATASETS and MODELS, each with its help line. The
    end of `train.py --help`, and of the README's flag tables."""
    lines, width = [], max(map(len, [*DATASETS, *MODELS]))
    for flag, registry in [("--dataset", DATASETS), ("--model", MODELS)]:
        lines.append(f"{flag}:")
        lines += [f"  {name:<{width}}  {help}".rstrip() for name, help in registry.items()]
    return "\n".join(lines)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(asdict(cfg), sort_keys=False)


if __name__ == "__main__":
    print(flag_reference())
