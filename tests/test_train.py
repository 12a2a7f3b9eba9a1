"""End to end: train.py and test.py as a user runs them, checkpoints, resume, and the numbers they report."""

import csv
import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import REPO, model_weights, only_run_dir, run_cli, run_script, snapshot, train_in_process

from tests.test_data import write_tiny_mnist

pytestmark = pytest.mark.slow
STEPS_PER_EPOCH = 20  # digits: 1295 training samples // eff_batch_size 64


def test_default_run_trains_and_test_py_reports_accuracy(default_run):
    run_dir, result = default_run
    assert result.stdout.count(f"Run dir: {run_dir}") == 2  # at the start and at the end
    ckpts = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert ckpts == {"best.ckpt", "final.ckpt", "step-00000160.ckpt", "step-00000180.ckpt", "step-00000200.ckpt"}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["epochs"] == 10
    assert (run_dir / "logs" / "csv" / "metrics.csv").is_file()

    test = run_script("test.py", "--out_dir", str(run_dir))
    assert test.returncode == 0, test.stderr
    metrics = json.loads((run_dir / "test" / "metrics.json").read_text())
    assert metrics["acc"] >= 0.97
    assert metrics["num_samples"] == 359 and metrics["checkpoint"].endswith("best.ckpt")
    assert f"accuracy  {metrics['acc']:.4f}" in test.stdout and f"macro_f1  {metrics['macro_f1']:.4f}" in test.stdout
    # Per-class numbers agree with the confusion matrix and with the overall accuracy.
    matrix = torch.tensor(metrics["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 359
    assert matrix.trace().item() / 359 == pytest.approx(metrics["acc"])
    assert [c["support"] for c in metrics["per_class"].values()] == matrix.sum(1).tolist()
    assert metrics["per_class"]["3"]["recall"] == pytest.approx(matrix[3, 3].item() / matrix[3].sum().item())
    assert f"{'3':>12}  {metrics['per_class']['3']['precision']:9.4f}" in test.stdout
    for png in ["curves.png", "test/confusion_matrix.png", "test/misclassified.png"]:
        assert_real_png(run_dir / png)


def assert_real_png(path):
    """A PNG that decodes to a picture with something in it, not a blank canvas."""
    import matplotlib.image

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = matplotlib.image.imread(path)
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100 and pixels[..., :3].std() > 0.05, path


def test_output_to_a_file_gets_plain_progress_lines(default_run):
    _, result = default_run  # stdout and stderr were pipes, as in CI or a SLURM log
    assert "epoch 1 step 10/200 loss " in result.stdout and " samples/s eta " in result.stdout
    assert "\r" not in result.stdout + result.stderr  # no redrawn bar
    assert "  best val acc " in result.stdout and "at epoch" in result.stdout and "curves:" in result.stdout


def test_a_terminal_gets_a_progress_bar(tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a 160-column terminal
    proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--root_dir", str(tmp_path), "--epochs", "2"],
                            stdout=slave, stderr=slave, cwd=REPO)
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
    assert "train:" in text and "40/40" in text and "samples_per_s=" in text and "\r" in text
    assert "epoch 1 step 10/40" not in text  # no plain lines in a terminal


def test_curves_are_redrawn_after_a_resume_from_the_whole_run(tmp_path):
    run_dir = train_in_process(tmp_path, "--epochs", "2")
    first = (run_dir / "curves.png").read_bytes()
    import utils
    from config import parse_train_config
    from train import main

    utils.make_fabric("cpu", "1").launch(main, parse_train_config(["--resume", str(run_dir), "--epochs", "3"]))
    assert (run_dir / "curves.png").read_bytes() != first
    from plots import read_metrics

    assert [step for step, _ in read_metrics(run_dir)["val/acc"]] == [20, 40, 60]  # both parts of the run
    assert_real_png(run_dir / "curves.png")


def test_test_py_evaluates_the_weights_it_is_asked_for(default_run):
    run_dir, _ = default_run
    for which, step in [("final", 200), ("last", 200), (str(run_dir / "checkpoints" / "step-00000160.ckpt"), 160)]:
        assert run_cli("test", "--out_dir", str(run_dir), "--checkpoint", which) == 0
        assert json.loads((run_dir / "test" / "metrics.json").read_text())["global_step"] == step


def test_fabric_demo_usage_works_verbatim(tmp_path):
    result = run_script("train.py", "--log_per_epoch", "4", "--logger_name", "tensorboard", "csv",
                        "--checkpoint_frequency", "5", "--comment", "concise comment for current run",
                        "--root_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    assert list((run_dir / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    rows = list(csv.DictReader(open(run_dir / "logs" / "csv" / "metrics.csv")))
    train_steps = [int(r["step"]) for r in rows if r["train/loss"]]
    assert train_steps == list(range(5, 201, 5))  # 4 times in each 20-step epoch
    assert [int(r["step"]) for r in rows if r["val/acc"]] == list(range(20, 201, 20))
    assert {p.name for p in (run_dir / "checkpoints").glob("step-*")} == {"step-00000100.ckpt", "step-00000200.ckpt"}
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["comment"] == "concise comment for current run"
    test = run_script("test.py", "--out_dir", str(run_dir))
    assert test.returncode == 0 and "accuracy" in test.stdout


def test_rotation_keeps_the_newest_periodic_checkpoints_plus_best_and_final(tmp_path):
    run_dir = train_in_process(tmp_path, "--epochs", "6", "--checkpoint_frequency", "1", "--num_checkpoint_keep", "2")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.ckpt", "final.ckpt", "step-00000100.ckpt", "step-00000120.ckpt"]


def test_checkpoints_load_with_weights_only_and_hold_what_resume_needs(tmp_path):
    run_dir = train_in_process(tmp_path, "--fast_run")
    ckpt = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "epoch", "global_step", "rng", "config", "logger_ids"} <= set(ckpt)
    assert ckpt["epoch"] == 1 and ckpt["global_step"] == 2 and ckpt["scheduler"]["last_epoch"] == 2
    assert ckpt["config"]["root_dir"] == str(tmp_path)
    assert not list((run_dir / "checkpoints").glob(".*tmp"))  # no temporary file left behind


def test_two_accumulated_micro_batches_of_32_equal_one_batch_of_64(tmp_path, capsys):
    args = ["--epochs", "1", "--dropout", "0", "--eff_batch_size", "64", "--checkpoint_every_n_steps", "1",
            "--num_checkpoint_keep", "100"]
    accumulated = train_in_process(tmp_path / "a", *args, "--max_batch_size_per_device", "32")
    assert "1 device(s) x 32 samples x 2 accumulation step(s) = 64" in capsys.readouterr().out
    single = train_in_process(tmp_path / "b", *args, "--max_batch_size_per_device", "64")
    assert "1 device(s) x 64 samples x 1 accumulation step(s) = 64" in capsys.readouterr().out
    def max_diff(name: str) -> float:
        a, b = model_weights(accumulated / "checkpoints" / name), model_weights(single / "checkpoints" / name)
        return max((a[k] - b[k]).abs().max().item() for k in a)

    assert max_diff("step-00000001.ckpt") < 1e-6  # the same update
    assert max_diff("final.ckpt") < 1e-5  # and after 20 of them (Adam amplifies float-order differences)


def test_sigkill_after_epoch_3_checkpoint_then_resume_is_bitwise_identical(tmp_path):
    args = ["--epochs", "6", "--checkpoint_frequency", "1", "--dropout", "0.2"]
    reference = train_in_process(tmp_path / "reference", *args)

    root = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "train.py"), "--root_dir", str(root), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
    epoch3 = f"step-{3 * STEPS_PER_EPOCH:08d}.ckpt"
    deadline = time.time() + 120
    while not list(root.glob(f"*/checkpoints/{epoch3}")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "training ended before it could be killed"
    run_dir = only_run_dir(root)
    assert not (run_dir / "checkpoints" / "final.ckpt").exists()

    resumed = run_script("train.py", "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout and only_run_dir(root) == run_dir  # no new run dir
    final, expected = model_weights(run_dir / "checkpoints" / "final.ckpt"), model_weights(
        reference / "checkpoints" / "final.ckpt")
    assert final.keys() == expected.keys()
    assert all(torch.equal(final[k], expected[k]) for k in final)
    # The CSV log reads as one run: the rows from before the kill are kept, and no step appears twice.
    rows = list(csv.DictReader(open(run_dir / "logs" / "csv" / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r["train/loss"]] == list(range(10, 121, 10))
    assert [int(r["step"]) for r in rows if r["val/acc"]] == list(range(20, 121, 20))


def test_resume_cannot_change_the_model_and_touches_nothing(tmp_path):
    run_dir = train_in_process(tmp_path, "--fast_run")
    before = snapshot(tmp_path)
    result = run_script("train.py", "--resume", str(run_dir), "--model", "resnet18", "--dataset", "mnist")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        "error: --resume cannot change --dataset 'digits' -> 'mnist', --model 'cnn' -> 'resnet18': "
        "the checkpoint would not fit. Start a new run instead")
    assert snapshot(tmp_path) == before


def test_resume_can_extend_training_and_a_finished_run_says_so(tmp_path, capsys):
    run_dir = train_in_process(tmp_path, "--epochs", "2")
    before = snapshot(tmp_path)
    import utils
    from config import parse_train_config
    from train import main

    cfg = parse_train_config(["--resume", str(run_dir)])
    utils.make_fabric("cpu", "1").launch(main, cfg)
    assert "already finished its 2 epochs" in capsys.readouterr().out
    assert snapshot(tmp_path) == before

    cfg = parse_train_config(["--resume", str(run_dir), "--epochs", "3"])
    utils.make_fabric("cpu", "1").launch(main, cfg)
    final = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)
    assert final["epoch"] == 3 and final["config"]["optim"]["epochs"] == 3  # the resumed run's config, not the old
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["epochs"] == 3
    assert only_run_dir(tmp_path) == run_dir


def test_a_new_run_never_touches_earlier_runs(tmp_path):
    first = train_in_process(tmp_path, "--fast_run")
    before = snapshot(first)
    second = train_in_process(tmp_path, "--fast_run")  # same out_dir, most likely the same second
    assert second != first and second.parent == first.parent
    assert snapshot(first) == before


def test_mnist_trains_end_to_end_on_tiny_offline_files(tmp_path):
    write_tiny_mnist(tmp_path / "data", num_train=700, num_test=100)
    run_dir = train_in_process(tmp_path / "runs", "--dataset", "mnist", "--data_dir", str(tmp_path / "data"),
                               "--epochs", "3", "--eff_batch_size", "32")
    ckpt = torch.load(run_dir / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt["best_val_acc"] >= 0.9  # the bright row makes this easy, so it must be learned


def test_wandb_logs_offline_into_the_run_dir(tmp_path):
    result = run_script("train.py", "--fast_run", "--logger_name", "wandb", "csv", "--root_dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    run_dir = only_run_dir(tmp_path)
    (wandb_run,) = (run_dir / "logs" / "wandb").glob("offline-run-*")
    assert wandb_run.name.endswith(run_dir.name)  # the run id, reused on resume
    assert (run_dir / "logs" / "csv" / "metrics.csv").is_file()
