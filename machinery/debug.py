"""Debugging and measuring: --detect_anomaly, --deterministic, --profile, FLOPs and memory.

Guarantees: all off by default and free when off; --profile traces optimizer steps 3 to 5 of a
launch (one trace per rank); FLOPs are counted on the meta device (no memory, no time), or skipped
with a warning where an operation has no meta kernel."""

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.throughput import measure_flops


def set_debug_modes(cfg: Any) -> None:
    """--detect_anomaly and --deterministic, for this process (before any model is built)."""
    torch.autograd.set_detect_anomaly(cfg.detect_anomaly)
    torch.use_deterministic_algorithms(cfg.deterministic)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.benchmark = False  # autotuning may pick another algorithm on each run


class NoProfiler:
    def step(self) -> None:
        pass


@contextlib.contextmanager
def step_profiler(enabled: bool, run_dir: Path, fabric: Fabric, steps_left: int) -> Iterator[Any]:
    """--profile: torch.profiler over optimizer steps 3 to 5 (the first pays for one-time work, the
    second warms up); each rank writes RUN_DIR/profile/rankN.*.pt.trace.json, rank 0 prints the top
    ops. Call `.step()` after each optimizer step."""
    if enabled and steps_left < 5:
        fabric.print(
            f"--profile: {steps_left} optimizer step(s) to train, fewer than 5: nothing to trace"
        )
    if not enabled or steps_left < 5:
        yield NoProfiler()
        return
    folder, cuda = run_dir / "profile", fabric.device.type == "cuda"

    def write(profiler: torch.profiler.profile) -> None:
        name = f"rank{fabric.global_rank}"
        torch.profiler.tensorboard_trace_handler(str(folder), worker_name=name)(profiler)
        if fabric.is_global_zero:
            key = "self_device_time_total" if cuda else "self_cpu_time_total"
            print(profiler.key_averages().table(sort_by=key, row_limit=12), flush=True)
            print(
                f"--profile: steps 3-5 traced in {folder}: tensorboard --logdir {folder}, or "
                "open the .json file at https://ui.perfetto.dev",
                flush=True,
            )

    activities = [torch.profiler.ProfilerActivity.CPU]
    activities += [torch.profiler.ProfilerActivity.CUDA] if cuda else []
    steps_3_to_5 = torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1)
    with torch.profiler.profile(
        activities=activities, schedule=steps_3_to_5, on_trace_ready=write, record_shapes=True
    ) as profiler:
        yield profiler


def training_flops(
    build_model: Callable[[], torch.nn.Module], forward: Callable, batch: Any
) -> int | None:
    """FLOPs of a forward and backward pass over `batch` (`forward(model, batch)[0]` is the loss),
    counted on the meta device; None, with a warning, where an op has no meta kernel."""
    try:
        with torch.device("meta"), torch.autograd.set_detect_anomaly(False):  # NaN checks need data
            model, batch = build_model(), move_data_to_device(batch, "meta")
            return measure_flops(model, lambda: forward(model, batch)[0], lambda loss: loss)
    except Exception as err:  # noqa: BLE001 - throughput without FLOPs is still worth having
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        warnings.warn(
            f"no FLOPs/s or MFU: the FLOPs cannot be counted on the meta device ({reason})",
            stacklevel=2,
        )
        return None


def memory_per_process(
    model: torch.nn.Module, optimizer: Any, device: torch.device
) -> dict[str, float]:
    """MiB this process holds for the parameters and the optimizer state (its shards under FSDP),
    and on CUDA the allocator's peak."""

    def mib(tensors: Any) -> float:
        local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
        return (
            sum(t.numel() * t.element_size() for t in local if isinstance(t, torch.Tensor)) / 2**20
        )

    states = [value for state in optimizer.state.values() for value in state.values()]
    memory = {"params": mib(model.parameters()), "optimizer_state": mib(states)}
    if device.type == "cuda":
        memory["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory
