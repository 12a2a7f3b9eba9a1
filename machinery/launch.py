"""Fabric from the config; however a process ends, it leaves its group and flushes its loggers."""

import gc
import os
import re
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import DoublePrecision
from lightning.fabric.plugins import environments as envs
from lightning.fabric.strategies import ModelParallelStrategy

from machinery.debug import set_debug_modes
from machinery.errors import LAUNCHER_ENV, STARTED_BY_LAUNCHER, LostProcess, UsageError
from machinery.loggers import RunLogger
from machinery.signals import Preempted


def run(main: Callable, cfg: Any, hw: Any) -> None:
    loggers = [RunLogger(cfg)] if hasattr(cfg, "logger_name") else []
    args = hw.accelerator, hw.devices, hw.num_nodes, hw.strategy, hw.precision
    fabric = make_fabric(*args, loggers)
    if hasattr(cfg, "optim"):
        cfg.optim.micro_batching(fabric.world_size)  # fails early
        set_debug_modes(cfg.debug)
    status = "failed"
    try:
        if os.environ.get("LT_CLI_USED"):  # `fabric run` gives each process all cores
            if os.environ.get("OMP_NUM_THREADS") == str(os.cpu_count()):
                per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
                torch.set_num_threads(max(1, os.cpu_count() // per_node))
            call_then_leave_process_group(main, cfg, fabric)
        else:
            os.environ[LAUNCHER_ENV] = str(os.getpid())
            fabric.launch(partial(call_then_leave_process_group, main, cfg))
        status = "success"
    except Preempted as stopped:
        sys.exit(0 if STARTED_BY_LAUNCHER else stopped.exit_code)
    finally:
        os.environ.pop(LAUNCHER_ENV, None)
        for logger in fabric.loggers:
            logger.finalize(status)


def make_fabric(
    accelerator: str,
    devices: str,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "32-true",
    loggers: list | None = None,
) -> Fabric:
    launchers = [getattr(envs, f"{n}Environment") for n in ("SLURM", "TorchElastic", "LSF", "MPI")]
    if num_nodes > 1 and "NODE_RANK" not in os.environ and not any(e.detect() for e in launchers):
        where = "every node with torchrun, `fabric run` or SLURM's srun"
        raise UsageError(f"--num_nodes {num_nodes}: start it on {where}, or it waits forever")
    options = dict(accelerator=accelerator, devices=devices, num_nodes=num_nodes, loggers=loggers)
    plugins, named, chosen = [], precision, strategy
    try:
        if strategy == "fsdp":  # FSDP2, data parallel only
            from torch.distributed.fsdp import MixedPrecisionPolicy as Policy

            import model

            mixed = precision == "bf16-mixed"
            policy = Policy(torch.bfloat16, torch.float32) if mixed else Policy()
            default = partial(shard_layers, mp_policy=policy)
            world_size = Fabric(**options, strategy="ddp").world_size
            sizes = {"data_parallel_size": world_size, "tensor_parallel_size": 1}
            chosen = ModelParallelStrategy(getattr(model, "parallelize", default), **sizes)
            if precision == "64-true":  # Fabric refuses the name for FSDP2, not the plugin
                plugins, named = [DoublePrecision()], None
        return Fabric(**options, strategy=chosen, precision=named, plugins=plugins)
    except (ValueError, RuntimeError, TypeError, ImportError) as err:
        flags = f"--accelerator {accelerator} --devices {devices} --num_nodes {num_nodes}"
        reason = f"{flags} --strategy {strategy}: {' '.join(str(err).split())}"
        raise UsageError(f"cannot start Fabric with {reason}") from None


def shard_layers(model: torch.nn.Module, mesh: Any, mp_policy: Any) -> torch.nn.Module:
    """Each module with parameters of its own, then the root."""
    from torch.distributed.fsdp import fully_shard

    options = {"mesh": mesh["data_parallel"], "mp_policy": mp_policy}
    for module in model.modules():
        if module is not model and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, **options)
    return fully_shard(model, **options)


def setup_model(fabric: Fabric, model: torch.nn.Module, hw: Any) -> Any:
    if hw.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fabric.device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    return fabric.setup_module(torch.compile(model) if hw.compile else model)


def call_then_leave_process_group(function: Callable, cfg: Any, fabric: Fabric) -> Any:
    try:
        return function(fabric, cfg)
    except RuntimeError as err:  # a lost peer?
        lost = re.search(
            r"Connection (reset|closed) by peer|Broken pipe|remote process exit", str(err)
        )
        if fabric.world_size == 1 or not lost:
            raise
        where = f"another process of the run is gone ({lost[0]}): rank {fabric.global_rank}"
        raise LostProcess(f"{where} stopped too; the checkpoints on disk stay") from err
    finally:
        if torch.distributed.is_initialized():  # exiting with the group up may abort
            torch.distributed.destroy_process_group()
            gc.collect()  # a group in a cycle keeps gloo's threads, which may abort
