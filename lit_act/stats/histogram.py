"""Fixed-bin activation histograms: constant memory whatever the number of steps or samples.

``bins`` equal-width bins on ``[low, high)`` plus the counts below ``low`` and at or above ``high``; NaN/Inf entries are
counted apart (``nonfinite``) and never binned. A layer with no finite entry logs ``hist_outside = NaN`` (its counts
stay zero), so it drops out of module means taken with ``nanmean``.

Not a paper statistic: the exact count of values per fixed bin (no sampling, no per-call adaptive edges), so histograms
of different steps and ranks share their edges and add up.

Example:
    >>> metric = ActivationHistogramMetric(bins=4, low=-2.0, high=2.0)
    >>> metric.update(torch.tensor([-3.0, -1.5, 0.2, 0.7, 2.0, float("nan")]))
    >>> metric.counts.tolist(), metric.compute()["hist_outside"].item(), metric.compute()["nonfinite"].item()
    ([1, 0, 2, 0], 0.4000000059604645, 1.0)
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from lit_act.stats.tap import nan_marked


def _histogram_arg_validation(bins: int, low: float, high: float) -> None:
    if not (isinstance(bins, int) and bins >= 1):
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    if not low < high:
        raise ValueError(f"need low < high for the histogram range, got [{low}, {high})")


class ActivationHistogramMetric(Metric):
    """Counts of activation values in fixed bins (states summed over DDP ranks).

    Args:
        bins: number of equal-width bins on ``[low, high)``.
        low, high: the binned range (``low < high``).
    """

    full_state_update = False

    def __init__(self, bins: int = 64, low: float = -5.0, high: float = 5.0, **kwargs) -> None:
        super().__init__(**kwargs)
        _histogram_arg_validation(bins, low, high)
        self.bins, self.low, self.high = bins, float(low), float(high)
        self.add_state("counts", torch.zeros(bins, dtype=torch.int64), dist_reduce_fx="sum")
        for name in ("below", "above", "nonfinite"):
            self.add_state(name, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, x: Tensor) -> None:
        """Bin every finite entry of ``x`` (any shape, any float dtype) with one ``bincount``: no host sync.

        One fp32 buffer, worked on in place (:func:`~lit_act.stats.tap.nan_marked`: NaN at NaN/Inf entries), then one
        int32 copy for ``bincount``: on CPU, fresh activation-sized buffers cost more than the arithmetic."""
        position = nan_marked(x).reshape(-1)
        position.sub_(self.low).mul_(self.bins / (self.high - self.low)).floor_().clamp_(-1, self.bins)
        # slots: 0 below, 1..bins the bins, bins + 1 at or above high, bins + 2 NaN/Inf (NaN survives clamp_)
        slot = position.add_(1).nan_to_num_(nan=self.bins + 2).to(torch.int32)
        counts = torch.bincount(slot, minlength=self.bins + 3)
        self.below += counts[0]
        self.counts += counts[1:self.bins + 1]
        self.above += counts[self.bins + 1]
        self.nonfinite += counts[self.bins + 2]

    def compute(self) -> dict[str, Tensor]:
        """``hist_outside``: fraction of finite entries outside ``[low, high)`` (NaN when none seen); ``nonfinite``."""
        total = self.counts.sum() + self.below + self.above
        outside = (self.below + self.above).double() / total.clamp(min=1)
        return {"hist_outside": torch.where(total > 0, outside, torch.nan).float(), "nonfinite": self.nonfinite.float()}

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` bin edges."""
        return np.linspace(self.low, self.high, self.bins + 1)
