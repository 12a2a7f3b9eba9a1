"""--detect_anomaly, --deterministic (off by default), FLOPs (on the meta device) and memory."""

import os
import warnings
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.throughput import measure_flops


def set_debug_modes(cfg: Any) -> None:
    torch.autograd.set_detect_anomaly(cfg.detect_anomaly)
    torch.use_deterministic_algorithms(cfg.deterministic)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.benchmark = False


def training_flops(arch: Any, info: Any, batch: Any) -> int | None:
    """None, with a warning, where they cannot be counted."""
    import task
    from model import build_model

    try:
        with torch.device("meta"), torch.autograd.set_detect_anomaly(False):  # NaN checks need data
            model, batch = build_model(arch, info, False), move_data_to_device(batch, "meta")
            return measure_flops(model, lambda: task.forward(model, batch)[0], lambda loss: loss)
    except Exception as err:  # noqa: BLE001 - throughput without FLOPs is still worth having
        why = f"the FLOPs cannot be counted on the meta device ({err!r:.200})"
        warnings.warn(f"no FLOPs/s or MFU: {why}", stacklevel=2)


def memory_per_process(model: torch.nn.Module, optimizer: Any, device: Any) -> dict[str, float]:
    """MiB of this process's shards, and CUDA's peak."""

    def mib(tensors: Any) -> float:
        local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
        return sum(t.nbytes for t in local if torch.is_tensor(t)) / 2**20

    states = [value for state in optimizer.state.values() for value in state.values()]
    memory = {"params": mib(model.parameters()), "optimizer_state": mib(states)}
    if device.type == "cuda":
        memory["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory
