"""Crash-safe checkpoints: copied off the training thread's tensors, then written, flushed and renamed in a
background thread, rotated, and loaded with weights_only=True, with every rank's RNG states so that a resumed run
continues bitwise.

Machinery: nothing here knows what the model or the task is; `state` is train.py's dict of what to save.
"""

import errno
import math
import os
import pickle
import random
import shutil
import sys
import time
import warnings
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.strategies import (DataParallelStrategy, DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy,
                                         SingleDeviceStrategy)
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.fabric.utilities.load import _load_distributed_checkpoint
from lightning.fabric.wrappers import _unwrap_objects

from config import PERIODIC_CHECKPOINT, is_checkpoint, periodic_checkpoints
from errors import FilesystemError, NonFiniteLoss, UsageError


class DirectCheckpointIO(TorchCheckpointIO):
    """Fabric's checkpoint writer, minus its own atomic save: save_checkpoint below already writes to a temporary
    name in checkpoints/ and renames it. Fabric's would first hold the whole checkpoint in memory, then write a
    temporary file in $TMPDIR and move it: a copy on another filesystem, and a file a kill leaves there forever."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.save(checkpoint, path)
        except RuntimeError as err:  # torch's writer reports a failed write (a full disk) as a RuntimeError
            Path(path).unlink(missing_ok=True)  # the space it took, back
            raise OSError(errno.EIO, f"could not write the checkpoint ({' '.join(str(err).split())[:200]})",
                          str(path)) from None


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was saved at: from the name of a periodic one, else read from the file
    (memory-mapped: its tensors are not read). -1 when it cannot be read."""
    if match := PERIODIC_CHECKPOINT.match(path.name):
        return int(match.group(1))
    try:  # a sharded checkpoint (a directory) keeps its plain values in meta.pt
        file = path / "meta.pt" if path.is_dir() else path
        return int(torch.load(file, mmap=True, weights_only=True, map_location="cpu")["global_step"])
    except Exception:  # noqa: BLE001 - unreadable: loading it will say why
        return -1


def resume_candidates(ckpt_dir: Path) -> list[Path]:
    """The checkpoints a resume may continue from, newest first by their step: final.ckpt first only if no
    periodic checkpoint is newer (a finished run that a resume extended, then was stopped, is not finished)."""
    final = ckpt_dir / "final.ckpt"
    ranked = [(int(PERIODIC_CHECKPOINT.match(p.name).group(1)), 0, p) for p in periodic_checkpoints(ckpt_dir)]
    if final.exists():
        ranked.append((checkpoint_step(final), 1, final))
    return [p for *_, p in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True)]


def newest_checkpoint(ckpt_dir: Path) -> str | None:
    """The name of the newest checkpoint on disk once those being published are, or None."""
    wait_for_checkpoints()
    candidates = resume_candidates(ckpt_dir)
    return candidates[0].name if candidates else None


def is_finished(ckpt_dir: Path) -> bool:
    """Whether the run's newest checkpoint is final.ckpt."""
    candidates = resume_candidates(ckpt_dir)
    return bool(candidates) and candidates[0].name == "final.ckpt"


_publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-publisher")
_publishing: list[Future] = []


