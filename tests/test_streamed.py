"""Streamed data (`--dataset streamed`, litdata chunks written by tools/stream.py): a killed or stopped
epoch resumes at its next sample; 1 or 2 processes count every evaluation sample once; bad input is
one line. Each run is a real process on data converted here, offline."""

import collections
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, only_run_dir, run_script, snapshot
from test_resume import assert_same_run

pytestmark = pytest.mark.slow  # each run imports lightning and litdata (~8 s)

# Every training sample is recorded (a hash of its pixels) with the epoch it came in; a signal can
# stop the run after its n-th optimizer step. Fabric's launcher starts every rank with this script.
RUNNER = """
import hashlib, os, signal, sys
sys.path.insert(0, os.getcwd())
import task, train
from machinery import run, stream

record = open(os.path.join(os.environ["SEEN"], f"{os.getpid()}.txt"), "a")
forward, set_position, log_step, calls = task.forward, stream.StreamedBatches.set_position, run.Run.log_step, [0]

def recording(model, batch):
    if model.training:
        record.writelines(hashlib.sha1(x.cpu().numpy().tobytes()).hexdigest() + chr(10) for x in batch[0])
        record.flush()
    return forward(model, batch)

def marking(self, epoch, sample_offset=0):
    record.write(f"epoch {epoch}" + chr(10))
    return set_position(self, epoch, sample_offset)

def stopping(self, *args):
    log_step(self, *args)
    calls[0] += 1
    if calls[0] == int(os.environ.get("STOP_AT", 0)) and os.environ.get("LOCAL_RANK", "0") == "0":
        os.kill(os.getpid(), int(os.environ["SIGNUM"]))

task.forward, stream.StreamedBatches.set_position, run.Run.log_step = recording, marking, stopping
train.cli(sys.argv[1:])
"""

ARGS = ["--dataset", "streamed", "--epochs", "2", "--eff_batch_size", "32", "--dropout", "0.2"]
ARGS += ["--checkpoint_every_n_steps", "7", "--log_interval", "2", "--ema_decay", "0.9"]
STEPS_PER_EPOCH = 56  # 1,800 training samples // 32


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """2,000 random CIFAR-10-shaped images (every one unique): train 1,800, val 200, test 400."""
    out = tmp_path_factory.mktemp("streamed") / "data"
    args = ["--dataset", "synthetic_cifar10", "--out", str(out), "--chunk_bytes", "256KB"]
    result = convert(*args, "--synthetic_size", "2000")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def convert(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "tools" / "stream.py"), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)


def train(
    tmp: Path, data: Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess, dict]:
    """The runner in `tmp`; what it printed, and per process the samples of each epoch."""
    seen = tmp / "seen"
    seen.mkdir(parents=True, exist_ok=True)
    (tmp / "runner.py").write_text(RUNNER)
    env = {**os.environ, "WANDB_MODE": "offline", "SEEN": str(seen), **env}
    command = [sys.executable, str(tmp / "runner.py"), "--root_dir", str(tmp / "runs")]
    command += [*ARGS, "--data_dir", str(data), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    return result, samples_by_epoch(seen)


def samples_by_epoch(seen: Path) -> dict[int, collections.Counter]:
    epochs = collections.defaultdict(collections.Counter)
    for path in seen.glob("*.txt"):
        epoch = None
        for line in path.read_text().splitlines():
            if line.startswith("epoch "):
                epoch = int(line.split()[1])
            else:
                epochs[epoch][line] += 1
    return dict(epochs)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[Path, dict]:
    """One process, two loader workers, never interrupted."""
    result, seen = train(tmp_path_factory.mktemp("reference"), data, "--num_workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{STEPS_PER_EPOCH} steps/epoch" in result.stdout
    return only_run_dir(result_root(result)), seen


def result_root(result: subprocess.CompletedProcess) -> Path:
    return Path(result.args[result.args.index("--root_dir") + 1])


def assert_each_sample_once(seen: dict, epochs: int = 2) -> None:
    """Each epoch: 56 steps of 32 distinct samples, none twice."""
    assert sorted(seen) == list(range(epochs))
    for counts in seen.values():
        assert sum(counts.values()) == STEPS_PER_EPOCH * 32 and max(counts.values()) == 1


def test_an_uninterrupted_streamed_run_sees_each_sample_at_most_once_an_epoch(reference):
    run_dir, seen = reference
    assert_each_sample_once(seen)
    assert seen[0].keys() != seen[1].keys() or list(seen[0]) != list(seen[1])  # reshuffled
    final = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)
    assert final["stream"]["current_epoch"] == 2 and final["global_step"] == 2 * STEPS_PER_EPOCH


@pytest.mark.parametrize(
    ("signum", "workers", "code"), [(signal.SIGKILL, "2", -9), (signal.SIGTERM, "0", 143)]
)
def test_a_kill_or_stop_mid_epoch_resumes_bitwise_at_the_next_sample(
    data, tmp_path, reference, signum, workers, code
):
    if workers == "0":  # its own uninterrupted twin: the batches depend on the worker count
        reference_run, result = None, train(tmp_path / "twin", data, "--num_workers", "0")[0]
        assert result.returncode == 0, result.stderr[-3000:]
        reference_run = only_run_dir(result_root(result))
    else:
        reference_run = reference[0]
    stop_at = str(STEPS_PER_EPOCH + 10)  # mid epoch 2, three steps after the checkpoint at 63
    first, _ = train(tmp_path, data, "--num_workers", workers, STOP_AT=stop_at, SIGNUM=str(signum))
    assert first.returncode == code, first.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "runs")
    saved = 66 if signum == signal.SIGTERM else 63
    resumed, _ = train(tmp_path, data, "--num_workers", workers, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoints/step-{saved:08d}.ckpt: step {saved}, in epoch 2" in resumed.stdout
    assert_same_run(run_dir, reference_run)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (["--num_workers", "2"], ["--num_workers", "0"]),  # fewer workers
        (["--num_workers", "0"], ["--num_workers", "2"]),  # more workers
        (["--num_workers", "1"], ["--devices", "2", "--num_workers", "1"]),  # a second process
        (["--devices", "2", "--num_workers", "0"], ["--num_workers", "0"]),  # one process fewer
    ],
)
def test_a_resume_on_another_world_size_or_worker_count_drops_and_repeats_no_sample(
    data, tmp_path, before, after
):
    cpu = ["--accelerator", "cpu", "--strategy", "ddp"]
    stop = {"STOP_AT": str(STEPS_PER_EPOCH + 10), "SIGNUM": str(signal.SIGTERM)}
    first, _ = train(tmp_path, data, *cpu, *before, **stop)
    assert first.returncode == 143, first.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "runs")
    resumed, seen = train(tmp_path, data, *cpu, *after, "--resume", str(run_dir))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    epoch_2 = seen[1]
    assert max(epoch_2.values()) == 1  # nothing repeated
    assert sum(epoch_2.values()) == STEPS_PER_EPOCH * 32  # nothing dropped
    final = torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)
    assert final["global_step"] == 2 * STEPS_PER_EPOCH


