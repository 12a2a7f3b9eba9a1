"""Data splits, the sampler that owns the data order, sharded evaluation, and the torchvision loaders
run offline on tiny files that the tests write."""

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from config import DataConfig, UsageError
from data import GlobalBatchSampler, load_splits, make_eval_loader


def global_batches(num_samples, eff, world_size, max_per_device, epoch=0, seed=0, sample_offset=0):
    """The sample ids of each optimizer step, gathered over all ranks and accumulation steps."""
    from config import OptimConfig

    optim = OptimConfig(eff_batch_size=eff, max_batch_size_per_device=max_per_device)
    per_device, accum = optim.micro_batching(world_size)
    per_rank = []
    for rank in range(world_size):
        sampler = GlobalBatchSampler(num_samples, eff, per_device, rank, world_size, seed)
        sampler.set_position(epoch, sample_offset)
        micro = list(sampler)
        assert len(micro) == len(sampler)
        assert all(len(m) == per_device for m in micro)
        per_rank.append([sum(micro[i:i + accum], []) for i in range(0, len(micro), accum)])
    return [sorted(sum((steps[i] for steps in per_rank), [])) for i in range(len(per_rank[0]))]


@pytest.mark.parametrize(("world_size", "max_per_device"), [(2, 256), (4, 256), (1, 16), (2, 8), (8, 4)])
def test_same_global_batches_at_every_world_size_and_accumulation(world_size, max_per_device):
    reference = global_batches(1000, 64, 1, 256)
    assert global_batches(1000, 64, world_size, max_per_device) == reference


def test_every_step_has_exactly_eff_batch_size_distinct_samples():
    steps = global_batches(1000, 64, 2, 256)
    assert len(steps) == 1000 // 64  # the last, partial global batch is dropped
    assert all(len(s) == len(set(s)) == 64 for s in steps)
    assert len(set(sum(steps, []))) == 64 * len(steps)  # no sample twice in an epoch


def test_order_depends_only_on_seed_and_epoch():
    assert global_batches(500, 50, 1, 256, epoch=3) == global_batches(500, 50, 1, 256, epoch=3)
    assert global_batches(500, 50, 1, 256, epoch=3) != global_batches(500, 50, 1, 256, epoch=4)
    assert global_batches(500, 50, 1, 256, seed=1) != global_batches(500, 50, 1, 256, seed=2)


def test_starting_at_a_sample_offset_continues_the_same_epoch_order():
    full = global_batches(1000, 64, 1, 256, epoch=2)
    assert global_batches(1000, 64, 2, 256, epoch=2, sample_offset=5 * 64) == full[5:]


def test_fast_run_caps_the_steps_per_epoch():
    sampler = GlobalBatchSampler(1000, 64, 32, 0, 1, 0, max_steps_per_epoch=2)
    assert sampler.steps_per_epoch == 2 and len(list(sampler)) == 4


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_eval_shards_cover_every_sample_once_without_padding(world_size):
    dataset = torch.utils.data.TensorDataset(torch.arange(37))
    seen = []
    for rank in range(world_size):
        for (batch,) in make_eval_loader(dataset, 5, rank, world_size, num_workers=0):
            seen += batch.tolist()
    assert sorted(seen) == list(range(37))


def test_digits_splits_are_disjoint_and_test_is_the_same_for_every_seed():
    def ids(dataset):  # identify samples by their pixels
        return {tuple(x.flatten().tolist()) + (int(y),) for x, y in zip(*dataset.__getitems__(range(len(dataset))))}

    train, val, test, info = load_splits(DataConfig(), seed=1)
    assert (len(train), len(val), len(test)) == (1295, 143, 359)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 8)
    train2, val2, test2, _ = load_splits(DataConfig(), seed=2)
    assert torch.equal(test.images, test2.images)  # the test split does not move with the seed
    assert not torch.equal(val.images, val2.images)  # the validation split does
    assert not (ids(train) | ids(val) | ids(train2) | ids(val2)) & ids(test)  # no test image is trained on
    x, y = train.__getitems__([0, 1, 2])
    assert x.shape == (3, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert abs(train.__getitems__(range(len(train)))[0].mean().item()) < 0.1  # normalised


def _write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of the MNIST files: magic (0, 0, dtype 0x08, ndim), big-endian sizes, then bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", n) for n in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_tiny_mnist(data_dir: Path, folder: str = "MNIST", num_train: int = 200, num_test: int = 50) -> None:
    raw = data_dir / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in [("train", num_train), ("t10k", num_test)]:
        labels = np.arange(n) % 10
        images = rng.integers(0, 50, size=(n, 28, 28))
        images[np.arange(n), labels * 2, :] = 255  # a learnable signal: the label is a bright row
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.mark.parametrize(("dataset", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_style_datasets_load_offline_through_torchvision(tmp_path, dataset, folder):
    write_tiny_mnist(tmp_path, folder)
    train, val, test, info = load_splits(DataConfig(dataset=dataset, data_dir=str(tmp_path)), seed=0)
    assert (len(train), len(val), len(test)) == (180, 20, 50)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 1, 28)
    x, y = test.__getitems__([3])
    assert int(y) == 3 and x.shape == (1, 1, 28, 28)
    assert x[0, 0, 6].mean() > x[0, 0, 7].mean()  # row 2 * label is the bright one


def test_cifar10_loads_offline_through_torchvision(tmp_path, monkeypatch):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)

    def write(name, obj):
        (base / name).write_bytes(pickle.dumps(obj))

    for i in range(1, 6):
        write(f"data_batch_{i}", {"data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))})
    write("test_batch", {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": list(range(10)) * 2})
    write("batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    import torchvision

    # The real files' checksums are hard-coded in torchvision; ours are tiny stand-ins.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    train, val, test, info = load_splits(DataConfig(dataset="cifar10", data_dir=str(tmp_path)), seed=0)
    assert (len(train), len(val), len(test)) == (45, 5, 20)
    assert (info.num_classes, info.in_channels, info.image_size) == (10, 3, 32)
    assert info.class_names[3] == "class3"
    assert test.__getitems__([0])[0].shape == (1, 3, 32, 32)


def test_missing_dataset_files_offline_say_where_to_put_them(tmp_path):
    with pytest.raises(UsageError, match=rf"not in {tmp_path}/MNIST/raw and could not be downloaded"):
        load_splits(DataConfig(dataset="mnist", data_dir=str(tmp_path)), seed=0)
