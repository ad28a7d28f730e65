"""Top-k activation sparsifier (Li et al., "The Lazy Neuron Phenomenon", ICLR 2023, Sec. 5.1 "Top-k
Transformer"): keep the k largest entries of each token's activation vector (last dim), zero the rest.

Gradients pass straight through the kept entries (derivative 1) and are zero for the dropped ones. ``k`` is a
count (int >= 1) or a fraction of the last dim (float in (0, 1], rounded up). An optional ``activation`` (registry
name) is applied first, as the paper applies top-k after the MLP's non-linearity.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lit_act.activations.fused import check_floating
from lit_act.activations.registry import build, register


class TopK(nn.Module):
    def __init__(self, k: int | float = 0.1, activation: str | None = None) -> None:
        super().__init__()
        if isinstance(k, bool) or not isinstance(k, int | float):
            raise TypeError(f"k must be an int count or a float fraction, got {k!r}")
        if (isinstance(k, int) and k < 1) or (isinstance(k, float) and not 0.0 < k <= 1.0):
            raise ValueError(f"k must be an int >= 1 or a float in (0, 1], got {k!r}")
        self.k = k
        self.activation = build(activation) if activation is not None else nn.Identity()

    def kept(self, width: int) -> int:
        """Number of entries kept per token for a last dim of ``width``."""
        return min(width, self.k) if isinstance(self.k, int) else max(1, math.ceil(self.k * width))

    def forward(self, x: Tensor) -> Tensor:
        check_floating(x, "TopK")
        x = self.activation(x)
        values, index = x.topk(self.kept(x.shape[-1]), dim=-1)
        return torch.zeros_like(x).scatter(-1, index, values)

    def extra_repr(self) -> str:
        return f"k={self.k}"


register("topk", TopK)
