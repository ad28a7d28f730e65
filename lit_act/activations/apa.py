"""Adaptive Parametric Activation (Alexandridis et al., "Adaptive Parametric Activation", ECCV 2024;
kostas1515/AGLU).

``APA(x; lambda, kappa) = (lambda exp(-kappa x) + 1)^(-1/lambda)`` (paper eq. 6) and its gated form for
intermediate layers ``AGLU(x) = x APA(x)`` (paper eq. 8). As in the reference, ``lambda`` and ``kappa`` are scalar
parameters drawn from ``U(0, 1)``, ``lambda`` is clamped to ``>= 1e-4`` and the power is evaluated stably as
``exp(-softplus(log(lambda) - kappa x) / lambda)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_act.activations.fused import check_floating
from lit_act.activations.registry import register
from lit_act.utils.validate import boolean

LAMBDA_MIN = 1e-4


class APA(nn.Module):
    """APA (``gated=False``) or AGLU (``gated=True``, ``x * APA(x)``)."""

    def __init__(self, gated: bool = False) -> None:
        super().__init__()
        self.gated = boolean("gated", gated)
        self.lambd = nn.Parameter(torch.rand(1))
        self.kappa = nn.Parameter(torch.rand(1))

    def forward(self, x: Tensor) -> Tensor:
        check_floating(x, type(self).__name__)
        lam = self.lambd.clamp(min=LAMBDA_MIN)
        apa = torch.exp(-F.softplus(torch.log(lam) - self.kappa * x) / lam)
        return x * apa if self.gated else apa

    def extra_repr(self) -> str:
        return f"gated={self.gated}"


def aglu() -> APA:
    """AGLU: ``x * APA(x)``, the intermediate-layer form of APA."""
    return APA(gated=True)


register("apa", APA)
register("aglu", aglu)
