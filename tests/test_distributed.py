"""Scale-out: real multi-process runs (2 CPU processes over gloo) do the math of 1 process, evaluation counts
every sample once, runs resume on another world size, and the launchers users know all work. (Generic tier: the
toy fork.)

"The same math" is proven in float64 (--precision 64-true), where a different reduction order (2 ranks sum
their gradients, accumulation splits a batch) changes the weights by ~1e-15 per step, not by the ~1e-5 that
float32 reaches after a hundred steps, differently on different CPUs."""

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, max_abs_diff, only_run_dir, weights_and_ema
from lightning.fabric.utilities.distributed import _suggested_max_num_threads

pytestmark = pytest.mark.slow

# No dropout (masks are drawn per rank), float64, a test split of 153 and a validation split of 61 samples
# (neither divides by 2), checkpoints every 3 steps, all kept, so that a run can be cut mid-epoch and resumed on
# another world size. The EMA of the weights is on: it is saved, sharded and resumed with the rest.
ARGS = [
    "--epochs",
    "3",
    "--dropout",
    "0",
    "--precision",
    "64-true",
    "--num_samples",
    "767",
    "--checkpoint_every_n_steps",
    "3",
    "--num_checkpoint_keep",
    "100",
    "--ema_decay",
    "0.9",
]
TWO_PROCESSES = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
SAME_MATH = 1e-9  # float64


@pytest.fixture(scope="module")
def one_process(fork, tmp_path_factory) -> Path:
    return fork.train(tmp_path_factory.mktemp("one"), *ARGS)


@pytest.fixture(scope="module")
def two_processes(fork, tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("two")
    # 2 processes x 16 samples x 2 accumulation steps: the same 64 samples per step as 1 x 64 x 1.
    result = fork.run(
        "train.py",
        "--root_dir",
        str(root),
        *ARGS,
        *TWO_PROCESSES,
        "--max_batch_size_per_device",
        "16",
    )
    assert result.returncode == 0, result.stderr
    return only_run_dir(root), result.stdout


def final(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "final.ckpt"


def metrics_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the run's CSV log."""
    return list(csv.DictReader((run_dir / "logs" / "csv" / "metrics.csv").read_text().splitlines()))


def val_rows(run_dir: Path) -> list[dict[str, float]]:
    rows = metrics_rows(run_dir)
    return [
        {k: float(v) for k, v in row.items() if k.startswith("val/") or k == "step"}
        for row in rows
        if row["val/loss"]
    ]


def train_losses(run_dir: Path) -> dict[int, float]:
    rows = metrics_rows(run_dir)
    return {int(row["step"]): float(row["train/loss"]) for row in rows if row["train/loss"]}


def assert_same_training_log(run_dir: Path, reference: Path) -> None:
    """The logged training loss of every log step, accumulation and world size changes included. The running sum
    is a float32 tensor whatever the precision, so it agrees to float32's rounding (a mis-weighted mean is ~1e-3
    off)."""
    a, b = train_losses(run_dir), train_losses(reference)
    assert (
        a.keys() == b.keys()
        and len(a) >= 2
        and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)
    )


def test_two_processes_do_the_math_of_one(one_process, two_processes):
    two, stdout = two_processes
    assert (
        "2 device(s) x 16 samples x 2 accumulation step(s) = 64 per optimizer step | lr 0.002"
        in stdout
    )
    assert max_abs_diff(final(one_process), final(two)) < SAME_MATH  # the weights and their EMA
    assert any(name.startswith("ema/") for name in weights_and_ema(final(two)))
    assert_same_training_log(two, one_process)
    # Validation is sharded over the ranks and summed exactly: the same numbers, up to float32 metric sums.
    one_val, two_val = val_rows(one_process), val_rows(two)
    assert [r["step"] for r in one_val] == [r["step"] for r in two_val] and len(one_val) == 3
    for a, b in zip(one_val, two_val):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-6) for k in a)


