"""Machinery for train.py and test.py: launching, stop signals, FLOPs, progress, run directories and loggers.

Nothing here knows the task: what a batch holds, the loss and the metrics live in task.py (see the README).
"""

import contextlib
import csv
import fcntl
import gc
import io
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn

import lightning
import torch
import yaml
from lightning.fabric import Fabric
from lightning.fabric.connector import _is_using_cli
from lightning.fabric.loggers import Logger, TensorBoardLogger
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.fabric.plugins import DoublePrecision
from lightning.fabric.strategies import ModelParallelStrategy
from lightning.fabric.strategies.launchers.multiprocessing import _MultiProcessingLauncher
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed, _suggested_max_num_threads
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.loggers import CSVLogger  # Fabric's own CSVLogger cannot log hyperparameters
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from tqdm import tqdm

import checkpoints
from checkpoints import DirectCheckpointIO, checkpoint_step, clean_up_after_crash, set_aside, wait_for_checkpoints
from config import DebugConfig, TrainConfig, is_checkpoint, load_train_config, overrides, resumed_run, to_yaml
from errors import LAUNCHER_ENV, FilesystemError, UsageError


OUT_OF_TIME = 1000  # what StopSignals.agreed returns when the time budget is nearly spent (above any signal number)
OUT_OF_TIME_EXIT_CODE = 75  # EX_TEMPFAIL, "try again later": --resume continues the run


