"""python tools/stream.py --dataset NAME --out DIR: a dataset of data.py as litdata chunks, for
`train.py --dataset streamed --data_dir DIR` (docs/streaming.md). Writes DIR/{train,val,test,info}
and, last, DIR/checksums.json: a conversion without it is incomplete."""

import json
import sys
import zlib
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the template's root, from anywhere

from simple_parsing import ArgumentParser  # noqa: E402

from machinery.errors import UsageError, exit_on_usage_error  # noqa: E402
from task_config import DataConfig  # noqa: E402


def sample(dataset: object, index: int) -> dict:
    return {"image": dataset.images[index], "label": int(dataset.labels[index])}


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__.split(":")[0])
    parser.add_arguments(DataConfig, dest="data")  # train.py's data flags: --dataset NAME, ...
    parser.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    parser.add_argument("--seed", type=int, default=0, help="which samples become val (10%%)")
    parser.add_argument("--chunk_bytes", default="64MB", help="e.g. 64KB for a small test set")
    args = parser.parse_args(argv)
    problems = args.data.problems() + ["--dataset streamed is already streamed"] * (
        args.data.dataset == "streamed"
    )
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        problems.append(f"--out {args.out} is not a new or empty folder; nothing is overwritten")
    with exit_on_usage_error():  # one line; e.g. cifar10's files are not in --data_dir
        if problems:
            raise UsageError("; ".join(problems))
        from data import load_splits

        *splits, meta = load_splits(args.data, args.seed)
    import litdata

    images = splits[0]
    stats = {"mean": images.mean.flatten().tolist(), "std": images.std.flatten().tolist()}
    info = {"num_classes": meta.num_classes, "in_channels": meta.in_channels, **stats}
    info |= {"class_names": list(meta.class_names), "scale": float(images.stats[2])}
    info["crop_flip"] = meta.augment is not None
    for name, split in zip(("train", "val", "test", "info"), (*splits, [info])):
        make = partial(sample, split) if name != "info" else partial(dict.__getitem__, {0: info})
        out, chunk_bytes = str(args.out / name), args.chunk_bytes  # one worker: the same files
        litdata.optimize(make, list(range(len(split))), out, chunk_bytes=chunk_bytes, num_workers=1)
    sums = {}
    for path in sorted(p for p in args.out.rglob("*") if p.is_file()):
        sums[str(path.relative_to(args.out))] = zlib.crc32(path.read_bytes())
    (args.out / "checksums.json").write_text(json.dumps(sums, indent=1))
    print(f"{args.data.dataset} -> {args.out}: train --dataset streamed --data_dir {args.out}")


if __name__ == "__main__":
    main()
