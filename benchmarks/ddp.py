"""What this template costs per optimizer step on 2 DDP processes (gloo, CPU), next to raw DDP.

    python benchmarks/ddp.py                      # ~5 min on a 2-core CPU
    python benchmarks/ddp.py --repeats 5 --out benchmarks/results/NAME.json --repo PATH

Reported: ms per optimizer step of each contender (median over the repeats, with min and max), the
template's ms/step minus raw's (round by round: the two ran back to back), the same by a second,
cruder method as a check, and each one's start-up (what a run costs besides its steps: imports,
launch, process group, data, the end; an estimate).

Both contenders run as whole processes, timed from outside, so that any version of the template is
measured through its command line alone (`train.py --accelerator cpu --devices 2 --strategy ddp
--epochs N --root_dir DIR`): nothing of the template is imported here. Same data (scikit-learn's
digits, with the template's splits and normalisation), model (the default CNN, its layers copied
here), global batch (64: 2 processes x 32) and math (the raw loop prints the template's validation
numbers, epoch by epoch); OMP_NUM_THREADS=1 in every process. ms/step counts the steady state, each
epoch's validation and checkpoint included (the same work in both), by two methods:

  epoch_lines  (reported, where both print them) each contender prints a line after each epoch's
               validation, "epoch E/N step S ..."; each line is timed as it comes out of the
               pipe, and the time from one to the next, over its steps, is that epoch's ms/step.
               A run's value: the median epoch after the first of the long run
  two_lengths  (the check, and the fallback) each runs at two lengths (--epochs SHORT LONG, 20
               steps an epoch): (T_long - T_short) / (steps_long - steps_short) of the whole
               processes' wall times. The start-up cancels, but its noise (~0.5 s) does not: it
               takes long runs to be as precise

The contenders and lengths take turns within each repeat (the order reversed every other repeat),
so that drift of the machine hits them alike; one run of each at the short length comes first and
is not counted.

  raw      torch.distributed (gloo) and DistributedDataParallel in two processes this script starts:
           the template's data order (each step a global batch of 64 from a (seed, epoch)
           permutation, each rank its half), fused AdamW, gradient clipping at 1.0, warmup-cosine
           LR; after each epoch a validation over the val split (each rank its share, one
           all_reduce of the sums) and a torch.save checkpoint on rank 0. No Fabric, no logging, no
           progress bar, no host sync in the steps
  template train.py as it is, at its defaults: Fabric's DDP, logging, progress, throughput,
           validation and checkpoints each epoch, and whatever host syncs its steps have

Writes --out (default benchmarks/results/cpu-<N>core-ddp.json).
"""

import argparse
import contextlib
import ctypes
import gc
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
WORLD_SIZE, EFF_BATCH_SIZE, SEED = 2, 64, 42
LR, WEIGHT_DECAY, WARMUP_EPOCHS, GRAD_CLIP, DROPOUT = 2e-3, 0.01, 1, 1.0, 0.1  # train.py's defaults
DIGITS_MEAN, DIGITS_STD, DIGITS_SCALE = 0.3053, 0.3760, 16.0  # as data.py's digits()
DIGITS_TEST_FRACTION, VAL_FRACTION = 0.2, 0.1  # as data.py
RUN_TIMEOUT_S = 600
# What each contender prints after each epoch's validation: "epoch 3/32 step 60 val loss ..."
EPOCH_LINE = re.compile(r"\bepoch (\d+)/\d+ step (\d+)\b")


