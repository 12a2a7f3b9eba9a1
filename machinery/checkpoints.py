"""Checkpoint I/O: crash-safe saves off the training thread, rotation, verified loads, RNG states.

Guarantees: a checkpoint appears under its name only when complete and flushed, so a crash at any
instant leaves the previous one loadable; rotation deletes only once the new one is durable;
non-finite weights are never saved; a load verifies the file (zip CRCs) and uses weights_only=True,
so a file that carries code is refused, not run; every rank's RNG states are saved, so a resumed
run continues bitwise.
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
from lightning.fabric.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
)
from lightning_utilities.core.apply_func import apply_to_collection

from machinery.errors import FilesystemError, NonFiniteLoss, UsageError
from machinery.rundir import PERIODIC, is_checkpoint, periodic_checkpoints


class DirectCheckpointIO(TorchCheckpointIO):
    """Fabric's writer without its own atomic save, which goes through $TMPDIR (a copy across
    filesystems, and a file a kill leaves there): save_checkpoint renames in checkpoints/ itself."""

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.save(checkpoint, path)
        except RuntimeError as err:  # how torch's writer reports a full disk
            Path(path).unlink(missing_ok=True)
            reason = " ".join(str(err).split())[:200]
            raise OSError(
                errno.EIO, f"could not write the checkpoint ({reason})", str(path)
            ) from None


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was saved at: from a periodic one's name, else from the file (memory-
    mapped; a sharded one's meta.pt). -1 when it cannot be read."""
    if match := PERIODIC.match(path.name):
        return int(match[1])
    try:
        file = path / "meta.pt" if path.is_dir() else path
        return int(
            torch.load(file, mmap=True, weights_only=True, map_location="cpu")["global_step"]
        )
    except Exception:  # noqa: BLE001 - loading it will say why
        return -1


def resume_candidates(ckpt_dir: Path) -> list[Path]:
    """Newest first by step; final.ckpt first only if no periodic checkpoint is newer (a finished
    run that a resume extended, then was stopped, is not finished)."""
    ranked = [(int(PERIODIC.match(p.name)[1]), 0, p) for p in periodic_checkpoints(ckpt_dir)]
    if (final := ckpt_dir / "final.ckpt").exists():
        ranked.append((checkpoint_step(final), 1, final))
    return [p for *_, p in sorted(ranked, key=lambda r: r[:2], reverse=True)]


def newest_checkpoint(ckpt_dir: Path) -> str | None:
    """The name of the newest checkpoint, once those being published are on disk."""
    wait_for_checkpoints()
    candidates = resume_candidates(ckpt_dir)
    return candidates[0].name if candidates else None


def is_finished(ckpt_dir: Path) -> bool:
    candidates = resume_candidates(ckpt_dir)
    return bool(candidates) and candidates[0].name == "final.ckpt"


_publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-publisher")
_publishing: list[Future] = []
longest_write_seconds = 0.0  # of a background write: --max_time keeps that long in reserve


def save_checkpoint(fabric: Fabric, state: dict, *paths: Path, keep: int | None = None) -> None:
    """Save `state` with every rank's RNG states under each of `paths` (one file, the others hard
    links), then keep only the newest `keep` periodic checkpoints.

    The training thread copies the state to the CPU; a background thread on rank 0 writes it to a
    temporary name, flushes and renames it. One save is in flight at a time: the next one, the end
    of the run and a requeue wait for it. Sharded checkpoints (FSDP) are written by every rank here;
    only their flush and renames run in the background."""
    if not paths:
        return
    wait_for_checkpoints(fabric)  # the previous one is on disk; a failed write stops the run here
    # Periodic names last: a crash between the renames redoes the epoch, and with it best.ckpt.
    paths = tuple(sorted(paths, key=lambda p: bool(PERIODIC.match(p.name))))
    keep = keep if PERIODIC.match(paths[-1].name) else None
    local = [p.to_local() if hasattr(p, "to_local") else p for p in state["model"].parameters()]
    # The largest |weight| in one kernel per dtype: not finite when any weight is not.
    largest = torch.nn.utils.get_total_norm([p for p in local if p.numel()], float("inf"))
    finite = largest.isfinite().float().to(fabric.device)
    if not fabric.all_reduce(finite, reduce_op="min").item():  # one sync per checkpoint
        problem = f"the weights are not finite at step {state['global_step']} ({paths[0].name})"
        raise NonFiniteLoss(problem, newest_checkpoint(paths[0].parent))
    # One name for every rank: under FSDP each writes its shard into this directory.
    tmp = Path(fabric.broadcast(str(temporary_name(paths[0])), src=0))
    state = {**state, "rng": gather_rng_states(fabric)}
    strategy = fabric.strategy
    whole = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy))
    if not whole or isinstance(strategy, DeepSpeedStrategy):  # shards, written together
        fabric.save(tmp, state)
        fabric.barrier()
        if fabric.global_rank == 0:
            _publishing.append(_publisher.submit(publish_and_prune, tmp, paths, keep))
    elif fabric.global_rank == 0:
        copied = snapshot(state)
        _publishing.append(_publisher.submit(write_and_publish, fabric, tmp, copied, paths, keep))


