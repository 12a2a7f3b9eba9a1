"""What train.py does on one GPU: throughput on CIFAR-shaped data, and time to accuracy on real data.

    python benchmarks/gpu.py                 # one CUDA GPU, a few minutes (most of it is --compile compiling)
    python benchmarks/gpu.py --dry_run       # the same code path on the CPU with tiny sizes, ~30 s: no numbers

Every run is `python train.py ...` as a separate process, as a user runs it, with a fresh --root_dir:

1. Throughput: --dataset synthetic_cifar10 --model resnet18_cifar (crop + flip on the device), --eff_batch_size
   512 in one micro-batch, --steps optimizer steps in one epoch (no validation inside the measured part), at
   --precision 32-true, bf16-mixed, bf16-mixed with --compile, --channels_last, and both. Read from the run's
   CSV log (RUN_DIR/logs/csv/metrics.csv), the columns Lightning's ThroughputMonitor writes (each a rate over
   the last two log intervals): samples/s and ms/step are the medians of device/samples_per_sec and
   device/batches_per_sec after the first window (warm-up: cuDNN autotuning, the first steps after compiling);
   MFU is device/mfu (only on GPUs whose peak FLOPs Lightning knows). Also the process's wall time (start-up,
   compiling, the final validation and checkpoints included) and train.py's own "Finished ..." line.
2. Time to accuracy: the default run (--dataset digits, real data bundled with scikit-learn, --model cnn) on the
   GPU: the first validation step where val/acc >= --threshold (from the CSV log), the seconds from launching the
   process to the line that printed it, and the process's wall time.

Prints a markdown table and writes a JSON file (--out; default benchmarks/results/gpu-<gpu name>.json).
"""

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data import VAL_FRACTION  # noqa: E402  (the share of --synthetic_size that becomes the validation split)

CONFIGS = {  # name: train.py flags
    "32-true": ["--precision", "32-true"],
    "bf16-mixed": ["--precision", "bf16-mixed"],
    "bf16-mixed --compile": ["--precision", "bf16-mixed", "--compile"],
    "bf16-mixed --channels_last": ["--precision", "bf16-mixed", "--channels_last"],
    "bf16-mixed --compile --channels_last": [
        "--precision",
        "bf16-mixed",
        "--compile",
        "--channels_last",
    ],
}
GPU = {
    "accelerator": "cuda",
    "model": "resnet18_cifar",
    "batch": 512,
    "steps": 200,
    "threshold": 0.97,
    "epochs": 10,
}
# The dry run: a small CNN, batch 16, 6 steps, and 2 epochs of digits (val/acc 0.86 at epoch 2 on a CPU).
DRY_RUN = {
    "accelerator": "cpu",
    "model": "cnn",
    "batch": 16,
    "steps": 6,
    "threshold": 0.8,
    "epochs": 2,
}
DRY_RUN_SKIPS = {
    "--compile": "not in the dry run: compiling took ~40 s per run on a 2-core CPU (cold cache)"
}
FINISHED = re.compile(r"Finished (\d+) steps in ([\d.]+)s \(([\d.]+) steps/s, (\d+) samples/s")


def run_train(flags: list[str]) -> dict[str, Any]:
    """`python train.py FLAGS` in a fresh root dir: its wall time, its output lines (each with the seconds since
    launch when it was printed), its exit code, the rows of its CSV log and its provenance (versions, devices)."""
    with tempfile.TemporaryDirectory() as root:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "WANDB_MODE": "offline",
        }  # lines arrive when printed
        start = time.perf_counter()
        process = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "train.py"),
                *flags,
                "--root_dir",
                root,
                "--logger_name",
                "csv",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=env,
        )
        lines = [(time.perf_counter() - start, line.rstrip("\n")) for line in process.stdout]
        returncode, seconds = process.wait(), time.perf_counter() - start
        # The one run dir, YYYYmmdd-HHMMSS-run; root itself (empty) if train.py failed before making it.
        run_dir = next(Path(root).iterdir(), Path(root))
        log, provenance = run_dir / "logs" / "csv" / "metrics.csv", run_dir / "provenance.yaml"
        rows = list(csv.DictReader(log.open())) if log.is_file() else []
        launches = yaml.safe_load(provenance.read_text()) if provenance.is_file() else [{}]
    return {
        "seconds": seconds,
        "lines": lines,
        "returncode": returncode,
        "rows": rows,
        "provenance": launches[-1],
    }


