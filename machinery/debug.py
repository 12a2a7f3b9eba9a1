"""--detect_anomaly, --deterministic (off by default) and memory."""

import os
from typing import Any

import torch


def set_debug_modes(cfg: Any) -> None:
    torch.autograd.set_detect_anomaly(cfg.detect_anomaly)
    torch.use_deterministic_algorithms(cfg.deterministic)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.backends.cudnn.benchmark = False


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
