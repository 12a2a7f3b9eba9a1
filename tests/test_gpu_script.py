"""benchmarks/gpu.py, as a user runs it: the dry run on the CPU (the same code path as on a GPU, tiny sizes: the
runs, the parsing of train.py's outputs, the table and the JSON), and its refusal to run without a GPU. (Task
tier: the benchmark runs the template's own datasets and models.)"""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

from benchmarks.gpu import CONFIGS, DRY_RUN, steady_state, table, throughput

GPU_SCRIPT = [sys.executable, str(REPO / "benchmarks" / "gpu.py")]


@pytest.mark.slow
def test_dry_run_reports_every_configuration_in_its_table_and_json(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [*GPU_SCRIPT, "--dry_run", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "WANDB_MODE": "offline"},
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert (
        report["dry_run"] is True and "dry run" in report["device"] and report["versions"]["torch"]
    )
    assert set(report["throughput"]) == set(CONFIGS)
    ran = {name: r for name, r in report["throughput"].items() if "skipped" not in r}
    assert set(ran) == {
        name for name in CONFIGS if "--compile" not in name
    }  # compiling is skipped on the CPU
    batch = report["setting"]["eff_batch_size"]
    for name, r in ran.items():
        assert r["samples_per_sec"] > 0 and r["ms_per_step"] > 0 and r["process_seconds"] > 0, name
        # train.py gives ThroughputMonitor samples = optimizer steps x batch, and both rates come from the same
        # window, so every row has samples/s = batch x steps/s exactly, and so do the medians of the two columns.
        # 0.1% leaves room only for float rounding: another column, row or batch size would be far off.
        assert r["ms_per_step"] == pytest.approx(1000 * batch / r["samples_per_sec"], rel=1e-3), (
            name
        )
        assert r["mfu"] is None  # Lightning knows no CPU's peak FLOPs
        assert (
            r["finished"]["steps"] == DRY_RUN["steps"] == report["setting"]["steps"]
        )  # --synthetic_size fits
        assert r["windows"] >= 2  # a median of steady-state windows, the warm-up window left out
    tta = report["time_to_accuracy"]
    assert tta["process_seconds"] > 0 and tta["threshold"] == DRY_RUN["threshold"]
    if tta["reached"]:
        assert tta["step"] > 0 and tta["val_acc"] >= tta["threshold"]
        assert 0 < tta["seconds_to_threshold"] < tta["process_seconds"]
    else:
        assert (
            tta["step"] is None
            and tta["seconds_to_threshold"] is None
            and tta["best_val_acc"] < tta["threshold"]
        )
    lines = result.stdout.splitlines()
    assert report["device"] in lines[0] and report["versions"]["torch"] in lines[0]
    for name in CONFIGS:
        assert len([line for line in lines if line.startswith(f"| {name} |")]) == 1, name
    assert (
        any(line.startswith("Time to accuracy") for line in lines)
        and f"Wrote {out}" in result.stdout
    )


def test_without_a_gpu_it_exits_2_with_a_one_line_error(tmp_path):
    result = subprocess.run(
        [*GPU_SCRIPT, "--out", str(tmp_path / "gpu.json")],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )  # hides any GPU
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: ") and "GPU" in line and "--dry_run" in line
    assert not (tmp_path / "gpu.json").exists()


def test_steady_state_leaves_out_the_first_window_and_blank_rows():
    rows = [  # the layout of train.py's CSV log: rates blank until the monitor's window is full, val rows apart
        {"device/samples_per_sec": "", "device/batches_per_sec": "", "step": "10", "val/acc": ""},
        {"device/samples_per_sec": "", "device/batches_per_sec": "", "step": "20", "val/acc": ""},
        {
            "device/samples_per_sec": "100",
            "device/batches_per_sec": "1",
            "step": "30",
            "val/acc": "",
        },  # warm-up
        {
            "device/samples_per_sec": "3000",
            "device/batches_per_sec": "30",
            "step": "40",
            "val/acc": "",
        },
        {
            "device/samples_per_sec": "",
            "device/batches_per_sec": "",
            "step": "40",
            "val/acc": "0.5",
        },
        {
            "device/samples_per_sec": "2000",
            "device/batches_per_sec": "20",
            "step": "50",
            "val/acc": "",
        },
        {
            "device/samples_per_sec": "5000",
            "device/batches_per_sec": "50",
            "step": "60",
            "val/acc": "",
        },
    ]
    assert steady_state(rows) == {
        "samples_per_sec": 3000,
        "ms_per_step": 1000 / 30,
        "mfu": None,
        "windows": 3,
    }
    with_mfu = [
        {**row, "device/mfu": "0.25" if row["device/samples_per_sec"] else ""} for row in rows
    ]
    assert steady_state(with_mfu)["mfu"] == 0.25
    with pytest.raises(ValueError, match="--steps"):
        steady_state(rows[:3])


def test_table_shows_mfu_a_failed_run_and_a_threshold_not_reached():
    """What only a GPU (MFU) or a failure would show, which the dry run cannot."""
    failed = throughput(
        {
            "returncode": 1,
            "seconds": 3.0,
            "lines": [(1.0, "Traceback ..."), (2.0, "RuntimeError: OOM")],
            "rows": [],
        }
    )
    assert failed == {
        "error": "train.py exited with code 1: RuntimeError: OOM",
        "process_seconds": 3.0,
    }
    report = {
        "device": "NVIDIA H100 80GB HBM3",
        "versions": {"torch": "2.14.1+cu130", "lightning": "2.6.6"},
        "setting": {"model": "resnet18_cifar", "eff_batch_size": 512, "steps": 200},
        "throughput": {
            "bf16-mixed": {
                "samples_per_sec": 25600.0,
                "ms_per_step": 20.0,
                "mfu": 0.123,
                "process_seconds": 30.0,
            },
            "bf16-mixed --compile": failed,
        },
        "time_to_accuracy": {
            "threshold": 0.97,
            "reached": False,
            "best_val_acc": 0.95,
            "process_seconds": 9.0,
        },
    }
    lines = table(report).splitlines()
    assert lines[0] == (
        "## NVIDIA H100 80GB HBM3 | torch 2.14.1+cu130, lightning 2.6.6 | resnet18_cifar, batch 512, "
        "200 steps"
    )
    assert "| bf16-mixed | 25600 | 20.00 | 12.3% | 30.0 |" in lines
    assert (
        "| bf16-mixed --compile | train.py exited with code 1: RuntimeError: OOM | | | |" in lines
    )
    assert (
        lines[-1]
        == "Time to accuracy, digits + cnn, val/acc >= 0.97: not reached (best 0.9500); process wall 9.0 s"
    )
