"""Launching: Fabric from the config, the strategies, the processes, and how the run's process ends.

Guarantees: the template is a script, launched from a shell: one process, or Fabric's launcher (ddp,
fsdp), torchrun, `fabric run` or SLURM starting one per device; a usage error is reported once, in
one line; --strategy fsdp is FSDP2 (torch's fully_shard, CPUs too); every process leaves its process
group before it exits, and the loggers are flushed however the run ends.
"""

import gc
import os
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import DoublePrecision
from lightning.fabric.strategies import ModelParallelStrategy

from machinery.checkpoints import DirectCheckpointIO
from machinery.errors import LAUNCHER_ENV, UsageError, started_by_launcher
from machinery.signals import Preempted


def run(main: Callable, cfg: Any, hw: Any) -> None:
    """main(fabric, cfg) on every process. A training config gets its loggers (opened by
    machinery/run)."""
    from machinery.debug import set_debug_modes
    from machinery.loggers import RunLogger

    loggers = [RunLogger(cfg)] if hasattr(cfg, "logger_name") else []
    fabric = make_fabric(
        hw.accelerator, hw.devices, hw.num_nodes, hw.strategy, hw.precision, loggers
    )
    if hasattr(cfg, "optim"):
        cfg.optim.micro_batching(
            fabric.world_size
        )  # a batch size that does not divide: before launch
        set_debug_modes(cfg.debug)
    status = "failed"
    try:
        if os.environ.get(
            "LT_CLI_USED"
        ):  # `fabric run` (Lightning's CLI) has started the processes
            share_cpu_threads()
            call_then_leave_process_group(main, cfg, fabric)
        else:
            os.environ[LAUNCHER_ENV] = str(os.getpid())  # the processes Fabric starts inherit it
            fabric.launch(partial(call_then_leave_process_group, main, cfg))
        status = "success"
    except Preempted as stopped:  # the checkpoint is on disk, and the run said so
        sys.exit(0 if started_by_launcher() else stopped.exit_code)
    finally:
        os.environ.pop(LAUNCHER_ENV, None)
        for logger in fabric.loggers:  # flush what is buffered, whatever happened
            logger.finalize(status)


def make_fabric(
    accelerator: str,
    devices: str,
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str = "32-true",
    loggers: list | None = None,
) -> Fabric:
    """--strategy fsdp: FSDP2 through Fabric's ModelParallelStrategy (every process one
    data-parallel shard); fsdp1: Fabric's FSDPStrategy (GPUs). Other names go to Fabric as they are.
    """
    devices_arg = (
        int(devices) if devices.lstrip("-").isdigit() else devices
    )  # "2" -> 2; "0,1" as is
    options = dict(
        accelerator=accelerator, devices=devices_arg, num_nodes=num_nodes, loggers=loggers
    )
    named: str | None = precision
    # Our writer straight into checkpoints/ (Fabric's goes through $TMPDIR); FSDP2 writes its own
    # shards.
    plugins: list = [DirectCheckpointIO()]
    chosen: Any = {"fsdp1": "fsdp"}.get(strategy, strategy)
    try:
        if strategy == "fsdp":
            import model as task_models

            world_size = Fabric(**options, strategy="ddp").world_size
            shard = getattr(task_models, "parallelize", None)
            if shard is None and precision == "bf16-mixed":  # bf16 all-gathers, float32 reductions
                from torch.distributed.fsdp import MixedPrecisionPolicy

                policy = MixedPrecisionPolicy(
                    param_dtype=torch.bfloat16, reduce_dtype=torch.float32
                )
                shard = partial(shard_layers, mp_policy=policy)
            chosen = ModelParallelStrategy(
                shard or shard_layers, data_parallel_size=world_size, tensor_parallel_size=1
            )
            plugins = []
            if precision == "64-true":  # Fabric refuses the name for FSDP2, not the plugin
                plugins, named = [DoublePrecision()], None
        return Fabric(**options, strategy=chosen, precision=named, plugins=plugins)
    except (ValueError, RuntimeError, TypeError, ImportError) as err:  # --accelerator cuda, no GPU
        flags = f"--accelerator {accelerator} --devices {devices} --num_nodes {num_nodes}"
        reason = " ".join(str(err).split())
        raise UsageError(
            f"cannot start Fabric with {flags} --strategy {strategy}: {reason}"
        ) from None


def shard_layers(model: torch.nn.Module, mesh: Any, mp_policy: Any = None) -> torch.nn.Module:
    """FSDP2's default for a model whose model.py defines no `parallelize(model, mesh)`: each module
    with parameters of its own is a unit (gathered only while it computes), then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = {"mesh": mesh["data_parallel"], "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for module in model.modules():
        if module is not model and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, **options)
    return fully_shard(model, **options)


def setup_model(fabric: Fabric, model: torch.nn.Module, hw: Any) -> Any:
    """--activation_checkpointing, --channels_last, TF32 on GPUs, --compile, then
    fabric.setup_module."""
    if hw.activation_checkpointing:
        checkpoint_activations(model)
    if hw.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fabric.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on GPUs that have them
    return fabric.setup_module(torch.compile(model) if hw.compile else model)


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Each block (a child of the model with parameters) recomputes its activations in the backward
    pass, with torch's non-reentrant checkpoint, which replays the RNG: the same gradients as
    without, and the same state dict keys (the block's forward is wrapped, not the block)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.children():
        if any(True for _ in block.parameters()):
            block.forward = partial(checkpoint, block.forward, use_reentrant=False)


def share_cpu_threads() -> None:
    """`fabric run` gives every process all the cores (OMP_NUM_THREADS); share them, as Fabric's own
    launchers do (a value of your own is kept)."""
    if os.environ.get("OMP_NUM_THREADS") == str(os.cpu_count()):
        processes = int(
            os.environ.get("LOCAL_WORLD_SIZE", 1)
        )  # set by `fabric run`, as by torchrun
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes))


def call_then_leave_process_group(function: Callable, cfg: Any, fabric: Fabric) -> Any:
    try:
        return function(fabric, cfg)
    finally:
        if torch.distributed.is_initialized():  # a process that exits with the group up may abort
            torch.distributed.destroy_process_group()
            # A group a reference cycle still holds keeps gloo's threads running until the final
            # collection, which may then abort the exiting interpreter (SIGABRT): collect it now.
            gc.collect()
