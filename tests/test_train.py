"""End to end on the toy fork: train.py and test.py as a user runs them, the task's metrics everywhere they
belong, best.ckpt by a min-mode metric, checkpoints, rotation, logs and progress. (Generic tier.)"""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import Fork, max_abs_diff, model_weights, only_run_dir, run_script, snapshot

pytestmark = pytest.mark.slow


def steps_per_epoch(run_dir: Path) -> int:
    final = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)
    return final["global_step"] // final["epoch"]


def csv_rows(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "logs" / "csv" / "metrics.csv")))


def assert_real_png(path: Path, min_width: int = 100) -> None:
    """A PNG that decodes to a picture with something in it, not a blank canvas."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = matplotlib.image.imread(path)
    assert (
        pixels.shape[0] > 100 and pixels.shape[1] >= min_width and pixels[..., :3].std() > 0.05
    ), path


# A big model on little data in float64: the validation error goes down, then up and down again, so the best
# epoch by val/mae (6), by val/loss (8) and the worst (1) all differ from the last one, on any CPU.
EPOCHS = 10
TOY_ARGS = [
    "--epochs",
    str(EPOCHS),
    "--num_samples",
    "150",
    "--eff_batch_size",
    "8",
    "--hidden",
    "512",
    "--dropout",
    "0",
    "--warmup",
    "0",
    "--lr",
    "0.003",
    "--precision",
    "64-true",
    "--log_interval",
    "2",
]


@pytest.fixture(scope="module")
def toy_run(fork, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The toy task trained as a real process, with its output going to a file (as in CI or a SLURM log)."""
    root = tmp_path_factory.mktemp("toy_run")
    result = fork.run("train.py", "--root_dir", str(root), *TOY_ARGS)
    assert result.returncode == 0, result.stderr
    return only_run_dir(root), result


def test_every_scalar_metric_of_the_task_is_logged_printed_plotted_and_tested(fork, toy_run):
    run_dir, result = toy_run
    rows = csv_rows(run_dir)
    val = [row for row in rows if row["val/loss"]]
    assert len(val) == EPOCHS and all(row["val/mae"] and row["val/mse"] for row in val)
    assert float(val[-1]["val/mse"]) == pytest.approx(
        float(val[-1]["val/loss"])
    )  # the toy's loss is the MSE
    last_epoch_line = (
        f"epoch {EPOCHS}/{EPOCHS} step {val[-1]['step']} val loss {float(val[-1]['val/loss']):.4f} "
        f"val mae {float(val[-1]['val/mae']):.4f} val mse {float(val[-1]['val/mse']):.4f}"
    )
    assert last_epoch_line in result.stdout

    test = fork.run("test.py", "--out_dir", str(run_dir))
    assert test.returncode == 0, test.stderr
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    assert metrics["num_samples"] == 150 // 5 and metrics["dataset"] == "waves"
    assert {"loss", "mae", "mse"} <= metrics.keys() and metrics["mse"] == pytest.approx(
        metrics["loss"], rel=1e-5
    )
    for name in ["loss", "mae", "mse"]:
        assert f"  {name:<9} {metrics[name]:.4f}" in test.stdout


def test_best_ckpt_follows_the_task_metric_down_when_lower_is_better(toy_run):
    run_dir, result = toy_run
    val = [
        (int(row["epoch"]), float(row["val/mae"])) for row in csv_rows(run_dir) if row["val/mae"]
    ]
    best_epoch, best_mae = min(val, key=lambda point: point[1])
    assert best_epoch != EPOCHS  # the minimum, not merely the newest
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert best["epoch"] == best_epoch and best["best"] == {
        "metric": "val/mae",
        "mode": "min",
        "value": best["best"]["value"],
        "epoch": best_epoch,
    }
    assert best["best"]["value"] == pytest.approx(best_mae, rel=1e-6)
    assert (
        "  best.ckpt: min val/mae" in result.stdout
        and f"best val/mae {best_mae:.4f} at epoch {best_epoch}" in result.stdout
    )
    hparams = yaml.safe_load((run_dir / "logs" / "csv" / "hparams.yaml").read_text())
    assert (hparams["monitor_used"], hparams["monitor_mode_used"]) == ("val/mae", "min")


@pytest.mark.parametrize(
    ("flags", "metric", "pick"),
    [
        (["--monitor", "val/loss"], "val/loss", min),
        (["--monitor", "val/mse", "--monitor_mode", "max"], "val/mse", max),
    ],
)
def test_monitor_flags_choose_the_metric_and_direction_of_best_ckpt(
    fork, toy_run, tmp_path, flags, metric, pick
):
    run_dir = fork.train(tmp_path, *TOY_ARGS, *flags)
    val = [(int(row["epoch"]), float(row[metric])) for row in csv_rows(run_dir) if row[metric]]
    best_epoch, _ = pick(val, key=lambda point: point[1])
    default_best = torch.load(toy_run[0] / "checkpoints" / "best.ckpt", weights_only=True)["epoch"]
    assert best_epoch not in (EPOCHS, default_best)  # neither the newest nor what val/mae picked
    assert (
        torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)["epoch"] == best_epoch
    )