# The sample ids of every optimizer step of two epochs, gathered from all ranks of a real run: a script, started
# as the template is (Fabric's ddp launcher runs it once more for rank 1).
GLOBAL_BATCHES = textwrap.dedent("""
    import json, sys
    from functools import partial
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])  # the repository
    import torch
    from config import OptimConfig
    from machinery.launch import call_then_leave_process_group, make_fabric
    from machinery.sampler import GlobalBatchSampler, make_train_loader

    def global_batches(fabric, setting):
        num_samples, eff_batch_size, max_per_device = setting
        per_device, accum = OptimConfig(
            eff_batch_size=eff_batch_size, max_batch_size_per_device=max_per_device
        ).micro_batching(fabric.world_size)
        sampler = GlobalBatchSampler(
            num_samples, eff_batch_size, per_device, fabric.global_rank, fabric.world_size, 0
        )
        dataset = torch.utils.data.TensorDataset(torch.arange(num_samples))
        loader = fabric.setup_dataloaders(
            make_train_loader(dataset, sampler, 0), use_distributed_sampler=False
        )
        steps = []
        for epoch in range(2):
            sampler.set_position(epoch)
            micro_batches = [ids for (ids,) in loader]
            for i in range(0, len(micro_batches), accum):
                step_ids = torch.cat(micro_batches[i : i + accum])
                steps.append(sorted(fabric.all_gather(step_ids).flatten().tolist()))
        return steps

    if __name__ == "__main__":
        devices, max_per_device, out = sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
        fabric = make_fabric("cpu", devices, strategy="auto" if devices == "1" else "ddp")
        setting = (300, 48, max_per_device)
        steps = fabric.launch(partial(call_then_leave_process_group, global_batches, setting))
        if fabric.global_rank == 0:
            out.write_text(json.dumps(steps))
""")


