"""Activation sparsity (Lazy Neuron Phenomenon, Li et al., ICLR 2023, "The Lazy Neuron Phenomenon: On Emergence of
Activation Sparsity in Transformers").

For activations ``a`` viewed as ``(samples, neurons)`` (tokens x neurons for a Transformer MLP, positions x channels
for a conv map; see :func:`lit_act.stats.tap.neuron_view`) and a threshold ``tau >= 0``:

* sparsity = #{(s, i) : |a_si| <= tau} / #{(s, i)}  (tau = 0: the fraction of exact zeros; the paper reports the
  complementary "% nonzero entries after ReLU", 3.0% for T5-Base, Sec. 2);
* per-token activation ratio r_s = #{i : |a_si| > tau} / N, the fraction of neurons token ``s`` uses; reported as its
  mean (equal to 1 - sparsity when every entry is finite), minimum and maximum over tokens.

NaN/Inf entries are excluded from both numerator and denominator and counted as ``nonfinite``.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lit_act.stats.tap import count_above, nan_marked


class ActivationSparsityMetric(Metric):
    """Fixed-shape accumulator of the sparsity statistics above over every ``update`` since the last ``reset``.

    States (fp32/int64 scalars, DDP reduce): ``small`` and ``finite`` counts (sum), ``nonfinite`` (sum),
    ``ratio_sum`` and ``tokens`` (sum) for the mean per-token ratio, ``ratio_min`` (min), ``ratio_max`` (max).

    Args:
        threshold: tau >= 0; an entry is inactive when ``|a| <= tau``.
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0 (|a| <= threshold counts as inactive), got {threshold}")
        self.threshold = float(threshold)
        for name in ("small", "finite", "nonfinite", "tokens"):
            self.add_state(name, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("ratio_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ratio_min", torch.full((), float("inf")), dist_reduce_fx="min")
        self.add_state("ratio_max", torch.full((), float("-inf")), dist_reduce_fx="max")

    def update(self, a: Tensor) -> None:
        """``a``: ``(samples, neurons)`` activations (any float dtype); in-place float arithmetic, no host sync."""
        active_per_token, nonfinite_per_token = count_above(nan_marked(a).abs_(), self.threshold, dim=1)
        finite_per_token = a.shape[1] - nonfinite_per_token
        counted = finite_per_token > 0
        ratio = active_per_token / finite_per_token.clamp(min=1)
        n_finite = finite_per_token.sum(dtype=torch.float64)
        self.finite += n_finite.long()
        self.small += (n_finite - active_per_token.sum(dtype=torch.float64)).long()
        self.nonfinite += (a.numel() - n_finite).long()
        self.tokens += counted.sum()
        self.ratio_sum += torch.where(counted, ratio, 0.0).sum(dtype=torch.float64)
        self.ratio_min.copy_(torch.minimum(self.ratio_min, torch.where(counted, ratio, float("inf")).min()))
        self.ratio_max.copy_(torch.maximum(self.ratio_max, torch.where(counted, ratio, float("-inf")).max()))

    def compute(self) -> dict[str, Tensor]:
        """``sparsity``, ``token_activation_ratio`` (mean), ``token_activation_ratio_min``/``_max`` and ``nonfinite``
        (NaN when nothing finite was seen)."""
        finite = self.finite.clamp(min=1)
        nan = torch.tensor(float("nan"), device=self.finite.device)
        seen = self.tokens > 0
        return {
            "sparsity": torch.where(self.finite > 0, self.small / finite, nan),
            "token_activation_ratio": torch.where(seen, self.ratio_sum / self.tokens.clamp(min=1), nan).float(),
            "token_activation_ratio_min": torch.where(seen, self.ratio_min, nan),
            "token_activation_ratio_max": torch.where(seen, self.ratio_max, nan),
            "nonfinite": self.nonfinite.float(),
        }
