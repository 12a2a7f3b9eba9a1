"""Streamed data (litdata chunks, written by tools/stream.py): checked before use, and trained on
through litdata's own loader, whose position every checkpoint holds."""

import json
import math
import os
import threading
import zlib
from itertools import islice
from pathlib import Path
from typing import Any

from machinery.errors import UsageError

SPLITS = ("train", "val", "test", "info")
SAFE_FORMATS = {
    "int",
    "float",
    "bool",
    "str",
    "bytes",
    "json",
    "tensor",
    "no_header_tensor",
    "numpy",
}


def open_splits(root: str, transform: Any) -> dict[str, Any]:
    """`root`'s splits: train streamed, val and test map-style (in order), info a dict. One line
    if `root` is not a complete, intact conversion, or gives no answer in $STREAM_TIMEOUT_S (60)."""
    remote, seconds = "://" in root, os.environ.get("STREAM_TIMEOUT_S", "60")
    if not seconds.isdigit():
        raise UsageError(f"STREAM_TIMEOUT_S={seconds!r} must be a whole number of seconds")
    if not remote and not Path(root, "checksums.json").is_file():
        why = "no such directory" if not Path(root).is_dir() else "no checksums.json in it"
        raise UsageError(f"--data_dir {root}: {why}; convert a dataset with tools/stream.py")
    found, failure = {}, []

    def reach() -> None:
        try:
            found["info"] = info = dataset(f"{root}/info", None)[0]
            found.update({s: dataset(f"{root}/{s}", transform(info)) for s in SPLITS[:3]})
        except UsageError as err:
            failure.append(err)
        except Exception as err:  # noqa: BLE001 - litdata's and the storage's: one line
            failure.append(UsageError(f"--data_dir {root}: {' '.join(str(err).split())[:200]}"))

    thread = threading.Thread(target=reach, daemon=True)  # a hung request stops no exit
    thread.start()
    thread.join(int(seconds))
    if thread.is_alive():
        raise UsageError(f"--data_dir {root}: no answer in {seconds} s; check the URL")
    if failure:
        raise failure[0]
    if not remote:
        verify(Path(root))
    return found


def dataset(where: str, transform: Any) -> Any:
    from litdata import StreamingDataset

    train, remote = where.endswith("/train"), "://" in where
    length = 0 if remote else checked_length(where, Path(where))  # before litdata parses it
    data = StreamingDataset(where, shuffle=train, drop_last=train or None, transform=transform)
    if remote:  # litdata fetched it into its cache
        length = checked_length(where, Path(data.input_dir.path))
    return data if train else Ordered(data, length)


def checked_length(where: str, folder: Path) -> int:
    try:
        index = json.loads((folder / "index.json").read_text())
        formats, chunks = index["config"]["data_format"], index["chunks"]
        length = sum(int(c["chunk_size"]) for c in chunks)
    except (OSError, ValueError, TypeError, KeyError):
        raise UsageError(
            f"{where}/index.json is not litdata's; convert with tools/stream.py"
        ) from None
    if unsafe := set(map(str, formats)) - SAFE_FORMATS:
        raise UsageError(f"{where}/index.json: refused, its items need {sorted(unsafe)} to load")
    if not length:
        raise UsageError(f"{where}: the split is empty; convert a dataset with tools/stream.py")
    return length


class Ordered:
    """A split indexed in order: a rank reads every world_size-th sample, each one once."""

    def __init__(self, data: Any, length: int) -> None:
        self.data, self.length = data, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.data[index]


def verify(root: Path) -> None:
    """Each local chunk against the CRC32 tools/stream.py wrote: a damaged file is one line."""
    for name, expected in json.loads((root / "checksums.json").read_text()).items():
        path, crc = root / name, 0
        try:
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    crc = zlib.crc32(block, crc)
        except OSError as err:
            raise UsageError(f"--data_dir: cannot read {path}: {err.strerror}") from None
        if crc != expected:
            raise UsageError(f"--data_dir: {path} fails its checksum: damaged; convert it again")


class StreamedBatches:
    """Training batches from litdata's StreamingDataLoader. Each rank (and worker) reads its own
    chunks, so the batches depend on the world size and workers, unlike the map-style path's.
    `set_position` and the checkpointed state resume an epoch at its next sample."""

    def __init__(self, fabric: Any, data: Any, batch_size: int, accum: int, cfg: Any, fast: Any):
        import torch
        from litdata import StreamingDataLoader

        data.seed, workers = cfg.seed, cfg.hardware.num_workers  # the epoch's order: seed, epoch
        # Its own generator: an iterator draws nothing from the global RNG, which a resume restores.
        loader = StreamingDataLoader(
            data, batch_size=batch_size, num_workers=workers, generator=torch.Generator()
        )
        self.loader, self.accum, self.saved = loader, accum, None
        steps = min(len(loader) // accum, fast or math.inf)  # ranks may differ by a batch
        self.steps_per_epoch = int(fabric.all_reduce(float(steps), reduce_op="min"))
        self.train = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
        self.eff_batch_size = batch_size * accum * fabric.world_size
        self.set_position(0)

    def set_position(self, epoch: int, sample_offset: int = 0) -> None:
        if sample_offset and self.saved:  # mid-epoch: litdata replays to its next sample
            self.loader.load_state_dict(self.saved)
        else:  # litdata counts epochs from 1 and begins one at each iter()
            self.loader.current_epoch, self.loader.restore = epoch, False
        self.saved = None
        self.left = (self.steps_per_epoch - sample_offset // self.eff_batch_size) * self.accum

    def __iter__(self) -> Any:
        return islice(self.train, self.left)

    def __len__(self) -> int:
        return self.left

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = state