class Preempted(Exception):
    """Raised on every rank after the checkpoint that a stop signal or the time budget asked for is on disk
    (stop_after_signal). `exit_code`: 128 + the signal's number, as a shell reports it, or 75 for the time budget."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = OUT_OF_TIME_EXIT_CODE if signum == OUT_OF_TIME else 128 + signum
        super().__init__(stop_reason(signum))


def stop_reason(signum: int) -> str:
    return "the time budget (--max_time)" if signum == OUT_OF_TIME else signal.Signals(signum).name


class StopSignals:
    """SIGTERM, SIGUSR1 (SLURM's warning before the time limit) and Ctrl-C ask the run to stop cleanly:
    every rank finishes its current optimizer step, they agree, save a checkpoint, and exit.
    A second Ctrl-C stops at once.

    With a time budget (seconds from the start of the process: imports count), the run stops the same way once
    the time left is less than twice the longest stretch seen between two checks (a step, or the validation and
    checkpoint at an epoch's end), plus the longest checkpoint write, plus a margin of 5% of the budget (at most a
    minute) for the exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, time_budget: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.received, self.clock = 0, clock
        self.deadline = None if time_budget is None else process_start_time() + time_budget
        self.margin = 0.0 if time_budget is None else min(60.0, 0.05 * time_budget)
        self.last_check, self.longest_gap = clock(), 0.0
        for signum in self.SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received:
            raise KeyboardInterrupt
        self.received = signum

    def agreed(self, fabric: Fabric) -> int:
        """The signal any rank received, OUT_OF_TIME, or 0 for none. Every rank must call this at the same point."""
        if self.deadline is not None and not self.received:
            now = self.clock()
            self.longest_gap, self.last_check = max(self.longest_gap, now - self.last_check), now
            # The stop's checkpoint is written in the background, but the exit waits for it: keep its time too.
            if now + 2 * self.longest_gap + checkpoints.longest_write_seconds + self.margin >= self.deadline:
                self.received = OUT_OF_TIME
        if fabric.world_size == 1:
            return self.received
        return int(fabric.all_reduce(torch.tensor(self.received, device=fabric.device), reduce_op="max").item())


def process_start_time() -> float:
    """When this process started (seconds since the epoch, from /proc on Linux), else now."""
    try:
        after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22: the start, in ticks after boot
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def stop_after_signal(fabric: Fabric, cfg: TrainConfig, signum: int, checkpoint: Path) -> NoReturn:
    """After the checkpoint that stop signal `signum` (or the time budget) asked for: once it is on disk, rank 0
    says so, requeues the SLURM job if asked to and flushes the loggers, and only then does any rank stop
    (Preempted). A rank that exited earlier could get the others killed before the
    checkpoint is durable: Fabric's launcher ends every process when one exits with a non-zero code."""
    wait_for_checkpoints(fabric)
    if fabric.global_rank == 0:
        print(f"Stopped by {stop_reason(signum)} at step {checkpoint_step(checkpoint)}: {checkpoint} saved. "
              f"Continue with: python train.py --resume {checkpoint.parent.parent}", flush=True)
        job_id = os.environ.get("SLURM_JOB_ID")
        if cfg.requeue and job_id:
            print(f"Requeueing SLURM job {job_id}", flush=True)
            subprocess.run(["scontrol", "requeue", job_id], check=False)
        elif cfg.requeue:
            print("--requeue: not under SLURM (no SLURM_JOB_ID), nothing to requeue", flush=True)
        for logger in fabric.loggers:
            logger.finalize("failed")
    fabric.barrier()
    raise Preempted(signum)


def make_fabric(accelerator: str, devices: str, num_nodes: int = 1, strategy: str = "auto",
                precision: str = "32-true") -> Fabric:
    """--strategy fsdp is FSDP2 (PyTorch's fully_shard) through Fabric's ModelParallelStrategy, which also runs on
    CPUs; fsdp1 is Fabric's FSDPStrategy (FSDP1, GPUs only). Other names go to Fabric as they are."""
    devices_arg = int(devices) if devices.lstrip("-").isdigit() else devices  # "2" -> 2; "0,1" and "auto" as is
    chosen: Any = {"fsdp": FSDP2Strategy, "fsdp1": "fsdp"}.get(strategy, strategy)
    # Our checkpoint writer (straight into checkpoints/, nothing in $TMPDIR); FSDP2 writes its shards without a plugin.
    plugins: list[Any] = [] if strategy == "fsdp" else [DirectCheckpointIO()]
    named: str | None = precision
    if strategy == "fsdp" and precision == "64-true":  # Fabric refuses the name for FSDP2, not the plugin: fine,
        plugins, named = [DoublePrecision()], None  # fully_shard shards float64 parameters like any others
    try:
        return Fabric(accelerator=accelerator, devices=devices_arg, num_nodes=num_nodes,
                      strategy=chosen() if strategy == "fsdp" else chosen, precision=named, plugins=plugins)
    except (ValueError, RuntimeError, TypeError, ImportError) as err:  # e.g. --accelerator cuda without a GPU
        flags = f"--accelerator {accelerator} --devices {devices} --num_nodes {num_nodes} --strategy {strategy}"
        reason = " ".join(str(err).split())
        raise UsageError(f"cannot start Fabric with {flags} --precision {precision}: {reason}") from None


class FSDP2Strategy(ModelParallelStrategy):
    """Fabric's ModelParallelStrategy as plain FSDP2: every process is one data-parallel shard (no tensor
    parallelism), and the model is sharded by the task's `parallelize(model, mesh)` in model.py, else layer by
    layer (shard_layers). Checkpoints are directories of shards (torch.distributed.checkpoint)."""

    def __init__(self) -> None:
        import model as task_models

        super().__init__(parallelize_fn=getattr(task_models, "parallelize", shard_layers))

    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = self.num_nodes * self.num_processes, 1
        super().setup_environment()

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """With --precision bf16-mixed, the default sharding gathers the parameters in bf16 and reduces the
        gradients in float32 (FSDP2's MixedPrecisionPolicy); the sharded parameters stay float32."""
        if self._parallelize_fn is shard_layers and getattr(self.precision, "precision", None) == "bf16-mixed":
            from torch.distributed.fsdp import MixedPrecisionPolicy

            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            self._parallelize_fn = partial(shard_layers, mp_policy=policy)
        return super().setup_module(module)


def shard_layers(model: torch.nn.Module, mesh: Any, mp_policy: Any = None) -> torch.nn.Module:
    """FSDP2's default for a model that says nothing: each module that holds parameters of its own is a unit
    (its parameters are gathered only while it computes), then the root holds what is left."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options = {"mesh": mesh["data_parallel"], "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for module in model.modules():
        if module is not model and any(True for _ in module.parameters(recurse=False)):
            fully_shard(module, **options)
    return fully_shard(model, **options)


def memory_per_process(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                       device: torch.device) -> dict[str, float]:
    """MiB this process holds for the model's parameters and the optimizer's state (its shards under FSDP: the
    memory sharding divides by the world size), and on CUDA the allocator's peak. A CPU has no allocator
    statistics to report."""

    def mib(tensors: Any) -> float:
        local = (t.to_local() if hasattr(t, "to_local") else t for t in tensors)
        return sum(t.numel() * t.element_size() for t in local if isinstance(t, torch.Tensor)) / 2**20

    states = [value for state in optimizer.state.values() for value in state.values()]
    memory = {"params": mib(model.parameters()), "optimizer_state": mib(states)}
    if device.type == "cuda":
        memory["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
    return memory


def checkpoint_activations(model: torch.nn.Module) -> None:
    """--activation_checkpointing: each block (a child of the model that holds parameters) recomputes its
    activations in the backward pass instead of keeping them, with PyTorch's non-reentrant checkpoint. It
    replays the RNG (the same dropout masks), so the gradients are those of a run without it; state dict keys
    are unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    blocks = {child for child in model.children() if any(True for _ in child.parameters())}
    apply_activation_checkpointing(model, check_fn=lambda module: module in blocks,
                                   checkpoint_wrapper_fn=partial(checkpoint_wrapper,
                                                                 checkpoint_impl=CheckpointImpl.NO_REENTRANT))


def launch(fabric: Fabric, function: Callable, *args: Any) -> Any:
    """fabric.launch(function, *args), leaving the process group when `function` returns. Under `fabric run`,
    which has started the processes already, a plain call. A stop signal or a usage error in a worker that
    ddp_spawn started is raised again in the launching process, which reports it once."""
    if _is_using_cli():
        # `fabric run` sets OMP_NUM_THREADS to all the cores for every process it starts; share them between the
        # processes instead, as Fabric's own launchers do (a value of your own is kept).
        if os.environ.get("OMP_NUM_THREADS") == str(_suggested_max_num_threads()):
            del os.environ["OMP_NUM_THREADS"]
        _set_num_threads_if_needed(num_processes=getattr(fabric.strategy, "num_processes", 1))
        return _call_then_leave_process_group(function, args, fabric)
    handlers = {signum: signal.getsignal(signum) for signum in StopSignals.SIGNALS}
    if isinstance(fabric.strategy.launcher, _MultiProcessingLauncher):  # ddp_spawn: this process only waits
        _forward_stop_signals_to_workers()
    os.environ[LAUNCHER_ENV] = str(os.getpid())
    try:  # bound here rather than passed to launch(): ddp_spawn's launcher rejects frozen dataclasses in arguments
        outcome = fabric.launch(partial(_call_then_leave_process_group, function, args))
    finally:
        del os.environ[LAUNCHER_ENV]
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    if isinstance(outcome, _Stopped):  # raised again here: under ddp_spawn, this is the launching process
        raise outcome.exception()
    return outcome


def _forward_stop_signals_to_workers() -> None:
    """Under ddp_spawn the process you started only waits for its workers. SIGTERM or SIGUSR1 sent to it (or to
    the whole process group) reaches them, and it waits on for them to save and stop, instead of dying and
    leaving them orphaned. Ctrl-C reaches every process of the terminal already: here it is not passed on (a
    second one would mean "stop at once")."""

    def forward(signum: int, frame: Any) -> None:
        for worker in multiprocessing.active_children():
            os.kill(worker.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Stopped:
    """How a run stopped early, as a value that ddp_spawn's workers can hand back to the launching process."""

    def __init__(self, signum: int = 0, problems: tuple[str, ...] = (), exit_code: int = 2) -> None:
        self.signum, self.problems, self.exit_code = signum, problems, exit_code

    def exception(self) -> Exception:
        if self.signum:
            return Preempted(self.signum)
        err = UsageError(*self.problems)
        err.exit_code = self.exit_code
        return err


def _call_then_leave_process_group(function: Callable, args: tuple, fabric: Fabric) -> Any:
    try:
        return function(fabric, *args)
    except Preempted as stopped:
        return _Stopped(signum=stopped.signum)
    except UsageError as err:
        return _Stopped(problems=tuple(err.problems), exit_code=err.exit_code)
    finally:
        if torch.distributed.is_initialized():  # a process that exits with the group still up may abort (gloo)
            torch.distributed.destroy_process_group()
            # A group that a reference cycle still holds (found on rank 0) keeps gloo's worker threads running until
            # the interpreter's final collection; one of them freeing a finished collective's tensors then needs
            # the GIL the exiting interpreter holds, and the process aborts ("terminate called without an active
            # exception", SIGABRT). Collected now, the group stops its threads while Python is whole.
            gc.collect()


def training_flops(build_model: Callable[[], torch.nn.Module], forward: Callable, batch: Any) -> int | None:
    """FLOPs of a forward and backward pass over `batch`, counted on the meta device (no memory, no time):
    `forward(model, batch)` returns the loss first. None, with a warning, where an operation has no meta kernel."""
    try:
        with torch.device("meta"), torch.autograd.set_detect_anomaly(False):  # its NaN check cannot read meta tensors
            model = build_model()
            batch = move_data_to_device(batch, "meta")
            return measure_flops(model, lambda: forward(model, batch)[0], lambda loss: loss)
    except Exception as err:  # noqa: BLE001 - throughput without FLOPs is still worth having
        warnings.warn(f"could not count the model's FLOPs on the meta device, so no FLOPs/s or MFU will be logged "
                      f"({type(err).__name__}: {' '.join(str(err).split())[:200]})", stacklevel=2)
        return None


def set_debug_modes(cfg: DebugConfig) -> None:
    """--detect_anomaly and --deterministic, for this process (before any model is built)."""
    torch.autograd.set_detect_anomaly(cfg.detect_anomaly)
    torch.use_deterministic_algorithms(cfg.deterministic)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: deterministic matmuls
        torch.backends.cudnn.benchmark = False  # autotuning may pick another algorithm on each run


@contextlib.contextmanager
def step_profiler(enabled: bool, run_dir: Path, fabric: Fabric, steps_left: int) -> Iterator[Any]:
    """--profile: torch.profiler over optimizer steps 3 to 5 of this launch (the first is skipped, being slow for
    one-time reasons, and the second warms the profiler up). Each rank writes its trace to
    RUN_DIR/profile/rankN.*.pt.trace.json; rank 0 prints the ops that took the most time. `.step()` after each
    optimizer step; off, it does nothing."""
    if enabled and steps_left < 5:
        fabric.print(f"--profile: {steps_left} optimizer step(s) to train, fewer than 5: nothing to trace")
    if not enabled or steps_left < 5:
        yield _NoProfiler()
        return
    folder = run_dir / "profile"

    def write(profiler: torch.profiler.profile) -> None:
        torch.profiler.tensorboard_trace_handler(str(folder), worker_name=f"rank{fabric.global_rank}")(profiler)
        if fabric.is_global_zero:
            device_time = "self_device_time_total" if fabric.device.type == "cuda" else "self_cpu_time_total"
            print(profiler.key_averages().table(sort_by=device_time, row_limit=12) +
                  f"\n--profile: steps 3-5 traced in {folder}: tensorboard --logdir {folder}, or open the .json file "
                  "at https://ui.perfetto.dev", flush=True)

    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if fabric.device.type == "cuda" else [])
    steps_3_to_5 = torch.profiler.schedule(wait=1, warmup=1, active=3, repeat=1)
    with torch.profiler.profile(activities=activities, schedule=steps_3_to_5, on_trace_ready=write,
                                record_shapes=True) as profiler:
        yield profiler


class _NoProfiler:
    def step(self) -> None:
        pass


class Progress:
    """Training progress, on global rank 0 only: a tqdm bar (step, ETA, loss, lr, samples/s) in a terminal, and
    plain lines at each log step when the output goes to a file (CI, SLURM logs), where a bar is noise.

    The ETA is timed from the end of the first step: that one pays for one-time work (torch.compile, CUDA
    kernels, the allocator, worker start-up) that would otherwise inflate every early estimate."""

    def __init__(self, fabric: Fabric, total_steps: int, done_steps: int) -> None:
        self.shown, self.total, self.done, self.start = fabric.is_global_zero, total_steps, done_steps, None
        self.bar = tqdm(total=total_steps, initial=done_steps, desc="train", unit="step", dynamic_ncols=True,
                        disable=not (self.shown and sys.stderr.isatty()))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()

    def update(self) -> None:
        self.bar.update()
        self.done += 1
        if self.start is None:  # the first step is done: time the rest from here
            self.start = (time.perf_counter(), self.done)
            if not self.bar.disable:
                self.bar.start_t = self.bar.last_print_t = self.bar._time()

    def log(self, epoch: int, step: int, loss: float, lr: float, samples_per_s: float) -> None:
        if not self.bar.disable:
            self.bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.3g}", samples_per_s=f"{samples_per_s:.0f}")
        elif self.shown:
            seconds, steps = time.perf_counter() - self.start[0], step - self.start[1]
            eta = "--:--:--" if steps == 0 else time.strftime("%H:%M:%S", time.gmtime((self.total - step) * seconds
                                                                                       / steps))
            print(f"epoch {epoch} step {step}/{self.total} loss {loss:.4f} lr {lr:.3g} {samples_per_s:.0f} samples/s "
                  f"eta {eta}", flush=True)

    def write(self, line: str) -> None:
        if self.shown and not self.bar.disable:
            self.bar.write(line)  # above the bar, which is then redrawn
        elif self.shown:
            print(line, flush=True)


