"""Config resolution, validation and the derived batch-size and learning-rate numbers. (Generic tier: only the
machinery's flags; the task's own flags are tested with the task.)"""

import math
import os
import pickle
import re
from dataclasses import fields, is_dataclass
from pathlib import Path

import pytest

from config import LogConfig, OptimConfig, TrainConfig, validate
from machinery.cli import flatten, make_parser, parse, parse_test_config, parse_train_config
from machinery.errors import UsageError, exit_on_usage_error

# Every train.py flag that fabric-demo users know, with a value and the config field it must land in.
TRAIN_FLAGS = [
    ("--accelerator", "cpu", "hardware.accelerator", "cpu"),
    ("--devices", "2", "hardware.devices", "2"),
    ("--num_nodes", "2", "hardware.num_nodes", 2),
    ("--strategy", "ddp", "hardware.strategy", "ddp"),
    ("--precision", "bf16-mixed", "hardware.precision", "bf16-mixed"),
    ("--seed", "7", "seed", 7),
    ("--project", "p", "project", "p"),
    ("--comment", "a b", "comment", "a b"),
    ("--root_dir", "somewhere", "root_dir", "somewhere"),
    ("--out_dir", "exp", "out_dir", "exp"),
    ("--num_workers", "2", "hardware.num_workers", 2),
    ("--epochs", "5", "optim.epochs", 5),
    ("--eff_batch_size", "128", "optim.eff_batch_size", 128),
    ("--max_batch_size_per_device", "32", "optim.max_batch_size_per_device", 32),
    ("--base_batch_size", "32", "optim.base_batch_size", 32),
    ("--base_lr", "0.01", "optim.base_lr", 0.01),
    ("--lr", "0.05", "optim.lr", 0.05),
    ("--lr_scaling_rule", "sqrt", "optim.lr_scaling_rule", "sqrt"),
    ("--warmup", "0.5", "optim.warmup", 0.5),
    ("--optimizer", "sgd", "optim.optimizer", "sgd"),
    ("--weight_decay", "0.1", "optim.weight_decay", 0.1),
    ("--grad_clip", "0", "optim.grad_clip", 0.0),
    ("--log_interval", "3", "log.log_interval", 3),
    ("--checkpoint_frequency", "5", "log.checkpoint_frequency", 5),
    ("--num_checkpoint_keep", "2", "log.num_checkpoint_keep", 2),
    ("--monitor", "val/loss", "log.monitor", "val/loss"),
    ("--monitor_mode", "min", "log.monitor_mode", "min"),
]


@pytest.mark.parametrize(("flag", "value", "key", "expected"), TRAIN_FLAGS)
def test_fabric_demo_flags_are_spelled_the_same(flag, value, key, expected):
    assert flatten(parse_train_config([flag, value]))[key] == expected


def test_boolean_and_list_flags():
    cfg = parse_train_config(
        ["--fast_run", "--compile", "--logger_name", "csv", "tensorboard", "wandb"]
    )
    assert cfg.fast_run and cfg.hardware.compile
    assert cfg.logger_name == ["csv", "tensorboard", "wandb"]


def test_help_lists_the_names_of_the_task_registries(capsys):
    from task_config import DATASETS, MODELS

    with pytest.raises(SystemExit) as exit:
        parse_train_config(["--help"])
    assert exit.value.code == 0
    help_text = capsys.readouterr().out
    for flag, registry in [("--dataset", DATASETS), ("--model", MODELS)]:
        listing = help_text.split(f"\n{flag}:\n")[1]
        for name, help_line in registry.items():
            assert re.search(rf"^  {name} +{re.escape(help_line)}$", listing, re.MULTILINE), name


def test_every_name_the_task_registers_is_a_function_of_its_module():
    import inspect

    import data
    import model
    from task_config import DATASETS, MODELS

    for module, registry in [(data, DATASETS), (model, MODELS)]:
        for name in registry:
            function = getattr(module, name, None)
            assert inspect.isfunction(function) and function.__module__ == module.__name__, (
                module.__name__,
                name,
            )