def test_one_and_two_processes_see_the_same_global_batches(tmp_path):
    script = tmp_path / "global_batches.py"
    script.write_text(GLOBAL_BATCHES)
    batches = []
    for devices, max_per_device in [("1", 48), ("2", 8)]:
        out = tmp_path / f"{devices}.json"
        result = subprocess.run(
            [sys.executable, str(script), str(REPO), devices, str(max_per_device), str(out)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        batches.append(json.loads(out.read_text()))
    one, two = batches
    assert len(one) == 2 * (300 // 48)
    assert one == two


def test_test_py_on_two_devices_reports_what_one_device_does(fork, one_process):
    """Every sample counted once, whatever the world size; the sums agree to float32's rounding (2 ranks add their
    halves in another order)."""
    reports = []
    for devices in ["1", "2"]:
        result = fork.run(
            "test.py", "--out_dir", str(one_process), "--accelerator", "cpu", "--devices", devices
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("Test split"))
        reports.append(
            (lines[start], json.loads((one_process / "test" / "metrics.json").read_text()))
        )
    (header, one), (header_two, two) = reports
    assert header == header_two and "153 samples" in header and "ema weights" in header
    assert_same_report(one, two)


def assert_same_report(one: dict, two: dict) -> None:
    """metrics.json of test.py: the same, with the numbers equal to float32's rounding."""
    numbers = [name for name, value in one.items() if isinstance(value, float)]
    assert numbers == ["loss", "mae", "mse"] and all(
        one[k] == pytest.approx(two[k], rel=1e-6) for k in numbers
    )
    assert {k: v for k, v in one.items() if k not in numbers} == {
        k: v for k, v in two.items() if k not in numbers
    }


def cut_mid_epoch_2(run_dir: Path, to: Path) -> tuple[Path, int]:
    """A copy of `run_dir` as if it had been killed after a checkpoint in the middle of epoch 2."""
    from machinery.checkpoints import checkpoint_step, remove_checkpoint

    per_epoch = checkpoint_step(final(run_dir)) // 3
    cut = next(s for s in range(per_epoch + 1, 2 * per_epoch) if s % 3 == 0)
    shutil.copytree(run_dir, to)
    for ckpt in (to / "checkpoints").glob("*.ckpt"):  # files, or directories of shards (FSDP)
        if ckpt.name == "final.ckpt" or (
            ckpt.name.startswith("step-") and int(ckpt.stem[5:]) > cut
        ):
            remove_checkpoint(ckpt)
    return to, cut


def test_checkpointed_on_two_processes_resumes_on_one(fork, two_processes, one_process, tmp_path):
    run_dir, cut = cut_mid_epoch_2(two_processes[0], tmp_path / "cut")
    result = fork.call(
        "train.py",
        "--resume",
        str(run_dir),
        "--accelerator",
        "cpu",
        "--devices",
        "1",
        "--strategy",
        "auto",
    )
    assert result.returncode == 0, result.stderr
    assert f"/checkpoints/step-{cut:08d}.ckpt: step {cut}, in epoch 2" in result.stdout
    # The run was configured with --max_batch_size_per_device 16: on one device that means 4 accumulation steps.
    assert (
        "1 device(s) x 16 samples x 4 accumulation step(s) = 64 per optimizer step | lr 0.002"
        in result.stdout
    )
    assert max_abs_diff(final(run_dir), final(one_process)) < SAME_MATH
    assert_same_training_log(
        run_dir, one_process
    )  # the partial log interval saved at 2 x 2 goes on at 1 x 4


def test_checkpointed_on_one_process_resumes_on_two(fork, one_process, tmp_path):
    run_dir, cut = cut_mid_epoch_2(one_process, tmp_path / "cut")
    result = fork.run("train.py", "--resume", str(run_dir), *TWO_PROCESSES)
    assert result.returncode == 0, result.stderr
    assert f"/checkpoints/step-{cut:08d}.ckpt: step {cut}, in epoch 2" in result.stdout
    assert (
        "2 device(s) x 32 samples x 1 accumulation step(s) = 64 per optimizer step | lr 0.002"
        in result.stdout
    )
    assert max_abs_diff(final(run_dir), final(one_process)) < SAME_MATH
    assert_same_training_log(run_dir, one_process)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(fork, *args: str) -> list[subprocess.CompletedProcess]:
    """Two `torchrun --nnodes 2` commands on this machine, one process per node, as two nodes would run them."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node_rank",
                str(rank),
                "--nproc_per_node",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                str(fork.path / "train.py"),
                "--accelerator",
                "cpu",
                "--devices",
                "1",
                "--num_nodes",
                "2",
                "--strategy",
                "ddp",
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=fork.path,
        )
        for rank in (0, 1)
    ]
    results = [
        subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs
    ]
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results


def test_two_nodes_with_torchrun_make_one_run_that_trains_checkpoints_finishes_and_resumes(
    fork, tmp_path
):
    node0, node1 = torchrun_two_nodes(
        fork,
        "--root_dir",
        str(tmp_path),
        "--epochs",
        "2",
        "--log_interval",
        "2",
        "--logger_name",
        "csv",
        "tensorboard",
    )
    run_dir = only_run_dir(tmp_path)  # one run dir, decided by global rank 0
    assert f"Run dir: {run_dir}" in node0.stdout and f"Run dir: {run_dir}" in node1.stdout
    assert "2 device(s) x 32 samples" in node0.stdout
    assert torch.load(final(run_dir), weights_only=True)["epoch"] == 2
    assert (
        len(list((run_dir / "logs" / "tensorboard").glob("events.*"))) == 1
    )  # one writer: global rank 0

    torchrun_two_nodes(fork, "--resume", str(run_dir), "--epochs", "3")
    assert only_run_dir(tmp_path) == run_dir
    finished = torch.load(final(run_dir), weights_only=True)
    assert finished["epoch"] == 3
    rows = metrics_rows(run_dir)
    train_steps = [int(row["step"]) for row in rows if row["train/loss"]]
    assert train_steps == list(
        range(2, finished["global_step"] + 1, 2)
    )  # one writer: every step once, in order


def test_lightning_fabric_run_launcher(fork, tmp_path):
    fabric_cli = Path(sys.executable).parent / "fabric"
    result = subprocess.run(
        [
            str(fabric_cli),
            "run",
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--strategy",
            "ddp",
            str(fork.path / "train.py"),
            "--root_dir",
            str(tmp_path),
            "--fast_run",
        ],
        capture_output=True,
        text=True,
        cwd=fork.path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 device(s) x 32 samples x 1 accumulation step(s)" in result.stdout
    # The cores are shared between the two processes, as Fabric's own launchers do (not 2 x all cores).
    assert f"cpu, 32-true, {_suggested_max_num_threads(2)} thread(s) per process" in result.stdout
    assert (only_run_dir(tmp_path) / "checkpoints" / "final.ckpt").is_file()


@pytest.mark.parametrize(
    ("precision", "dtype"),
    [("bf16-mixed", torch.float32), ("64-true", torch.float64), ("bf16-true", torch.bfloat16)],
)
def test_cpu_precisions(fork, tmp_path, precision, dtype):
    run_dir = fork.train(tmp_path, "--fast_run", "--accelerator", "cpu", "--precision", precision)
    weights = torch.load(final(run_dir), weights_only=True)["model"]
    assert {w.dtype for w in weights.values()} == {dtype}
    assert all(w.isfinite().all() for w in weights.values())


# Slow storage: every checkpoint file takes 7 s to flush, longer than the 5 s between the checks of Fabric's
# launcher, which ends every process as soon as one exits with a non-zero code.
SLOW_PUBLISH = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, os.getcwd())
    from machinery import checkpoints
    import train
    flush = checkpoints.fsync
    def slow_fsync(path):
        if path.is_file() and (path.name == "meta.pt" or path.parent.name == "checkpoints"):  # once per checkpoint
            time.sleep(7)
        flush(path)
    checkpoints.fsync = slow_fsync
    if __name__ == "__main__":  # Fabric's launcher runs this file for rank 1 too: the slow storage is everyone's
        train.cli(sys.argv[1:])
""")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_a_stop_signal_on_two_processes_ends_only_once_the_announced_checkpoint_is_on_disk(
    fork, tmp_path, strategy
):
    from test_resume import wait_for_step

    runner = fork.path / "slow_publish.py"
    runner.write_text(SLOW_PUBLISH)
    root = tmp_path / "runs"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(runner),
            "--root_dir",
            str(root),
            "--epochs",
            "40",
            "--num_samples",
            "20000",
            "--log_interval",
            "1",
            "--accelerator",
            "cpu",
            "--devices",
            "2",
            "--strategy",
            strategy,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=fork.path,
    )
    wait_for_step(root, 3, proc)
    proc.send_signal(
        signal.SIGTERM
    )  # to rank 0, the launching process; rank 1 learns of it at the next log step (--log_interval 1)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    said = re.search(r"Stopped by SIGTERM at step (\d+): (\S+) saved", out)
    assert said and out.count("Stopped by SIGTERM") == 1, out
    from machinery.checkpoints import checkpoint_step, verify

    verify(
        Path(said.group(2))
    )  # announced, then complete on disk (a file, or FSDP's directory of shards)
    assert checkpoint_step(Path(said.group(2))) == int(said.group(1))
    assert not list(Path(said.group(2)).parent.glob(".*.tmp"))


def test_a_usage_error_on_two_processes_is_one_line(fork, tmp_path):
    # Raised on every rank, after the launch; the launching process alone reports it.
    result = fork.run(
        "train.py",
        "--root_dir",
        str(tmp_path),
        "--fast_run",
        "--monitor",
        "val/acc",
        *TWO_PROCESSES,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --monitor 'val/acc' is not one of: val/loss, val/mae, val/mse"], (
        result.stderr
    )


def test_each_rank_draws_its_own_random_numbers(fork, tmp_path):
    result = fork.run(
        "train.py", "--root_dir", str(tmp_path), "--fast_run", "--dropout", "0.5", *TWO_PROCESSES
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rng = torch.load(final(only_run_dir(tmp_path)), weights_only=True)["rng"]
    # Each rank's stream (torch, numpy, Python): dropout masks differ from rank to rank, as they would on one
    # device over a batch twice the size. Identical streams would repeat one mask pattern on every rank.
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])
    assert rng[0]["numpy"] != rng[1]["numpy"] and rng[0]["python"] != rng[1]["python"]