# ------------------------------------------------------------------------------------------- run directory


def create_run_dir(fabric: Fabric, cfg: TrainConfig, step: int, lr_schedule: dict[str, Any]) -> Path:
    """RUN_DIR for this run, decided once on rank 0 and broadcast to every rank, and locked for this run.

    A fresh run creates exactly one new ROOT_DIR/YYYYmmdd-HHMMSS-OUT_DIR (one second later if that name is
    taken, so two runs never share a directory) and writes config.yaml into it before training starts.
    A resumed run uses the given directory; if flags overrode its config, config.yaml is rewritten and
    resumes.yaml records which fields changed, from what to what, at which step, and the LR schedule from that
    step on. A run resumed from a chosen checkpoint file is a new run dir, which starts with a copy of the
    original run's logs and resumes.yaml (the loggers then drop what came after the checkpoint); resumes.yaml
    records the file. Either way rank 0 holds the
    run's lock first: a second process that would write into a run being trained stops with a one-line error,
    before it changes anything.
    """
    run_dir, problem = None, None
    if fabric.global_rank == 0:
        try:
            run_dir, problem = _prepare_run_dir(cfg, step, lr_schedule)
            if problem is None:
                record_provenance(run_dir, step, fabric.world_size)
            problem = problem and UsageError(problem)
        except OSError as err:  # the filesystem refused: every rank stops with the same line and exit code
            problem = FilesystemError.of(err)
    run_dir, problem = fabric.broadcast((str(run_dir), problem), src=0)
    if problem:
        raise problem
    return Path(run_dir)


