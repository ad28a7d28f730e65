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
from lit_act.utils.validate import ConfigError


def _parse_k(k) -> int | float:
    """``k`` as an int count >= 1 or a float fraction in (0, 1]; Hydra strings ``'8'`` / ``'0.1'`` converted."""
    expected = f"k={k!r}: expected an integer count >= 1 or a fraction in (0, 1]"
    if isinstance(k, str):
        try:
            k = float(k) if any(c in k for c in ".eE") else int(k)
        except ValueError:
            raise ConfigError(expected) from None
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise ConfigError(expected)
    if (isinstance(k, int) and k < 1) or (isinstance(k, float) and not 0.0 < k <= 1.0):
        raise ConfigError(expected)
    return k


class TopK(nn.Module):
    def __init__(self, k: int | float = 0.1, activation: str | None = None) -> None:
        super().__init__()
        k = _parse_k(k)
        if activation is not None and not isinstance(activation, str):
            raise ConfigError(f"activation={activation!r}: expected a registered activation name or None")
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