LONG_RUN = [
    "--epochs",
    "40",
    "--num_samples",
    "20000",
]  # epochs long enough to be interrupted midway


def test_sigterm_to_every_process_of_a_ddp_run_saves_and_leaves_no_process_behind(fork, tmp_path):
    from test_resume import wait_for_step

    root = tmp_path / "runs"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(fork.path / "train.py"),
            "--root_dir",
            str(root),
            *LONG_RUN,
            "--log_interval",
            "1",
            *TWO_PROCESSES,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=fork.path,
        start_new_session=True,
    )  # its own process group, as a job's
    wait_for_step(root, 3, proc)
    os.killpg(
        proc.pid, signal.SIGTERM
    )  # what a scheduler does: the launching process (rank 0) and rank 1
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]
    said = re.search(r"Stopped by SIGTERM at step (\d+): (\S+) saved", out)
    assert said and torch.load(said.group(2), weights_only=True)["global_step"] == int(
        said.group(1)
    )
    for _ in range(100):  # (a process that is exiting takes a moment to be gone)
        left = subprocess.run(
            ["pgrep", "-a", "-g", str(proc.pid)], capture_output=True, text=True
        ).stdout
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"processes left behind: {left}"


# Each rank says when a stop signal reached it (after how many optimizer steps) and at which step it stops: the
# signal handler only notes it (printing from a handler could interrupt a print), the stop reports it.
STOP_REPORTER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, os.getcwd())
    from machinery import run, signals
    import train

    steps_done, received_after = [0], [None]
    log_step = run.Run.log_step
    def counting_log_step(self, *args):  # called after every optimizer step, before it is logged
        steps_done[0] = self.state["global_step"]
        log_step(self, *args)
    run.Run.log_step = counting_log_step

    handle = signals.StopSignals.handle
    def noting_handle(self, signum, frame):
        received_after[0] = steps_done[0]
        handle(self, signum, frame)
    signals.StopSignals.handle = noting_handle

    stop_after_signal = run.stop_after_signal
    def reporting_stop(fabric, signum, checkpoint):
        print(f"rank {fabric.global_rank} (pid {os.getpid()}): signal received after step "
              f"{received_after[0]}, stops at {checkpoint.name}", flush=True)
        stop_after_signal(fabric, signum, checkpoint)
    run.stop_after_signal = reporting_stop

    if __name__ == "__main__":  # Fabric's launcher runs this file for rank 1 too
        train.cli(sys.argv[1:])
