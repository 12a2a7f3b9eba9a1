"""What --augment costs: the CIFAR crop + flip (data.CropFlip) against the training step it runs in.

    python benchmarks/augmentation.py [--batch_size 128] [--rounds 7] [--device cpu|cuda] [--models ...] [--out FILE]

On synthetic CIFAR-10-shaped batches (data.synthetic_cifar10), for the default CNN and resnet18_cifar, it times
a whole training step (the model's forward with its augmentation, cross-entropy, backward, AdamW) with the
augmentation on and off, taking turns round by round, and the augmentation alone. It reports the medians and the
augmentation's share of the step, and writes benchmarks/results/augmentation-<device>.json.
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from data import synthetic_cifar10  # noqa: E402
from model import build_model  # noqa: E402
from task_config import ArchConfig, DataConfig  # noqa: E402

STEPS = {"cnn": 20, "resnet18_cifar": 3}  # per round: a resnet18 step on a CPU takes seconds


def step_seconds(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int
) -> float:
    """Median seconds of a training step, after one warm-up step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def augmentation_seconds(
    augment: torch.nn.Module, images: torch.Tensor, repeats: int = 50
) -> float:
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        augment(images)
        if images.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--out", type=Path, help="JSON file (default: benchmarks/results/augmentation-DEVICE.json)"
    )
    parser.add_argument("--models", nargs="+", choices=list(STEPS), default=list(STEPS))
    args = parser.parse_args()
    torch.manual_seed(0)
    fit, _, info = synthetic_cifar10(DataConfig(synthetic_size=args.batch_size))
    images, labels = (t.to(args.device) for t in fit.__getitems__(list(range(args.batch_size))))
    device = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"cpu, {torch.get_num_threads()} threads"
    )
    report = {
        "device": device,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "models": {},
    }
    for name in args.models:
        steps = STEPS[name]
        models = {
            on: build_model(
                ArchConfig(model=name, dropout=0.0), info if on else replace(info, augment=None)
            )
            .to(args.device)
            .train()
            for on in (True, False)
        }
        on, off, alone = [], [], []
        for _ in range(args.rounds):
            on.append(step_seconds(models[True], images, labels, steps))
            off.append(step_seconds(models[False], images, labels, steps))
            alone.append(augmentation_seconds(info.augment, images))
        step_on, step_off, aug = (1000 * statistics.median(x) for x in (on, off, alone))
        report["models"][name] = {
            "step_ms_augment_on": step_on,
            "step_ms_augment_off": step_off,
            "augmentation_ms": aug,
            "augmentation_share_of_step": aug / step_on,
            "step_ms_difference": step_on - step_off,
        }
        print(
            f"{name}: step {step_on:.1f} ms with --augment, {step_off:.1f} ms without; the augmentation alone "
            f"{aug:.2f} ms = {100 * aug / step_on:.1f}% of the step (batch {args.batch_size}, {report['device']})"
        )
    out = (
        args.out
        or REPO / "benchmarks" / "results" / f"augmentation-{args.device.replace(':', '')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
