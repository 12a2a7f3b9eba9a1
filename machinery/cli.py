"""Flags, config files and --resume are checked before torch loads; flags win over files."""

import contextlib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal, NoReturn, Union, get_args, get_origin

import simple_parsing
import yaml

import task_config
from config import RESUME_LOCKED, TestConfig, TrainConfig, validate, walk
from machinery.errors import UsageError
from machinery.rundir import find_checkpoint, is_checkpoint, record_problems

AUTO_RESUME_ENV = "TEMPLATE_AUTO_RESUME_DIR"
TYPES = {int: "an integer", float: "a number", str: "a string", list: "a list, e.g. [{}]"}
TYPES[bool] = "a boolean (true or false)"


class Parser(simple_parsing.ArgumentParser):
    """--config_path read as YAML only (simple_parsing's reader unpickles)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")

    def set_defaults(self, config_path: Any = None, **kwargs: Any) -> None:
        if config_path:
            kwargs = {"cfg": typed(read_yaml(Path(config_path)), TrainConfig, config_path)}
        super().set_defaults(**kwargs)


def make_parser(config_class: type) -> Parser:
    is_train = config_class is TrainConfig
    epilog = registries() if is_train else None
    parser = Parser(description=config_class.__doc__, epilog=epilog, add_config_path_arg=is_train)
    parser.add_arguments(config_class, dest="cfg")
    parser.add_argument("--debug", action="store_true", help="On an error, show the traceback.")
    return parser


def parse(config_class: type, argv: Sequence[str] | None, defaults: Path | None = None) -> Any:
    parser = make_parser(config_class)
    if defaults:
        parser.set_defaults(defaults)
    elif config_class is TrainConfig and getattr(task_config, "DEFAULTS", None):
        parser.set_defaults(cfg=typed(task_config.DEFAULTS, TrainConfig, "task_config.DEFAULTS"))
    return parser.parse_args(argv).cfg


def read_yaml(path: Path) -> dict:
    try:  # stat first: a device, a FIFO or a huge file would be read forever
        if path.stat().st_size > 2**20 or not path.is_file():
            raise UsageError(f"config file {path}: not a regular YAML file of at most 1 MiB")
        values = yaml.safe_load(path.read_bytes().decode())
    except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as err:
        reason = err.strerror if isinstance(err, OSError) else " ".join(str(err).split())[:200]
        raise UsageError(f"config file {path} cannot be read: {reason}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping, not {type(values).__name__}")
    return values


def typed(values: dict, config_class: type, path: Any) -> dict:
    """Nested as in config.yaml (flat `epochs: 5` too), type-checked."""
    kinds = {name: kind for name, _, kind in walk(config_class())}
    groups = {name.split(".")[0] for name in kinds if "." in name}
    short = {name.split(".")[-1]: name for name in kinds}
    items, problems, nested = [], [], {}
    for key, value in values.items():
        if key not in groups:
            items.append((short.get(key, key), value))
        elif isinstance(value, dict):
            items += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            problems.append(f"{key} must be a mapping of its fields")
    for name, value in items:
        if name not in kinds:
            problems.append(f"{name!r} is not a config field (see --help)")
            continue
        *group, key = name.split(".")
        kind = kinds[name]
        if get_origin(kind) is Union:
            kind = type(value) if value is None else get_args(kind)[0]
        kind = str if get_origin(kind) is Literal else get_origin(kind) or kind
        if kind is float and type(value) in (int, str):  # YAML 1.1 reads 2e-3 as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if kind in TYPES and type(value) is not kind:  # bool is not an int here
            shown = yaml.safe_dump(value, default_flow_style=True).split("\n")[0]
            problems.append(f"{key}: {shown} must be {TYPES[kind].format(value)}")
        (nested.setdefault(group[0], {}) if group else nested)[key] = value
    if problems:
        raise UsageError(*(f"config file {path}: {problem}" for problem in problems))
    return nested


def parse_train_config(argv: Sequence[str] | None = None) -> TrainConfig:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(TrainConfig, argv)
    if cfg.resume == "auto":
        cfg = replace(cfg, resume=auto_resume_dir(cfg))
        argv += ["--resume", cfg.resume]
    problems = []
    if cfg.resume:  # a requeued job's repeated command line changes nothing
        saved_path = resumed_run(cfg.resume) / "config.yaml"
        problems += record_problems(saved_path.parent)
        saved, cfg = load_train_config(saved_path), parse(TrainConfig, argv, saved_path)
        changed = {k: v for k, v in overrides(saved, cfg).items() if k in RESUME_LOCKED}
        locked = [f"--{k.split('.')[-1]} {a!r} -> {b!r}" for k, (a, b) in changed.items()]
        if locked:
            problems.append(f"--resume cannot change {', '.join(locked)}: start a new run instead")
        if bool(cfg.optim.ema_decay) != bool(saved.optim.ema_decay):
            problems.append(
                f"--ema_decay {cfg.optim.ema_decay}: a resume cannot switch the EMA on or off "
                f"(the run's is {saved.optim.ema_decay}); start a new run with --init_from"
            )
    elif cfg.init_from and not Path(cfg.init_from).exists():
        problems.append(f"--init_from {cfg.init_from!r}: no such checkpoint, run dir or state dict")
    if problems := validate(cfg) + problems:
        raise UsageError(*problems)
    return cfg


def resumed_run(resume: str) -> Path:
    """RUN_DIR, or the run whose checkpoints/ holds the file given."""
    path = Path(resume)
    run = path.parent.parent if is_checkpoint(path) and path.parent.name == "checkpoints" else path
    if not (run / "config.yaml").is_file():
        raise UsageError(f"--resume {resume!r}: not a run directory or a checkpoint in one")
    return run


def auto_resume_dir(cfg: TrainConfig) -> str:
    """The newest unfinished *-OUT_DIR run with a checkpoint, else ""; decided once."""
    if AUTO_RESUME_ENV in os.environ:
        return os.environ[AUTO_RESUME_ENV]
    from machinery.checkpoints import is_finished  # torch

    root, name = Path(cfg.root_dir), re.compile(rf"\d{{8}}-\d{{6}}-{re.escape(cfg.out_dir)}")
    ckpts = sorted(p / "checkpoints" for p in root.glob("*") if name.fullmatch(p.name))
    unfinished = [c.parent for c in ckpts if not is_finished(c) and any(c.glob("step-*.ckpt"))]
    decision = str(unfinished[-1]) if unfinished else ""
    # every rank runs this: one says it
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0":
        found = f"resuming the newest unfinished run {decision}"
        none = f"no unfinished run named *-{cfg.out_dir} with a checkpoint under {root}: a new run"
        print(f"--resume auto: {found if decision else none}", flush=True)
    os.environ[AUTO_RESUME_ENV] = decision
    return decision


def load_train_config(path: Path) -> TrainConfig:
    cfg = parse(TrainConfig, [], defaults=path)
    if problems := validate(cfg):
        raise UsageError(*(f"{path}: {p}" for p in problems))
    return cfg


def parse_test_config(argv: Sequence[str] | None = None) -> TestConfig:
    cfg = parse(TestConfig, argv)
    if problems := validate(cfg):
        raise UsageError(*problems)
    find_checkpoint(run := Path(cfg.out_dir), cfg.checkpoint)
    if cfg.weights == "ema" and not load_train_config(run / "config.yaml").optim.ema_decay:
        raise UsageError("--weights ema: the run has no EMA (--ema_decay 0); use raw or auto")
    return cfg


def flatten(cfg: Any) -> dict[str, Any]:
    return {name: value for name, value, _ in walk(cfg)}


def overrides(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    a, b = flatten(old), flatten(new)
    return {k: (a[k], b[k]) for k in a if a[k] != b[k] and k != "resume"}


def registries() -> str:
    lines, width = [], max(map(len, [*task_config.DATASETS, *task_config.MODELS]))
    for flag, registry in [("--dataset", task_config.DATASETS), ("--model", task_config.MODELS)]:
        lines += [f"{flag}:", *(f"  {n:<{width}}  {h}".rstrip() for n, h in registry.items())]
    return "\n".join(lines)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(asdict(cfg), sort_keys=False)