def raw_worker(rank: int, world_size: int, port: int, epochs: int, out_dir: Path) -> None:
    """One rank of the raw contender (run_once starts one process per rank)."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    # data.py's digits: a fixed test split (seed 0), then val: a seeded VAL_FRACTION of the rest
    data = load_digits()
    images = torch.from_numpy(data.images).to(torch.uint8).unsqueeze(1)  # (1797, 1, 8, 8), 0..16
    labels = torch.from_numpy(data.target).long()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    fit = order[int(len(labels) * DIGITS_TEST_FRACTION) :]
    split = torch.randperm(len(fit), generator=torch.Generator().manual_seed(SEED))
    num_val = int(len(fit) * VAL_FRACTION)
    train_idx, val_idx = fit[split[num_val:]], fit[split[:num_val]]

    def batch(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (images[indices].float() / DIGITS_SCALE - DIGITS_MEAN) / DIGITS_STD
        return x, labels[indices]

    torch.manual_seed(SEED)  # the same initial weights on every rank
    model = nn.Sequential(  # model.py's SmallCNN (--model cnn) for 1 channel and 10 classes
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Dropout(DROPOUT),
        nn.Linear(64 * 4 * 4, 128),
        nn.ReLU(),
        nn.Dropout(DROPOUT),
        nn.Linear(128, 10),
    )
    if rank > 0:
        torch.manual_seed(SEED + rank)  # each rank its own dropout masks
    model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    per_rank = EFF_BATCH_SIZE // world_size
    steps_per_epoch = len(train_idx) // EFF_BATCH_SIZE
    end = epochs * steps_per_epoch
    warmup = min(round(WARMUP_EPOCHS * steps_per_epoch), end)

    def lr_factor(step: int) -> float:  # train.py's: a linear warmup, then a cosine to zero
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, end - warmup))))

    start, global_step = time.perf_counter(), 0
    for epoch in range(epochs):
        model.train()
        generator = torch.Generator().manual_seed(SEED * 100_003 + epoch)
        perm = torch.randperm(len(train_idx), generator=generator)
        for step in range(steps_per_epoch):
            first = step * EFF_BATCH_SIZE + rank * per_rank
            x, y = batch(train_idx[perm[first : first + per_rank]])
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=GRAD_CLIP)
            for group in optimizer.param_groups:
                group["lr"] = LR * lr_factor(global_step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1

        model.eval()  # rank r: samples r, r + world_size, ..., in batches of per_rank
        sums = torch.zeros(3)  # loss sum, correct, count
        with torch.no_grad():
            for chunk in val_idx[rank::world_size].split(per_rank):
                x, y = batch(chunk)
                logits = model(x)
                sums += torch.stack(
                    [
                        F.cross_entropy(logits, y, reduction="sum"),
                        (logits.argmax(1) == y).sum().float(),
                        torch.tensor(float(len(y))),
                    ]
                )
        dist.all_reduce(sums)
        if rank == 0:
            print(
                f"epoch {epoch + 1}/{epochs} step {global_step} val loss {sums[0] / sums[2]:.4f} "
                f"val acc {sums[1] / sums[2]:.4f}",
                flush=True,
            )
            torch.save(
                {
                    "model": model.module.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "global_step": global_step,
                },
                out_dir / f"step-{global_step:08d}.ckpt",
            )
    if rank == 0:
        print(f"Finished {global_step} steps in {time.perf_counter() - start:.3f}s", flush=True)
    # gloo's worker threads stop with the group now, while Python is whole: one kept alive until the
    # interpreter's exit (DDP holds the group) can abort it ("terminate called without an active
    # exception"), as train.py's launcher notes too
    del model, optimizer
    dist.destroy_process_group()
    gc.collect()


def run_once(contender: str, epochs: int, repo: Path, tmp: Path, tag: str) -> dict[str, Any]:
    """One whole run: wall seconds from the start of its first process to the exit of its last; the
    time each end-of-epoch line ("epoch E/N step S ...") came out, with its step S; the optimizer
    steps its output says it made (None if it does not say); its lines that mention a warning or an
    error."""
    root = tmp / tag
    root.mkdir()
    subreaper = become_subreaper()
    if contender == "template":
        commands = [
            [
                sys.executable,
                str(repo / "train.py"),
                "--accelerator",
                "cpu",
                "--devices",
                str(WORLD_SIZE),
                "--strategy",
                "ddp",
                "--epochs",
                str(epochs),
                "--root_dir",
                str(root / "runs"),
            ]
        ]
    else:
        port = free_port()
        commands = [
            [
                sys.executable,
                str(HERE),
                "--_raw_worker",
                str(rank),
                "--_port",
                str(port),
                "--_epochs",
                str(epochs),
                "--_dir",
                str(root),
            ]
            for rank in range(WORLD_SIZE)
        ]
    lines: list[tuple[float, str]] = []
    read_end, write_end = os.pipe()  # all processes' stdout and stderr, each line timed as it comes

    def read() -> None:
        with open(read_end, "rb") as reader:
            for line in reader:
                lines.append((time.perf_counter(), line.decode(errors="replace").rstrip()))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    cpu_before = cpu_seconds()
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            command,
            cwd=repo,
            env=run_env(),
            stdout=write_end,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        for command in commands
    ]
    os.close(write_end)
    codes: list[int | str] = []
    for proc in procs:
        try:
            codes.append(proc.wait(timeout=RUN_TIMEOUT_S))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            codes.append("timeout")
    seconds = time.perf_counter() - start
    reader.join(timeout=30)  # until every process (and any it started) has closed the pipe
    with contextlib.suppress(ChildProcessError):  # what they left behind (SUBREAPER): its CPU time
        while os.waitpid(-1, 0)[0]:
            pass
    cpu_after, window = cpu_seconds(), time.perf_counter() - start
    shutil.rmtree(root, ignore_errors=True)
    text = [line for _, line in lines]
    if any(code != 0 for code in codes):
        raise SystemExit(
            f"{contender} --epochs {epochs} failed (exit {codes}); its output ends:\n"
            + "\n".join(text[-30:])
        )
    finished = re.search(r"Finished (\d+) steps", "\n".join(text))
    epoch_ends = [
        (stamp, int(match.group(2))) for stamp, line in lines if (match := EPOCH_LINE.search(line))
    ]
    noted = [line.strip() for line in text if re.search(r"warn|error", line, re.IGNORECASE)]
    other = None
    if subreaper and cpu_before[0] is not None and cpu_after[0] is not None:
        machine, ours = (
            after - before for before, after in zip(cpu_before, cpu_after, strict=True)
        )
        other = max(0.0, machine - ours) / window
    return {
        "seconds": seconds,
        "other_cores": other,
        "epoch_ends": epoch_ends,
        "steps": int(finished.group(1)) if finished else None,
        "noted": noted,
    }


def cpu_seconds() -> tuple[float | None, float]:
    """CPU seconds run so far by the whole machine (/proc/stat: all but idle and iowait; None where
    there is none), and by this process and its children that have been waited for."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
        machine = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        machine = None
    mine, children = (
        resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return machine, mine.ru_utime + mine.ru_stime + children.ru_utime + children.ru_stime


def become_subreaper() -> bool:
    """Make the processes that a run's processes leave behind (Fabric's rank 1 can outlive rank 0,
    which started it) children of this one, so that their CPU time is counted as the run's."""
    try:
        return (
            ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
        )  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_env() -> dict[str, str]:
    """This environment without any rendezvous variables of its own, with one thread per process."""
    rendezvous = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK")
    env = {key: value for key, value in os.environ.items() if key not in rendezvous}
    return {**env, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}


def steps_per_epoch() -> int:
    """Optimizer steps per epoch of the digits training split at a global batch of 64 (20)."""
    from sklearn.datasets import load_digits

    total = len(load_digits().target)
    fit = total - int(total * DIGITS_TEST_FRACTION)
    return (fit - int(fit * VAL_FRACTION)) // EFF_BATCH_SIZE


def measure(repo: Path, short: int, long: int, repeats: int) -> dict[str, Any]:
    """Each contender's ms/step in each round, by both methods, its start-up, and every run."""
    contenders, per_epoch = ("template", "raw"), steps_per_epoch()
    seconds: dict[str, list[dict[int, float]]] = {
        name: [{} for _ in range(repeats)] for name in contenders
    }
    in_run: dict[str, list[float | None]] = {name: [None] * repeats for name in contenders}
    noted: dict[str, set[str]] = {name: set() for name in contenders}
    runs = []
    with tempfile.TemporaryDirectory(prefix="ddp-benchmark-") as tmp:
        for name in contenders:  # warm-up (page cache, .pyc files): not counted
            noted[name].update(run_once(name, short, repo, Path(tmp), f"warmup-{name}")["noted"])
        order = [(name, epochs) for epochs in (short, long) for name in contenders]
        for repeat in range(repeats):
            for name, epochs in order if repeat % 2 == 0 else order[::-1]:
                run = run_once(name, epochs, repo, Path(tmp), f"{repeat}-{name}-{epochs}")
                if run["steps"] is not None and run["steps"] != epochs * per_epoch:
                    raise SystemExit(
                        f"{name} --epochs {epochs} made {run['steps']} optimizer "
                        f"steps, not {epochs * per_epoch}: the difference would be "
                        "wrong"
                    )
                noted[name].update(run["noted"])
                seconds[name][repeat][epochs] = run["seconds"]
                ms_in_run = after_first_epoch(run["epoch_ends"])
                if epochs == long and ms_in_run:
                    in_run[name][repeat] = ms_in_run["median"]
                runs.append(
                    {
                        "repeat": repeat + 1,
                        "contender": name,
                        "epochs": epochs,
                        "seconds": run["seconds"],
                        "other_work_cores": run["other_cores"],
                        "steps_reported": run["steps"],
                        "epoch_lines": len(run["epoch_ends"]),
                        "ms_per_step_after_epoch_1": ms_in_run,
                    }
                )
                other = run["other_cores"]
                print(
                    f"  repeat {repeat + 1}/{repeats} {name:<8} --epochs {epochs:<3} "
                    f"{run['seconds']:6.2f} s"
                    + (f", other work {other:.1f} cores" if other is not None else "")
                    + (
                        f", after epoch 1 {ms_in_run['median']:5.2f} ms/step (median epoch), "
                        f"{ms_in_run['mean']:5.2f} (mean)"
                        if ms_in_run
                        else ""
                    ),
                    file=sys.stderr,
                    flush=True,
                )
    extra_steps = (long - short) * per_epoch
    two_lengths = {
        name: [1000 * (r[long] - r[short]) / extra_steps for r in rounds]
        for name, rounds in seconds.items()
    }
    by_method = {"two_lengths": two_lengths}
    if all(value is not None for values in in_run.values() for value in values):
        by_method["epoch_lines"] = in_run
    method = "epoch_lines" if "epoch_lines" in by_method else "two_lengths"
    startup = {
        name: [
            r[short] - m / 1000 * short * per_epoch
            for r, m in zip(seconds[name], by_method[method][name], strict=True)
        ]
        for name in contenders
    }
    results = {
        key: {
            "ms_per_step": {name: spread(values) for name, values in ms.items()},
            "template_minus_raw_ms_per_step": spread(
                [t - r for t, r in zip(ms["template"], ms["raw"], strict=True)]
            ),
        }
        for key, ms in by_method.items()
    }
    return {
        "method": method,
        **results[method],
        "by_method": results,
        "startup_seconds": {name: spread(values) for name, values in startup.items()},
        "other_work_cores": other_work([run["other_work_cores"] for run in runs]),
        "steps_per_epoch": per_epoch,
        "runs": runs,
        "output_lines_with_warn_or_error": {name: sorted(lines) for name, lines in noted.items()},
    }


def after_first_epoch(epoch_ends: list[tuple[float, int]]) -> dict[str, float] | None:
    """ms/step of the epochs after the first, from one end-of-epoch line to the next (each epoch's
    steps, its validation and its checkpoint): the median epoch's (what a burst of other work on the
    machine moves least) and the mean. None without two such lines."""
    pairs = list(itertools.pairwise(epoch_ends))
    if not pairs or any(step <= before for (_, before), (_, step) in pairs):
        return None
    (first_time, first_step), (last_time, last_step) = epoch_ends[0], epoch_ends[-1]
    each = [1000 * (t1 - t0) / (s1 - s0) for (t0, s0), (t1, s1) in pairs]
    return {
        "median": statistics.median(each),
        "mean": 1000 * (last_time - first_time) / (last_step - first_step),
    }


def other_work(cores: list[float | None]) -> dict[str, Any] | None:
    """How busy the machine was with other work during the counted runs, in cores (None where it
    could not be told)."""
    known = [value for value in cores if value is not None]
    return (
        spread(known) | {"runs_over_half_a_core": sum(value > 0.5 for value in known)}
        if known
        else None
    )


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "rounds": values,
    }