def save_checkpoint(fabric: Fabric, state: dict[str, Any], *paths: Path, keep: int | None = None) -> None:
    """Save `state` and every rank's RNG states under each of `paths`, each appearing only when complete; then,
    with `keep`, delete all but the newest `keep` periodic checkpoints.

    The training thread only copies the state (a snapshot, on the CPU); a background thread on rank 0 writes it
    once, to a temporary name in the same directory, flushes it to disk and renames it (the other names are hard
    links to it): a crash at any moment leaves either the previous file or the new one, never a partial one. One
    checkpoint is in flight at a time, so one snapshot is held: the next save first waits for the previous one,
    and so do the end of the run and a requeue. Non-finite weights are never saved: the last good checkpoint
    stays the newest. Sharded checkpoints (FSDP) are written by every rank together, here; only their flush and
    renames run in the background.
    """
    if not paths:
        return
    wait_for_checkpoints(fabric)  # the previous one is on disk; a write that failed (a full disk) stops the run here
    # Periodic names last: a resume continues from the newest of those, so a crash between the renames redoes
    # the epoch and with it best.ckpt, rather than skipping a best.ckpt that was never put in place.
    paths = tuple(sorted(paths, key=lambda p: bool(PERIODIC_CHECKPOINT.match(p.name))))
    keep = keep if PERIODIC_CHECKPOINT.match(paths[-1].name) else None
    local = [p.to_local() if hasattr(p, "to_local") else p for p in state["model"].parameters()]  # FSDP2: a shard
    # The largest |weight|, in one kernel per dtype: NaN or inf when any weight is (an empty shard has no maximum).
    largest = torch.nn.utils.get_total_norm([p for p in local if p.numel()], float("inf"))
    finite = largest.isfinite().float().to(fabric.device)
    if not fabric.all_reduce(finite, reduce_op="min").item():  # one sync per checkpoint, not per step
        raise NonFiniteLoss(f"the weights are not finite at step {state['global_step']} ({paths[0].name})",
                            newest_checkpoint(paths[0].parent))
    # One name for every rank: under FSDP each writes its shard into this directory (a clock read on each rank
    # would give each its own).
    tmp = Path(fabric.broadcast(str(_temporary_name(paths[0])), src=0))
    state = {**state, "rng": gather_rng_states(fabric)}
    if not _written_by_rank_zero_alone(fabric):
        fabric.save(tmp, state)
        fabric.barrier()  # every rank's shard is written
        if fabric.global_rank == 0:
            _publishing.append(_publisher.submit(_publish_and_prune, tmp, paths, keep))
    elif fabric.global_rank == 0:
        _publishing.append(_publisher.submit(_write_and_publish, fabric, tmp, snapshot(fabric, state), paths, keep))


def _written_by_rank_zero_alone(fabric: Fabric) -> bool:
    """One process, DDP or DP: rank 0 holds the whole state and writes the one file (DeepSpeed and FSDP gather or
    write shards together, in collectives that only the training thread may issue)."""
    strategy = fabric.strategy
    return (isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, DataParallelStrategy))
            and not isinstance(strategy, DeepSpeedStrategy))


def snapshot(fabric: Fabric, state: dict[str, Any]) -> dict[str, Any]:
    """`state` as Fabric would save it (modules and optimizers as their state dicts), every tensor copied to the
    CPU: what the writer thread saves while training goes on changing the originals."""
    converted = fabric.strategy._convert_stateful_objects_in_state(_unwrap_objects(state), filter={})
    return apply_to_collection(converted, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))


def _write_and_publish(fabric: Fabric, tmp: Path, state: dict[str, Any], paths: tuple[Path, ...],
                       keep: int | None) -> None:
    """In the background thread. Fabric.save with one process; with several, what it does on rank 0 without its
    closing barrier, a collective that only the training thread may issue."""
    global longest_write_seconds
    start = time.monotonic()
    if fabric.world_size == 1:
        fabric.save(tmp, state)
    else:
        fabric.strategy.save_checkpoint(tmp, state)
    _publish_and_prune(tmp, paths, keep)
    longest_write_seconds = max(longest_write_seconds, time.monotonic() - start)


longest_write_seconds = 0.0  # of a checkpoint in the background: --max_time keeps that long in reserve


def _temporary_name(path: Path) -> Path:
    """Hidden, unique (a save may be queued while the previous one with the same name is being published)."""
    return path.with_name(f".{path.name}.{time.monotonic_ns()}.tmp")


def _publish_and_prune(tmp: Path, paths: tuple[Path, ...], keep: int | None) -> None:
    publish(tmp, paths[0])
    for path in paths[1:]:
        link = _temporary_name(path)
        if paths[0].is_dir():  # a sharded checkpoint: a directory of hard links to the same shards
            shutil.copytree(paths[0], link, copy_function=os.link)
        else:
            os.link(paths[0], link)
        publish(link, path)
    if keep:
        prune_checkpoints(paths[0].parent, keep)  # only once the new checkpoint is durable


