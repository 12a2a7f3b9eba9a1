"""The benchmark runs and reports; the speed options keep the numbers right. (Task tier: the benchmark and these
options are measured on the default CNN and digits. Timings live in benchmarks/overhead.py and the README.)"""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, model_weights, run_cli

pytestmark = pytest.mark.slow


def train_in_process(root, *args: str):
    """train.py's cli() in this process, as `python train.py --root_dir ROOT ARGS` runs it; returns RUN_DIR."""
    before = set(root.iterdir()) if root.exists() else set()
    assert run_cli("train", "--root_dir", str(root), *args) == 0
    (run_dir,) = set(root.iterdir()) - before
    return run_dir


def test_overhead_benchmark_runs_and_writes_its_json(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "overhead.py"),
            "--epochs",
            "2",
            "--repeats",
            "1",
            "--name",
            "tiny",
            "--results_dir",
            str(tmp_path),
            "--startup_repeats",
            "0",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "tiny.json").read_text())
    steps = report["steps_per_sec"]
    assert set(steps) == {"raw", "template", "trainer"} and all(v > 0 for v in steps.values())
    assert report["template_vs_raw"] == pytest.approx(steps["template"] / steps["raw"])
    assert report["template_vs_trainer"] == pytest.approx(steps["template"] / steps["trainer"])
    for name, per_second in steps.items():  # one round: median, min and max are that round's
        assert report["ms_per_step"][name] == pytest.approx(
            dict.fromkeys(("median", "min", "max"), 1000 / per_second)
        )
    for name in ("template", "trainer"):
        assert report[f"{name}_minus_raw_ms_per_step"]["median"] == pytest.approx(
            1000 / steps[name] - 1000 / steps["raw"]
        )
    assert report["startup_seconds"] == {
        "help": None,
        "bad_flag": None,
        "default_run": None,
    }  # skipped here
    assert 0 < report["data_wait_fraction"] < 1 and 0 < report["checkpoint_fraction"] < 1
    assert report["checkpoint_writer_seconds"] > 0 and 0 < report["checkpoint_writer_fraction"] < 1
    assert report["versions"]["torch"] == torch.__version__
    assert "| template |" in result.stdout and "template/raw" in result.stdout


def test_augmentation_benchmark_times_the_step_with_and_without_it(tmp_path):
    out = tmp_path / "augmentation.json"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "augmentation.py"),
            "--batch_size",
            "16",
            "--rounds",
            "1",
            "--device",
            "cpu",
            "--models",
            "cnn",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (
        set(report["models"]) == {"cnn"} and report["batch_size"] == 16
    )  # resnet18_cifar: seconds a step here
    for name, timing in report["models"].items():
        assert (
            timing["step_ms_augment_on"] > 0
            and timing["step_ms_augment_off"] > 0
            and timing["augmentation_ms"] > 0
        )
        assert timing["augmentation_share_of_step"] == pytest.approx(
            timing["augmentation_ms"] / timing["step_ms_augment_on"]
        )
        assert f"{name}: step {timing['step_ms_augment_on']:.1f} ms with --augment" in result.stdout


def test_startup_is_timed_as_a_whole_process():
    from benchmarks.overhead import startup_seconds

    seconds = startup_seconds([sys.executable, "-c", "import time; time.sleep(0.3)"], repeats=3)
    assert 0.3 < seconds < 10 and startup_seconds([sys.executable, "-c", "pass"], repeats=0) is None


def test_channels_last_trains_the_same_model_in_channels_last_memory(tmp_path):
    plain = model_weights(
        train_in_process(tmp_path / "plain", "--fast_run") / "checkpoints" / "final.ckpt"
    )
    weights = model_weights(
        train_in_process(tmp_path / "cl", "--fast_run", "--channels_last")
        / "checkpoints"
        / "final.ckpt"
    )
    conv = weights[
        "features.2.weight"
    ]  # (64, 32, 3, 3): saved with the strides it was trained with
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert not plain["features.2.weight"].is_contiguous(memory_format=torch.channels_last)
    assert max((weights[k] - plain[k]).abs().max().item() for k in plain) < 1e-4  # the same math


def test_compiled_model_checkpoints_load_into_a_plain_one(tmp_path):
    run_dir = train_in_process(tmp_path, "--fast_run", "--compile")
    weights = model_weights(run_dir / "checkpoints" / "final.ckpt")
    assert not any(
        k.startswith("_orig_mod") for k in weights
    )  # test.py and resume need the plain names
    assert run_cli("test", "--out_dir", str(run_dir), "--checkpoint", "final") == 0