""")


def rank_1_pid(launcher: int) -> int:
    """The process that Fabric's ddp launcher (rank 0, `launcher`) started for local rank 1: its child with
    LOCAL_RANK=1 in the environment it was started with."""
    deadline = time.time() + 60
    while time.time() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
                environ = (stat.parent / "environ").read_bytes().split(b"\0")
            except (OSError, ValueError, IndexError):  # a process that is gone, or not ours
                continue
            if parent == launcher and b"LOCAL_RANK=1" in environ:
                return int(stat.parent.name)
        time.sleep(0.1)
    raise AssertionError(f"no rank 1 among the children of {launcher}")


def test_a_stop_signal_is_acted_on_by_every_rank_within_the_log_interval(fork, tmp_path):
    """On several processes the ranks agree on a stop only at log steps (and at an epoch's end): a SIGTERM that
    reaches rank 1 alone stops both ranks at the same step, at most --log_interval optimizer steps after it
    arrived, with the checkpoint of that step; the run exits 143 and resumes from it."""
    from test_resume import wait_for_step

    every = 4
    runner = fork.path / "stop_reporter.py"
    runner.write_text(STOP_REPORTER)
    root = tmp_path / "runs"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(runner),
            "--root_dir",
            str(root),
            *LONG_RUN,
            "--log_interval",
            str(every),
            *TWO_PROCESSES,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=fork.path,
    )
    rank_1 = rank_1_pid(proc.pid)
    wait_for_step(root, 2 * every, proc)  # both ranks are in the loop, their handlers installed
    run_dir = only_run_dir(root)
    logged_before = max(train_losses(run_dir))  # the last log step on disk before the signal
    os.kill(
        rank_1, signal.SIGTERM
    )  # rank 1 only: rank 0, the launching process, hears of it from rank 1
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 143 and "Traceback" not in err, err[-3000:]

    reports = {
        int(rank): (int(pid), None if after == "None" else int(after), int(step))
        for rank, pid, after, step in re.findall(
            r"rank (\d) \(pid (\d+)\): signal received after step (\w+), stops at step-(\d+)\.ckpt",
            out,
        )
    }
    assert reports.keys() == {0, 1}, out
    (_, never, stop), (pid, arrived, stop_1) = reports[0], reports[1]
    assert (
        pid == rank_1 and arrived is not None and never is None
    )  # the signal reached rank 1 alone
    assert stop == stop_1  # both ranks stop at the same optimizer step
    assert stop % every == 0  # a log step: the only steps at which the ranks talk about stopping
    assert (
        logged_before <= arrived <= stop <= arrived + every
    )  # within one log interval of the signal
    said = re.search(r"Stopped by SIGTERM at step (\d+): (\S+) saved", out)
    assert said and int(said.group(1)) == stop and out.count("Stopped by SIGTERM") == 1, out
    checkpoint = Path(said.group(2))
    assert checkpoint == run_dir / "checkpoints" / f"step-{stop:08d}.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == stop

    resumed = fork.run(
        "train.py", "--resume", str(run_dir), "--epochs", "1"
    )  # its config: 2 processes, ddp
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoint}: step {stop}, in epoch 1" in resumed.stdout
    finished = torch.load(final(run_dir), weights_only=True)
    assert finished["epoch"] == 1 and finished["global_step"] > stop


def consolidated_model(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model's state dict from a checkpoint file, or from a sharded checkpoint directory (FSDP), whole, with
    the EMA of its weights under ema/<name>."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return weights_and_ema(
        _load_distributed_checkpoint(checkpoint) if checkpoint.is_dir() else checkpoint
    )


FSDP = ["--accelerator", "cpu", "--devices", "2", "--strategy", "fsdp"]


@pytest.fixture(scope="module")
def fsdp_run(fork, tmp_path_factory) -> Path:
    # The same 2 x 16 x 2 split as the DDP run, each process holding half of every layer (FSDP2, over gloo).
    root = tmp_path_factory.mktemp("fsdp")
    result = fork.run(
        "train.py", "--root_dir", str(root), *ARGS, *FSDP, "--max_batch_size_per_device", "16"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return only_run_dir(root)


def test_fsdp_does_the_math_of_ddp_and_saves_sharded_checkpoints(fsdp_run, two_processes):
    sharded = final(fsdp_run)
    assert sharded.is_dir() and {p.name for p in sharded.iterdir()} == {
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "meta.pt",
        "checksums.json",  # every file's size and CRC-32, checked on load
    }
    fsdp, ddp = consolidated_model(sharded), consolidated_model(final(two_processes[0]))
    assert (
        fsdp.keys() == ddp.keys()
        and max((fsdp[k] - ddp[k]).abs().max().item() for k in fsdp) < SAME_MATH
    )
    assert_same_training_log(fsdp_run, two_processes[0])
    assert not list(
        (fsdp_run / "checkpoints").glob(".*")
    )  # every temporary directory was published or removed
    # What rank 0 holds of the parameters and the optimizer state: about half (FSDP2 splits each tensor's first
    # dimension; the toy's one-row output layer stays whole on rank 0).
    fsdp_memory, ddp_memory = memory_logged(fsdp_run), memory_logged(two_processes[0])
    assert all(
        0.4 * ddp_memory[k] < fsdp_memory[k] < 0.75 * ddp_memory[k]
        for k in ("params", "optimizer_state")
    )


def memory_logged(run_dir: Path) -> dict[str, float]:
    rows = [r for r in metrics_rows(run_dir) if r.get("memory/params")]
    return {
        k.removeprefix("memory/"): float(v) for k, v in rows[-1].items() if k.startswith("memory/")
    }


def test_sigkill_mid_publish_under_fsdp_resumes_bitwise_and_rotates_directories(
    fork, fsdp_run, tmp_path
):
    from test_resume import crash

    root = tmp_path / "runs"
    args = [
        "--root_dir",
        str(root),
        *ARGS,
        *FSDP,
        "--max_batch_size_per_device",
        "16",
        "--num_checkpoint_keep",
        "2",
    ]
    killed = crash(
        fork, "before_rename", 2, *args
    )  # rank 0 dies with the 2nd directory complete, not yet renamed
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    run_dir = only_run_dir(root)
    assert list(
        (run_dir / "checkpoints").glob(".step-*.tmp")
    )  # the directory it was about to publish
    resumed = fork.run("train.py", "--resume", str(run_dir))  # its config: fsdp on 2 processes
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = consolidated_model(final(run_dir)), consolidated_model(final(fsdp_run))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "best.ckpt",
        "final.ckpt",
        *[p.name for p in sorted((fsdp_run / "checkpoints").glob("step-*"))[-2:]],
    ]


def test_a_sharded_checkpoint_resumes_on_one_process_without_fsdp(
    fork, fsdp_run, one_process, tmp_path
):
    run_dir, cut = cut_mid_epoch_2(fsdp_run, tmp_path / "cut")
    result = fork.call(
        "train.py",
        "--resume",
        str(run_dir),
        "--accelerator",
        "cpu",
        "--devices",
        "1",
        "--strategy",
        "auto",
    )
    assert result.returncode == 0, result.stderr
    assert f"/checkpoints/step-{cut:08d}.ckpt: step {cut}, in epoch 2" in result.stdout
    whole = torch.load(final(run_dir), weights_only=True)["model"]  # a file again: no FSDP any more
    reference = consolidated_model(final(one_process))
    assert max((whole[k] - reference[k]).abs().max().item() for k in whole) < SAME_MATH


def test_a_ddp_checkpoint_resumes_under_fsdp(fork, two_processes, one_process, tmp_path):
    run_dir, cut = cut_mid_epoch_2(two_processes[0], tmp_path / "cut")
    result = fork.run("train.py", "--resume", str(run_dir), *FSDP)
    assert result.returncode == 0, result.stderr[-3000:]
    assert final(run_dir).is_dir()
    fsdp, reference = consolidated_model(final(run_dir)), consolidated_model(final(one_process))
    assert max((fsdp[k] - reference[k]).abs().max().item() for k in fsdp) < SAME_MATH


def test_a_sharded_run_is_evaluated_on_one_or_two_processes_and_exported_to_one_file(
    fork, fsdp_run, tmp_path
):
    reports = []
    for devices in ["2", "1"]:
        result = fork.run(
            "test.py", "--out_dir", str(fsdp_run), "--accelerator", "cpu", "--devices", devices
        )
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((fsdp_run / "test" / "metrics.json").read_text()))
    assert_same_report(*reports)
    exported = tmp_path / "final.pt"  # the README's one command
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning.fabric.utilities.consolidate_checkpoint",
            str(final(fsdp_run)),
            "--output_file",
            str(exported),
        ],
        check=True,
        capture_output=True,
    )
    whole = torch.load(exported, weights_only=True)
    assert (
        whole["global_step"]
        == torch.load(final(fsdp_run) / "meta.pt", weights_only=True)["global_step"]
    )
    sharded = consolidated_model(final(fsdp_run))
    assert weights_and_ema(whole).keys() == sharded.keys()
    assert all(torch.equal(weights_and_ema(whole)[k], v) for k, v in sharded.items())


def test_fsdp_with_bf16_mixed_keeps_float32_shards(fork, tmp_path):
    result = fork.run(
        "train.py", "--root_dir", str(tmp_path), "--fast_run", *FSDP, "--precision", "bf16-mixed"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    weights = consolidated_model(
        final(only_run_dir(tmp_path))
    )  # gathered in bf16 to compute, kept in float32
    assert {w.dtype for w in weights.values()} == {torch.float32} and all(
        w.isfinite().all() for w in weights.values()
    )


def test_early_stopping_is_agreed_by_both_processes_and_resumes_with_its_count(fork, tmp_path):
    # No change is larger than 1e9: epoch 1 sets the reference and every later epoch is stale, so a patience of 3
    # stops the 6-epoch run after epoch 4 (whatever the numbers), on both ranks at once.
    early = ["--epochs", "6", "--early_stopping_patience", "3", "--early_stopping_min_delta", "1e9"]
    result = fork.run(
        "train.py",
        "--root_dir",
        str(tmp_path / "two"),
        *ARGS,
        *TWO_PROCESSES,
        "--max_batch_size_per_device",
        "16",
        *early,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = only_run_dir(tmp_path / "two")
    saved = torch.load(final(run_dir), weights_only=True)
    per_epoch = saved["global_step"] // 4
    assert saved["epoch"] == 4 and saved["patience"]["stale_epochs"] == 3
    assert (
        result.stdout.count(
            "stopped early after epoch 4: val/mae has not improved by more than 1e+09 for 3 "
            "epochs (--early_stopping_patience 3)"
        )
        == 1
    )
    assert (run_dir / "checkpoints" / f"step-{4 * per_epoch:08d}.ckpt").exists()
    assert [r["step"] for r in val_rows(run_dir)] == [k * per_epoch for k in (1, 2, 3, 4)]

    # Back to the checkpoint of epoch 2 (one stale epoch counted), resumed on one process: it stops after epoch 4
    # again, with the same weights. A count that started over would train on to the end of epoch 6.
    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    for ckpt in (cut / "checkpoints").glob("*.ckpt"):
        if ckpt.name == "final.ckpt" or (
            ckpt.name.startswith("step-") and int(ckpt.stem[5:]) > 2 * per_epoch
        ):
            ckpt.unlink()
    one = ["--accelerator", "cpu", "--devices", "1", "--strategy", "auto"]
    resumed = fork.call("train.py", "--resume", str(cut), *one)
    assert resumed.returncode == 0, resumed.stderr
    assert "stopped early after epoch 4: " in resumed.stdout
    assert max_abs_diff(final(cut), final(run_dir)) < SAME_MATH

    # Stopped (a signal, --max_time) right after the epoch that ran out of patience: a resume only finishes the run.
    signalled = tmp_path / "signalled"
    shutil.copytree(run_dir, signalled)
    (signalled / "checkpoints" / "final.ckpt").unlink()
    finished = fork.call("train.py", "--resume", str(signalled), *one)
    assert (
        finished.returncode == 0
        and "The run ran out of patience at epoch 4: val/mae has not improved by more "
        "than 1e+09 for 3 epochs (--early_stopping_patience 3); finishing the run"
        in finished.stdout
    )
    assert torch.load(final(signalled), weights_only=True)["global_step"] == 4 * per_epoch

    # A run that stopped early says so when resumed; a larger patience trains it on.
    again = fork.call("train.py", "--resume", str(run_dir), *one)
    assert (
        again.returncode == 0
        and "The run ran out of patience at epoch 4: val/mae has not improved by more than 1e+09 "
        "for 3 epochs (--early_stopping_patience 3); pass a larger "
        "--early_stopping_patience to train further."
        in again.stdout
    )
    longer = fork.call("train.py", "--resume", str(run_dir), *one, "--early_stopping_patience", "4")
    assert longer.returncode == 0 and "stopped early after epoch 5: " in longer.stdout


def test_a_write_that_fails_on_rank_0_stops_both_processes_in_one_line(fork, tmp_path):
    # Only rank 0 writes, in a background thread; its failure must stop rank 1 too, not leave it waiting forever
    # in the next collective while rank 0 exits.
    from test_resume import crash

    failed = crash(
        fork,
        "disk_full",
        2,
        "--root_dir",
        str(tmp_path),
        "--epochs",
        "2",
        "--num_samples",
        "767",
        "--checkpoint_every_n_steps",
        "3",
        *TWO_PROCESSES,
    )
    assert failed.returncode == 4 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    run_dir = only_run_dir(tmp_path)
    reported = [line for line in failed.stderr.splitlines() if "No space left on device" in line]
    assert len(reported) == 1 and re.fullmatch(
        rf"error: No space left on device: {run_dir}/checkpoints/\.step-\d+\.ckpt\.\d+\.tmp",
        reported[0],
    ), reported
    assert [p.name for p in (run_dir / "checkpoints").glob("step-*.ckpt")] == ["step-00000003.ckpt"]


@pytest.mark.parametrize(
    ("strategy", "killed"), [("fsdp", "rank 1"), ("ddp", "the launcher (rank 0)")]
)
def test_when_a_rank_dies_the_survivor_says_so_in_one_line_and_the_run_resumes(
    fork, tmp_path, strategy, killed
):
    from test_resume import wait_for_step

    root, flags = tmp_path / "runs", [*TWO_PROCESSES[:-1], strategy]
    args = ["--root_dir", str(root), *LONG_RUN, "--checkpoint_every_n_steps", "2", *flags]
    proc = subprocess.Popen(
        [sys.executable, str(fork.path / "train.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=fork.path,
    )
    wait_for_step(root, 3, proc)
    os.kill(rank_1_pid(proc.pid) if killed == "rank 1" else proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=180)  # the pipe closes when the survivor is gone too
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == (1 if killed == "rank 1" else -signal.SIGKILL)
    survivor, prefix = ("0", "") if killed == "rank 1" else ("1", r"\[local rank 1\] ")
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert re.fullmatch(
        rf"{prefix}error: another process of the run is gone \(({LOST})\): rank {survivor} "
        r"stopped too; the checkpoints on disk stay",
        line,
    )
    run_dir = only_run_dir(root)
    newest = max((run_dir / "checkpoints").glob("step-*"))
    resumed = fork.run("train.py", "--resume", str(run_dir), *flags, "--epochs", "1")  # shorter
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resuming from {newest}: step {int(newest.name[5:13])}, in epoch 1" in resumed.stdout


LOST = "Connection reset by peer|Connection closed by peer|Broken pipe|remote process exit"