def wait_for_checkpoints(fabric: Fabric | None = None) -> None:
    """Until the checkpoints being published are on disk under their names; re-raises a failure (disk full). With
    `fabric`, on every rank together: a write that failed on rank 0 stops them all, not rank 0 alone."""
    failure = None
    try:
        while _publishing:
            _publishing.pop(0).result()
    except Exception as err:  # noqa: BLE001 - raised below, on every rank
        failure = err
    if fabric is not None and fabric.world_size > 1:
        written = fabric.all_reduce(torch.tensor(float(failure is None), device=fabric.device), reduce_op="min")
        if not written.item() and failure is None:
            raise FilesystemError("rank 0 could not write a checkpoint (it says why); the run stops on every rank")
    if failure is not None:
        raise failure


def publish(tmp: Path, path: Path) -> None:
    """Flush `tmp` to disk and give it the name `path`, atomically. `tmp` may be a directory: the sharded
    checkpoint that Fabric writes under FSDP. A directory cannot replace another in one step, so an existing
    one is first renamed aside and deleted only after the new one is in place."""
    for file in [tmp] if tmp.is_file() else [*(p for p in tmp.rglob("*") if p.is_file()), tmp]:
        _fsync(file)  # every shard, and the directory's own entries
    _fsync(tmp.parent)
    if path.exists() and (tmp.is_dir() or path.is_dir()):  # a directory on either side (FSDP, or no longer)
        old = path.with_name(f".{path.name}.old.tmp")
        os.replace(path, old)
        os.replace(tmp, path)
        remove_checkpoint(old)
    else:
        os.replace(tmp, path)
    _fsync(path.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_checkpoint(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():  # a link is removed, never what it points to
        shutil.rmtree(path)
    else:
        path.unlink()


def clean_up_after_crash(ckpt_dir: Path) -> None:
    """Remove the temporary files a crash left in the middle of `publish`, or put back a checkpoint that it
    had renamed aside."""
    for tmp in ckpt_dir.glob(".*.tmp"):
        original = ckpt_dir / tmp.name[1:].removesuffix(".old.tmp")
        if tmp.name.endswith(".old.tmp") and not original.exists():  # a crash between publish()'s two renames
            os.replace(tmp, original)
        else:
            remove_checkpoint(tmp)


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` periodic checkpoints."""
    for path in periodic_checkpoints(ckpt_dir)[:-keep]:
        remove_checkpoint(path)


def load_newest_checkpoint(fabric: Fabric, run_dir: Path, state: dict[str, Any]) -> tuple[Path, list[Path]]:
    """Restore `state` from the newest checkpoint of `run_dir` that loads (resume_candidates), and return it with
    the newer ones that failed to load (truncated, corrupted, another model's), each skipped with a warning; the
    caller moves those aside once it owns the run, so that rotation never counts them. `run_dir` may be a
    checkpoint file: that one is loaded."""
    if is_checkpoint(run_dir):  # a chosen checkpoint
        load_checkpoint(fabric, run_dir, state)
        return run_dir, []
    ckpt_dir = run_dir / "checkpoints"
    candidates = resume_candidates(ckpt_dir)
    for i, path in enumerate(candidates):
        try:
            load_checkpoint(fabric, path, state)
            return path, candidates[:i]
        except UsageError as err:
            fabric.print(f"warning: skipping an unloadable checkpoint: {err}", file=sys.stderr)
    skipped = f" ({len(candidates)} could not be loaded)" if candidates else ""
    raise UsageError(f"--resume {str(run_dir)!r} has no loadable checkpoint in {ckpt_dir}{skipped}")


def init_weights(model: torch.nn.Module, source: Path) -> str:
    """--init_from: load the weights of `source` (a checkpoint, a run's best.ckpt, or a plain state dict file) into
    `model` wherever a name and a shape match; the rest keeps its fresh initialisation (a new head for another
    number of classes). Only weights: no optimizer state, step, schedule or RNG. Returns what was loaded and what
    was not, one line each."""
    path = source / "checkpoints" / "best.ckpt" if (source / "config.yaml").is_file() else source
    weights, what = _weights_of(path)
    own = model.state_dict()
    fits = {name: value for name, value in weights.items() if name in own and value.shape == own[name].shape}
    if not fits:
        raise UsageError(f"--init_from {str(source)!r}: none of its {len(weights)} tensors fits the model by name and "
                         f"shape (it has e.g. {', '.join(list(weights)[:3])}; the model: {', '.join(list(own)[:3])})")
    model.load_state_dict(fits, strict=False)
    lines = [f"--init_from {path}: {len(fits)} of the model's {len(own)} tensors loaded, {what}"]
    for label, names in [
        ("different shape, freshly initialised", [f"{name} {list(weights[name].shape)} -> {list(own[name].shape)}"
                                                  for name in own if name in weights and name not in fits]),
        ("not in the checkpoint, freshly initialised", [name for name in own if name not in weights]),
        ("in the checkpoint only, ignored", [name for name in weights if name not in own])]:
        if names:
            lines.append(f"  {label}: {', '.join(names[:8])}{f' and {len(names) - 8} more' if len(names) > 8 else ''}")
    return "\n".join(lines)


def _weights_of(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The weights a checkpoint holds (its EMA of them where it kept one: the weights its validation judged) and
    where they come from, in words; or a plain state dict's."""
    from ema import averaged_weights

    try:
        verify(path)
    except UsageError as err:
        raise UsageError(f"--init_from {path}: {err.problems[0]}") from None
    try:
        loaded = _load_distributed_checkpoint(path) if path.is_dir() else torch.load(
            path, mmap=True, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - not a checkpoint that loads safely: say why, in one line
        reason = " ".join(str(err).split()).split(". ")[0]
        raise UsageError(f"--init_from {path}: cannot load it: {reason[:300]}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):  # a checkpoint of this template
        step = f"step {loaded.get('global_step', '?')}"
        if "ema" in loaded:
            return {**loaded["model"], **averaged_weights(loaded)}, f"the EMA of the weights at {step}"
        return loaded["model"], f"the weights at {step}"
    weights = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None  # a state dict (or Lightning's)
    if not isinstance(weights, dict) or not all(isinstance(value, torch.Tensor) for value in weights.values()):
        raise UsageError(f"--init_from {path}: neither a checkpoint of this template nor a state dict of tensors")
    return weights, "a state dict"


def set_aside(damaged: list[Path]) -> list[Path]:
    """Move damaged checkpoints into checkpoints/damaged/ (kept, never deleted, and out of the rotation, which
    would otherwise rank them as the newest and delete good ones); returns their new paths."""
    moved = []
    for path in damaged:
        folder = path.parent / "damaged"
        folder.mkdir(exist_ok=True)
        target = folder / path.name
        while target.exists():  # an earlier damaged file of the same name
            target = target.with_name(f"{target.stem}.{time.strftime('%Y%m%d-%H%M%S')}-{len(moved)}{target.suffix}")
        os.replace(path, target)
        moved.append(target)
    if moved:
        _fsync(moved[0].parent.parent)
    return moved


def load_checkpoint(fabric: Fabric, path: Path, state: dict[str, Any]) -> None:
    """Restore every key of `state` from `path`, and this rank's RNG states. The file is verified first: every
    member of its zip archive against its CRC-32 (a flipped bit is found, not trained on); then it is loaded with
    weights_only=True (a file that carries arbitrary pickled code is refused, not run)."""
    verify(path)
    try:
        with warnings.catch_warnings():  # a foreign file's pickle protocol is not worth a warning before our error
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if path.is_dir() and not isinstance(fabric.strategy, ModelParallelStrategy):
                remainder = _load_sharded_whole(path, state)  # FSDP's shards, into a model that is not sharded
            else:
                remainder = fabric.load(path, state, strict=True, weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(f"cannot load checkpoint {path}: it holds objects other than tensors and plain Python "
                         "values, and loading it could run code: refused") from None
    except Exception as err:  # noqa: BLE001 - any failure to read the file is the user's to know about
        reason = " ".join(str(err).split()).split(". ")[0]  # torch's first sentence says what went wrong
        raise UsageError(f"cannot load checkpoint {path}: {reason[:300]}") from None
    if "rng" in remainder:
        restore_rng_states(remainder["rng"], fabric.global_rank)


def _load_sharded_whole(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """Load a sharded checkpoint (a directory written under FSDP) into `state` whose model is whole (one device,
    DDP): every process reads all the shards, and the optimizer state, which is keyed by parameter name there,
    is mapped back onto the optimizer. Returns what `state` did not ask for."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    full = _load_distributed_checkpoint(path)
    missing = [key for key in state if key not in full]
    if missing:
        raise KeyError(f"the checkpoint has no {', '.join(missing)}")
    raw = _unwrap_objects(state)
    for key, value in raw.items():
        if isinstance(value, torch.nn.Module):
            value.load_state_dict(full.pop(key), strict=True)
        elif isinstance(value, torch.optim.Optimizer):
            set_optimizer_state_dict(raw["model"], value, full.pop(key), options=StateDictOptions(full_state_dict=True))
        else:
            state[key] = full.pop(key)
    return full


def verify(path: Path) -> None:
    """Raise a UsageError that says why, unless `path` is a complete zip archive whose members match their CRCs,
    or a complete sharded checkpoint: a directory with the .metadata and meta.pt that are written last."""
    if path.is_dir():
        missing = [name for name in (".metadata", "meta.pt") if not (path / name).is_file()]
        if missing:
            raise UsageError(f"cannot load checkpoint {path}: an incomplete sharded checkpoint "
                             f"(no {', '.join(missing)})")
        return  # the shards carry no checksums
    if not path.is_file():  # a device (/dev/zero), a broken link
        raise UsageError(f"cannot load checkpoint {path}: not a regular file")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        size = path.stat().st_size
        raise UsageError(f"cannot load checkpoint {path}: not a complete checkpoint file ({size:,} bytes: "
                         f"{err or 'unreadable'}); torch.save writes a zip archive") from None
    if damaged:
        raise UsageError(f"cannot load checkpoint {path}: it is damaged ({damaged} does not match its CRC-32 checksum)")


# ------------------------------------------------------------------------------------------------------ RNG


def capture_rng_states(device_type: str = "cpu") -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors only, so they can be gathered and loaded with weights_only=True; with
    the accelerator's (`device_type` cuda or mps: the same keys on every rank, whatever else it initialised)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_rest": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_rest": torch.tensor([py_version, math.nan if py_gauss is None else py_gauss], dtype=torch.float64),
    }
    if device_type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state()
    elif device_type == "mps":
        states["mps"] = torch.mps.get_rng_state()
    return states


def gather_rng_states(fabric: Fabric) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, each stacked along a first dimension of size world_size."""
    states = capture_rng_states(fabric.device.type)
    if fabric.world_size == 1:
        return {name: state.unsqueeze(0) for name, state in states.items()}
    with warnings.catch_warnings():  # Fabric's all_gather goes through torch's differentiable one, now deprecated
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated")
        return {name: state.cpu() for name, state in fabric.all_gather(states).items()}


def restore_rng_states(states: dict[str, torch.Tensor], rank: int) -> None:
    """Restore this rank's RNG states. After a change of world size, rank r takes saved rank r % saved."""
    row = rank % len(states["torch"])
    torch.set_rng_state(states["torch"][row].clone())  # a copy: set_rng_state reads a row view from its start
    pos, has_gauss, gauss = states["numpy_rest"][row].tolist()
    np_keys = states["numpy_keys"][row].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", np_keys, int(pos), int(has_gauss), gauss))
    version, py_gauss = states["python_rest"][row].tolist()
    random.setstate((int(version), tuple(states["python_internal"][row].tolist()),
                     None if math.isnan(py_gauss) else py_gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"][row].clone())
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"][row].clone())
