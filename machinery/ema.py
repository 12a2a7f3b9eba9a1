"""An exponential moving average (EMA) of the model's weights (not buffers), as timm's keeps one.

Guarantees: an Optimizer in form, so every strategy saves, loads and shards the averages like the
optimizer's moments, and a resume restores them bitwise."""

import contextlib
from collections.abc import Iterator

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(torch.optim.Optimizer):
    """The decay warms up as min(decay, (1 + step) / (10 + step)): early weights do not dominate."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        self.module = getattr(model, "module", model)  # the user's module inside Fabric's wrapper
        # Named as in the model's state dict, for --init_from.
        named = [(name, p) for name, p in self.module.named_parameters() if p.requires_grad]
        super().__init__(named, {})
        self.decay, self.params = decay, [p for _, p in named]
        for p in self.params:
            self.state[p]["average"] = p.detach().clone()

    def averages(self) -> list[torch.Tensor]:
        return [self.state[p]["average"] for p in self.params]  # a load replaces them

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (from 0): one fused lerp, no CPU sync."""
        decay = min(self.decay, (1 + step) / (10 + step))
        get_ema_multi_avg_fn(decay)(self.averages(), [p.detach() for p in self.params], None)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        self.swap()
        try:
            yield
        finally:
            self.swap()

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's weights and the averages; a second swap undoes it, bitwise."""
        from torch.distributed.fsdp import FSDPModule

        for module in self.module.modules():  # FSDP2 keeps the root's gathered weights: drop them
            if isinstance(module, FSDPModule):
                module.reshard()
        for p, average in zip(self.params, self.averages()):
            weights = p.detach().clone()  # one at a time, in place: FSDP keeps views of them
            p.detach().copy_(average)
            average.copy_(weights)


def averaged_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """{name: average}; a file's "ema" is keyed by position, a sharded one's by name."""
    (group,), state = checkpoint["ema"]["param_groups"], checkpoint["ema"]["state"]
    names = group.get("param_names", group["params"])
    return {name: state[key]["average"] for name, key in zip(names, group["params"])}