def test_output_to_a_file_gets_plain_progress_lines(toy_run):
    run_dir, result = toy_run  # stdout and stderr were pipes, as in CI or a SLURM log
    total = EPOCHS * steps_per_epoch(run_dir)
    assert f"epoch 1 step 2/{total} loss " in result.stdout and " samples/s eta " in result.stdout
    assert "\r" not in result.stdout + result.stderr  # no redrawn bar


def test_a_terminal_gets_the_same_progress_lines(fork, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(
        slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0)
    )  # a 160-column terminal
    proc = subprocess.Popen(
        [sys.executable, str(fork.path / "train.py"), "--root_dir", str(tmp_path), "--epochs", "2"],
        stdout=slave,
        stderr=slave,
        cwd=fork.path,
    )
    os.close(slave)
    output = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    assert proc.wait() == 0
    text = output.decode(errors="replace")
    total = 2 * steps_per_epoch(only_run_dir(tmp_path))
    assert re.search(rf"epoch \d step 10/{total} loss \S+ lr \S+ \d+ samples/s eta \d\d:\d\d", text)
    assert "train:" not in text and not re.search("\r(?!\n)", text)  # no bar redrawn in place


def test_an_extended_run_logs_the_validations_of_both_parts(fork, tmp_path):
    run_dir = fork.train(tmp_path, "--epochs", "2")
    assert fork.call("train.py", "--resume", str(run_dir), "--epochs", "3").returncode == 0
    per_epoch = steps_per_epoch(run_dir)
    assert [int(row["step"]) for row in csv_rows(run_dir) if row["val/mae"]] == [
        per_epoch,
        2 * per_epoch,
        3 * per_epoch,
    ]  # both parts


def test_test_py_evaluates_the_weights_it_is_asked_for(fork, toy_run):
    run_dir, _ = toy_run
    *_, older, newest = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))
    for which, ckpt in [("final", newest), ("last", newest), (str(older), older)]:
        assert (
            fork.call("test.py", "--out_dir", str(run_dir), "--checkpoint", which).returncode == 0
        )
        step = json.loads((run_dir / "test" / "metrics.json").read_text())["global_step"]
        assert step == torch.load(ckpt, weights_only=True)["global_step"]


def test_fabric_demo_style_usage_logs_and_checkpoints_where_it_says(fork, tmp_path):
    result = fork.run(
        "train.py",
        "--log_interval",
        "4",
        "--logger_name",
        "tensorboard",
        "csv",
        "--checkpoint_frequency",
        "5",
        "--comment",
        "concise comment for current run",
        "--root_dir",
        str(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    per_epoch = steps_per_epoch(run_dir)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "logs" / "tensorboard"))
    events.Reload()
    assert {"train/loss", "val/loss", "val/mae", "epoch"} <= set(events.Tags()["scalars"])
    assert "hp_metric" not in events.Tags()["scalars"]  # no placeholder -1 next to the real metrics
    assert [e.value for e in events.Scalars("epoch")][
        -1
    ] == 10  # epochs count from 1, as on the console
    rows = csv_rows(run_dir)
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(
        range(4, 10 * per_epoch + 1, 4)
    )
    assert [int(r["step"]) for r in rows if r["val/loss"]] == list(
        range(per_epoch, 10 * per_epoch + 1, per_epoch)
    )
    assert {p.name for p in (run_dir / "checkpoints").glob("step-*")} == {
        f"step-{5 * per_epoch:08d}.ckpt",
        f"step-{10 * per_epoch:08d}.ckpt",
    }
    assert (
        yaml.safe_load((run_dir / "config.yaml").read_text())["comment"]
        == "concise comment for current run"
    )
    assert fork.call("test.py", "--out_dir", str(run_dir)).returncode == 0


def test_rotation_keeps_the_newest_periodic_checkpoints_plus_best_and_final(fork, tmp_path):
    run_dir = fork.train(
        tmp_path, "--epochs", "6", "--checkpoint_frequency", "1", "--num_checkpoint_keep", "2"
    )
    per_epoch = steps_per_epoch(run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.ckpt",
        "final.ckpt",
        f"step-{5 * per_epoch:08d}.ckpt",
        f"step-{6 * per_epoch:08d}.ckpt",
    ]