def test_test_py_flags_are_checked_against_the_run_before_any_torch_import(tmp_path):
    from machinery.cli import to_yaml

    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(TrainConfig()))
    (run / "checkpoints" / "final.ckpt").write_bytes(b"")
    cfg = parse_test_config(
        [
            "--out_dir",
            str(run),
            "--checkpoint",
            "final",
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--batch_size",
            "64",
        ]
    )
    assert (cfg.out_dir, cfg.checkpoint, cfg.accelerator, cfg.devices, cfg.batch_size) == (
        str(run),
        "final",
        "cpu",
        "2",
        64,
    )
    with pytest.raises(UsageError, match="^--checkpoint 'best': no checkpoint at .*best.ckpt"):
        parse_test_config(["--out_dir", str(run)])
    with pytest.raises(UsageError, match=r"^--weights ema: the run has no EMA \(--ema_decay 0\)"):
        parse_test_config(["--out_dir", str(run), "--checkpoint", "final", "--weights", "ema"])


def test_config_file_sets_values_and_command_line_flags_override_it(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  epochs: 3\n  base_lr: 0.5\ncomment: from file\n")
    cfg = parse_train_config(["--config_path", str(path), "--epochs", "7"])
    assert cfg.optim.epochs == 7  # the flag wins
    assert cfg.optim.base_lr == 0.5 and cfg.comment == "from file"  # the file beats the defaults


def test_a_flat_config_file_means_the_same_as_the_nested_layout_of_config_yaml(tmp_path):
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text(
        "epochs: 3\nbase_lr: 0.5\ncomment: from file\nlog_interval: 7\noptim:\n  warmup: 0.5\n"
    )
    nested.write_text(
        "optim:\n  epochs: 3\n  base_lr: 0.5\n  warmup: 0.5\ncomment: from file\nlog:\n  log_interval: 7\n"
    )
    cfg = parse_train_config(["--config_path", str(flat)])
    assert cfg == parse_train_config(["--config_path", str(nested)])
    assert (cfg.optim.epochs, cfg.optim.base_lr, cfg.optim.warmup, cfg.log.log_interval) == (
        3,
        0.5,
        0.5,
        7,
    )
    assert (
        parse_train_config(["--config_path", str(flat), "--epochs", "4"]).optim.epochs == 4
    )  # flags still win


def test_numbers_in_a_config_file_are_read_as_a_user_writes_them(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "base_lr: 3e-4\nwarmup: 1\nlr: null\ndevices: '2'\nlogger_name: [csv, tensorboard]\n"
    )
    cfg = parse_train_config(["--config_path", str(path)])
    assert cfg.optim.base_lr == 3e-4 and isinstance(
        cfg.optim.base_lr, float
    )  # YAML 1.1 reads 3e-4 as a string
    assert cfg.optim.warmup == 1.0 and isinstance(cfg.optim.warmup, float) and cfg.optim.lr is None
    assert (cfg.hardware.devices, cfg.logger_name) == ("2", ["csv", "tensorboard"])


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("optim:\n  epochz: 3\n", "epochz"),  # unknown key
        ("optim: [unclosed\n", "config file"),  # malformed YAML
        ("a: " + "[" * 5000 + "]" * 5000, "cannot be read: maximum recursion depth exceeded"),
    ],
)
def test_bad_config_file_is_a_usage_error(tmp_path, content, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(UsageError, match=needle):
        parse_train_config(["--config_path", str(path)])


def test_missing_config_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="config file"):
        parse_train_config(["--config_path", str(tmp_path / "nope.yaml")])


def test_the_task_defaults_come_between_the_defaults_and_a_config_file(monkeypatch, tmp_path):
    import task_config
    from machinery.cli import to_yaml

    defaults = {"epochs": 3, "base_lr": 0.5, "comment": "task", "log": {"log_interval": 7}}
    monkeypatch.setattr(task_config, "DEFAULTS", defaults, raising=False)
    cfg = parse_train_config([])
    assert (cfg.optim.epochs, cfg.optim.base_lr, cfg.comment, cfg.log.log_interval) == (
        3,
        0.5,
        "task",
        7,
    )
    assert cfg.optim.eff_batch_size == TrainConfig().optim.eff_batch_size  # the rest: defaults
    path = tmp_path / "exp.yaml"
    path.write_text("epochs: 5\ncomment: file\n")
    cfg = parse_train_config(["--config_path", str(path)])
    assert (cfg.optim.epochs, cfg.optim.base_lr, cfg.comment, cfg.log.log_interval) == (
        5,
        0.5,
        "file",
        7,
    )  # the file wins where it says something; the task's DEFAULTS stay where it does not
    cfg = parse_train_config(["--config_path", str(path), "--epochs", "9", "--base_lr", "0.1"])
    assert (cfg.optim.epochs, cfg.optim.base_lr, cfg.comment) == (9, 0.1, "file")  # flags win
    assert parse_train_config(["--log_interval", "2"]).log.log_interval == 2  # with no file too
    # A resumed run's config.yaml replaces the defaults, the task's DEFAULTS with them.
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(to_yaml(TrainConfig()))
    resumed = parse_train_config(["--resume", str(run)])
    assert (resumed.optim.epochs, resumed.comment) == (TrainConfig().optim.epochs, "")


