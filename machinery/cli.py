"""The command line: parse, read config files, resolve --resume, and check it all before torch
loads.

Guarantees: values resolve as defaults < the task's DEFAULTS < --config_path < flags (a resumed
run's config.yaml replaces the defaults); every value read from YAML is checked against its field's
type; every problem is reported together, one line each; a resume may not change a RESUME_LOCKED
field; nothing here imports torch, so `--help` and bad input answer in a fraction of a second."""

import contextlib
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, NoReturn, Optional, Union, get_args, get_origin

import simple_parsing
import yaml

import task_config
from config import RESUME_LOCKED, TestConfig, TrainConfig, validate
from machinery.errors import UsageError
from machinery.rundir import find_checkpoint, is_checkpoint

AUTO_RESUME_ENV = "TEMPLATE_AUTO_RESUME_DIR"


class Parser(simple_parsing.ArgumentParser):
    """simple_parsing's parser with its --config_path, reading files our way: YAML only (its own
    reader would unpickle a .pkl or .pth file), every value type-checked, flat or nested; one-line
    errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see --help)\n")

    def set_defaults(self, config_path: Any = None, **kwargs: Any) -> None:
        if config_path:
            kwargs = {"cfg": typed(read_yaml(Path(config_path)), self.config_class, config_path)}
        super().set_defaults(**kwargs)


def make_parser(config_class: type, files: Sequence[Path] = ()) -> Parser:
    """The parser of `config_class` (what --help shows), with `files` as defaults below
    --config_path."""
    is_train = config_class is TrainConfig
    parser = Parser(
        description=config_class.__doc__,
        epilog=registries() if is_train else None,
        add_config_path_arg=is_train,
        config_path=list(files) or None,
    )
    parser.config_class = config_class
    parser.add_arguments(config_class, dest="cfg")
    parser.add_argument("--debug", action="store_true", help="On an error, show the traceback.")
    return parser


def parse(
    config_class: type, argv: Optional[Sequence[str]], defaults: Optional[Path] = None
) -> Any:
    """`argv` parsed into `config_class`: a resumed run's config.yaml (`defaults`), else the task's
    DEFAULTS, then --config_path files, then the flags."""
    parser = make_parser(config_class, [defaults] if defaults else [])
    if config_class is TrainConfig and not defaults and getattr(task_config, "DEFAULTS", None):
        parser.set_defaults(cfg=typed(task_config.DEFAULTS, TrainConfig, "task_config.DEFAULTS"))
    try:
        return parser.parse_args(argv).cfg
    except RuntimeError as err:  # simple_parsing: a key that is no field
        raise UsageError(f"config file: {' '.join(str(err).split())}") from None


def read_yaml(path: Path) -> dict:
    """A config file's mapping; a device, a FIFO or a huge file is refused, not read forever."""
    try:
        if path.stat().st_size > 2**20 or not path.is_file():  # stat: a missing file says so
            raise UsageError(f"config file {path}: not a regular YAML file of at most 1 MiB")
        values = yaml.safe_load(path.read_bytes().decode())
    except (OSError, UnicodeDecodeError, RecursionError, yaml.YAMLError) as err:
        reason = err.strerror if isinstance(err, OSError) else " ".join(str(err).split())[:200]
        raise UsageError(f"config file {path} cannot be read: {reason}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {path} must hold a mapping, not {type(values).__name__}")
    return values


