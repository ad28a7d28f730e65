"""Correction Regularized ReLU (Sun et al., "A Method on Searching Better Activation Functions", 2024, eq. 9):
``CRReLU(x) = ReLU(x) + eps * x * exp(-x^2 / 2)`` with a learnable scalar ``eps`` initialised to 0.01."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_act.activations.fused import check_floating
from lit_act.activations.registry import register
from lit_act.utils.validate import finite_float


class CRReLU(nn.Module):
    def __init__(self, eps: float = 0.01) -> None:
        super().__init__()
        self.eps = nn.Parameter(torch.tensor(finite_float("eps", eps)))

    def forward(self, x: Tensor) -> Tensor:
        check_floating(x, "CRReLU")
        return F.relu(x) + self.eps * x * torch.exp(-0.5 * x * x)


register("crrelu", CRReLU)