def test_fast_run_goes_through_the_training_log_with_a_real_rate(fork, tmp_path):
    result = fork.call("train.py", "--root_dir", str(tmp_path), "--fast_run")
    assert result.returncode == 0, result.stderr
    rows = csv_rows(only_run_dir(tmp_path))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == [1, 2]
    rates = [
        float(line.split(" samples/s")[0].split()[-1])
        for line in result.stdout.splitlines()
        if " samples/s eta " in line
    ]
    assert len(rates) == 2 and all(
        rate > 0 for rate in rates
    )  # not "0 samples/s" before the monitor's window


def test_checkpoints_load_with_weights_only_and_hold_what_resume_needs(fork, tmp_path):
    run_dir = fork.train(tmp_path, "--fast_run")
    ckpt = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)
    assert {
        "model",
        "optimizer",
        "schedule",
        "epoch",
        "global_step",
        "rng",
        "config",
        "best",
        "patience",
        "sample_offset",
        "sums",
        "summed_steps",
    } <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 and ckpt["schedule"]["end"] == 2
    assert ckpt["config"]["root_dir"] == str(tmp_path) and ckpt["config"]["arch"]["hidden"] == 32
    assert not list((run_dir / "checkpoints").glob(".*tmp"))  # no temporary file left behind


def test_two_accumulated_micro_batches_of_32_equal_one_batch_of_64(fork, tmp_path):
    args = [
        "--epochs",
        "2",
        "--dropout",
        "0",
        "--precision",
        "64-true",
        "--eff_batch_size",
        "64",
        "--checkpoint_every_n_steps",
        "1",
        "--num_checkpoint_keep",
        "1000",
    ]
    accumulated = fork.call(
        "train.py", "--root_dir", str(tmp_path / "a"), *args, "--max_batch_size_per_device", "32"
    )
    assert "1 device(s) x 32 samples x 2 accumulation step(s) = 64" in accumulated.stdout
    single = fork.call(
        "train.py", "--root_dir", str(tmp_path / "b"), *args, "--max_batch_size_per_device", "64"
    )
    assert "1 device(s) x 64 samples x 1 accumulation step(s) = 64" in single.stdout
    a, b = (
        only_run_dir(tmp_path / "a") / "checkpoints",
        only_run_dir(tmp_path / "b") / "checkpoints",
    )
    assert (
        max_abs_diff(a / "step-00000001.ckpt", b / "step-00000001.ckpt") < 1e-12
    )  # the same update
    assert (
        max_abs_diff(a / "final.ckpt", b / "final.ckpt") < 1e-9
    )  # and after all of them (float64)
    assert max_abs_diff(a / "step-00000001.ckpt", a / "final.ckpt") > 1e-3  # which did train


def test_resume_can_extend_training_and_a_finished_run_says_so(fork, tmp_path):
    run_dir = fork.train(tmp_path, "--epochs", "2")
    before = snapshot(tmp_path)
    again = fork.call("train.py", "--resume", str(run_dir))
    assert "already finished its 2 epochs" in again.stdout and again.returncode == 0
    assert snapshot(tmp_path) == before

    assert fork.call("train.py", "--resume", str(run_dir), "--epochs", "3").returncode == 0
    final = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)
    assert (
        final["epoch"] == 3 and final["config"]["optim"]["epochs"] == 3
    )  # the resumed run's config, not the old
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["epochs"] == 3
    assert only_run_dir(tmp_path) == run_dir


def test_a_new_run_never_touches_earlier_runs(fork, tmp_path):
    first = fork.train(tmp_path, "--fast_run")
    before = snapshot(first)
    second = fork.train(tmp_path, "--fast_run")  # same out_dir, most likely the same second
    assert second != first and second.parent == first.parent
    assert snapshot(first) == before