def _prepare_run_dir(cfg: TrainConfig, step: int, lr_schedule: dict[str, Any]) -> tuple[Path, str | None]:
    """On rank 0, create_run_dir's work: (RUN_DIR, None), or (RUN_DIR, why this process may not write it)."""
    branch = bool(cfg.resume) and is_checkpoint(Path(cfg.resume))  # resumed from a chosen checkpoint
    run_dir = Path(cfg.resume) if cfg.resume and not branch else _new_run_dir(Path(cfg.root_dir), cfg.out_dir)
    problem = lock_run_dir(run_dir)
    if problem:
        return run_dir, problem
    # The saved config describes the run; how this process was launched (--resume) is not part of it.
    config_path, ran = run_dir / "config.yaml", replace(cfg, resume="")
    if cfg.resume:
        source = resumed_run(cfg.resume)
        if branch:
            if (source / "logs").is_dir():
                shutil.copytree(source / "logs", run_dir / "logs", ignore=shutil.ignore_patterns("wandb"))
            if (source / "resumes.yaml").is_file():
                shutil.copy2(source / "resumes.yaml", run_dir / "resumes.yaml")
        else:
            clean_up_after_crash(run_dir / "checkpoints")
        changed = overrides(load_train_config(source / "config.yaml"), ran)
        if changed or branch:
            _record_resume(run_dir / "resumes.yaml", step, changed, lr_schedule,
                           {"from_checkpoint": str(Path(cfg.resume).resolve())} if branch else {})
    if not config_path.exists() or config_path.read_text() != to_yaml(ran):
        atomic_write_text(config_path, to_yaml(ran))
    return run_dir, None