def snapshot(state: dict) -> dict:
    """`state` as Fabric saves it (objects as their state dicts), every tensor copied to the CPU."""
    converted = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
    return apply_to_collection(converted, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))


def write_and_publish(
    fabric: Fabric, tmp: Path, state: dict, paths: tuple, keep: int | None
) -> None:
    """In the background thread: what fabric.save does on rank 0, without its closing barrier."""
    global longest_write_seconds
    start = time.monotonic()
    fabric.strategy.checkpoint_io.save_checkpoint(state, tmp)
    publish_and_prune(tmp, paths, keep)
    longest_write_seconds = max(longest_write_seconds, time.monotonic() - start)


def temporary_name(path: Path) -> Path:
    """Hidden and unique: a save may be queued while one of the same name is being published."""
    return path.with_name(f".{path.name}.{time.monotonic_ns()}.tmp")


def publish_and_prune(tmp: Path, paths: tuple[Path, ...], keep: int | None) -> None:
    publish(tmp, paths[0])
    for path in paths[1:]:
        link = temporary_name(path)
        if paths[0].is_dir():  # a sharded checkpoint: a directory of hard links to its shards
            shutil.copytree(paths[0], link, copy_function=os.link)
        else:
            os.link(paths[0], link)
        publish(link, path)
    if keep:
        for old in periodic_checkpoints(paths[0].parent)[:-keep]:
            remove_checkpoint(old)


def wait_for_checkpoints(fabric: Fabric | None = None) -> None:
    """Until the checkpoints being published are on disk; re-raises a failure (a full disk). With
    `fabric`, on every rank together: a write that failed on rank 0 stops them all."""
    failure = None
    try:
        while _publishing:
            _publishing.pop(0).result()
    except Exception as err:  # noqa: BLE001 - raised below, on every rank
        failure = err
    if fabric is not None and fabric.world_size > 1:
        ok = torch.tensor(float(failure is None), device=fabric.device)
        if not fabric.all_reduce(ok, reduce_op="min").item() and failure is None:
            raise FilesystemError("rank 0 could not write a checkpoint (it says why); stopping")
    if failure is not None:
        raise failure


def publish(tmp: Path, path: Path) -> None:
    """Flush `tmp` (a file, or a sharded checkpoint's directory) and rename it `path`, atomically. A
    directory cannot replace another in one step: the old one is renamed aside, then deleted."""
    for file in [tmp] if tmp.is_file() else [*(p for p in tmp.rglob("*") if p.is_file()), tmp]:
        fsync(file)
    fsync(tmp.parent)
    if path.exists() and (tmp.is_dir() or path.is_dir()):
        old = path.with_name(f".{path.name}.old.tmp")
        os.replace(path, old)
        os.replace(tmp, path)
        remove_checkpoint(old)
    else:
        os.replace(tmp, path)
    fsync(path.parent)


def fsync(path: Path) -> None:
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
    """Remove what a crash left in the middle of `publish`, or put back what it renamed aside."""
    for tmp in ckpt_dir.glob(".*.tmp"):
        original = ckpt_dir / tmp.name[1:].removesuffix(".old.tmp")
        if tmp.name.endswith(".old.tmp") and not original.exists():  # between the two renames
            os.replace(tmp, original)
        else:
            remove_checkpoint(tmp)


def set_aside(damaged: list[Path]) -> list[Path]:
    """Rename checkpoints that do not load to NAME.damaged: kept, and out of the rotation (which
    would rank them the newest and delete good ones)."""
    moved = []
    for path in damaged:
        target = path.with_name(f"{path.name}.damaged")
        if target.exists():  # an earlier damaged file of the same name
            target = path.with_name(f"{path.name}.{time.time_ns()}.damaged")
        os.replace(path, target)
        moved.append(target)
        fsync(path.parent)
    return moved


