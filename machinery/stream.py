"""Streamed data (litdata chunks from tools/stream.py): checked before use, trained on through
litdata's own loader, whose position every checkpoint holds."""

import json
import math
import os
import threading
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from machinery.checkpoints import crc32
from machinery.errors import UsageError

SAFE = {"int", "float", "bool", "str", "bytes", "json", "tensor", "no_header_tensor", "numpy"}
CONVERT = "convert a dataset with tools/stream.py"


def open_splits(root: str, transform: Any) -> dict[str, Any]:
    """train streamed, val and test in order, info a dict; one line if `root` is not an intact
    conversion or gives no answer in $STREAM_TIMEOUT_S seconds (60)."""
    remote, seconds, found = "://" in root, os.environ.get("STREAM_TIMEOUT_S", "60"), {}
    if not remote and not Path(root, "checksums.json").is_file():
        why = "no such directory" if not Path(root).is_dir() else "no checksums.json in it"
        raise UsageError(f"--data_dir {root}: {why}; {CONVERT}")

    def reach() -> None:
        try:
            found["info"] = info = dataset(f"{root}/info", None)[0]
            found.update(
                {s: dataset(f"{root}/{s}", transform(info)) for s in ("train", "val", "test")}
            )
        except Exception as err:  # noqa: BLE001 - litdata's and the storage's: one line
            found["error"] = err

    thread = threading.Thread(target=reach, daemon=True)  # a hung request stops no exit
    thread.start()
    thread.join(int(seconds) if seconds.isdigit() else 60)
    if thread.is_alive():
        raise UsageError(f"--data_dir {root}: no answer in {seconds} s; check the URL")
    if err := found.get("error"):
        why = " ".join(str(err).split())[:200]  # one line
        raise err if isinstance(err, UsageError) else UsageError(f"--data_dir {root}: {why}")
    try:
        sums = {} if remote else dict(json.loads(Path(root, "checksums.json").read_text()))
        bad = [name for name, crc in sums.items() if crc32(Path(root, name)) != crc]
    except (ValueError, TypeError):
        bad = ["checksums.json"]
    if bad:
        raise UsageError(f"--data_dir {root}: {bad[0]} fails its checksum; convert it again")
    return found


def dataset(where: str, transform: Any) -> Any:
    from litdata import StreamingDataset

    train, remote = where.endswith("/train"), "://" in where
    length = remote or checked_length(where, Path(where))  # before litdata parses it
    # batch_decode "auto" decodes a window per shuffled read: 8x slower
    options = dict(shuffle=train, drop_last=train or None, batch_decode=False)
    data = StreamingDataset(where, transform=transform, **options)
    if remote:  # litdata fetched it into its cache
        length = checked_length(where, Path(data.input_dir.path))
    return data if train else Subset(data, range(length))  # a rank takes every world_size-th


def checked_length(where: str, folder: Path) -> int:
    try:
        index = json.loads((folder / "index.json").read_text())
        formats, length = (
            index["config"]["data_format"],
            sum(c["chunk_size"] for c in index["chunks"]),
        )
    except (OSError, ValueError, TypeError, KeyError):
        raise UsageError(f"{where}/index.json is not litdata's; {CONVERT}") from None
    if unsafe := set(map(str, formats)) - SAFE:
        raise UsageError(f"{where}/index.json: refused, its items need {sorted(unsafe)} to load")
    if not length:
        raise UsageError(f"{where}: the split is empty; {CONVERT}")
    return length


class StreamedBatches:
    """litdata's StreamingDataLoader: each rank (and worker) reads chunks of its own."""

    def __init__(self, fabric: Any, data: Any, batch_size: int, accum: int, cfg: Any, fast: Any):
        from litdata import StreamingDataLoader

        data.seed, workers, self.saved = cfg.seed, cfg.hardware.num_workers, None
        # Its own generator: an iterator draws nothing from the global RNG, which a resume restores.
        self.loader = StreamingDataLoader(
            data, batch_size=batch_size, num_workers=workers, generator=torch.Generator()
        )
        steps = min(len(self.loader) // accum, fast or math.inf)  # ranks may differ by a batch
        self.steps_per_epoch = int(fabric.all_reduce(float(steps), reduce_op="min"))
        self.accum, self.eff_batch_size = accum, batch_size * accum * fabric.world_size
        self.set_position(0)

    def set_position(self, epoch: int, sample_offset: int = 0) -> None:
        if sample_offset and self.saved:  # mid-epoch: litdata goes on at its next sample
            self.loader.load_state_dict(self.saved)
        else:  # litdata counts epochs from 1 and begins one at each iter()
            self.loader.current_epoch, self.loader.restore = epoch, False
        self.saved, steps = None, self.steps_per_epoch - sample_offset // self.eff_batch_size
        self.left = steps * self.accum

    def __iter__(self) -> Any:
        return islice(self.train, self.left)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.saved = state
