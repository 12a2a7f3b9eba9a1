"""python tools/stream.py --dataset NAME --out DIR: a dataset of data.py as litdata chunks, for
train.py --dataset streamed --data_dir DIR. checksums.json last: without it, it is incomplete."""

import json
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the template's root, from anywhere

from simple_parsing import ArgumentParser  # noqa: E402

from machinery.errors import UsageError, exit_on_usage_error  # noqa: E402
from task_config import DataConfig  # noqa: E402


def sample(dataset: object, index: int) -> dict:
    return {"image": dataset.images[index], "label": int(dataset.labels[index])}


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_arguments(DataConfig, dest="data")  # train.py's data flags
    parser.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    parser.add_argument("--seed", type=int, default=0, help="which samples become val (10%%)")
    parser.add_argument("--chunk_bytes", default="64MB", help="e.g. 64KB for a small test set")
    args = parser.parse_args()
    out, problems = args.out, args.data.problems()
    if args.data.dataset == "streamed":
        problems.append("--dataset streamed is streamed already")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        problems.append(f"--out {out} is not a new or empty folder; nothing is overwritten")
    with exit_on_usage_error():  # one line
        if problems:
            raise UsageError(*problems)
        from data import load_splits

        *splits, meta = load_splits(args.data, args.seed)
    import litdata

    from machinery.checkpoints import crc32

    images = splits[0]  # an ImageTensorDataset: uint8 images, normalised as read
    info = dict(num_classes=meta.num_classes, in_channels=meta.in_channels, scale=images.stats[2])
    info |= dict(mean=images.mean.flatten().tolist(), std=images.std.flatten().tolist())
    info |= dict(class_names=list(meta.class_names), crop_flip=meta.augment is not None)
    for name, split in zip(("train", "val", "test", "info"), (*splits, [info])):
        make = partial(sample, split) if name != "info" else {0: info}.get
        # One worker: the same files each time.
        where, size = str(out / name), args.chunk_bytes
        litdata.optimize(make, list(range(len(split))), where, chunk_bytes=size, num_workers=1)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    sums = {str(p.relative_to(out)): crc32(p) for p in files}
    (out / "checksums.json").write_text(json.dumps(sums, indent=1))
    print(f"{args.data.dataset} -> {out}: train.py --dataset streamed --data_dir {out}")


if __name__ == "__main__":
    main()