@pytest.mark.parametrize(
    ("defaults", "expected"),
    [
        ({"epochs": "three"}, "epochs: three must be an integer"),
        ({"optim": {"base_lr": "fast"}}, "base_lr: fast must be a number"),
        ({"compile": 1}, "compile: 1 must be a boolean (true or false)"),
        ({"optim": 3}, "optim must be a mapping of its fields"),
        ({"epochz": 3}, "'epochz' is not a config field (see --help)"),
    ],
)
def test_a_task_default_of_the_wrong_type_is_one_line(monkeypatch, capsys, defaults, expected):
    import task_config

    monkeypatch.setattr(task_config, "DEFAULTS", defaults, raising=False)
    with pytest.raises(SystemExit) as exit, exit_on_usage_error():  # as train.py reports it
        parse_train_config([])
    assert exit.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: config file task_config.DEFAULTS: {expected}"
    ]


class _Trap:
    """Unpickled, it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "x"))


@pytest.mark.parametrize(
    "kind", ["fifo", "/dev/zero", "link to /dev/zero", "over 1 MiB", "invalid UTF-8", "pickle"]
)
def test_a_config_path_that_is_no_yaml_file_is_one_line_and_never_read_forever(tmp_path, kind):
    from conftest import run_script

    path, marker = tmp_path / "exp.yaml", tmp_path / "unpickled"
    not_regular = "not a regular YAML file of at most 1 MiB"
    if kind == "fifo":
        os.mkfifo(path)  # no writer: opening it to read would wait forever
        expected = [f"config file {path}: {not_regular}"]
    elif kind == "/dev/zero":
        path = Path("/dev/zero")  # endless
        expected = [f"config file {path}: {not_regular}"]
    elif kind == "link to /dev/zero":
        path.symlink_to("/dev/zero")
        expected = [f"config file {path}: {not_regular}"]
    elif kind == "over 1 MiB":
        path.write_text("# a comment\n" * 100_000 + "epochs: 3\n")
        expected = [f"config file {path}: {not_regular}"]
    elif kind == "invalid UTF-8":
        path.write_bytes(b"epochs: 3\ncomment: \xff\xfe\n")
        expected = [
            f"config file {path} cannot be read: 'utf-8' codec can't decode byte 0xff in "
            "position 19: invalid start byte"
        ]
    else:  # simple_parsing's own reader would unpickle a .pkl file: ours reads YAML only
        pickle.loads(pickle.dumps(_Trap(tmp_path / "control")))
        assert (tmp_path / "control").exists()  # the trap works
        binary, text = tmp_path / "exp.pkl", tmp_path / "text.pkl"
        binary.write_bytes(pickle.dumps(_Trap(marker)))
        text.write_bytes(pickle.dumps(_Trap(marker), protocol=0))  # ASCII: YAML reads a string
        path = binary
        expected = [
            f"config file {binary} cannot be read: 'utf-8' codec can't decode byte 0x80 in "
            "position 0: invalid start byte"
        ]
        result = run_script("train.py", "--config_path", str(text), timeout=60)
        assert not marker.exists(), "the .pkl config file was unpickled"
        assert result.returncode == 2, result.stderr
        assert result.stderr.splitlines() == [
            f"error: config file {text} must hold a mapping, not str"
        ]
    runs = tmp_path / "runs"
    result = run_script(
        "train.py", "--root_dir", str(runs), "--config_path", str(path), timeout=60
    )  # subprocess.TimeoutExpired if it hangs
    assert not marker.exists(), "the .pkl config file was unpickled"
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {line}" for line in expected]
    assert "Traceback" not in result.stdout + result.stderr
    assert not runs.exists()  # no run dir


def test_every_field_has_a_docstring_that_is_its_help_text():
    help_text = " ".join(_help(TrainConfig).split())

    def docstrings(cls):
        import simple_parsing.docstring as ds

        for f in fields(cls):
            if is_dataclass(f.type):
                yield from docstrings(f.type)
            else:
                doc = ds.get_attribute_docstring(cls, f.name).docstring_below
                assert doc, f"{cls.__name__}.{f.name} has no docstring"
                yield f.name, " ".join(doc.split())

    for name, doc in docstrings(TrainConfig):
        assert f"--{name}" in help_text and doc in help_text, name


def _help(cls) -> str:
    parser = make_parser(cls)
    parser.parse_known_args([])  # simple_parsing adds the arguments when it first parses
    return parser.format_help()


def test_config_is_frozen():
    cfg = TrainConfig()
    with pytest.raises(AttributeError):
        cfg.optim.epochs = 3  # type: ignore[misc]


def test_every_problem_is_reported_at_once():
    problems = validate(
        _unvalidated(
            [
                "--lr",
                "-1",
                "--logger_name",
                "foo",
                "--num_nodes",
                "0",
                "--epochs",
                "0",
                "--warmup",
                "-1",
                "--monitor_mode",
                "best",
            ]
        )
    )
    expected = [
        "--lr -1.0 must be > 0",
        "--logger_name 'foo' is not one of: csv, tensorboard, wandb",
        "--num_nodes 0 must be >= 1",
        "--epochs 0 must be >= 1",
        "--warmup -1.0 must be between 0",
        "--monitor_mode 'best' is not one of: auto, min, max",
    ]
    assert len(problems) == len(expected), problems
    for needle in expected:
        assert any(needle in p for p in problems), needle


def _unvalidated(argv: list[str]) -> TrainConfig:
    return parse(TrainConfig, argv)  # parsed, not validated


# (eff_batch_size, world_size, max_batch_size_per_device) -> (batch_size_per_device, grad_accum_steps)
MICRO_BATCHING = [
    ((64, 1, 256), (64, 1)),
    ((64, 2, 256), (32, 1)),
    ((64, 8, 256), (8, 1)),
    ((64, 1, 32), (32, 2)),  # accumulate only because 64 > 32
    ((64, 2, 32), (32, 1)),  # two devices hold it without accumulating
    ((512, 4, 64), (64, 2)),
    ((96, 2, 16), (16, 3)),
    ((100, 1, 40), (25, 4)),  # ceil(100 / 40) = 3 does not divide 100: the next that does, 4
    ((1024, 16, 1024), (64, 1)),
]


@pytest.mark.parametrize(("args", "expected"), MICRO_BATCHING)
def test_micro_batching_is_exact_for_any_world_size(args, expected):
    eff, world, max_per_device = args
    per_device, accum = OptimConfig(
        eff_batch_size=eff, max_batch_size_per_device=max_per_device
    ).micro_batching(world)
    assert (per_device, accum) == expected
    assert per_device * world * accum == eff
    assert per_device <= max_per_device


@pytest.mark.parametrize(
    ("eff", "world", "max_per_device", "expected"),
    [
        (
            97,
            1,
            64,
            "--eff_batch_size 97 on 1 device(s) does not split into micro-batches of 32 to 64 "
            "(--max_batch_size_per_device); use e.g. 64 or 128",
        ),
        (
            190,
            2,
            64,
            "--eff_batch_size 190 on 2 device(s) does not split into micro-batches of 32 to 64 "
            "(--max_batch_size_per_device); use e.g. 128 or 256",
        ),
        (
            7,
            1,
            4,
            "--eff_batch_size 7 on 1 device(s) does not split into micro-batches of 2 to 4 "
            "(--max_batch_size_per_device); use e.g. 4 or 8",
        ),
        (  # a prime: bounded work, not a search through 10**12 candidates
            999_999_999_989,
            1,
            256,
            "--eff_batch_size 999999999989 on 1 device(s) does not split into micro-batches of "
            "128 to 256 (--max_batch_size_per_device); use e.g. 999999999744 or 1000000000000",
        ),
    ],
)
def test_a_split_into_tiny_micro_batches_is_refused_with_sizes_that_split_well(
    eff, world, max_per_device, expected
):
    with pytest.raises(UsageError) as err:
        OptimConfig(eff_batch_size=eff, max_batch_size_per_device=max_per_device).micro_batching(
            world
        )
    assert str(err.value) == expected


def test_a_batch_or_a_dataset_too_large_for_any_machine_is_refused_up_front():
    huge = validate(_unvalidated(["--eff_batch_size", str(2**40 + 1)]))
    assert huge == [f"--eff_batch_size {2**40 + 1} must be <= 2**40"]
    from task_config import DataConfig  # the template's own task: images held in memory

    (problem,) = DataConfig(dataset="synthetic_cifar10", synthetic_size=10**11).problems()
    assert problem == "--synthetic_size 100000000000 must be in [10, 10**6]"


@pytest.mark.parametrize(("eff", "world"), [(64, 3), (10, 4), (2, 4)])
def test_eff_batch_not_divisible_by_world_size_is_a_clear_error(eff, world):
    with pytest.raises(
        UsageError, match=f"--eff_batch_size {eff} is not divisible by the world size {world}"
    ):
        OptimConfig(eff_batch_size=eff).micro_batching(world)


@pytest.mark.parametrize(
    ("rule", "eff", "expected"),
    [
        ("linear", 256, 4e-3),
        ("linear", 32, 0.5e-3),
        ("sqrt", 256, 2e-3),
        ("sqrt", 16, 0.5e-3),
        ("none", 256, 1e-3),
    ],
)
def test_lr_scaling_rules(rule, eff, expected):
    opt = OptimConfig(base_lr=1e-3, base_batch_size=64, eff_batch_size=eff, lr_scaling_rule=rule)
    assert math.isclose(opt.learning_rate(), expected)


def test_explicit_lr_wins_over_the_scaling_rule():
    assert OptimConfig(base_lr=1e-3, eff_batch_size=256, lr=0.3).learning_rate() == 0.3
    assert (
        OptimConfig(base_lr=1e-3, eff_batch_size=256, lr=0.3).lr_rule() == "--lr, as given"
    )  # what the banner says
    assert (
        OptimConfig(base_lr=1e-3, eff_batch_size=256).lr_rule()
        == "--base_lr 0.001 at 64, linear rule"
    )


def test_log_interval_except_fast_run_which_logs_every_step():
    assert TrainConfig(log=LogConfig(log_interval=7)).log_every_n_steps() == 7
    assert TrainConfig(fast_run=True, log=LogConfig(log_interval=7)).log_every_n_steps() == 1


def test_best_checkpoint_rule_takes_the_direction_from_the_metric_unless_told():
    from torchmetrics import MeanMetric, MeanSquaredError, MetricCollection
    from torchmetrics.classification import BinaryAccuracy

    from machinery.run import best_checkpoint_rule

    metrics = MetricCollection(
        {"mse": MeanSquaredError(), "acc": BinaryAccuracy(), "mean": MeanMetric()}
    )
    logged = {
        "loss": 0.1,
        "acc": 0.9,
        "mean": 0.5,
        "mse": 0.1,
        "errors": 3.0,
    }  # "errors": not a metric object

    def rule(**kwargs):
        return best_checkpoint_rule(TrainConfig(log=LogConfig(**kwargs)), metrics, logged)

    assert rule(monitor="val/loss") == ("val/loss", "min")
    assert rule(monitor="val/mse") == ("val/mse", "min")
    assert rule(monitor="val/acc") == ("val/acc", "max")
    assert rule(monitor="val/acc", monitor_mode="min") == ("val/acc", "min")
    with pytest.raises(
        UsageError,
        match=r"^--monitor_mode auto: val/mean does not say whether higher is better; pass min or max$",
    ):
        rule(monitor="val/mean")
    with pytest.raises(UsageError, match=r"--monitor_mode auto: val/errors does not say whether"):
        rule(monitor="val/errors")
    assert rule(monitor="val/mean", monitor_mode="max") == ("val/mean", "max")
    with pytest.raises(
        UsageError,
        match=r"--monitor 'val/f1' is not one of: val/loss, val/acc, val/mean, val/mse, "
        r"val/errors$",
    ):
        rule(monitor="val/f1")


@pytest.mark.parametrize(
    ("score", "best", "mode", "expected"),
    [
        (0.5, None, "min", True),
        (math.nan, None, "max", True),  # the first epoch is the best so far
        (0.3, 0.4, "min", True),
        (0.5, 0.4, "min", False),
        (0.5, 0.4, "max", True),
        (0.3, 0.4, "max", False),
        (0.4, 0.4, "max", False),
        (0.4, 0.4, "min", False),  # a tie keeps the earlier checkpoint
        (math.nan, 0.4, "min", False),
        (math.nan, 0.4, "max", False),
        (9.0, math.nan, "min", True),
    ],
)
def test_a_new_best_must_beat_the_old_one_and_nan_never_does(score, best, mode, expected):
    from machinery.run import improves

    assert improves(score, best, mode) is expected


def test_a_registry_entry_without_help_is_listed_by_name(monkeypatch):
    import task_config
    from machinery.cli import registries

    monkeypatch.setitem(task_config.DATASETS, "bare", "")
    assert "\n  bare\n" in registries() + "\n"
