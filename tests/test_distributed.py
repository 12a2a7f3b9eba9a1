"""Scale-out: real multi-process runs (2 CPU processes over gloo) give the numbers of 1 process, evaluation
counts every sample once, runs resume on another world size, and the launchers users know all work."""

import csv
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, model_weights, only_run_dir, run_script, train_in_process
from lightning.fabric import Fabric

from config import ArchConfig, DataConfig, OptimConfig
from data import GlobalBatchSampler, load_splits, make_eval_loader, make_train_loader
from utils import launch

pytestmark = pytest.mark.slow

# Deterministic math (no dropout; the CNN has no batch norm). Checkpoints every 10 steps, all kept, so that a run
# can be cut at step 30, in the middle of epoch 2, and resumed on another world size.
ARGS = ["--epochs", "3", "--dropout", "0", "--checkpoint_every_n_steps", "10", "--num_checkpoint_keep", "100"]
TWO_PROCESSES = ["--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]


def max_abs_diff(a: Path, b: Path) -> float:
    wa, wb = model_weights(a), model_weights(b)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    return train_in_process(tmp_path_factory.mktemp("one"), *ARGS)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("two")
    # 2 processes x 16 samples x 2 accumulation steps: the same 64 samples per step as 1 x 64 x 1.
    result = run_script("train.py", "--root_dir", str(root), *ARGS, *TWO_PROCESSES, "--max_batch_size_per_device", "16")
    assert result.returncode == 0, result.stderr
    return only_run_dir(root), result.stdout


def test_two_processes_end_within_1e5_of_one_process(one_process, two_processes):
    two, stdout = two_processes
    assert "2 device(s) x 16 samples x 2 accumulation step(s) = 64 per optimizer step | lr 0.002" in stdout
    assert max_abs_diff(one_process / "checkpoints" / "final.ckpt", two / "checkpoints" / "final.ckpt") < 1e-5


def _global_batches(fabric: Fabric, num_samples: int, eff_batch_size: int, max_per_device: int) -> list[list[int]]:
    """The sample ids of every optimizer step of two epochs, gathered from all ranks of a real run."""
    per_device, accum = OptimConfig(eff_batch_size=eff_batch_size,
                                    max_batch_size_per_device=max_per_device).micro_batching(fabric.world_size)
    sampler = GlobalBatchSampler(num_samples, eff_batch_size, per_device, fabric.global_rank, fabric.world_size, 0)
    dataset = torch.utils.data.TensorDataset(torch.arange(num_samples))
    loader = fabric.setup_dataloaders(make_train_loader(dataset, sampler, 0), use_distributed_sampler=False)
    steps = []
    for epoch in range(2):
        sampler.set_position(epoch)
        micro_batches = [ids for (ids,) in loader]
        for i in range(0, len(micro_batches), accum):
            step_ids = torch.cat(micro_batches[i:i + accum])
            steps.append(sorted(fabric.all_gather(step_ids).flatten().tolist()))
    return steps


def test_one_and_two_processes_see_the_same_global_batches():
    one = launch(Fabric(accelerator="cpu", devices=1), _global_batches, 300, 48, 48)
    two = launch(Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn"), _global_batches, 300, 48, 8)
    assert len(one) == 2 * (300 // 48)
    assert one == two


def _evaluate(fabric: Fabric, weights: dict, split: str) -> dict:
    from model import build_model
    from train import evaluate

    train_set, val_set, test_set, info = load_splits(DataConfig(), seed=42)
    dataset = {"val": val_set, "test": test_set}[split]
    model = build_model(ArchConfig(), info)
    model.load_state_dict(weights)
    model = fabric.setup(model)
    loader = fabric.setup_dataloaders(make_eval_loader(dataset, 16, fabric.global_rank, fabric.world_size, 0),
                                      use_distributed_sampler=False)
    return evaluate(fabric, model, loader, info.num_classes)


@pytest.mark.parametrize("split", ["val", "test"])  # 143 and 359 samples: neither divides by 2 (or by 16)
def test_distributed_evaluation_counts_every_sample_exactly_once(one_process, split):
    weights = model_weights(one_process / "checkpoints" / "final.ckpt")
    one = launch(Fabric(accelerator="cpu", devices=1), _evaluate, weights, split)
    two = launch(Fabric(accelerator="cpu", devices=2, strategy="ddp_spawn"), _evaluate, weights, split)
    assert one["num_samples"] == two["num_samples"] == {"val": 143, "test": 359}[split]
    assert one["acc"] == two["acc"] and one["macro_f1"] == pytest.approx(two["macro_f1"], abs=1e-7)
    assert one["loss"] == pytest.approx(two["loss"], abs=1e-6)


def test_test_py_on_two_devices_reports_what_one_device_does(one_process):
    reports = []
    for devices in ["1", "2"]:
        result = run_script("test.py", "--out_dir", str(one_process), "--accelerator", "cpu", "--devices", devices)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("Test split"))
        reports.append(lines[start:start + 16])  # the header, 3 metrics, and the per-class table
    assert reports[0] == reports[1]
    assert "359 samples" in reports[0][0] and "accuracy" in reports[0][2] and reports[0][-1].strip().startswith("9")


def cut_at_step_30(run_dir: Path, to: Path) -> Path:
    """A copy of `run_dir` as if it had been killed after its step-30 checkpoint, mid-epoch 2."""
    shutil.copytree(run_dir, to)
    for ckpt in (to / "checkpoints").glob("*.ckpt"):
        if ckpt.name == "final.ckpt" or (ckpt.name.startswith("step-") and int(ckpt.stem[5:]) > 30):
            ckpt.unlink()
    return to


def test_checkpointed_on_two_processes_resumes_on_one(two_processes, one_process, tmp_path, capsys):
    run_dir = cut_at_step_30(two_processes[0], tmp_path / "cut")
    import utils
    from config import parse_train_config
    from train import main

    cfg = parse_train_config(["--resume", str(run_dir), "--accelerator", "cpu", "--devices", "1", "--strategy", "auto"])
    utils.make_fabric("cpu", "1").launch(main, cfg)
    out = capsys.readouterr().out
    assert "from step-00000030.ckpt: epoch 1, step 30" in out
    # The run was configured with --max_batch_size_per_device 16: on one device that means 4 accumulation steps.
    assert "1 device(s) x 16 samples x 4 accumulation step(s) = 64 per optimizer step | lr 0.002" in out
    assert max_abs_diff(run_dir / "checkpoints" / "final.ckpt", one_process / "checkpoints" / "final.ckpt") < 1e-5


def test_checkpointed_on_one_process_resumes_on_two(one_process, tmp_path):
    run_dir = cut_at_step_30(one_process, tmp_path / "cut")
    result = run_script("train.py", "--resume", str(run_dir), *TWO_PROCESSES)
    assert result.returncode == 0, result.stderr
    assert "2 device(s) x 32 samples x 1 accumulation step(s) = 64 per optimizer step | lr 0.002" in result.stdout
    assert max_abs_diff(run_dir / "checkpoints" / "final.ckpt", one_process / "checkpoints" / "final.ckpt") < 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_two_nodes(*args: str) -> list[subprocess.CompletedProcess]:
    """Two `torchrun --nnodes 2` commands on this machine, one process per node, as two nodes would run them."""
    port = str(free_port())
    procs = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node",
         "1", "--master_addr", "127.0.0.1", "--master_port", port, str(REPO / "train.py"), "--accelerator", "cpu",
         "--devices", "1", "--num_nodes", "2", "--strategy", "ddp", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO) for rank in (0, 1)]
    results = [subprocess.CompletedProcess(p.args, p.wait(timeout=300), *p.communicate()) for p in procs]
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]
    return results