def record_provenance(run_dir: Path, step: int, world_size: int) -> dict[str, Any]:
    """Append what this launch ran to RUN_DIR/provenance.yaml (one entry per launch: the first, and each resume):
    the command line, the versions, the machine, the world size and, from a git checkout, the commit, with the
    uncommitted changes to tracked files saved beside it as code-N.patch."""
    path = run_dir / "provenance.yaml"
    history = yaml.safe_load(path.read_text()) if path.is_file() else []
    entry: dict[str, Any] = {
        "step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(map(shlex.quote, ["python", *sys.argv])),
        "host": socket.gethostname(), "world_size": world_size, "python": platform.python_version(),
        "torch": str(torch.__version__), "lightning": lightning.__version__, "cuda": torch.version.cuda,
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or [_cpu_model()]}
    code = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(code), *args], capture_output=True, text=True, timeout=30,
                                  check=True).stdout
        except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
            return ""

    if commit := git("rev-parse", "HEAD").strip():
        entry["git_commit"] = commit
        if patch := git("diff", "HEAD", "--", "."):  # the template's own files, even inside a larger repository
            entry["uncommitted_changes"] = f"code-{len(history)}.patch"
            atomic_write_text(run_dir / entry["uncommitted_changes"], patch)
    atomic_write_text(path, yaml.safe_dump([*history, entry], sort_keys=False))
    return entry


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def set_aside_damaged(fabric: Fabric, run_dir: Path, damaged: list[Path]) -> None:
    """Once this process owns the run: move the checkpoints that a resume could not load into
    checkpoints/damaged/, kept but out of the rotation (ranked by step, they would count as the newest)."""
    problem = None
    if fabric.global_rank == 0:
        problem = lock_run_dir(run_dir)
        for path in set_aside(damaged) if problem is None else []:
            print(f"warning: moved a checkpoint that does not load out of the rotation, to {path}", file=sys.stderr)
    problem = fabric.broadcast(problem, src=0)
    if problem:
        raise UsageError(problem)


