"""Streamed data against the in-memory path: samples/s of the loader alone, and in training the share of
the step spent waiting for data, with 0 and 2 loader workers.

    python benchmarks/streaming.py            # a few minutes on 2 CPU cores; writes benchmarks/results/streaming.json

Each configuration runs train.py's own main() in a fresh process, on the default CNN, with the loader wrapped so
that the time spent in next() is counted (the data wait), and the time from the first batch asked for to the last
optimizer step (the loop). The chunks are converted by tools/stream.py into a temporary directory first.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = {  # name: (tools/stream.py's and train.py's data flags, epochs)
    "digits": (["--dataset", "digits"], 3),
    "synthetic_cifar10": (["--dataset", "synthetic_cifar10", "--synthetic_size", "10000"], 2),
}


def measure(data_flags: list[str], streamed: str, workers: int, epochs: int) -> dict:
    """In this process: the loader alone for an epoch, then a training run with its data wait counted."""
    sys.path.insert(0, str(REPO))
    os.chdir(tempfile.mkdtemp())
    import train
    from machinery import run, sampler

    waits, marks = [], []

    class Timed:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            iterator = iter(self.loader)
            while True:
                start = time.perf_counter()
                marks.append(start) if not marks else None
                try:
                    batch = next(iterator)
                except StopIteration:
                    return
                waits.append(time.perf_counter() - start)
                yield batch

    make_loaders, log_step = sampler.make_loaders, run.Run.log_step

    def timed_loaders(*args, **kwargs):
        found, train_loader, val_loader = make_loaders(*args, **kwargs)
        timed_loaders.loader = train_loader
        return found, Timed(train_loader), val_loader

    def stamped_log_step(self, *args):
        log_step(self, *args)
        marks.append(time.perf_counter())

    train.make_loaders, run.Run.log_step = timed_loaders, stamped_log_step
    flags = ["--dataset", "streamed", "--data_dir", streamed] if streamed else data_flags
    args = [
        *flags,
        "--epochs",
        str(epochs),
        "--num_workers",
        str(workers),
        "--log_interval",
        "1000",
    ]
    train.cli(["--root_dir", "runs", *args])
    steps = len(marks) - 1
    loop = marks[-1] - marks[0]
    wait = sum(waits)
    # The loader alone, one more epoch: how fast it can serve batches when nothing else runs.
    loader = timed_loaders.loader
    if hasattr(loader, "set_position"):
        loader.set_position(epochs)
    start, samples = time.perf_counter(), 0
    for images, _ in loader:
        samples += len(images)
    alone = samples / (time.perf_counter() - start)
    return {
        "steps": steps,
        "ms_per_step": 1000 * loop / steps,
        "data_wait_ms_per_step": 1000 * wait / steps,
        "data_wait_share": wait / loop,
        "train_samples_per_s": steps * 64 / loop,
        "loader_alone_samples_per_s": alone,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration, as JSON
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(measure(**json.loads(args.one))))
        return
    rows, tmp = [], Path(tempfile.mkdtemp())
    for name, (flags, epochs) in DATASETS.items():
        out = tmp / name
        command = [sys.executable, str(REPO / "tools" / "stream.py"), *flags, "--out", str(out)]
        subprocess.run([*command, "--chunk_bytes", "4MB"], check=True, capture_output=True)
        for path, streamed in (("in memory", ""), ("streamed", str(out))):
            for workers in (0, 2):
                one = dict(data_flags=flags, streamed=streamed, workers=workers, epochs=epochs)
                done = subprocess.run(
                    [sys.executable, __file__, "--one", json.dumps(one)],
                    capture_output=True,
                    text=True,
                )
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                assert line, done.stderr[-3000:]
                row = {"dataset": name, "path": path, "workers": workers, **json.loads(line[0][7:])}
                rows.append(row)
                print(row, flush=True)
    print(
        "\n| dataset | path | workers | loader alone (samples/s) | training (samples/s) | ms/step | data wait |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['path']} | {r['workers']} | {r['loader_alone_samples_per_s']:,.0f} | "
            f"{r['train_samples_per_s']:,.0f} | {r['ms_per_step']:.1f} | "
            f"{r['data_wait_ms_per_step']:.2f} ms ({100 * r['data_wait_share']:.1f}%) |"
        )
    out = REPO / "benchmarks" / "results" / "streaming.json"
    out.write_text(json.dumps({"cpu": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    print(f"Wrote {out}")


if __name__ == "__main__":
    main()