def load_newest_checkpoint(fabric: Fabric, run_dir: Path, state: dict) -> tuple[Path, list[Path]]:
    """Restore `state` from the newest checkpoint of `run_dir` that loads, or from `run_dir` itself
    if it is a checkpoint; returns it, and the newer ones that did not load (with a warning)."""
    if is_checkpoint(run_dir):
        load_checkpoint(fabric, run_dir, state)
        return run_dir, []
    candidates = resume_candidates(run_dir / "checkpoints")
    for i, path in enumerate(candidates):
        try:
            load_checkpoint(fabric, path, state)
            return path, candidates[:i]
        except UsageError as err:
            fabric.print(f"warning: skipping an unloadable checkpoint: {err}", file=sys.stderr)
    skipped = f" ({len(candidates)} could not be loaded)" if candidates else ""
    where = run_dir / "checkpoints"
    raise UsageError(f"--resume {str(run_dir)!r} has no loadable checkpoint in {where}{skipped}")


def load_checkpoint(fabric: Fabric, path: Path, state: dict) -> None:
    """Restore every key of `state` from `path`, and this rank's RNG states, after `verify`."""
    verify(path)
    try:
        with warnings.catch_warnings():  # a foreign pickle protocol: our error says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            if path.is_dir() and not isinstance(fabric.strategy, ModelParallelStrategy):
                remainder = load_sharded_whole(path, state)
            else:
                remainder = fabric.load(path, state, strict=True, weights_only=True)
    except pickle.UnpicklingError:
        raise UsageError(
            f"cannot load checkpoint {path}: it holds objects other than tensors and plain Python "
            "values, and loading it could run code: refused"
        ) from None
    except Exception as err:  # noqa: BLE001 - torch's first sentence says what went wrong
        reason = " ".join(str(err).split()).split(". ")[0]
        raise UsageError(f"cannot load checkpoint {path}: {reason[:300]}") from None
    if "rng" in remainder:
        restore_rng_states(remainder["rng"], fabric.global_rank)


def read_sharded(path: Path) -> dict[str, Any]:
    """A sharded checkpoint read whole, on one process. Private Lightning: torch's public DCP loader
    needs a state dict of known structure; this one rebuilds the nesting from .metadata."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    return _load_distributed_checkpoint(path)


def load_sharded_whole(path: Path, state: dict) -> dict:
    """A sharded checkpoint into a whole model (one device, DDP); its optimizer state, keyed by
    parameter name, is mapped back onto the optimizer. Returns what `state` did not ask for."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    full = read_sharded(path)
    if missing := [key for key in state if key not in full]:
        raise KeyError(f"the checkpoint has no {', '.join(missing)}")
    raw = {  # Fabric's wrappers unwrapped (an EMA, an Optimizer, has a .module of its own)
        k: getattr(v, "module", v) if isinstance(v, torch.nn.Module) else getattr(v, "optimizer", v)
        for k, v in state.items()
    }
    for key, value in raw.items():
        if isinstance(value, torch.nn.Module):
            value.load_state_dict(full.pop(key), strict=True)
        elif isinstance(value, torch.optim.Optimizer):
            options = StateDictOptions(full_state_dict=True)
            set_optimizer_state_dict(raw["model"], value, full.pop(key), options=options)
        else:
            state[key] = full.pop(key)
    return full


def verify(path: Path) -> None:
    """A UsageError that says why, unless `path` is a zip archive whose members match their CRCs
    (a flipped bit is found, not trained on), or a sharded checkpoint with the .metadata and
    meta.pt written last."""
    if path.is_dir():
        if missing := [n for n in (".metadata", "meta.pt") if not (path / n).is_file()]:
            what = f"an incomplete sharded checkpoint (no {', '.join(missing)})"
            raise UsageError(f"cannot load checkpoint {path}: {what}")
        return  # the shards carry no checksums
    if not path.is_file():  # a device, a FIFO, a broken link
        raise UsageError(f"cannot load checkpoint {path}: not a regular file")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        what = f"{path.stat().st_size:,} bytes: {err or 'unreadable'}"
        raise UsageError(
            f"cannot load checkpoint {path}: not a complete checkpoint file ({what}); "
            "torch.save writes a zip archive"
        ) from None
    if damaged:
        what = f"{damaged} does not match its CRC-32 checksum"
        raise UsageError(f"cannot load checkpoint {path}: it is damaged ({what})")


