"""Checkpoints: named only once complete and flushed, never of non-finite weights; CRC-checked."""

import errno
import io
import json
import os
import pickle
import random
import shutil
import sys
import time
import zipfile
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from lightning.fabric import Fabric
from lightning.fabric.strategies import ModelParallelStrategy
from lightning.fabric.utilities.load import _load_distributed_checkpoint
from lightning_utilities.core.apply_func import apply_to_collection
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from machinery.errors import FilesystemError, NonFiniteLoss, UsageError
from machinery.rundir import PERIODIC, is_checkpoint, periodic_checkpoints

SAFE_LOAD = {"mmap": True, "map_location": "cpu", "weights_only": True}
CHECKSUMS = "checksums.json"  # {file: [bytes, CRC-32]}
REFUSED = "it holds objects other than tensors and plain Python values, and loading it could "
REFUSED += "run code"


def checkpoint_step(path: Path) -> int:
    if match := PERIODIC.match(path.name):
        return int(match[1])
    file = path / "meta.pt" if path.is_dir() else path
    try:  # a FIFO or a link is never opened
        assert file.is_file() and not path.is_symlink() and not file.is_symlink()
        return int(torch.load(file, **SAFE_LOAD)["global_step"])
    except Exception:
        return -1


def resume_candidates(ckpt_dir: Path) -> list[Path]:
    # final.ckpt by its step: an extended run is not done
    final = [p for p in ckpt_dir.glob("final.ckpt") if not p.is_symlink()]
    paths = [*periodic_checkpoints(ckpt_dir), *final]
    return sorted(paths, key=lambda p: (checkpoint_step(p), p.name == "final.ckpt"), reverse=True)


def newest_checkpoint(ckpt_dir: Path) -> str | None:
    wait_for_checkpoints()
    return next((p.name for p in resume_candidates(ckpt_dir)), None)


def is_finished(ckpt_dir: Path) -> bool:
    return resume_candidates(ckpt_dir)[:1] == [ckpt_dir / "final.ckpt"]


_publisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoints")
_publishing: list[Future] = []
longest_write_seconds = 0.0  # kept in reserve by --max_time


def save_checkpoint(fabric: Fabric, state: dict, *paths: Path, keep: int | None = None) -> None:
    """Written by a background thread; `paths` past the first are links."""
    if not paths:
        return
    wait_for_checkpoints(fabric)
    # Periodic names last: a crash between renames redoes best.ckpt too.
    paths = tuple(sorted(paths, key=lambda p: bool(PERIODIC.match(p.name))))
    keep = keep if PERIODIC.match(paths[-1].name) else None
    local = [p.to_local() if hasattr(p, "to_local") else p for p in state["model"].parameters()]
    # inf-norm: one kernel per dtype
    largest = torch.nn.utils.get_total_norm([p for p in local if p.numel()], float("inf"))
    if not fabric.all_reduce(largest.isfinite().float().to(fabric.device), reduce_op="min").item():
        problem = f"the weights are not finite at step {state['global_step']} ({paths[0].name})"
        raise NonFiniteLoss(problem, newest_checkpoint(paths[0].parent))
    tmp = paths[0].with_name(f".{paths[0].name}.{state['global_step']}.tmp")
    name, keys, *rest = np.random.get_state()  # keys as a list, for weights_only
    rng = {"torch": torch.get_rng_state(), "numpy": (name, keys.tolist(), *rest)}
    rng["python"] = random.getstate()
    if (device := fabric.device.type) in ("cuda", "mps"):
        rng[device] = getattr(torch, device).get_rng_state()
    rngs = [rng] * fabric.world_size
    if fabric.world_size > 1:
        torch.distributed.all_gather_object(rngs, rng)
    state = {**state, "rng": rngs}
    if isinstance(fabric.strategy, ModelParallelStrategy):  # FSDP
        fabric.save(tmp, state)
        if fabric.global_rank == 0:
            _publishing.append(_publisher.submit(publish_and_prune, tmp, paths, keep))
    elif fabric.global_rank == 0:
        # training goes on while the CPU copy is written
        state = {k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()}
        copy = apply_to_collection(state, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))
        _publishing.append(_publisher.submit(write_and_publish, tmp, copy, paths, keep))


def write_and_publish(tmp: Path, state: dict, paths: tuple, keep: int | None) -> None:
    # Not fabric.save: it copies from $TMPDIR, maybe across filesystems.
    global longest_write_seconds
    start = time.monotonic()
    tmp.parent.mkdir(exist_ok=True)
    try:
        torch.save(state, tmp)
    except RuntimeError as err:  # how torch reports a full disk
        tmp.unlink(missing_ok=True)
        raise OSError(errno.EIO, first_sentence(err), tmp) from None
    publish_and_prune(tmp, paths, keep)
    longest_write_seconds = max(longest_write_seconds, time.monotonic() - start)


