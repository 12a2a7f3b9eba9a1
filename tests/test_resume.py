"""Never lose a run: a crash at any moment, a signal, or a damaged checkpoint, then a resume that ends bitwise
equal to the run that was never interrupted, with logs that read as one run."""

import csv
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, model_weights, only_run_dir, run_script, train_in_process

pytestmark = pytest.mark.slow

# 20 optimizer steps per epoch on digits; a checkpoint every 7 steps lands mid-epoch (7, 14, 21, ...) and
# every epoch (20, 40, ...), so both kinds are exercised.
ARGS = ["--epochs", "4", "--checkpoint_every_n_steps", "7", "--dropout", "0.2", "--log_interval", "3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run that every interrupted one must equal."""
    return train_in_process(tmp_path_factory.mktemp("reference"), *ARGS)


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Final weights bitwise equal, and the CSV log identical: every step once, none missing, same values."""
    final, expected = model_weights(run_dir / "checkpoints" / "final.ckpt"), model_weights(
        reference / "checkpoints" / "final.ckpt")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    assert logged_values(run_dir) == logged_values(reference)
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))  # the crash's temporary file is cleaned up


def logged_values(run_dir: Path) -> list[dict]:
    """metrics.csv without its throughput columns, which measure time and so differ from run to run."""
    rows = csv.DictReader(open(run_dir / "logs" / "csv" / "metrics.csv"))
    return [{k: v for k, v in row.items() if not k.endswith("_per_sec")} for row in rows]


# Each crash is injected in a real process: `when` is patched in, and on its n-th call the process kills itself.
CRASH_RUNNER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import lightning.fabric, utils, train

    def crash_on_call(owner, name, n, before=None):
        original, calls = getattr(owner, name), [0]
        def wrapper(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                if before: before(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
            return original(*args, **kwargs)
        setattr(owner, name, wrapper)

    original_save = lightning.fabric.Fabric.save

    def half_written(fabric, path, state, *args, **kwargs):  # the file is cut off in the middle of the write
        original_save(fabric, path, state)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    when, n = sys.argv[1], int(sys.argv[2])
    if when == "mid_write":
        crash_on_call(lightning.fabric.Fabric, "save", n, before=half_written)
    elif when == "before_rename":
        crash_on_call(utils.os, "replace", n)
    elif when == "before_prune":
        crash_on_call(utils, "prune_checkpoints", n)
    train.cli(sys.argv[3:])
""")


@pytest.mark.parametrize(("when", "n"), [
    ("mid_write", 4),  # the 4th save (step 21, mid-epoch 2) is cut off half-way
    ("before_rename", 6),  # step 28's complete temporary file is never renamed
    ("before_prune", 5),  # step 40's checkpoint is on disk, the old ones not yet pruned
])
def test_sigkill_while_checkpointing_then_resume_is_bitwise_identical(tmp_path, reference, when, n):
    runner = tmp_path / "crash_runner.py"
    runner.write_text(CRASH_RUNNER.format(repo=str(REPO)))
    root = tmp_path / "runs"
    crashed = subprocess.run([sys.executable, str(runner), when, str(n), "--root_dir", str(root), *ARGS],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    run_dir = only_run_dir(root)
    assert not (run_dir / "checkpoints" / "final.ckpt").exists()

    _resume(run_dir)
    assert only_run_dir(root) == run_dir
    assert_same_run(run_dir, reference)


def _resume(run_dir: Path, *args: str) -> None:
    import utils
    from config import parse_train_config
    from train import main

    utils.make_fabric("cpu", "1").launch(main, parse_train_config(["--resume", str(run_dir), *args]))


def start_training(root: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, str(REPO / "train.py"), "--root_dir", str(root), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})


def wait_for_step(root: Path, step: int, proc: subprocess.Popen) -> None:
    """Until the CSV log shows `step`: the run is training, mid-epoch."""
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        logs = list(root.glob("*/logs/csv/metrics.csv"))
        if logs and any(f",{step}," in line for line in logs[0].read_text().splitlines()):  # the step column
            return
        time.sleep(0.01)
    raise AssertionError(f"training never reached step {step}")


def test_sigkill_mid_epoch_from_outside_then_resume_auto_is_bitwise_identical(tmp_path, reference):
    root = tmp_path / "runs"
    proc = start_training(root, *ARGS)
    wait_for_step(root, 24, proc)  # after the step-21 checkpoint, in the middle of epoch 2
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    run_dir = only_run_dir(root)
    assert not (run_dir / "checkpoints" / "final.ckpt").exists()

    # What a requeued job runs: the same command line, with --resume auto.
    resumed = run_script("train.py", "--root_dir", str(root), "--resume", "auto", *ARGS)
    assert resumed.returncode == 0, resumed.stderr
    assert f"--resume auto: resuming the newest unfinished run {run_dir}" in resumed.stdout
    assert only_run_dir(root) == run_dir
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_saves_exits_with_documented_code_and_resumes_bitwise(tmp_path, reference, signum, exit_code):
    root = tmp_path / "runs"
    proc = start_training(root, *ARGS)
    wait_for_step(root, 30, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == exit_code, err
    run_dir = only_run_dir(root)
    assert f"Stopped by {signal.Signals(signum).name}: checkpoint saved. Continue with: python train.py " \
           f"--resume {run_dir}" in out
    newest = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))[-1]
    saved_step = torch.load(newest, weights_only=True)["global_step"]
    assert saved_step >= 30 and not (run_dir / "checkpoints" / "final.ckpt").exists()

    _resume(run_dir)
    assert_same_run(run_dir, reference)