def test_wandb_logs_offline_into_the_run_dir(fork, tmp_path):
    result = fork.run(
        "train.py", "--fast_run", "--logger_name", "wandb", "csv", "--root_dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    (wandb_run,) = (run_dir / "logs" / "wandb").glob("offline-run-*")
    assert wandb_run.name.endswith(run_dir.name)  # the run id, reused on resume
    assert (run_dir / "logs" / "csv" / "metrics.csv").is_file()


def variant(fork: Fork, to: Path, file: str, old: str, new: str) -> Path:
    """A copy of the fork with one edit in one of its files, as a user's mistake or a user's own code."""
    shutil.copytree(fork.path, to)
    text = (to / file).read_text()
    assert old in text
    (to / file).write_text(text.replace(old, new))
    return to


def test_a_mistake_in_the_task_code_fails_before_the_run_directory_is_created(fork, tmp_path):
    broken = variant(fork, tmp_path / "broken", "task.py", 'batch["features"]', 'batch["feature"]')
    result = run_script("train.py", "--root_dir", str(tmp_path / "runs"), cwd=broken)
    assert result.returncode == 1 and "KeyError: 'feature'" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_a_resume_that_changes_the_monitor_mode_starts_best_ckpt_over(fork, tmp_path):
    run_dir = fork.train(tmp_path, "--epochs", "3")
    resumed = fork.call(
        "train.py", "--resume", str(run_dir), "--epochs", "4", "--monitor_mode", "max"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (
        "best.ckpt so far followed the min val/mae; from now on it follows the max val/mae"
        in resumed.stdout
    )
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert (
        best["epoch"] == 4 and best["best"]["mode"] == "max"
    )  # the only epoch judged by the new rule
    assert "best val/mae" in resumed.stdout and "at epoch 4" in resumed.stdout


def test_a_metric_that_counts_is_logged_and_can_pick_best_ckpt(fork, tmp_path):
    counting = variant(
        fork,
        tmp_path / "counting",
        "task.py",
        'MONITOR = "val/mae"',
        """MONITOR = "val/errors"


class Errors(torchmetrics.Metric):  # an integer count: samples off by more than 0.5
    higher_is_better = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds, target) -> None:
        self.count += ((preds - target).abs() > 0.5).sum()

    def compute(self):
        return self.count""",
    )
    text = (
        (counting / "task.py")
        .read_text()
        .replace('"mae": MeanAbsoluteError()})', '"mae": MeanAbsoluteError(), "errors": Errors()})')
    )
    (counting / "task.py").write_text("import torchmetrics\n" + text)
    result = run_script(
        "train.py", "--root_dir", str(tmp_path / "runs"), "--epochs", "3", cwd=counting
    )
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path / "runs")
    errors = [
        (int(r["epoch"]), float(r["val/errors"])) for r in csv_rows(run_dir) if r["val/errors"]
    ]
    assert len(errors) == 3 and all(value == int(value) for _, value in errors)
    best_epoch = min(errors, key=lambda point: point[1])[0]
    best = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert (best["epoch"], best["best"]["metric"], best["best"]["mode"]) == (
        best_epoch,
        "val/errors",
        "min",
    )


def test_a_task_metric_named_loss_is_refused_before_the_run_directory(fork, tmp_path):
    clash = variant(
        fork,
        tmp_path / "clash",
        "task.py",
        '"mse": MeanSquaredError()',
        '"loss": MeanSquaredError()',
    )
    result = run_script("train.py", "--root_dir", str(tmp_path / "runs"), "--fast_run", cwd=clash)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: task.metrics has a metric named 'loss': val/loss is the task's; rename it"
    )
    assert not (tmp_path / "runs").exists()


def test_the_repository_own_task_trains_and_tests_on_fast_run(tmp_path):
    """Whatever task this repository holds (the template's, or a fork's own): its plumbing runs end to end."""
    trained = run_script("train.py", "--root_dir", str(tmp_path), "--fast_run")
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    tested = run_script("test.py", "--out_dir", str(run_dir), "--checkpoint", "final")
    assert tested.returncode == 0, tested.stderr[-3000:]
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    assert (
        metrics["num_samples"] > 0
        and metrics["global_step"] == 2
        and math.isfinite(metrics["loss"])
    )


def test_a_resume_with_lr_and_weight_decay_overrides_trains_with_them_and_records_them(
    fork, tmp_path
):
    run_dir = fork.train(
        tmp_path,
        "--epochs",
        "3",
        "--lr",
        "0.01",
        "--checkpoint_every_n_steps",
        "1",
        "--num_checkpoint_keep",
        "1000",
        "--log_interval",
        "1",
    )
    per_epoch = steps_per_epoch(run_dir)
    for late in [
        *sorted((run_dir / "checkpoints").glob("step-*.ckpt"))[2 * per_epoch :],
        "final.ckpt",
        "best.ckpt",
    ]:
        (run_dir / "checkpoints" / late).unlink()  # as if stopped at the end of epoch 2
    resumed = fork.call(
        "train.py", "--resume", str(run_dir), "--lr", "0.001", "--weight_decay", "0.5"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (
        "LR schedule" not in resumed.stdout
    )  # --epochs and --warmup are as before: the same schedule
    for step in range(
        2 * per_epoch + 1, 3 * per_epoch + 1
    ):  # each step after the resume, in the checkpoint's eyes
        groups = torch.load(run_dir / "checkpoints" / f"step-{step:08d}.ckpt", weights_only=True)[
            "optimizer"
        ]["param_groups"]
        expected_lr = 0.001 * factor_at(
            per_epoch, 3 * per_epoch, step - 1
        )  # the same schedule, at the new peak
        assert expected_lr > 0 and all(g["weight_decay"] == 0.5 for g in groups)
        assert all(g["lr"] == pytest.approx(expected_lr, rel=1e-12) for g in groups)
    lr_logged = {int(r["step"]): float(r["lr"]) for r in csv_rows(run_dir) if r["lr"]}
    for step in range(
        1, 3 * per_epoch + 1
    ):  # the log says what each step used, before and after the resume
        peak = 0.01 if step <= 2 * per_epoch else 0.001
        assert lr_logged[step] == pytest.approx(
            peak * factor_at(per_epoch, 3 * per_epoch, step - 1), rel=1e-6
        )
    record = yaml.safe_load((run_dir / "provenance.yaml").read_text())[-1]
    assert record["step"] == 2 * per_epoch and record["overrides"] == {
        "optim.lr": [0.01, 0.001],
        "optim.weight_decay": [0.01, 0.5],
    }
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]
    assert (saved["lr"], saved["weight_decay"]) == (0.001, 0.5)