def failure(run: dict[str, Any]) -> str:
    tail = [line for _, line in run["lines"] if line.strip()][-1:] or ["no output"]
    return f"train.py exited with code {run['returncode']}: {tail[0]}"


def column(rows: list[dict[str, str]], name: str) -> list[float]:
    """The logged values of a CSV column, in order: rows where it is blank (other log calls) left out."""
    return [float(row[name]) for row in rows if row.get(name)]


def steady_state(rows: list[dict[str, str]]) -> dict[str, Any]:
    """Medians of the throughput windows after the first (warm-up). ThroughputMonitor logs `device/...` per device
    and, on more than one device, the totals without the prefix; one device here."""
    prefix = "" if any("samples_per_sec" in row for row in rows[:1]) else "device/"
    samples = column(rows, f"{prefix}samples_per_sec")[1:]
    if not samples:
        raise ValueError("fewer than two throughput windows in the CSV log: pass a larger --steps")
    mfu = column(rows, f"{prefix}mfu")[1:]
    return {
        "samples_per_sec": statistics.median(samples),
        "ms_per_step": 1000 / statistics.median(column(rows, f"{prefix}batches_per_sec")[1:]),
        "mfu": statistics.median(mfu) if mfu else None,
        "windows": len(samples),
    }


def finished_line(lines: list[tuple[float, str]]) -> dict[str, float] | None:
    """train.py's summary: 'Finished N steps in Xs (S steps/s, R samples/s, with validation and checkpoints)'."""
    for _, line in lines:
        if match := FINISHED.search(line):
            steps, seconds, _, samples = match.groups()
            return {
                "steps": int(steps),
                "seconds": float(seconds),
                "samples_per_sec": float(samples),
            }
    return None


def throughput(run: dict[str, Any]) -> dict[str, Any]:
    if run["returncode"] != 0:
        return {"error": failure(run), "process_seconds": run["seconds"]}
    return {
        **steady_state(run["rows"]),
        "process_seconds": run["seconds"],
        "finished": finished_line(run["lines"]),
    }


