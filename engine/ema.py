"""--ema: an exponential moving average of the weights and BatchNorm statistics, the model that is validated and
saved as best.pth (Polyak averaging; the weight EMA of timm and torchvision's classification references)."""
from __future__ import annotations

import copy

import torch
from torch import nn


class WeightAverage:
    """A copy of the model whose floating-point parameters and buffers follow the trained ones:
    average ← average + (1 − d)·(weights − average) after every optimizer step, with d = min(decay,
    (1 + n)/(10 + n)) at the n-th update, so the first updates are not dominated by the initial weights.
    Integer buffers (BatchNorm's batch count) are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.pairs(model)

    def pairs(self, model: nn.Module) -> None:
        """The (average, trained) tensor lists that update() walks, matched by state-dict name."""
        source = model.state_dict()
        floats, integers = [], []
        for name, average in self.model.state_dict().items():
            (floats if average.is_floating_point() else integers).append((average, source[name]))
        self.floats = [list(side) for side in zip(*floats)] or [[], []]
        self.integers = integers

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after an optimizer step (one fused kernel per tensor list)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        averages, trained = self.floats
        torch._foreach_lerp_(averages, trained, 1 - decay)
        for average, value in self.integers:
            average.copy_(value)

    def state_dict(self) -> dict:
        """What last.pth keeps so a resumed run continues the same average."""
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.updates = state["updates"]