def test_extending_a_finished_run_warms_the_lr_up_again_and_never_jumps(fork, tmp_path):
    run_dir = fork.train(tmp_path, "--epochs", "2", "--lr", "0.01", "--log_interval", "1")
    per_epoch = steps_per_epoch(run_dir)
    resumed = fork.call("train.py", "--resume", str(run_dir), "--epochs", "12", "--warmup", "0.5")
    assert resumed.returncode == 0, resumed.stderr
    warmup = round(0.5 * per_epoch)
    assert (
        f"--epochs/--warmup changed the LR schedule: from step {2 * per_epoch} it warms up from 0 to 0.01 over "
        f"{warmup} steps, then decays to 0 at step {12 * per_epoch}"
    ) in resumed.stdout
    logged = [float(r["lr"]) for r in csv_rows(run_dir) if r["lr"]]
    assert len(logged) == 12 * per_epoch  # every step, once
    rises = [b - a for a, b in zip(logged, logged[1:])]
    assert max(rises) == pytest.approx(
        0.01 / warmup, rel=1e-6
    )  # no step rises faster than the warmup allows
    assert (
        max(logged[2 * per_epoch :]) == pytest.approx(0.01) and logged[-1] < 0.01 / per_epoch**2
    )  # to 0 again
    after = logged[2 * per_epoch :]
    assert all(b >= a for a, b in zip(after[:warmup], after[1:warmup])) and all(
        b <= a for a, b in zip(after[warmup:], after[warmup + 1 :])
    )  # warmup, then decay
    record = yaml.safe_load((run_dir / "provenance.yaml").read_text())[-1]
    assert record["overrides"] == {"optim.epochs": [2, 12], "optim.warmup": [1.0, 0.5]}
    assert record["lr_schedule"] == {
        "epochs": 12,
        "warmup_epochs": 0.5,
        "start": 2 * per_epoch,
        "start_factor": 0.0,
        "warmup_steps": warmup,
        "end": 12 * per_epoch,
    }
    assert (
        torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)["schedule"]
        == record["lr_schedule"]
    )