def _record_resume(path: Path, step: int, changed: dict[str, tuple[Any, Any]], lr_schedule: dict[str, Any],
                   source: dict[str, str]) -> None:
    """Append {step, time, [from_checkpoint], overrides: {field: [before, after]}, lr_schedule} to resumes.yaml."""
    history = yaml.safe_load(path.read_text()) if path.is_file() else []
    history.append({"step": step, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **source,
                    "overrides": {key: list(values) for key, values in changed.items()}, "lr_schedule": lr_schedule})
    atomic_write_text(path, yaml.safe_dump(history, sort_keys=False))


_locks: dict[Path, int] = {}  # run dir -> open file descriptor holding its lock, for this process's lifetime


def lock_run_dir(run_dir: Path) -> str | None:
    """Hold RUN_DIR/.lock for the rest of this process: one run has one writer. The kernel releases the lock
    when the process ends, however it ends (after the background checkpoint publishing has finished), so a
    killed run never leaves it behind. None when held, else the problem, naming the holder."""
    if run_dir.resolve() in _locks:
        return None
    fd = os.open(run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return (f"{run_dir} is being trained by {holder}: a run has one writer at a time. Let it finish or stop "
                "it (SIGTERM saves a checkpoint), then resume")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} (since {time.strftime('%Y-%m-%d %H:%M:%S')})".encode())
    _locks[run_dir.resolve()] = fd
    return None