def typed(values: dict, config_class: type, path: Any) -> dict:
    """The file's values in config.yaml's nested layout (a flat `epochs: 5` works too), each checked
    against its field's type. Every unknown key and every value of the wrong type is reported."""
    top = {f.name: f.type for f in fields(config_class)}
    group_of = {
        g.name: f.name for f in fields(config_class) if is_dataclass(f.type) for g in fields(f.type)
    }
    nested: dict[str, Any] = {}
    problems = []
    for key, value in values.items():
        if key in top and is_dataclass(top[key]):
            if not isinstance(value, dict):
                problems.append(f"{key} must be a mapping of its fields")
                continue
            problems += [
                f"'{key}.{k}' is not a config field (see --help)"
                for k in value
                if k not in {g.name for g in fields(top[key])}
            ]
            nested.setdefault(key, {}).update(value)
        elif key in top and not is_dataclass(top[key]):
            nested[key] = value
        elif key in group_of:
            nested.setdefault(group_of[key], {})[key] = value
        else:
            problems.append(f"{key!r} is not a config field (see --help)")
    for f in fields(config_class):
        group = fields(f.type) if is_dataclass(f.type) else [f]
        where = nested.get(f.name, {}) if is_dataclass(f.type) else nested
        for g in group:
            if g.name in where:
                where[g.name], problem = check_type(where[g.name], g.type)
                if problem:
                    shown = yaml.safe_dump(where[g.name], default_flow_style=True).split("\n")[0]
                    problems.append(f"{g.name}: {shown} {problem}")
    if problems:
        raise UsageError(*(f"config file {path}: {problem}" for problem in problems))
    return nested


def check_type(value: Any, kind: Any) -> tuple[Any, str]:
    """(value, "") when a YAML value fits the field type `kind` (an int, or YAML 1.1's 2e-3 string,
    becomes a float for a float field); else (value, what is wrong)."""
    names = {int: "an integer", str: "a string", bool: "a boolean (true or false)"}
    if get_origin(kind) is Union:  # Optional[float]
        if value is None:
            return value, ""
        return check_type(value, next(k for k in get_args(kind) if k is not type(None)))
    if get_origin(kind) is Literal:
        kind = str
    if kind is float and not isinstance(value, bool):
        with contextlib.suppress(TypeError, ValueError):
            return float(value), ""
        return value, "must be a number"
    if get_origin(kind) is list:
        if isinstance(value, list) and all(not check_type(v, str)[1] for v in value):
            return value, ""
        return value, f"must be a list of strings, e.g. [{value}]"
    if kind in names and type(value) is not kind:  # bool is not an int here
        quote = f": write '{value}'" if kind is str and isinstance(value, (int, float)) else ""
        return value, f"must be {names[kind]}{quote}"
    return value, ""


