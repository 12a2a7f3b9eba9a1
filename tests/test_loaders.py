"""The sampler that owns the data order, and sharded evaluation. (Generic tier: any dataset.)"""

import pytest
import torch

from machinery.sampler import GlobalBatchSampler, make_eval_loader, make_train_loader


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
        per_rank.append([sum(micro[i : i + accum], []) for i in range(0, len(micro), accum)])
    return [sorted(sum((steps[i] for steps in per_rank), [])) for i in range(len(per_rank[0]))]


@pytest.mark.parametrize(
    ("world_size", "max_per_device"), [(2, 256), (4, 256), (1, 16), (2, 8), (8, 4)]
)
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


def test_a_per_sample_dataset_is_collated_as_usual_in_worker_processes():
    dataset = torch.utils.data.TensorDataset(torch.arange(100), torch.arange(100) * 2)
    sampler = GlobalBatchSampler(100, 20, 10, rank=0, world_size=1, seed=0)
    loader = make_train_loader(dataset, sampler, num_workers=2)
    batches = list(loader)
    assert [x.tolist() for x, _ in batches] == list(
        sampler
    )  # collated per sample, in the sampler's order
    assert all(torch.equal(y, x * 2) for x, y in batches)


def test_a_dataset_that_serves_whole_batches_passes_them_through():
    class Batched(torch.utils.data.Dataset):
        collate_fn = staticmethod(lambda batch: batch)

        def __len__(self):
            return 50

        def __getitems__(self, indices):
            return {"ids": torch.tensor(indices)}

    loader = make_eval_loader(Batched(), 8, rank=1, world_size=2, num_workers=0)
    assert [batch["ids"].tolist() for batch in loader][0] == [1, 3, 5, 7, 9, 11, 13, 15]
