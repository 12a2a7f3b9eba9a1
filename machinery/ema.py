"""An exponential moving average (EMA) of the model's weights, as timm's --model-ema keeps one.

Guarantees: it is an Optimizer in form only: its per-parameter state holds the averages. That way
every strategy saves, loads and shards it exactly as it does the optimizer's moments: one file, or
one shard per rank under FSDP, and a resume restores it bitwise. Buffers (BatchNorm's running
statistics) are not averaged: evaluation with the averaged weights uses the model's own."""

import contextlib
from collections.abc import Iterator

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMA(torch.optim.Optimizer):
    """average = decay x average + (1 - decay) x weights, after each optimizer step. The decay warms
    up as min(decay, (1 + step) / (10 + step)): early weights, which are soon left behind, do not
    dominate the average."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        # The names go into the state dict (--init_from reads them), spelled as in the model's state
        # dict.
        module = getattr(model, "module", model)  # the user's module inside Fabric's wrapper
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        super().__init__(named, {})
        self.decay, self.module = decay, module
        self.params = [p for _, p in named]
        for p in self.params:
            self.state[p]["average"] = p.detach().clone()

    def averages(self) -> list[torch.Tensor]:
        return [
            self.state[p]["average"] for p in self.params
        ]  # looked up each time: a load replaces them

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (counted from 0): one fused lerp over all parameters, no CPU
        sync."""
        decay = min(self.decay, (1 + step) / (10 + step))
        ema_update = get_ema_multi_avg_fn(decay)  # one fused lerp (torch's foreach kernel)
        ema_update(self.averages(), [p.detach() for p in self.params], None)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averaged weights inside the block, its own weights again after it
        (bitwise)."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange the model's weights and the averages (a second swap undoes it, bitwise)."""
        from torch.distributed.fsdp import FSDPModule

        for module in (
            self.module.modules()
        ):  # FSDP2 keeps the root's gathered weights after a forward: drop them
            if isinstance(module, FSDPModule):
                module.reshard()
        for p, average in zip(self.params, self.averages()):
            weights = (
                p.detach().clone()
            )  # in place, one tensor at a time: FSDP keeps views of its parameters
            p.detach().copy_(average)
            average.copy_(weights)

    def step(self, closure: None = None) -> None:
        raise RuntimeError("EMA is updated with ema.update(step), after the optimizer's step")


def averaged_weights(checkpoint: dict) -> dict[str, torch.Tensor]:
    """{parameter name: averaged weights} from the "ema" entry of a loaded checkpoint (a file's,
    where the state is keyed by position and the names are in param_groups, or a sharded one's,
    keyed by name)."""
    saved = checkpoint["ema"]
    names = [
        name
        for group in saved["param_groups"]
        for name in group.get("param_names", group["params"])
    ]
    positions = [position for group in saved["param_groups"] for position in group["params"]]
    return {name: saved["state"][position]["average"] for name, position in zip(names, positions)}
