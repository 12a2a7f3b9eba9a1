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


def test_activation_checkpointing_gives_the_same_training_with_the_same_checkpoint_keys(tmp_path):
    # Dropout sits inside the CNN's classifier block: the recomputation must replay the same masks.
    args = ["--fast_run", "--dropout", "0.5", "--precision", "64-true"]
    plain = model_weights(
        train_in_process(tmp_path / "plain", *args) / "checkpoints" / "final.ckpt"
    )
    recomputed_run = train_in_process(
        tmp_path / "ac", *args, "--activation_checkpointing", "--ema_decay", "0.9"
    )
    recomputed = model_weights(recomputed_run / "checkpoints" / "final.ckpt")
    assert (
        recomputed.keys() == plain.keys()
    )  # no wrapper names: test.py and resume see the plain model
    from machinery.ema import averaged_weights  # nor in the EMA's names (--init_from matches them)

    assert (
        averaged_weights(torch.load(recomputed_run / "checkpoints" / "final.ckpt")).keys()
        == plain.keys()
    )
    assert all(
        torch.equal(recomputed[k], plain[k]) for k in plain
    )  # the same gradients, to the bit
    assert run_cli("test", "--out_dir", str(recomputed_run), "--checkpoint", "final") == 0


def test_activation_checkpointing_recomputes_each_block_in_the_backward_pass():
    from functools import partial

    from torch.utils.checkpoint import checkpoint

    from data import DataInfo
    from machinery.launch import checkpoint_activations
    from model import build_model
    from task_config import ArchConfig

    model = build_model(ArchConfig(), DataInfo(10, 1, ()))
    blocks = {name: type(block).__name__ for name, block in model.named_children()}
    keys = list(model.state_dict())
    checkpoint_activations(model)
    # Each block with parameters has its forward wrapped (the block itself stays): the same modules, the same
    # state dict keys; the parameter-free augment module is left alone.
    assert {name: type(block).__name__ for name, block in model.named_children()} == blocks
    assert list(model.state_dict()) == keys
    wrapped = {
        name: isinstance(block.forward, partial) and block.forward.func is checkpoint
        for name, block in model.named_children()
    }
    assert wrapped == {"augment": False, "features": True, "classifier": True}
    assert all(
        block.forward.keywords == {"use_reentrant": False}
        for name, block in model.named_children()
        if wrapped[name]
    )
    forwards = []  # a block's forward runs again during backward: that is the recomputation
    conv = model.features[0]
    conv.forward = lambda x, forward=conv.forward: forwards.append(True) or forward(x)
    model(torch.randn(2, 1, 8, 8)).sum().backward()
    assert len(forwards) == 2