def time_to_accuracy(run: dict[str, Any], threshold: float) -> dict[str, Any]:
    """The first validation with val/acc >= threshold (CSV log), and when its line was printed (seconds since
    the process was launched, start-up included)."""
    result = {
        "threshold": threshold,
        "process_seconds": run["seconds"],
        "finished": finished_line(run["lines"]),
    }
    if run["returncode"] != 0:
        return {**result, "error": failure(run)}
    validations = [row for row in run["rows"] if row.get("val/acc")]
    reached = next((row for row in validations if float(row["val/acc"]) >= threshold), None)
    result["best_val_acc"] = max(float(row["val/acc"]) for row in validations)
    if reached is None:
        return {**result, "reached": False, "step": None, "seconds_to_threshold": None}
    step, epoch = int(reached["step"]), int(float(reached["epoch"]))
    printed = [
        t for t, line in run["lines"] if re.match(rf"epoch {epoch}/\d+ step {step} val ", line)
    ]
    return {
        **result,
        "reached": True,
        "step": step,
        "epoch": epoch,
        "val_acc": float(reached["val/acc"]),
        "seconds_to_threshold": printed[0] if printed else None,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"## {report['device']} | torch {report['versions']['torch']}, lightning {report['versions']['lightning']}"
        f" | {report['setting']['model']}, batch {report['setting']['eff_batch_size']}, "
        f"{report['setting']['steps']} steps",
        "",
        "| configuration | samples/s | ms/step | MFU | process wall s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in report["throughput"].items():
        if "skipped" in r or "error" in r:
            lines.append(f"| {name} | {r.get('skipped') or r['error']} | | | |")
        else:
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            lines.append(
                f"| {name} | {r['samples_per_sec']:.0f} | {r['ms_per_step']:.2f} | {mfu} | "
                f"{r['process_seconds']:.1f} |"
            )
    tta = report["time_to_accuracy"]
    if "error" in tta:
        outcome = tta["error"]
    elif tta["reached"]:
        when = tta["seconds_to_threshold"]  # None if its line was not found in the output
        outcome = (
            f"reached at step {tta['step']} (epoch {tta['epoch']}, val/acc {tta['val_acc']:.4f}), "
            + ("?" if when is None else f"{when:.1f}")
            + " s after launch"
        )
    else:
        outcome = f"not reached (best {tta['best_val_acc']:.4f})"
    lines += [
        "",
        f"Time to accuracy, digits + cnn, val/acc >= {tta['threshold']}: {outcome}; "
        f"process wall {tta['process_seconds']:.1f} s",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="on the CPU, tiny sizes: checks the script, not a GPU",
    )
    parser.add_argument(
        "--steps", type=int, help=f"optimizer steps per throughput run ({GPU['steps']})"
    )
    parser.add_argument(
        "--threshold", type=float, help=f"val/acc of the time-to-accuracy run ({GPU['threshold']})"
    )
    parser.add_argument(
        "--out", type=Path, help="JSON file (default benchmarks/results/gpu-<gpu name>.json)"
    )
    args = parser.parse_args()
    if args.steps is not None and args.steps < 4:
        parser.error(
            "--steps must be at least 4: throughput needs 3 log steps, and the first window is warm-up"
        )
    if not args.dry_run:
        import torch  # the runs themselves say which versions and devices they used

        if not torch.cuda.is_available():
            print(
                "error: no CUDA GPU found (torch.cuda.is_available() is False): this benchmark needs one; "
                "python benchmarks/gpu.py --dry_run checks the script on the CPU",
                file=sys.stderr,
            )
            sys.exit(2)
    setting = dict(DRY_RUN if args.dry_run else GPU)
    setting["steps"], setting["threshold"] = (
        args.steps or setting["steps"],
        args.threshold or setting["threshold"],
    )
    batch, steps = setting["batch"], setting["steps"]
    device = ["--accelerator", setting["accelerator"], "--devices", "1"]
    common = [
        *device,
        "--dataset",
        "synthetic_cifar10",
        "--model",
        setting["model"],
        "--epochs",
        "1",
        "--eff_batch_size",
        str(batch),
        "--max_batch_size_per_device",
        str(batch),
        "--synthetic_size",
        str(int(steps * batch / (1 - VAL_FRACTION)) + batch),  # >= steps full batches
        "--log_interval",
        str(max(1, steps // 20)),
    ]
    results, provenance = {}, {}
    for config, flags in CONFIGS.items():
        skip = [why for flag, why in DRY_RUN_SKIPS.items() if args.dry_run and flag in flags]
        print(f"{config}: {skip[0] if skip else 'running'}", file=sys.stderr, flush=True)
        if skip:
            results[config] = {"flags": flags, "skipped": skip[0]}
            continue
        run = run_train([*common, *flags])
        results[config], provenance = (
            {"flags": flags, **throughput(run)},
            provenance or run["provenance"],
        )
    print("time to accuracy: running", file=sys.stderr, flush=True)
    run = run_train(
        tta_flags := [*device, "--epochs", str(setting["epochs"])]
    )  # the default run: digits, cnn
    tta = {
        "command": ["python", "train.py", *tta_flags],
        **time_to_accuracy(run, setting["threshold"]),
    }
    provenance = provenance or run["provenance"]
    name = provenance.get("devices", ["unknown device"])[
        0
    ]  # torch.cuda.get_device_name(), in the run itself
    report = {
        "device": f"{name} (CPU), dry run" if args.dry_run else name,
        "dry_run": args.dry_run,
        "throughput": results,
        "time_to_accuracy": tta,
        "setting": {
            "dataset": "synthetic_cifar10",
            "model": setting["model"],
            "eff_batch_size": batch,
            "steps": steps,
            "command": ["python", "train.py", *common],
        },
        "versions": {
            k: provenance.get(k) for k in ("python", "torch", "cuda", "lightning", "git_commit")
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    slug = re.sub(r"[^a-z0-9]+", "-", "dry-run" if args.dry_run else name.lower()).strip("-")
    out = args.out or REPO / "benchmarks" / "results" / f"gpu-{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report) + f"\n\nWrote {out}")
    if "error" in tta or any("error" in r for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
