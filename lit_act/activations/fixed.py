"""Fixed (parameter-free) activations under the registry: relu, leaky_relu, gelu, silu/swish, tanh, sigmoid,
identity, erf."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_act.activations.registry import register
from lit_act.utils.validate import finite_float


class Erf(nn.Module):
    """Gauss error function erf(x) = 2/sqrt(pi) * int_0^x exp(-t^2) dt, the teacher non-linearity of the
    soft-committee-machine literature (e.g. Saad & Solla 1995)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.erf(x)


def leaky_relu(negative_slope: float = 0.01) -> nn.Module:
    """LeakyReLU with PAU's reference slope 0.01 (a finite number; Hydra's string ``'0.2'`` is converted)."""
    return nn.LeakyReLU(finite_float("negative_slope", negative_slope))


register("relu", nn.ReLU)
register("leaky_relu", leaky_relu)
register("gelu", nn.GELU)
register("silu", nn.SiLU)
register("swish", nn.SiLU)
register("tanh", nn.Tanh)
register("sigmoid", nn.Sigmoid)
register("identity", nn.Identity)
register("erf", Erf)