def git_commit(repo: Path) -> str | None:
    try:  # read-only
        return subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="rounds (at least 3)")
    parser.add_argument(
        "--epochs",
        type=int,
        nargs=2,
        default=(2, 32),
        metavar=("SHORT", "LONG"),
        help="the two run lengths, in epochs of 20 optimizer steps (default: 2 32)",
    )
    parser.add_argument(
        "--repo",
        type=Path,
        default=HERE.parents[1],
        help="the template checkout whose train.py is measured (default: this one)",
    )
    parser.add_argument("--out", type=Path, help="the results file (JSON)")
    parser.add_argument("--_raw_worker", type=int, metavar="RANK", help=argparse.SUPPRESS)
    parser.add_argument("--_port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_epochs", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--_dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._raw_worker is not None:
        raw_worker(args._raw_worker, WORLD_SIZE, args._port, args._epochs, args._dir)
        return
    short, long = args.epochs
    if args.repeats < 3 or not 1 <= short < long:
        parser.error("--repeats must be at least 3, and --epochs SHORT LONG 1 <= SHORT < LONG")
    repo = args.repo.resolve()
    if not (repo / "train.py").is_file():
        parser.error(f"--repo {repo}: no train.py there")
    out = args.out or HERE.parent / "results" / f"cpu-{os.cpu_count()}core-ddp.json"

    began = time.perf_counter()
    result = measure(repo, short, long, args.repeats)
    methods = {
        "epoch_lines": "in the long run, each line 'epoch E/N step S' timed as it came out: "
        "the median over epochs 2..N of (t_E - t_E-1) / (S_E - S_E-1); runs[].mean: "
        "(t_N - t_1) / (S_N - S_1)",
        "two_lengths": "(T_long - T_short) / (steps_long - steps_short), wall clock of "
        "whole processes",
    }
    report = {
        "method": result["method"],
        **{
            key: result[key]
            for key in (
                "ms_per_step",
                "template_minus_raw_ms_per_step",
                "startup_seconds",
                "by_method",
                "other_work_cores",
            )
        },
        "setting": {
            "repo": str(repo),
            "commit": git_commit(repo),
            "world_size": WORLD_SIZE,
            "backend": "gloo",
            "accelerator": "cpu",
            "omp_num_threads": 1,
            "dataset": "digits",
            "model": "cnn",
            "precision": "32-true",
            "eff_batch_size": EFF_BATCH_SIZE,
            "batch_size_per_process": EFF_BATCH_SIZE // WORLD_SIZE,
            "epochs": [short, long],
            "steps_per_epoch": result["steps_per_epoch"],
            "repeats": args.repeats,
            "methods": methods,
            "startup": "T_short - ms/step x steps_short",
            "other_work_cores": "CPU time the machine ran (/proc/stat) less this script's and "
            "its runs' processes', over each run's wall time",
        },
        "runs": result["runs"],
        "output_lines_with_warn_or_error": result["output_lines_with_warn_or_error"],
        "total_seconds": time.perf_counter() - began,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
        },
        "versions": {
            "python": platform.python_version(),
            **{name: version(name) for name in ("torch", "lightning", "scikit-learn")},
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report, short, long, args.repeats))
    print(f"Wrote {out} ({report['total_seconds']:.0f} s)")