def publish_and_prune(tmp: Path, paths: tuple[Path, ...], keep: int | None) -> None:
    if tmp.is_dir():  # shards carry no checksum of their own
        sums = {p.name: [p.stat().st_size, crc32(p)] for p in sorted(tmp.iterdir())}
        (tmp / CHECKSUMS).write_text(json.dumps(sums))
    publish(tmp, paths[0])
    for path in paths[1:]:
        link = path.with_name(f".{path.name}.tmp")
        if paths[0].is_dir():
            shutil.copytree(paths[0], link, copy_function=os.link)
        else:
            os.link(paths[0], link)
        publish(link, path)
    for old in periodic_checkpoints(paths[0].parent)[:-keep] if keep else []:
        remove_checkpoint(old)


def wait_for_checkpoints(fabric: Fabric | None = None) -> None:
    """Re-raises a failed write (with `fabric`: on every rank)."""
    failure = next(filter(None, [future.exception() for future in _publishing]), None)
    _publishing.clear()
    if fabric and fabric.world_size > 1:
        ok = torch.tensor(float(failure is None), device=fabric.device)
        if not fabric.all_reduce(ok, reduce_op="min").item() and failure is None:
            raise FilesystemError("rank 0 could not write a checkpoint (it says why); stopping")
    if failure:
        raise failure


def publish(tmp: Path, path: Path) -> None:
    # A directory cannot replace another atomically: the old one goes aside first.
    for file in [*tmp.rglob("*"), tmp, tmp.parent]:
        fsync(file)
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
    if path.is_dir() and not path.is_symlink():  # never what a link points to
        shutil.rmtree(path)
    else:
        path.unlink()


_damaged: list[tuple[Path, str]] = []  # what a resume skipped: set aside under the lock


def tidy_checkpoints(ckpt_dir: Path) -> None:
    """Undoes a crash in `publish`; renames what a resume skipped NAME.damaged."""
    for tmp in ckpt_dir.glob(".*.tmp"):
        original = ckpt_dir / tmp.name[1:].removesuffix(".old.tmp")
        if tmp.name.endswith(".old.tmp") and not original.exists():
            os.replace(tmp, original)
        else:
            remove_checkpoint(tmp)
    while _damaged:
        damaged, warning = _damaged.pop()
        target = damaged.with_name(f"{damaged.name}.damaged")
        if target.exists():
            target = damaged.with_name(f"{damaged.name}.{time.time_ns()}.damaged")
        os.replace(damaged, target)
        print(f"{warning}; renamed {target.name}, out of the rotation", file=sys.stderr)


def load_newest_checkpoint(fabric: Fabric, run_dir: Path, state: dict) -> tuple[Path, dict]:
    """The checkpoint loaded, and what it holds besides `state`."""
    if is_checkpoint(run_dir):
        return run_dir, load_checkpoint(fabric, run_dir, state)
    failed, where = [], run_dir / "checkpoints"
    for link in sorted(p for p in where.glob("*.ckpt") if p.is_symlink()):
        fabric.print(
            f"warning: ignoring {link}: a link is never this run's checkpoint", file=sys.stderr
        )
    loaded = None
    for path in resume_candidates(where):
        try:  # past the one loaded, those with no readable step are checked
            if not loaded:
                loaded = path, load_checkpoint(fabric, path, state)
            elif checkpoint_step(path) < 0:
                verify(path)
        except UsageError as err:
            failed.append((path, f"warning: skipping an unloadable checkpoint: {err}"))
    if loaded:
        _damaged[:] = failed
        return loaded
    for _, warning in failed:
        fabric.print(warning, file=sys.stderr)
    n = f" ({len(failed)} could not be loaded)" if failed else ""
    raise UsageError(f"--resume {str(run_dir)!r} has no loadable checkpoint in {where}{n}")


def load_checkpoint(fabric: Fabric, path: Path, state: dict) -> dict:
    verify(path)
    try:
        if path.is_dir() and not isinstance(fabric.strategy, ModelParallelStrategy):
            remainder = load_sharded_whole(path, state)
        else:
            remainder = fabric.load(path, state, strict=True, weights_only=True)
    except (Exception, CheckpointException) as err:  # DCP's is a BaseException
        why = f"{REFUSED}: refused" if isinstance(err, pickle.UnpicklingError) else None
        raise UsageError(f"cannot load checkpoint {path}: {why or first_sentence(err)}") from None
    if not isinstance(rngs := remainder.get("rng", []), list):
        raise UsageError(f"cannot load checkpoint {path}: it holds an older template's RNG states")
    if rngs:  # a new world size: rank r takes saved rank r % saved
        rng = rngs[fabric.global_rank % len(rngs)]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        for device in ("cuda", "mps"):
            if device in rng and getattr(torch, device).is_available():
                getattr(torch, device).set_rng_state(rng[device])
    return remainder


def first_sentence(err: Exception) -> str:
    return " ".join(str(err).split()).split(". ")[0][:300]