def factor_at(warmup_steps: int, total_steps: int, step: int) -> float:
    """A fresh run's LR factor at optimizer step `step` (from 0): linear warmup, then cosine to zero."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / (total_steps - warmup_steps)))


def test_a_new_code_patch_never_replaces_one_of_another_launch(tmp_path, monkeypatch):
    from machinery import provenance

    def git(*args: str) -> str:  # a checkout with uncommitted changes
        return "0123abcd\n" if args[0] == "rev-parse" else f"diff of launch at {len(calls)}\n"

    calls = []
    monkeypatch.setattr(provenance, "git", lambda *args: calls.append(args) or git(*args))
    provenance.record_provenance(tmp_path, 0, 1, {})
    (tmp_path / "code-1.patch").write_text("another launch's\n")  # its entry never made it
    provenance.record_provenance(tmp_path, 40, 1, {})
    entries = yaml.safe_load((tmp_path / "provenance.yaml").read_text())
    assert [e["uncommitted_changes"] for e in entries] == ["code-0.patch", "code-2.patch"]
    assert (tmp_path / "code-1.patch").read_text() == "another launch's\n"
    assert (tmp_path / "code-0.patch").read_text() != (tmp_path / "code-2.patch").read_text()


def test_every_run_records_its_provenance_and_test_py_names_it(fork, tmp_path):
    checkout = (
        tmp_path / "checkout"
    )  # the template as a user has it: a git checkout, with a change not committed
    shutil.copytree(fork.path, checkout, ignore=shutil.ignore_patterns("__pycache__"))
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@t"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "the template"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    commit = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    with open(checkout / "task.py", "a") as f:
        f.write("# an experiment in progress\n")
    trained = run_script(
        "train.py", "--root_dir", str(tmp_path / "runs"), "--fast_run", cwd=checkout
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    run_dir = only_run_dir(tmp_path / "runs")
    (entry,) = yaml.safe_load((run_dir / "provenance.yaml").read_text())
    assert (
        entry["command"]
        == f"python {checkout / 'train.py'} --root_dir {tmp_path / 'runs'} --fast_run"
    )
    assert (entry["git_commit"], entry["world_size"], entry["torch"]) == (
        commit,
        1,
        str(torch.__version__),
    )
    assert entry["devices"] and entry["host"] and entry["python"] == sys.version.split()[0]
    assert "+# an experiment in progress" in (run_dir / entry["uncommitted_changes"]).read_text()
    tested = run_script("test.py", "--out_dir", str(run_dir), "--checkpoint", "final", cwd=checkout)
    assert tested.returncode == 0, tested.stderr[-2000:]
    assert f"| commit {commit[:12]} + code-0.patch\n" in tested.stdout
    assert json.loads((run_dir / "test" / "metrics.json").read_text())["provenance"] == entry
    # Not YAML, not a list, odd types: test.py reads around a hand-damaged record.
    for damaged in ("- [unclosed\n", "step: 3\n", "- {git_commit: 7, command: [1]}\n"):
        (run_dir / "provenance.yaml").write_text(damaged)
        tested = fork.call("test.py", "--out_dir", str(run_dir), "--checkpoint", "final")
        assert tested.returncode == 0 and "Traceback" not in tested.stderr, tested.stderr
        assert "Trained by: " in tested.stdout


def test_ema_follows_its_recurrence_and_validation_and_test_py_judge_it(fork, tmp_path):
    args = [
        *TOY_ARGS[2:],
        "--epochs",
        "2",
        "--checkpoint_every_n_steps",
        "1",
        "--num_checkpoint_keep",
        "1000",
    ]
    plain = fork.train(tmp_path / "plain", *args)
    averaged = fork.train(
        tmp_path / "ema", *args, "--ema_decay", "0.5"
    )  # the warmup ends at step 8 of ~26
    from machinery.ema import averaged_weights

    # After each optimizer step t (from 0): average = d x average + (1 - d) x weights, d = min(0.5, (1+t)/(10+t)).
    steps = sorted((averaged / "checkpoints").glob("step-*.ckpt"))
    assert len(steps) == 2 * steps_per_epoch(averaged)
    before = averaged_weights(
        torch.load(steps[0], weights_only=True)
    )  # after step 0 (9/10 of its weights)
    for t, path in enumerate(steps[1:], start=1):
        ckpt = torch.load(path, weights_only=True)
        decay = min(0.5, (1 + t) / (10 + t))
        expected = {k: decay * before[k] + (1 - decay) * ckpt["model"][k] for k in before}
        got = averaged_weights(ckpt)
        assert got.keys() == expected.keys() and all(
            torch.allclose(got[k], expected[k], atol=1e-12) for k in got
        )
        before = got
    # The EMA never touches training: the same weights and training losses as without it...
    raw = [model_weights(run / "checkpoints" / "final.ckpt") for run in (plain, averaged)]
    assert all(torch.equal(raw[0][k], raw[1][k]) for k in raw[0])
    assert [r["train/loss"] for r in csv_rows(plain)] == [
        r["train/loss"] for r in csv_rows(averaged)
    ]
    # ...but validation judges the averaged weights.
    val = [[r["val/loss"] for r in csv_rows(run) if r["val/loss"]] for run in (plain, averaged)]
    assert len(val[0]) == 2 and all(a != b for a, b in zip(*val))
    # test.py evaluates the EMA by default and the trained weights with --weights raw (those of the plain run).
    reports = {}
    for run, weights in [(plain, "auto"), (averaged, "auto"), (averaged, "raw"), (averaged, "ema")]:
        result = fork.call(
            "test.py", "--out_dir", str(run), "--checkpoint", "final", "--weights", weights
        )
        assert result.returncode == 0, result.stderr
        metrics = json.loads((run / "test" / "metrics.json").read_text())
        reports[run.parent.name, weights] = (metrics["weights"], metrics["loss"])
    assert reports["plain", "auto"][0] == "raw" and reports["ema", "auto"] == reports["ema", "ema"]
    assert reports["ema", "auto"][0] == "ema" and reports["ema", "raw"] == reports["plain", "auto"]
    assert reports["ema", "ema"][1] != reports["ema", "raw"][1]
    refused = fork.call("test.py", "--out_dir", str(plain), "--weights", "ema")
    assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
        "error: --weights ema: the run has no EMA (--ema_decay 0); use raw or auto"
    ]


def test_init_from_loads_the_weights_that_fit_a_new_head_and_nothing_else_of_the_run(
    fork, tmp_path
):
    source = fork.train(tmp_path / "source", "--epochs", "2", "--num_samples", "150")
    # A tiny LR keeps the weights where they started, to see where that was.
    result = fork.call(
        "train.py",
        "--root_dir",
        str(tmp_path / "fine"),
        "--init_from",
        str(source),
        "--model",
        "deeper",
        "--fast_run",
        "--lr",
        "1e-12",
        "--dropout",
        "0",
    )
    assert result.returncode == 0, result.stderr
    best = torch.load(source / "checkpoints" / "best.ckpt", weights_only=True)
    assert (
        f"--init_from {source}/checkpoints/best.ckpt (the weights at step {best['global_step']}): 2 of its 4 "
        "tensors loaded into the model's 6; freshly initialised: 3.weight, 3.bias, 5.weight, 5.bias\n"
    ) in result.stdout
    fine = only_run_dir(tmp_path / "fine")
    tuned = torch.load(fine / "checkpoints" / "final.ckpt", weights_only=True)
    for name in ("0.weight", "0.bias"):  # the source's first layer...
        assert (tuned["model"][name] - best["model"][name]).abs().max() < 1e-9
    assert tuned["model"]["3.weight"].shape == (32, 32)  # ...under a new head
    assert (
        tuned["global_step"] == 2 and tuned["epoch"] == 1
    )  # a new run: the step, schedule and optimizer start over
    assert yaml.safe_load((fine / "config.yaml").read_text())["init_from"] == str(source)

    back = fork.call(
        "train.py",
        "--root_dir",
        str(tmp_path / "back"),
        "--init_from",
        str(fine / "checkpoints" / "final.ckpt"),
        "--fast_run",
    )  # and from the deeper model into the MLP
    assert back.returncode == 0, back.stderr
    assert (
        "2 of its 6 tensors loaded into the model's 4; freshly initialised: 3.weight, 3.bias\n"
        in back.stdout
    )

    for args, error in [
        (
            ["--resume", str(source), "--init_from", str(fine)],
            f"error: --resume cannot change --init_from '' -> {str(fine)!r}: start a new run instead",
        ),
        (
            ["--init_from", str(source), "--model", "linear"],
            f"error: --init_from {str(source)!r}: none of its 4 tensors fits the model by name and shape (it has e.g. "
            "0.weight, 0.bias, 3.weight; the model: weight, bias)",
        ),
        (
            ["--init_from", str(tmp_path / "nowhere")],
            f"error: --init_from {str(tmp_path / 'nowhere')!r}: no such checkpoint, run dir or state dict",
        ),
    ]:
        before = snapshot(tmp_path)
        refused = fork.call("train.py", "--root_dir", str(tmp_path / "refused"), *args)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [error], (
            refused.stderr
        )
        assert snapshot(tmp_path) == before

    source.rename(
        tmp_path / "moved"
    )  # a resume continues from its own checkpoint: the source is not needed
    resumed = fork.call("train.py", "--resume", str(fine), "--epochs", "2")
    assert resumed.returncode == 0 and "--init_from" not in resumed.stdout, resumed.stderr


@pytest.mark.parametrize(
    ("mode", "min_delta", "scores", "stale"),
    [
        (
            "min",
            0.1,
            [1.0, 0.95, 0.85, 0.9, float("nan"), 0.7],
            [0, 1, 0, 1, 2, 0],
        ),  # 0.05 is too small; NaN is stale
        ("max", 0.0, [0.5, 0.5, 0.6, 0.55], [0, 1, 0, 1]),  # a tie is no improvement
        ("min", 0.0, [float("nan"), 1.0, 1.0], [0, 0, 1]),  # any number beats a NaN reference
    ],
)
def test_early_stopping_counts_only_improvements_larger_than_min_delta(
    mode, min_delta, scores, stale
):
    from machinery.run import count_patience

    patience, counted = {"value": None, "stale_epochs": 0}, []
    for score in scores:
        count_patience(patience, score, mode, min_delta)
        counted.append(patience["stale_epochs"])
    assert counted == stale


def test_detect_anomaly_and_deterministic_switch_pytorch_modes_on(monkeypatch):
    from config import DebugConfig
    from machinery.debug import set_debug_modes

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (
        torch.is_anomaly_enabled(),
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.benchmark,
    )
    try:
        set_debug_modes(DebugConfig(detect_anomaly=True, deterministic=True))
        modes = (
            torch.is_anomaly_enabled(),
            torch.are_deterministic_algorithms_enabled(),
            torch.backends.cudnn.benchmark,
        )
        workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        x = torch.zeros(1, requires_grad=True)
        # 0 x inf: the error names the backward op, and a warning shows where its forward op was called.
        with (
            pytest.raises(RuntimeError, match="'SqrtBackward0' returned nan values"),
            pytest.warns(
                UserWarning, match="Error detected in SqrtBackward0. Traceback of forward call"
            ),
        ):
            (x.sqrt() * 0).backward()
    finally:
        torch.autograd.set_detect_anomaly(before[0])
        torch.use_deterministic_algorithms(before[1])
        torch.backends.cudnn.benchmark = before[2]
    assert modes == (True, True, False) and workspace == ":4096:8"
    set_debug_modes(DebugConfig())
    assert not torch.is_anomaly_enabled() and not torch.are_deterministic_algorithms_enabled()


def test_a_gradient_norm_added_in_train_py_is_logged_as_train_grad_norm(tmp_path):
    from conftest import apply_readme_diff, make_fork

    own = make_fork(tmp_path / "fork")
    patched = apply_readme_diff("grad_norm", own)  # the README's diff, as a user applies it
    assert patched.returncode == 0, patched.stdout + patched.stderr
    root = tmp_path / "runs"
    # SGD (momentum 0.9) without weight decay, in float64, with a clip that never clips: a step's
    # gradient is what its checkpoint's momentum buffer adds to 0.9 x the previous one's,
    # g_t = buf_t - 0.9 buf_(t-1) (buf_1 = g_1), computed here without train.py or Fabric.
    args = ["--num_samples", "150", "--eff_batch_size", "8", "--log_interval", "2"]
    args += ["--optimizer", "sgd", "--weight_decay", "0", "--grad_clip", "1e6"]
    args += ["--precision", "64-true", "--checkpoint_every_n_steps", "1"]
    args += ["--num_checkpoint_keep", "1000"]
    trained = run_script("train.py", "--root_dir", str(root), *args, "--epochs", "2", cwd=own)
    assert trained.returncode == 0, trained.stderr[-3000:]
    run_dir = only_run_dir(root)
    # Extended by a resume at the end of epoch 2, a log step: nothing summed is carried over.
    resumed = run_script("train.py", "--resume", str(run_dir), "--epochs", "3", cwd=own)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    per_epoch, total = steps_per_epoch(run_dir), 3 * steps_per_epoch(run_dir)

    def grad_norms() -> dict[int, float]:
        """Each optimizer step's gradient norm, from the momentum buffers of the step checkpoints."""
        buffers = {}
        for step in range(1, total + 1):
            ckpt = torch.load(run_dir / "checkpoints" / f"step-{step:08d}.ckpt", weights_only=True)
            assert (
                ckpt["global_step"] == step
                and ckpt["optimizer"]["param_groups"][0]["momentum"] == 0.9
            )
            state = ckpt["optimizer"]["state"]
            buffers[step] = [state[i]["momentum_buffer"].double() for i in sorted(state)]
        norms = {}
        for step, buffer in buffers.items():
            grads = (
                buffer
                if step == 1
                else [b - 0.9 * a for a, b in zip(buffers[step - 1], buffer, strict=True)]
            )
            norms[step] = math.sqrt(sum((g**2).sum().item() for g in grads))
        return norms

    def logged() -> dict[int, float]:
        rows = csv_rows(run_dir)
        assert "train/grad_norm" in rows[0]
        return {int(r["step"]): float(r["train/grad_norm"]) for r in rows if r["train/grad_norm"]}

    def assert_means_over_each_interval(norms: dict[int, float], values: dict[int, float]) -> None:
        assert sorted(values) == list(range(2, total + 1, 2))  # every log step, once
        assert all(math.isfinite(v) and v > 0 for v in values.values())
        for step, value in values.items():
            assert value == pytest.approx((norms[step - 1] + norms[step]) / 2, rel=1e-9, abs=0)
        # The norm rides with the loss: logged at the same steps.
        assert sorted(values) == sorted(
            int(r["step"]) for r in csv_rows(run_dir) if r["train/loss"]
        )

    norms, values = grad_norms(), logged()
    # A different gradient each step, so that a mean over the wrong steps would show.
    assert len(set(norms.values())) == total and per_epoch % 2 == 1
    assert_means_over_each_interval(norms, values)

    # A resume from the middle of a log interval (step 2 x per_epoch + 1, the first of epoch 3) carries the
    # interval's sum: the next log is the mean of both steps, as if never stopped.
    middle = 2 * per_epoch + 1
    for late in range(middle + 1, total + 1):
        (run_dir / "checkpoints" / f"step-{late:08d}.ckpt").unlink()
    (run_dir / "checkpoints" / "final.ckpt").unlink()
    again = run_script("train.py", "--resume", str(run_dir), cwd=own)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"step-{middle:08d}.ckpt: step {middle}, in epoch 3" in again.stdout
    renorms, revalues = grad_norms(), logged()
    assert_means_over_each_interval(renorms, revalues)
    assert revalues == pytest.approx(values, rel=1e-12, abs=0)


def test_a_run_shorter_than_the_log_interval_says_it_logs_no_training_loss(fork, tmp_path):
    result = fork.call(
        "train.py", "--root_dir", str(tmp_path), "--epochs", "1", "--log_interval", "1000"
    )
    assert result.returncode == 0, result.stderr
    assert "note: fewer steps than --log_interval 1000: no train/* logged" in result.stdout
    assert not any(row.get("train/loss") for row in csv_rows(only_run_dir(tmp_path)))