def table(report: dict[str, Any], short: int, long: int, repeats: int) -> str:
    def cell(ms: dict[str, float]) -> str:
        return f"{ms['median']:.2f} ({ms['min']:.2f}-{ms['max']:.2f})"

    check = report["by_method"]["two_lengths"]
    lines = [
        (
            f"\n{WORLD_SIZE} processes (gloo, CPU, 1 thread each), --epochs {short} and {long},"
            f" {repeats} repeats; ms/step by {report['method']}, checked by two_lengths\n"
        ),
        "| contender | ms/step median (min-max) | two_lengths check | start-up, s |",
        "|---|---:|---:|---:|",
    ]
    for name, ms in report["ms_per_step"].items():
        lines.append(
            f"| {name} | {cell(ms)} | {cell(check['ms_per_step'][name])} | "
            f"{report['startup_seconds'][name]['median']:.1f} |"
        )
    for label, diff in (
        ("", report["template_minus_raw_ms_per_step"]),
        (" (two_lengths)", check["template_minus_raw_ms_per_step"]),
    ):
        lines.append(
            f"{'' if label else chr(10)}template - raw{label}: {diff['median']:+.2f} "
            f"ms/step ({diff['min']:+.2f}..{diff['max']:+.2f})"
        )
    if other := report["other_work_cores"]:
        lines.append(
            f"other work on the machine during the runs: {other['median']:.2f} cores median "
            f"({other['min']:.2f}-{other['max']:.2f}); over half a core in "
            f"{other['runs_over_half_a_core']} of {len(other['rounds'])} runs"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