def _new_run_dir(root_dir: Path, out_dir: str) -> Path:
    root_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    while True:
        run_dir = root_dir / f"{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}-{out_dir}"
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            now += 1


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def make_loggers(cfg: TrainConfig, run_dir: Path, resumed_at: tuple[int, bool] | None) -> list[Logger]:
    """Loggers writing under RUN_DIR/logs/<name>/: csv always, and tensorboard and wandb when asked for. A run
    resumed at (step, whether that step's validation came before the checkpoint) continues the same files,
    dropping what was logged after the checkpoint and before the interruption, and the same wandb run."""
    resume_step = None if resumed_at is None else resumed_at[0]
    logs = run_dir / "logs"
    # The CSV log is always kept: it is the run's own record, that curves.png is drawn from. It is written at
    # every log call (once per log interval), so a killed run keeps its log up to the kill.
    loggers: list[Logger] = [
        ResumableCSVLogger(resumed_at, save_dir=logs, name="csv", version="", flush_logs_every_n_steps=1)]
    if resumed_at is not None:
        loggers[0].experiment  # cut the log at the checkpoint now, even if the run has nothing left to log
    if "tensorboard" in cfg.logger_name:
        # TensorBoard drops the events after the step (not by tag: a validation at the checkpoint's step may repeat).
        purge = {} if resume_step is None else {"purge_step": resume_step + 1}
        loggers.append(TensorBoardLogger(root_dir=logs, name="tensorboard", version="", default_hp_metric=False,
                                         **purge))
    if "wandb" in cfg.logger_name:
        from lightning.pytorch.loggers import WandbLogger

        (logs / "wandb").mkdir(parents=True, exist_ok=True)
        loggers.append(WandbLogger(project=cfg.project, name=run_dir.name, id=wandb_run_id(run_dir),
                                   save_dir=str(logs), resume="allow", notes=cfg.comment or None))
    return loggers


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger deletes an existing metrics.csv when it starts; a resumed run appends instead."""

    def __init__(self, resumed_at: tuple[int, bool] | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.resumed_at = resumed_at

    @property
    @rank_zero_experiment  # as the parent's: other ranks get a stand-in, and never touch the file
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingCSVWriter(self.log_dir, self.resumed_at)
        return self._experiment


class _AppendingCSVWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resumed_at: tuple[int, bool] | None) -> None:
        self.resumed_at = resumed_at
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        """Instead of deleting metrics.csv: keep its rows logged before the checkpoint, and its columns."""
        path = Path(self.metrics_file_path)
        if self.resumed_at is None or not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if self._before_checkpoint(row)]
            self.metrics_keys = list(reader.fieldnames or [])
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.metrics_keys)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())

    def _before_checkpoint(self, row: dict[str, str | None]) -> bool:
        """A complete row (a kill or a full disk may have cut the last one short) logged before the checkpoint:
        at an earlier step, or at its step if it is not a validation the checkpoint came before."""
        step, validated = self.resumed_at
        if None in row or None in row.values() or not (row["step"] or "").isdigit():
            return False
        validation = any(value for key, value in row.items() if key.startswith("val/"))
        return int(row["step"]) < step or (int(row["step"]) == step and (validated or not validation))


def wandb_run_id(run_dir: Path) -> str:
    """Derived from the run directory's name, so a resumed run continues the same wandb run."""
    return re.sub(r"[^a-zA-Z0-9_-]", "-", run_dir.name)