def test_sigusr1_with_requeue_calls_scontrol_requeue(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    calls = tmp_path / "scontrol_calls"
    (fake_bin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (fake_bin / "scontrol").chmod(0o755)
    root = tmp_path / "runs"
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    proc = start_training(root, *ARGS, "--requeue", env=env)
    wait_for_step(root, 6, proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 138, err
    assert calls.read_text() == "requeue 4242\n"
    assert list((only_run_dir(root) / "checkpoints").glob("step-*.ckpt"))


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, reference, capfd):
    run_dir = train_in_process(tmp_path, *ARGS)
    (run_dir / "checkpoints" / "final.ckpt").unlink()  # as if killed just before the end
    newest = sorted((run_dir / "checkpoints").glob("step-*.ckpt"))[-1]
    newest.write_bytes(newest.read_bytes()[:1000])
    capfd.readouterr()
    _resume(run_dir)
    out, err = capfd.readouterr()
    assert f"warning: skipping an unloadable checkpoint: cannot load checkpoint {newest}" in err
    assert "Resuming" in out and "from step-00000077.ckpt" in out
    assert_same_run(run_dir, reference)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_a_malicious_pickle_is_refused_not_run(tmp_path):
    run_dir = train_in_process(tmp_path / "runs", "--epochs", "2")
    marker = tmp_path / "PWNED"
    exploit = _Exploit()
    exploit.marker = marker
    evil = run_dir / "checkpoints" / "step-99999999.ckpt"  # the newest, so resume tries it first
    evil.write_bytes(pickle.dumps({"model": exploit}))
    (run_dir / "checkpoints" / "final.ckpt").unlink()

    result = run_script("test.py", "--out_dir", str(run_dir), "--checkpoint", str(evil))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (f"error: cannot load checkpoint {evil}: it holds objects other than tensors and "
                                     "plain Python values, and loading it could run code: refused")
    _resume(run_dir, "--epochs", "3")  # skips it with a warning and resumes from the newest real checkpoint
    assert not marker.exists()
    assert torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)["epoch"] == 3


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    root = tmp_path / "runs"
    # SGD at lr 20, warmed up over 2 epochs: the loss explodes after a dozen or so steps.
    result = run_script("train.py", "--root_dir", str(root), "--optimizer", "sgd", "--lr", "20", "--warmup", "2",
                        "--grad_clip", "0", "--epochs", "3", "--checkpoint_every_n_steps", "2", "--log_interval", "1")
    assert result.returncode == 3 and "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: the (training loss is (nan|inf)|weights are not finite) at step (\d+).*", last_line)
    assert match and "the newest checkpoint holds the last finite weights" in last_line, last_line
    checkpoints = list((only_run_dir(root) / "checkpoints").glob("step-*.ckpt"))
    assert checkpoints, "the run should have saved good checkpoints before diverging"
    for ckpt in checkpoints:  # every checkpoint written holds finite weights, from before the failure
        assert all(t.isfinite().all() for t in model_weights(ckpt).values()), ckpt.name
        assert torch.load(ckpt, weights_only=True)["global_step"] < int(match.group(3))


def test_resume_auto_without_a_run_or_after_a_finished_one_starts_a_new_run(tmp_path, capsys):
    from config import parse_train_config

    assert parse_train_config(["--root_dir", str(tmp_path), "--resume", "auto"]).resume == ""
    assert f"--resume auto: no run named *-run under {tmp_path}: starting a new run" in capsys.readouterr().out

    finished = train_in_process(tmp_path, "--fast_run")
    os.environ.pop("TEMPLATE_AUTO_RESUME_DIR")
    assert parse_train_config(["--root_dir", str(tmp_path), "--resume", "auto"]).resume == ""
    assert f"the newest run {finished} has finished: starting a new run" in capsys.readouterr().out

    os.environ.pop("TEMPLATE_AUTO_RESUME_DIR")
    (finished / "checkpoints" / "final.ckpt").unlink()  # now it looks interrupted
    cfg = parse_train_config(["--root_dir", str(tmp_path), "--resume", "auto"])
    assert cfg.resume == str(finished) and cfg.fast_run  # its saved config is used