def test_two_processes_take_the_same_samples_an_epoch_and_evaluate_exactly(data, tmp_path):
    result, seen = train(
        tmp_path, data, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 device(s) x 16 samples" in result.stdout
    assert f"{STEPS_PER_EPOCH} steps/epoch" in result.stdout
    assert_each_sample_once(seen)
    run_dir = only_run_dir(tmp_path / "runs")
    with open(run_dir / "logs" / "csv" / "metrics.csv") as f:
        assert "val/loss" in f.readline()
    reports = []
    for devices in ("1", "2"):
        args = ["--out_dir", str(run_dir), "--accelerator", "cpu", "--devices", devices]
        tested = run_script("test.py", *args)
        assert tested.returncode == 0, tested.stderr[-3000:]
        reports.append(json.loads((run_dir / "test" / "metrics.json").read_text()))
    one, two = reports
    assert one["num_samples"] == two["num_samples"] == 400  # every test sample, once
    assert one["acc"] == two["acc"] and abs(one["loss"] - two["loss"]) < 1e-6


def write_json(path: Path, value: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def silent_port() -> socket.socket:
    """A port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    return server


def test_bad_data_is_one_line_and_leaves_the_runs_alone(data, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(data, other)
    damaged = other / "train" / sorted(p.name for p in (other / "train").glob("*.bin"))[1]
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"!")
    mosaic = tmp_path / "mosaic"
    write_json(mosaic / "checksums.json", {})
    write_json(mosaic / "info" / "index.json", {"version": 2, "shards": []})
    pickled = tmp_path / "pickled"
    shutil.copytree(data, pickled)
    index = json.loads((pickled / "info" / "index.json").read_text())
    index["config"]["data_format"][0] = "pickle"
    write_json(pickled / "info" / "index.json", index)
    (tmp_path / "empty").mkdir()
    server = silent_port()
    cases = {
        tmp_path
        / "missing": r"--data_dir \S+/missing: no such directory; convert a dataset with tools/stream.py",
        tmp_path
        / "empty": r"--data_dir \S+/empty: no checksums.json in it; convert a dataset with tools/stream.py",
        mosaic: r"\S+/mosaic/info/index.json is not litdata's; convert a dataset with tools/stream.py",
        pickled: r"\S+/pickled/info/index.json: refused, its items need \['pickle'\] to load",
        other: rf"--data_dir \S+/other: train/{damaged.name} fails its checksum; convert it again",
    }
    runs = tmp_path / "runs"
    earlier = train(tmp_path / "earlier", data, "--fast_run")[
        0
    ]  # a run the bad ones must not touch
    assert earlier.returncode == 0, earlier.stderr[-3000:]
    before = snapshot(tmp_path / "earlier" / "runs")
    for where, message in cases.items():
        args = ["--root_dir", str(runs), *ARGS, "--data_dir", str(where)]
        result = run_script("train.py", *args)
        assert result.returncode == 2, (where, result.stderr[-3000:])
        assert re.fullmatch(f"error: {message}\n", result.stderr), result.stderr[-3000:]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.getsockname()[1]}"}
    env |= {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x", "STREAM_TIMEOUT_S": "5"}
    args = ["--root_dir", str(runs), *ARGS, "--data_dir", "s3://bucket/data"]
    result = run_script("train.py", *args, env=env)
    assert result.returncode == 2
    assert result.stderr == "error: --data_dir s3://bucket/data: no answer in 5 s; check the URL\n"
    assert not runs.exists() and snapshot(tmp_path / "earlier" / "runs") == before
    server.close()


def test_the_converter_never_writes_into_a_folder_that_holds_files(data, tmp_path):
    before = snapshot(data)
    result = convert("--dataset", "digits", "--out", str(data))
    assert result.returncode == 2 and "is not a new or empty folder" in result.stderr
    assert snapshot(data) == before