def parse_train_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """The training config. With --resume, the run's config.yaml replaces the defaults, and the file
    and flags may override it where that is safe (a requeued job repeating its command line changes
    nothing)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse(TrainConfig, argv)
    if cfg.resume == "auto":
        cfg = replace(cfg, resume=auto_resume_dir(cfg))
        argv += ["--resume", cfg.resume]  # the last occurrence of a flag wins
    if cfg.resume:
        saved_path = resumed_run(cfg.resume) / "config.yaml"
        saved = load_train_config(saved_path)
        cfg = parse(TrainConfig, argv, defaults=saved_path)
        changed = overrides(saved, cfg)
        locked = [
            f"--{k.split('.')[-1]} {a!r} -> {b!r}"
            for k, (a, b) in changed.items()
            if k in RESUME_LOCKED
        ]
        if locked:
            raise UsageError(f"--resume cannot change {', '.join(locked)}: start a new run instead")
        if cfg.init_from != saved.init_from:
            raise UsageError(f"--init_from {cfg.init_from!r} with --resume: pass one of them")
        if bool(cfg.optim.ema_decay) != bool(saved.optim.ema_decay):
            raise UsageError(
                f"--ema_decay {cfg.optim.ema_decay}: a resume cannot switch the EMA on or off "
                f"(the run's is {saved.optim.ema_decay}); start a new run with --init_from"
            )
    problems = validate(cfg) + ([] if cfg.resume else init_from_problems(cfg.init_from))
    if problems:
        raise UsageError(*problems)
    return cfg


def resumed_run(resume: str) -> Path:
    """The run --resume continues: RUN_DIR, or the run whose checkpoints/ holds the file given."""
    path = Path(resume)
    if is_checkpoint(path):
        if path.parent.name != "checkpoints" or not (path.parent.parent / "config.yaml").is_file():
            raise UsageError(
                f"--resume {resume!r}: a checkpoint must be in a run's checkpoints/ folder"
            )
        return path.parent.parent
    if not (path / "config.yaml").is_file():
        raise UsageError(
            f"--resume {resume!r}: no run directory (with a config.yaml) or checkpoint"
        )
    return path


def init_from_problems(init_from: str) -> list[str]:
    path = Path(init_from)
    if init_from and not path.exists():
        return [f"--init_from {init_from!r}: no such checkpoint, run directory or state dict file"]
    if (
        init_from
        and (path / "config.yaml").is_file()
        and not (path / "checkpoints/best.ckpt").exists()
    ):
        return [f"--init_from {init_from!r}: the run has no best.ckpt yet; pass a checkpoint file"]
    return []


def auto_resume_dir(cfg: TrainConfig) -> str:
    """--resume auto: the newest run named YYYYmmdd-HHMMSS-OUT_DIR under root_dir that is unfinished
    and has a periodic checkpoint, else "" (a new run). Decided once, by the process that launches
    the others (they inherit it in the environment: rank 0 may have created a new run dir
    meanwhile)."""
    if AUTO_RESUME_ENV in os.environ:
        return os.environ[AUTO_RESUME_ENV]
    from machinery.checkpoints import is_finished  # reads final.ckpt's step: torch

    pattern = re.compile(rf"^\d{{8}}-\d{{6}}-{re.escape(cfg.out_dir)}$")
    root = Path(cfg.root_dir)
    runs = (
        sorted(p for p in root.glob(f"*-{cfg.out_dir}") if pattern.match(p.name))
        if root.is_dir()
        else []
    )
    ckpts = [run / "checkpoints" for run in runs]
    unfinished = [c.parent for c in ckpts if not is_finished(c) and any(c.glob("step-*.ckpt"))]
    decision = str(unfinished[-1]) if unfinished else ""
    message = (
        f"resuming the newest unfinished run {decision}"
        if decision
        else f"no unfinished run named *-{cfg.out_dir} with a checkpoint under {root}: a new run"
    )
    if (
        os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"
    ):  # torchrun, SLURM: every rank
        print(f"--resume auto: {message}", flush=True)
    os.environ[AUTO_RESUME_ENV] = decision
    return decision


def load_train_config(path: Path, validated: bool = True) -> TrainConfig:
    """A run's config.yaml (defaults for fields it predates), checked: it may have been edited by
    hand."""
    cfg = parse(TrainConfig, [], defaults=path)
    problems = validate(cfg) if validated else []
    if problems:
        raise UsageError(*(f"{path}: {p}" for p in problems))
    return cfg


def parse_test_config(argv: Optional[Sequence[str]] = None) -> TestConfig:
    """test.py's config, checked against the run: its directory, the checkpoint, --weights ema."""
    cfg = parse(TestConfig, argv)
    problems = validate(cfg)
    if problems:
        raise UsageError(*problems)
    find_checkpoint(Path(cfg.out_dir), cfg.checkpoint)
    if (
        cfg.weights == "ema"
        and not load_train_config(Path(cfg.out_dir) / "config.yaml").optim.ema_decay
    ):
        raise UsageError(
            "--weights ema: the run kept no EMA (its --ema_decay is 0); use raw or auto"
        )
    return cfg


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """{"optim.epochs": 10, ...} for a (nested) config dataclass."""
    out = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        out.update(
            flatten(value, f"{f.name}.") if is_dataclass(value) else {prefix + f.name: value}
        )
    return out


def overrides(old: TrainConfig, new: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """Fields that differ between two configs, `resume` aside."""
    a, b = flatten(old), flatten(new)
    return {k: (a[k], b[k]) for k in a if a[k] != b[k] and k != "resume"}


def registries() -> str:
    """What --dataset and --model take (task_config's DATASETS and MODELS): the end of --help."""
    lines, width = [], max(map(len, [*task_config.DATASETS, *task_config.MODELS]))
    for flag, registry in [("--dataset", task_config.DATASETS), ("--model", task_config.MODELS)]:
        lines += [f"{flag}:", *(f"  {n:<{width}}  {h}".rstrip() for n, h in registry.items())]
    return "\n".join(lines)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(asdict(cfg), sort_keys=False)
