"""Massive activations (Sun et al., COLM 2024, "Massive Activations in Large Language Models",
locuslab/massive-activations).

Site: the residual stream, i.e. a decoder block's output ``h`` of shape ``(B, T, D)`` (any ``(B, ..., D)``; the middle
dimensions are flattened into token positions). Per layer, over the batches seen since the last reset:

* top-k ``|h|`` (default k = 3) with the (token position, hidden dimension) where each occurs;
* median ``|h|``: as in the reference code, the median of ``|h|`` over one sequence (sample), averaged over samples;
* ratio = top-1 ``|h|`` / median (the "max/median" ratio of "Hidden Dynamics of Massive Activations", Sec. 3);
* massive count: entries with ``|h| > magnitude`` (100) and ``|h| >= ratio * median_of_their_sequence`` (1000x), the
  paper's criterion (Sec. 2: "larger than 100 and at least or around 1,000 times larger than the median").

NaN/Inf entries are counted (``nonfinite``) and excluded (from the median with ``nanmedian``, from the top-k as 0).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from lit_act.stats.tap import nan_marked


class MassiveActivationMetric(Metric):
    """Fixed-shape accumulator of one layer's massive-activation statistics.

    States: ``top_values (k,)`` and ``top_positions (k, 2)`` (running top-k; DDP: concatenated, then top-k again),
    ``median_sum``, ``samples``, ``massive_count``, ``nonfinite`` (sum).

    Args:
        k: number of largest magnitudes kept (>= 1).
        magnitude: absolute criterion threshold (> 0).
        median_ratio: relative criterion, multiple of the sequence median (> 0).
    """

    full_state_update = False

    def __init__(self, k: int = 3, magnitude: float = 100.0, median_ratio: float = 1000.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if not magnitude > 0 or not median_ratio > 0:
            raise ValueError(f"magnitude and median_ratio must be positive, got {magnitude} and {median_ratio}")
        self.k, self.magnitude, self.median_ratio = k, float(magnitude), float(median_ratio)
        self.add_state("top_values", torch.full((k,), float("-inf")), dist_reduce_fx="cat")
        self.add_state("top_positions", torch.full((k, 2), -1, dtype=torch.int64), dist_reduce_fx="cat")
        self.add_state("median_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("samples", "massive_count", "nonfinite"):
            self.add_state(name, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, h: Tensor) -> None:
        """``h``: ``(B, T, D)`` hidden states (``(B, D)`` is one token per sample)."""
        if h.dim() < 2:
            raise ValueError(f"massive activations need (batch, ..., hidden) states, got shape {tuple(h.shape)}")
        per_sample = nan_marked(h.reshape(h.shape[0], -1)).abs_()  # (B, T*D) |h|, NaN where h is NaN/Inf
        median = per_sample.nanmedian(dim=1).values  # (B,); NaN when a sample has no finite entry
        seen = ~median.isnan()
        # |h| > magnitude and |h| >= ratio * median  <=>  |h| > limit, with limit the stricter of the two per sample
        # (x >= t is x > nextafter(t, -inf) in fp32); a NaN limit (no finite entry) matches nothing
        relative = self.median_ratio * median
        limit = torch.where(relative > self.magnitude, torch.nextafter(relative, relative.new_tensor(-math.inf)),
                            relative.new_tensor(self.magnitude))
        self.median_sum += torch.where(seen, median, 0.0).sum(dtype=torch.float64)
        self.samples += seen.sum()
        self.massive_count += (per_sample > limit[:, None]).sum()
        self.nonfinite += per_sample.isnan().sum()
        per_sample.nan_to_num_(nan=0.0)
        row_values, row_index = per_sample.topk(min(self.k, per_sample.shape[1]), dim=1)
        values, best = row_values.flatten().topk(min(self.k, row_values.numel()))
        within = row_index.flatten()[best]  # index inside the sample's (T*D) entries
        tokens, dims = within // h.shape[-1], within % h.shape[-1]
        self._merge(values, torch.stack([tokens, dims], dim=1))

    def _merge(self, values: Tensor, positions: Tensor) -> None:
        # reshape: a state restored from a DDP checkpoint holds every rank's top-k stacked
        values = torch.cat([self.top_values.reshape(-1), values])
        positions = torch.cat([self.top_positions.reshape(-1, 2), positions])
        best = values.topk(self.k).indices
        self.top_values, self.top_positions = values[best], positions[best]

    def compute(self) -> dict[str, Tensor]:
        """``top{i}``, ``top{i}_token``, ``top{i}_dim`` (i = 1..k), ``median``, ``ratio`` (top1 / median),
        ``count`` and ``nonfinite``."""
        # after a DDP sync the states hold every rank's top-k, stacked: (world, k) and (world, k, 2)
        values, positions = self.top_values.reshape(-1), self.top_positions.reshape(-1, 2)
        best = values.topk(self.k).indices
        values, positions = values[best], positions[best]
        median = (self.median_sum / self.samples.clamp(min=1)).float()
        median = torch.where(self.samples > 0, median, torch.nan)
        out = {}
        for i in range(self.k):
            out[f"top{i + 1}"] = values[i]
            out[f"top{i + 1}_token"] = positions[i, 0].float()
            out[f"top{i + 1}_dim"] = positions[i, 1].float()
        return out | {"median": median, "ratio": values[0] / median, "count": self.massive_count.float(),
                      "nonfinite": self.nonfinite.float()}