def test_two_nodes_with_torchrun_make_one_run_that_trains_checkpoints_finishes_and_resumes(tmp_path):
    node0, node1 = torchrun_two_nodes("--root_dir", str(tmp_path), "--epochs", "2",
                                      "--logger_name", "csv", "tensorboard")
    run_dir = only_run_dir(tmp_path)  # one run dir, decided by global rank 0
    assert f"Run dir: {run_dir}" in node0.stdout and f"Run dir: {run_dir}" in node1.stdout
    assert "2 device(s) x 32 samples" in node0.stdout
    assert torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)["epoch"] == 2
    assert len(list((run_dir / "logs" / "tensorboard").glob("events.*"))) == 1  # one writer: global rank 0

    torchrun_two_nodes("--resume", str(run_dir), "--epochs", "3")
    assert only_run_dir(tmp_path) == run_dir
    assert torch.load(run_dir / "checkpoints" / "final.ckpt", weights_only=True)["epoch"] == 3
    rows = csv.DictReader(open(run_dir / "logs" / "csv" / "metrics.csv"))
    train_steps = [int(row["step"]) for row in rows if row["train/loss"]]
    assert train_steps == list(range(10, 61, 10))  # one writer: every step once, in order, across the resume


def test_lightning_fabric_run_launcher(tmp_path):
    fabric_cli = Path(sys.executable).parent / "fabric"
    result = subprocess.run([str(fabric_cli), "run", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
                             str(REPO / "train.py"), "--root_dir", str(tmp_path), "--fast_run"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 device(s) x 32 samples x 1 accumulation step(s)" in result.stdout
    assert (only_run_dir(tmp_path) / "checkpoints" / "final.ckpt").is_file()


def test_ddp_spawn_strategy(tmp_path):
    result = run_script("train.py", "--root_dir", str(tmp_path), "--fast_run", "--accelerator", "cpu", "--devices",
                        "2", "--strategy", "ddp_spawn")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 device(s) x 32 samples" in result.stdout
    assert (only_run_dir(tmp_path) / "checkpoints" / "final.ckpt").is_file()


@pytest.mark.parametrize(("precision", "dtype"), [("bf16-mixed", torch.float32), ("64-true", torch.float64),
                                                  ("bf16-true", torch.bfloat16)])
def test_cpu_precisions(tmp_path, precision, dtype):
    run_dir = train_in_process(tmp_path, "--fast_run", "--accelerator", "cpu", "--precision", precision)
    weights = model_weights(run_dir / "checkpoints" / "final.ckpt")
    assert {w.dtype for w in weights.values()} == {dtype}
    assert all(w.isfinite().all() for w in weights.values())
