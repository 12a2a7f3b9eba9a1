"""Every kind of bad input: one `error:` line that names the problem, a non-zero exit, no
traceback, and no file of any run created, changed or deleted. (Generic tier: the toy fork, whose
own flags check themselves.)"""

import shutil
from pathlib import Path

import pytest
import torch


def flip_a_bit(checkpoint: Path, to: Path) -> None:
    """A copy of `checkpoint` with one bit flipped in the middle of its largest tensor's bytes."""
    import zipfile

    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    header = member.header_offset
    start = (
        header
        + 30
        + int.from_bytes(data[header + 26 : header + 28], "little")
        + int.from_bytes(data[header + 28 : header + 30], "little")
    )  # past the local header, its file name and extra field
    data[start + member.file_size // 2] ^= 0x10
    to.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def world(fork, tmp_path_factory) -> Path:
    """A root with a finished run, one with an EMA, a copy with a hand-edited config, a copy whose
    checkpoints are all truncated, config files good and bad, and a checkpoint of another model."""
    root = tmp_path_factory.mktemp("world")
    run = fork.train(root / "runs", "--fast_run", "--out_dir", "good")
    fork.train(root / "runs", "--fast_run", "--out_dir", "ema", "--ema_decay", "0.9").rename(
        root / "runs" / "with_ema"
    )
    edited = root / "runs" / "edited"
    shutil.copytree(run, edited)
    (edited / "config.yaml").write_text(
        (run / "config.yaml").read_text().replace("dataset: waves", "dataset: wavez")
    )
    broken = root / "runs" / "broken"
    shutil.copytree(run, broken)
    for ckpt in (broken / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(ckpt.read_bytes()[:500])
    damaged = {  # a file of the run's record, as a hand edit or a bad disk leaves it
        "config_not_utf8": ("config.yaml", b"seed: 42\xff\n"),
        "provenance_not_yaml": ("provenance.yaml", b"- [unclosed\n"),
        "provenance_a_mapping": ("provenance.yaml", b"step: 3\n"),
        "metrics_not_utf8": ("logs/csv/metrics.csv", b"step,train/loss\n1,\xff\xfe\n"),
        "metrics_without_step": ("logs/csv/metrics.csv", b"train/loss,lr\n0.5,0.1\n"),
    }
    for name, (file, content) in damaged.items():
        shutil.copytree(run, root / "runs" / name)
        with open(root / "runs" / name / file, "ab" if file == "config.yaml" else "wb") as f:
            f.write(content)
    (root / "unknown_key.yaml").write_text("optim:\n  epochz: 3\n")
    (root / "unknown_flat_key.yaml").write_text("epochs: 2\nepochz: 3\nlrr: 0.1\n")
    (root / "malformed.yaml").write_text("optim: [unclosed\n")
    (root / "notes.txt").write_text("not a checkpoint")
    (root / "empty.ckpt").write_bytes(b"")
    (root / "zeros.ckpt").symlink_to("/dev/zero")
    flip_a_bit(next((run / "checkpoints").glob("step-*.ckpt")), root / "flipped.ckpt")
    torch.save(
        {"model": {"weight": torch.zeros(3)}, "epoch": 0, "global_step": 0},
        root / "other_model.ckpt",
    )
    return root


def good_run(world: Path) -> str:
    (run,) = (world / "runs").glob("*-good")
    return str(run)


# (id, script, args with {world} and {run} placeholders, the text the one error line must contain)
CASES = [
    ("unknown flag", "train", ["--bogus", "1"], "unrecognized arguments: --bogus 1"),
    ("wrong type", "train", ["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
    ("negative lr", "train", ["--lr", "-0.1"], "--lr -0.1 must be > 0"),
    (
        "unknown logger",
        "train",
        ["--logger_name", "mlflow"],
        "--logger_name 'mlflow' is not one of: csv, tensorb",
    ),
    (
        "unknown scaling rule",
        "train",
        ["--lr_scaling_rule", "cubic"],
        "--lr_scaling_rule 'cubic' is not one of",
    ),
    (
        "unknown precision",
        "train",
        ["--precision", "8-bit"],
        "--precision '8-bit' is not one of: 32-true",
    ),
    (
        "zero devices",
        "train",
        ["--devices", "0"],
        "--devices '0' must be a count, ids like 0,1, -1 or auto",
    ),
    (
        "no GPU here",
        "train",
        ["--accelerator", "cuda"],
        "cannot start Fabric with --accelerator cuda",
    ),
    (
        "warmup beyond epochs",
        "train",
        ["--epochs", "2", "--warmup", "3"],
        "--warmup 3.0 must be between 0 and",
    ),
    (
        "keep no checkpoint",
        "train",
        ["--num_checkpoint_keep", "0"],
        "--num_checkpoint_keep 0 must be >= 1",
    ),
    ("negative workers", "train", ["--num_workers", "-1"], "--num_workers -1 must be >= 0"),
    (
        "eff batch not divisible",
        "train",
        ["--accelerator", "cpu", "--devices", "3"],
        "--eff_batch_size 64 is not divisible by the world size 3",
    ),
    (
        "eff batch in tiny micro-batches",
        "train",
        ["--eff_batch_size", "97", "--max_batch_size_per_device", "64"],
        "--eff_batch_size 97 on 1 device(s) does not split into micro-batches of 32 to 64 "
        "(--max_batch_size_per_device); use e.g. 64 or 128",
    ),
    (
        "eff batch larger than the data",
        "train",
        ["--eff_batch_size", "5000"],
        "--eff_batch_size 5000 is larger than the",
    ),
    (
        "empty validation split",
        "train",
        ["--num_samples", "10", "--eff_batch_size", "4"],
        "--dataset waves: the validation split is empty",
    ),
    (
        "the task's dataset registry",
        "train",
        ["--dataset", "imagenet"],
        "--dataset 'imagenet' is not one of: waves",
    ),
    (
        "the task's model registry",
        "train",
        ["--model", "resnet9000"],
        "--model 'resnet9000' is not one of: mlp",
    ),
    ("the task's own flag", "train", ["--hidden", "0"], "--hidden 0 must be >= 1"),
    (
        "monitor not a validation metric",
        "train",
        ["--monitor", "mae"],
        "--monitor 'mae' must be val/loss or val/<metric>",
    ),
    (
        "monitor that the task does not log",
        "train",
        ["--monitor", "val/acc"],
        "--monitor 'val/acc' is not one of: val/loss, val/mae, val/mse",
    ),
    (
        "unknown monitor mode",
        "train",
        ["--monitor_mode", "up"],
        "--monitor_mode 'up' is not one of: auto, min, max",
    ),
    (
        "config file missing",
        "train",
        ["--config_path", "{world}/nope.yaml"],
        "config file {world}/nope.yaml cannot be read: No such file or directory",
    ),
    (
        "config file unknown key",
        "train",
        ["--config_path", "{world}/unknown_key.yaml"],
        "config file {world}/unknown_key.yaml: 'optim.epochz' is not a config field (see --help)",
    ),
    (
        "config file malformed",
        "train",
        ["--config_path", "{world}/malformed.yaml"],
        "config file {world}/malformed.yaml cannot be read: while parsing a flow sequence",
    ),
    (
        "root dir is a file",
        "train",
        ["--root_dir", "{world}/notes.txt"],
        "--root_dir '{world}/notes.txt' is not a directory",
    ),
    (
        "resume nowhere",
        "train",
        ["--resume", "{world}/runs/nope"],
        "--resume '{world}/runs/nope': not a run directory or a checkpoint in one",
    ),
    (
        "resume not a run",
        "train",
        ["--resume", "{world}"],
        "--resume '{world}': not a run directory or a checkpoint in one",
    ),
    (
        "resume a file outside a run",
        "train",
        ["--resume", "{world}/other_model.ckpt"],
        "--resume '{world}/other_model.ckpt': not a run directory or a checkpoint in one",
    ),
    (
        "resume with a bad config file",
        "train",
        ["--resume", "{run}", "--config_path", "{world}/unknown_key.yaml"],
        "config file {world}/unknown_key.yaml: 'optim.epochz' is not a config field (see --help)",
    ),
    (
        "resume changes the model",
        "train",
        ["--resume", "{run}", "--model", "linear"],
        "--resume cannot change --model 'mlp' -> 'linear'",
    ),
    (
        "resume changes the task's locked flags",
        "train",
        ["--resume", "{run}", "--num_samples", "2000", "--hidden", "8"],
        "--resume cannot change --num_samples 750 -> 2000, --hidden 32 -> 8: "
        "start a new run instead",
    ),
    (
        "resume hand-edited config",
        "train",
        ["--resume", "{world}/runs/edited"],
        "{world}/runs/edited/config.yaml: --dataset 'wavez' is not one of",
    ),
    (
        "resume no loadable checkpoint",
        "train",
        ["--resume", "{world}/runs/broken"],
        "has no loadable checkpoint in {world}/runs/broken/checkpoints (2 could not be loaded)",
    ),
    ("EMA decay of 1", "train", ["--ema_decay", "1"], "--ema_decay 1.0 must be in [0, 1)"),
    (
        "EMA in 16 bits",
        "train",
        ["--ema_decay", "0.999", "--precision", "bf16-true"],
        "--ema_decay with --precision bf16-true: 16-bit weights lose the average's small updates; "
        "use bf16-mixed or 16-mixed",
    ),
    (
        "resume starts an EMA",
        "train",
        ["--resume", "{run}", "--ema_decay", "0.99"],
        "--ema_decay 0.99: a resume cannot switch the EMA on or off (the run's is 0.0); "
        "start a new run with --init_from",
    ),
    (
        "resume stops the EMA",
        "train",
        ["--resume", "{world}/runs/with_ema", "--ema_decay", "0"],
        "--ema_decay 0.0: a resume cannot switch the EMA on or off (the run's is 0.9); "
        "start a new run with --init_from",
    ),
    (
        "init_from not a checkpoint",
        "train",
        ["--init_from", "{world}/notes.txt"],
        "--init_from {world}/notes.txt: cannot load checkpoint {world}/notes.txt: "
        "not a complete checkpoint file",
    ),
    (
        "time budget not DD:HH:MM:SS",
        "train",
        ["--max_time", "4:00:00"],
        "--max_time '4:00:00' must be DD:HH:MM:SS, longer than 0",
    ),
    (
        "negative patience",
        "train",
        ["--early_stopping_patience", "-1"],
        "--early_stopping_patience -1 must be >= 0",
    ),
    ("negative seed", "train", ["--seed", "-1"], "--seed -1 must be >= 0"),
    ("negative seed -5", "train", ["--seed", "-5"], "--seed -5 must be >= 0"),
    (
        "seed beyond 64 bits",
        "train",
        ["--seed", "99999999999999999999"],
        "--seed 99999999999999999999 must be < 2**32",
    ),
    (
        "two nodes, no launcher",
        "train",
        ["--num_nodes", "2", "--devices", "1"],
        "--num_nodes 2: start it on every node with torchrun, `fabric run` or SLURM's srun",
    ),
    (
        "resume: config.yaml not UTF-8",
        "train",
        ["--resume", "{world}/runs/config_not_utf8"],
        "config file {world}/runs/config_not_utf8/config.yaml cannot be read: 'utf-8' codec can't",
    ),
    (
        "resume: provenance.yaml not YAML",
        "train",
        ["--resume", "{world}/runs/provenance_not_yaml"],
        "{world}/runs/provenance_not_yaml/provenance.yaml: expected ',' or ']', but got '<stream "
        "end>'; restore it, or move it away to resume without it",
    ),
    (
        "resume: provenance.yaml a mapping",
        "train",
        ["--resume", "{world}/runs/provenance_a_mapping"],
        "provenance_a_mapping/provenance.yaml: not a YAML list of launches; restore it, or move",
    ),
    (
        "resume: metrics.csv not UTF-8",
        "train",
        ["--resume", "{world}/runs/metrics_not_utf8"],
        "metrics_not_utf8/logs/csv/metrics.csv: 'utf-8' codec can't decode byte 0xff in position 18",
    ),
    (
        "resume: metrics.csv without its step column",
        "train",
        ["--resume", "{world}/runs/metrics_without_step"],
        "metrics_without_step/logs/csv/metrics.csv: no step column; restore it, or move it away",
    ),
    ("seed of 2**32", "train", ["--seed", str(2**32)], f"--seed {2**32} must be < 2**32"),
    (
        "a removed strategy",
        "train",
        ["--strategy", "ddp_spawn"],
        "--strategy 'ddp_spawn' is not one of: auto, ddp, fsdp",
    ),
    (
        "overfit a negative number of batches",
        "train",
        ["--overfit_batches", "-1"],
        "--overfit_batches -1 must be >= 0",
    ),
    (
        "test: the EMA of a run without one",
        "test",
        ["--out_dir", "{run}", "--weights", "ema"],
        "--weights ema: the run has no EMA (--ema_decay 0); use raw or auto",
    ),
    (
        "test: no run dir",
        "test",
        ["--out_dir", "{world}/runs/nope"],
        "--out_dir '{world}/runs/nope' is not a run directory (no config.yaml)",
    ),
    ("test: out_dir missing", "test", [], "--out_dir is required"),
    (
        "test: checkpoint nowhere",
        "test",
        ["--out_dir", "{run}", "--checkpoint", "{world}/nope.ckpt"],
        "--checkpoint '{world}/nope.ckpt': no checkpoint at",
    ),
    (
        "test: not a checkpoint",
        "test",
        ["--out_dir", "{run}", "--checkpoint", "{world}/notes.txt"],
        "cannot load checkpoint {world}/notes.txt: not a complete checkpoint file "
        "(16 bytes: File is not a zip file)",
    ),
    (
        "test: an empty file",
        "test",
        ["--out_dir", "{run}", "--checkpoint", "{world}/empty.ckpt"],
        "cannot load checkpoint {world}/empty.ckpt: not a complete checkpoint file "
        "(0 bytes: File is not a zip file)",
    ),
    (
        "test: a link to a device",
        "test",
        ["--out_dir", "{run}", "--checkpoint", "{world}/zeros.ckpt"],
        "--checkpoint '{world}/zeros.ckpt': no checkpoint at {world}/zeros.ckpt",
    ),
    (
        "test: one flipped bit",
        "test",
        ["--out_dir", "{run}", "--checkpoint", "{world}/flipped.ckpt"],
        "cannot load checkpoint {world}/flipped.ckpt: it is damaged (",
    ),
    (
        "test: truncated checkpoint",
        "test",
        ["--out_dir", "{world}/runs/broken", "--checkpoint", "final"],
        "cannot load checkpoint {world}/runs/broken/checkpoints/final.ckpt",
    ),
    (
        "test: another model's checkpoint",
        "test",
        ["--out_dir", "{run}", "--checkpoint", "{world}/other_model.ckpt"],
        "cannot load checkpoint {world}/other_model.ckpt: Error(s) in loading state_dict",
    ),
]


@pytest.mark.parametrize(
    ("script", "args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_one_clear_line_and_changes_no_file(fork, world, script, args, expected):
    from conftest import snapshot

    fill = {"world": str(world), "run": good_run(world)}
    args = [a.format(**fill) for a in args]
    if script == "train" and "--root_dir" not in args:
        args = ["--root_dir", str(world / "runs"), *args]
    before = snapshot(world)
    result = fork.call(f"{script}.py", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    errors = [
        line for line in result.stderr.strip().splitlines() if not line.startswith("warning: ")
    ]
    assert len(errors) == 1 and errors[0].startswith("error: "), result.stderr
    assert expected.format(**fill) in errors[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert snapshot(world) == before  # nothing created, changed or deleted


def test_every_unknown_key_of_a_config_file_is_a_line_of_its_own(fork, world):
    from conftest import snapshot

    path = world / "unknown_flat_key.yaml"
    before = snapshot(world)
    result = fork.call("train.py", "--root_dir", str(world / "runs"), "--config_path", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: config file {path}: 'epochz' is not a config field (see --help)",
        f"error: config file {path}: 'lrr' is not a config field (see --help)",
    ]
    assert snapshot(world) == before  # nothing created, changed or deleted


def test_every_problem_is_reported_at_once_through_a_real_process(fork, tmp_path):
    result = fork.run(
        "train.py",
        "--root_dir",
        str(tmp_path),
        "--lr",
        "-1",
        "--logger_name",
        "csv",
        "foo",
        "--dataset",
        "imagenet",
        "--hidden",
        "0",
        "--monitor_mode",
        "up",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip().splitlines() == [
        "error: --logger_name 'foo' is not one of: csv, tensorboard, wandb",
        "error: --monitor_mode 'up' is not one of: auto, min, max",
        "error: --lr -1.0 must be > 0",
        "error: --dataset 'imagenet' is not one of: waves",
        "error: --hidden 0 must be >= 1",
    ]
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # no run dir was created


# A hand-edited config.yaml (or a --config_path file) with a value of the wrong type:
# (field, value, the error).
WRONG_TYPES = [
    ("hardware.devices", 2, "devices: 2 must be a string"),
    ("logger_name", "csv", "logger_name: csv must be a list, e.g. [csv]"),
    ("optim.epochs", 10.5, "epochs: 10.5 must be an integer"),
    ("seed", None, "seed: null must be an integer"),
    ("hardware", None, "hardware must be a mapping of its fields"),
    ("hardware.compile", "maybe", "compile: maybe must be a boolean (true or false)"),
    ("optim.base_lr", "fast", "base_lr: fast must be a number"),
    ("data.num_samples", True, "num_samples: true must be an integer"),  # the task's own field
]


@pytest.mark.parametrize(("key", "value", "expected"), WRONG_TYPES, ids=[c[0] for c in WRONG_TYPES])
def test_a_config_file_value_of_the_wrong_type_is_one_line_wherever_it_is_read(
    fork, world, tmp_path, key, value, expected
):
    import yaml
    from conftest import snapshot

    run = tmp_path / "runs" / "edited"
    shutil.copytree(good_run(world), run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    *groups, name = key.split(".")
    (config[groups[0]] if groups else config)[name] = value
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    before = snapshot(tmp_path)
    for script, args in [
        ("train", ["--resume", str(run)]),
        ("test", ["--out_dir", str(run)]),
        (
            "train",
            ["--root_dir", str(tmp_path / "runs"), "--config_path", str(run / "config.yaml")],
        ),
    ]:
        result = fork.call(f"{script}.py", *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, (
            script,
            args,
            result.stderr,
        )
        assert result.stderr.strip().splitlines() == [
            f"error: config file {run / 'config.yaml'}: {expected}"
        ]
    assert snapshot(tmp_path) == before


def test_test_py_that_cannot_write_its_report_says_so_in_one_line(fork, world, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(good_run(world), run)
    (run / "test").write_text("a file where test.py writes its folder")
    result = fork.call("test.py", "--out_dir", str(run))
    assert result.returncode == 4 and "Traceback" not in result.stderr, result.stderr
    assert "Test split of waves" in result.stdout  # the numbers were printed first
    assert result.stderr.strip().splitlines() == [f"error: File exists: {run / 'test'}"]


@pytest.mark.parametrize(
    ("script", "args", "code", "says"),
    [
        ("train.py", ["--help"], 0, "usage: train.py"),
        ("train.py", ["--epochs", "x"], 2, "error: argument --epochs: invalid int value: 'x'"),
        ("train.py", ["--epochs", "0", "--hidden", "0"], 2, "error: --hidden 0 must be >= 1"),
        (
            "train.py",
            ["--resume", "nowhere"],
            2,
            "error: --resume 'nowhere': not a run directory or a checkpoint in one",
        ),
        ("test.py", ["--help"], 0, "usage: test.py"),
        (
            "test.py",
            ["--out_dir", "nowhere"],
            2,
            "error: --out_dir 'nowhere' is not a run directory (no config.yaml)",
        ),
    ],
)
def test_help_and_bad_input_answer_before_torch_is_imported(fork, script, args, code, says):
    # torch and Lightning take ~5 s to import: the config is parsed and checked first
    # (task_config.py imports no torch)
    import subprocess
    import sys

    answered = subprocess.run(
        [sys.executable, "-X", "importtime", script, *args],
        capture_output=True,
        text=True,
        cwd=fork.path,
        timeout=60,
    )
    assert answered.returncode == code and says in answered.stdout + answered.stderr, (
        answered.stderr[-2000:]
    )
    imported = {
        line.split("|")[-1].strip()
        for line in answered.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "config" in imported and not imported & {"torch", "lightning", "numpy"}
