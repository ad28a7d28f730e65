"""GR-KAN layer of the Kolmogorov-Arnold Transformer (Yang & Wang, "Kolmogorov-Arnold Transformer", ICLR 2025).

KAT, Sec. 4: ``GR-KAN(x) = W F(x) + b`` where ``F`` is a group-rational function (numerator shared, one denominator
per group of ``in / num_groups`` contiguous channels; :class:`~lit_act.activations.rational.GroupRational`).
In KAT's MLP replacement (Adamdad/kat ``katransformer.KAN``) the first layer's rational is initialised to the
identity and the second to GELU: ``fc2(F_gelu(fc1(F_id(x))))``.

Variance-preserving init (KAT Sec. 4.3): ``W ~ N(0, gain^2 / in)`` with ``gain = sqrt(1 / E_{x~N(0,1)}[F(x)^2])``,
so ``Var(y) = Var(x)`` for unit-variance inputs. KAT uses the closed-form gain of the function the rational was
fitted to (gelu ``sqrt(2.3568)``, identity 1); we use the gain of the initialised rational itself
(:meth:`GroupRational.gain`), which equals it up to the fit error. Note that Adamdad/kat's ``init_weights_vit_kan_*``
overwrite that kaiming init with ``trunc_normal_(std=.02)`` right after it (the ``else`` branch of the ``qkv``
test); we apply the variance-preserving init as the paper describes. Biases start at zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from lit_act.activations.rational import GroupRational
from lit_act.kan.kan_linear import check_in_features
from lit_act.utils import validate as v

__all__ = ["GRKANLinear"]


class GRKANLinear(nn.Module):
    """``Linear(GroupRational(x))``: ``in_features -> out_features``.

    Args:
        num_groups: rational groups (must divide ``in_features``; KAT uses 8).
        degrees: numerator/denominator degrees ``(m, n)``.
        act_init: function the rational starts as (``"identity"``, ``"gelu"``, ...; see ``GroupRational``).
        version: rational form passed to ``GroupRational`` (default ``"B"``, the form KAT's inits are fitted for).
        bias: learn the linear bias.
        backend: evaluation backend of ``GroupRational`` (``"auto"`` compiles the fused kernel on first use).
    """

    def __init__(self, in_features: int, out_features: int, num_groups: int = 8, degrees: tuple[int, int] = (5, 4),
                 act_init: str = "gelu", version: str = "B", bias: bool = True,
                 backend: str = "auto") -> None:
        super().__init__()
        in_features, out_features = v.positive_int("in_features", in_features), v.positive_int("out_features",
                                                                                                out_features)
        bias = v.boolean("bias", bias)
        self.in_features, self.out_features = in_features, out_features
        self.rational = GroupRational(in_features, num_groups=num_groups, degrees=degrees, init=act_init,
                                      version=version, backend=backend)
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Variance-preserving init: ``W ~ N(0, gain^2 / in)``, ``b = 0``."""
        std = self.rational.gain() / math.sqrt(self.in_features)
        nn.init.normal_(self.linear.weight, std=std)
        if self.linear.bias is not None:
            nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        check_in_features(x, self.in_features, type(self).__name__)
        return self.linear(self.rational(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"
