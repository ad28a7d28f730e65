"""PolyCom activations (Zhuo et al., "Polynomial Composition Activations", ICLR 2025; BryceZhuo/PolyCom).

* PolyReLU (paper eq. 5): ``sum_{i=0..r} a_i ReLU(x)^i``
* PolyNorm (paper eq. 6): ``sum_{i=1..r} a_i N(x^i) + a_0`` with ``N(z) = z / sqrt(mean_lastdim(z^2) + eps)``

Order ``r = 3``, weights ``1/3``, bias 0 and eps ``1e-6`` as in the reference. Parameters keep the reference's
names and layout so its checkpoints load: ``weight`` is in *descending* power order (``weight[0]`` multiplies the
power ``r`` term) and ``bias`` (shape ``(1,)``) is ``a_0``. Evaluation is the fused kernel of
:mod:`lit_act.activations.fused` (the reference wraps the plain formula in activation checkpointing instead).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lit_act.activations.fused import check_backend, polynorm, polyrelu
from lit_act.activations.registry import register
from lit_act.utils.validate import positive_float, positive_int

MAX_ORDER = 16  # x^16 already overflows float16 for |x| > 2; higher orders are a config mistake


class _PolyCom(nn.Module):
    def __init__(self, order: int = 3, backend: str = "auto") -> None:
        super().__init__()
        order = positive_int("order", order, high=MAX_ORDER)
        self.order, self.backend = order, check_backend(backend)
        self.weight = nn.Parameter(torch.full((order,), 1.0 / order))
        self.bias = nn.Parameter(torch.zeros(1))

    def extra_repr(self) -> str:
        return f"order={self.order}"


class PolyReLU(_PolyCom):
    """``sum_{i=1..r} weight[r - i] ReLU(x)^i + bias`` (PolyCom's PolyReLU)."""

    def forward(self, x: Tensor) -> Tensor:
        return polyrelu(x, self.weight, self.bias, self.backend)


class PolyNorm(_PolyCom):
    """``sum_{i=1..r} weight[r - i] N(x^i) + bias``, N the RMS normalisation over the last dim (PolyCom's
    PolyNorm)."""

    def __init__(self, order: int = 3, eps: float = 1e-6, backend: str = "auto") -> None:
        super().__init__(order, backend)
        self.eps = positive_float("eps", eps)

    def forward(self, x: Tensor) -> Tensor:
        return polynorm(x, self.weight, self.bias, self.eps, self.backend)


register("poly_relu", PolyReLU)
register("poly_norm", PolyNorm)
