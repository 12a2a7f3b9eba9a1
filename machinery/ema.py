"""The weights' EMA, an Optimizer in form: every strategy saves and shards it like moments."""

import contextlib
from collections.abc import Iterator

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(torch.optim.Optimizer):
    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.module = getattr(model, "module", model)
        # Named as in the model's state dict, for --init_from.
        named = [(name, p) for name, p in self.module.named_parameters() if p.requires_grad]
        super().__init__(named, {})
        self.decay, self.params = decay, [p for _, p in named]
        for p in self.params:
            self.state[p]["average"] = p.detach().clone()

    @torch.no_grad()
    def update(self, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        averages = [self.state[p]["average"] for p in self.params]
        get_ema_multi_avg_fn(decay)(averages, [p.detach() for p in self.params], None)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        self.swap()
        try:
            yield
        finally:
            self.swap()

    @torch.no_grad()
    def swap(self) -> None:
        from torch.distributed.fsdp import FSDPModule

        for module in self.module.modules():  # FSDP2 keeps the root's gathered weights
            if isinstance(module, FSDPModule):
                module.reshard()
        for p in self.params:
            average = self.state[p]["average"]
            weights = p.detach().clone()  # one at a time, in place: FSDP keeps views of them
            p.detach().copy_(average)
            average.copy_(weights)


def averaged_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """A file's "ema" is keyed by position, a sharded one's by name."""
    (group,), state = checkpoint["ema"]["param_groups"], checkpoint["ema"]["state"]
    names = group.get("param_names", group["params"])
    return {name: state[key]["average"] for name, key in zip(names, group["params"])}