def init_weights(model: torch.nn.Module, source: Path) -> str:
    """--init_from: the weights of `source` (a checkpoint, a run's best.ckpt, a state dict file),
    where name and shape match; the rest keeps its fresh initialisation. Returns what loaded."""
    path = source / "checkpoints/best.ckpt" if (source / "config.yaml").is_file() else source
    weights, what = weights_of(path)
    own = model.state_dict()
    fits = {k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}
    if not fits:
        raise UsageError(
            f"--init_from {str(source)!r}: none of its {len(weights)} tensors fits the model by "
            f"name and shape (it has e.g. {', '.join(list(weights)[:3])}; the model: "
            f"{', '.join(list(own)[:3])})"
        )
    model.load_state_dict(fits, strict=False)
    lines = [f"--init_from {path}: {len(fits)} of the model's {len(own)} tensors loaded, {what}"]
    reshaped = [
        f"{k} {list(weights[k].shape)} -> {list(own[k].shape)}" for k in own if k in weights
    ]
    for label, names in [
        ("different shape, freshly initialised", [n for n in reshaped if n.split()[0] not in fits]),
        ("not in the checkpoint, freshly initialised", [k for k in own if k not in weights]),
        ("in the checkpoint only, ignored", [k for k in weights if k not in own]),
    ]:
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        lines += [f"  {label}: {', '.join(names[:8])}{more}"] if names else []
    return "\n".join(lines)


def weights_of(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """A checkpoint's weights (its EMA of them, where it kept one) and their origin in words; or a
    plain state dict's."""
    from machinery.ema import averaged_weights

    try:
        verify(path)
        load = read_sharded if path.is_dir() else torch.load
        options = {} if path.is_dir() else dict(mmap=True, map_location="cpu", weights_only=True)
        loaded = load(path, **options)
    except UsageError as err:
        raise UsageError(f"--init_from {path}: {err.problems[0]}") from None
    except Exception as err:  # noqa: BLE001 - not a checkpoint that loads safely
        reason = " ".join(str(err).split()).split(". ")[0]
        raise UsageError(f"--init_from {path}: cannot load it: {reason[:300]}") from None
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):  # one of ours
        step = f"step {loaded.get('global_step', '?')}"
        if "ema" in loaded:
            return {
                **loaded["model"],
                **averaged_weights(loaded),
            }, f"the EMA of the weights at {step}"
        return loaded["model"], f"the weights at {step}"
    weights = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None  # Lightning's
    if not isinstance(weights, dict) or not all(
        isinstance(v, torch.Tensor) for v in weights.values()
    ):
        raise UsageError(f"--init_from {path}: neither a checkpoint nor a state dict of tensors")
    return weights, "a state dict"


# ---------------------------------------------------------------------------------------------- RNG


def capture_rng_states(device_type: str = "cpu") -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (gathered, and loaded with weights_only=True), with the
    accelerator's (cuda or mps: the same keys on every rank)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    f64 = torch.float64
    states = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_keys.astype(np.int64)),
        "numpy_rest": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=f64),
        "python_internal": torch.tensor(py_internal, dtype=torch.int64),
        "python_rest": torch.tensor(
            [py_version, math.nan if py_gauss is None else py_gauss], dtype=f64
        ),
    }
    if device_type in ("cuda", "mps"):
        states[device_type] = getattr(torch, device_type).get_rng_state()
    return states


def gather_rng_states(fabric: Fabric) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, stacked along a first dimension of size world_size."""
    states = capture_rng_states(fabric.device.type)
    if fabric.world_size == 1:
        return {name: state.unsqueeze(0) for name, state in states.items()}
    with (
        warnings.catch_warnings()
    ):  # Fabric's all_gather uses torch's deprecated differentiable one
        warnings.filterwarnings("ignore", message=".*all_gather is deprecated")
        return {name: state.cpu() for name, state in fabric.all_gather(states).items()}


def restore_rng_states(states: dict[str, torch.Tensor], rank: int) -> None:
    """This rank's RNG states. After a change of world size, rank r takes saved rank r % saved."""
    row = rank % len(states["torch"])
    torch.set_rng_state(states["torch"][row].clone())  # a copy: it reads a row view from its start
    pos, has_gauss, gauss = states["numpy_rest"][row].tolist()
    np_keys = states["numpy_keys"][row].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", np_keys, int(pos), int(has_gauss), gauss))
    version, py_gauss = states["python_rest"][row].tolist()
    internal = tuple(states["python_internal"][row].tolist())
    random.setstate((int(version), internal, None if math.isnan(py_gauss) else py_gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"][row].clone())
    if "mps" in states and torch.backends.mps.is_available():
        torch.mps.set_rng_state(states["mps"][row].clone())