def load_sharded_whole(path: Path, state: dict) -> dict:
    """For DDP; returns what `state` lacks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # Private: torch's public loader needs the structure; this reads .metadata.
    full, options = _load_distributed_checkpoint(path), StateDictOptions(full_state_dict=True)
    for key, obj in state.items():
        if isinstance(obj, torch.optim.Optimizer):  # the EMA too: keyed by name
            opt = getattr(obj, "optimizer", obj)
            set_optimizer_state_dict(state["model"].module, opt, full.pop(key), options=options)
        elif isinstance(obj, torch.nn.Module):
            obj.load_state_dict(full.pop(key))
        else:
            state[key] = full.pop(key)
    return full


def verify(path: Path) -> None:
    """A UsageError unless whole: a zip matching its CRCs, or a complete sharded one."""
    cannot = f"cannot load checkpoint {path}:"
    if path.is_dir() and not path.is_symlink():
        return verify_sharded(path, cannot)
    if not path.is_file() or path.is_symlink():  # a FIFO would block the read
        raise UsageError(f"{cannot} not a regular file")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        why = f"{path.stat().st_size:,} bytes: {err or 'unreadable'}"
        raise UsageError(f"{cannot} not a complete checkpoint file ({why})") from None
    if damaged:
        raise UsageError(f"{cannot} it is damaged ({damaged} does not match its CRC-32 checksum)")


def verify_sharded(path: Path, cannot: str) -> None:
    """Checksums match; .metadata holds DCP's classes only; other values load weights_only."""
    files = {p.name: p for p in path.iterdir()}
    try:
        sums = json.loads(files.pop(CHECKSUMS).read_text()) if CHECKSUMS in files else {}
        assert sums.keys() == files.keys() and {".metadata", "meta.pt"} <= files.keys()
    except (AssertionError, ValueError, OSError):
        raise UsageError(f"{cannot} an incomplete sharded checkpoint (its {CHECKSUMS})") from None
    for name, (size, crc) in sums.items():
        file = files[name]
        ok = file.is_file() and not file.is_symlink() and file.stat().st_size == size
        if not ok or crc32(file) != crc:
            raise UsageError(f"{cannot} it is damaged ({name} does not match its checksum)")
    try:
        metadata = MetadataUnpickler(io.BytesIO(files[".metadata"].read_bytes())).load()
        for index, info in metadata.storage_data.items():
            if isinstance(metadata.state_dict_metadata[index.fqn], BytesStorageMetadata):
                with open(files[info.relative_path], "rb") as f:
                    f.seek(info.offset)
                    torch.load(io.BytesIO(f.read(info.length)), weights_only=True)
    except Exception:
        raise UsageError(f"{cannot} {REFUSED}: refused") from None


class MetadataUnpickler(pickle.Unpickler):
    """Only what DCP's .metadata holds."""

    KNOWN = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")}
    KNOWN.add(("torch.distributed.checkpoint.filesystem", "_StorageInfo"))

    def find_class(self, module: str, name: str) -> type:
        known = (module, name) in self.KNOWN or module == "torch.distributed.checkpoint.metadata"
        if known or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def init_weights(model: torch.nn.Module, source: Path) -> str:
    from machinery.ema import averaged_weights

    path = source / "checkpoints/best.ckpt" if (source / "config.yaml").is_file() else source
    try:
        verify(path)
        weights = (
            _load_distributed_checkpoint(path) if path.is_dir() else torch.load(path, **SAFE_LOAD)
        )
    except Exception as err:
        why = err.problems[0] if isinstance(err, UsageError) else first_sentence(err)
        raise UsageError(f"--init_from {path}: {why}") from None
    what = "a state dict"
    if isinstance(weights, dict) and isinstance(weights.get("model"), dict):  # one of ours
        what = f"the {'EMA ' * ('ema' in weights)}weights at step {weights.get('global_step')}"
        weights = {**weights["model"], **(averaged_weights(weights) if "ema" in weights else {})}
    if not isinstance(weights, dict) or any(not torch.is_tensor(v) for v in weights.values()):
        raise UsageError(f"--init_from {path}: neither a checkpoint nor a state dict of tensors")
    own = model.state_dict()
    fits = {k: v for k, v in weights.items() if k in own and v.shape == own[k].shape}
    if not fits:
        raise UsageError(
            f"--init_from {str(source)!r}: none of its {len(weights)} tensors fits the model by "
            f"name and shape (it has e.g. {', '.join(list(weights)[:3])}; the model: "
            f"{', '.join(list(own)[:3])})"
        )
    model.load_state_dict(fits, strict=False)
    fresh = [k for k in own if k not in fits] or ["none"]
    fresh = ", ".join(fresh[:8] + ["..."][: len(fresh) > 8])
    return (
        f"--init_from {path} ({what}): {len(fits)} of its {len(weights)} tensors loaded into the "
        f"model's {len(own)}; freshly initialised: {fresh}"
    )
