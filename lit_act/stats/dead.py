"""Dead neurons (Voita et al. 2023, "Neurons in Large Language Models: Dead, N-gram, Positional", Sec. 3): a neuron is
dead when it never activates over a large window of data, i.e. ``a_si <= threshold`` (default 0, "never fires") for
every sample ``s`` seen; the paper reports the dead fraction per layer. Alongside, the activation frequency of the
living neurons, ``freq_i = #{s : a_si > threshold} / #{s}`` averaged over living neurons.

Counts are per neuron (fixed shape ``(N,)``) and summed across DDP ranks *before* the decision, so a neuron that fires
on any rank is alive. NaN/Inf entries are excluded from the counts and tallied as ``nonfinite``. Per-batch counts are
formed in fp32 (exact below 2**24 samples per batch) and accumulated in int64.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lit_act.stats.tap import count_above, nan_marked


class DeadNeuronMetric(Metric):
    """Per-neuron firing counts over a window.

    States: ``fired (N,)`` and ``seen (N,)`` (int64 counts, sum), ``nonfinite`` (sum). ``N`` is fixed at construction.

    Args:
        num_neurons: N (>= 1).
        threshold: a neuron fires on a sample when its activation exceeds this value.
    """

    full_state_update = False

    def __init__(self, num_neurons: int, threshold: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not isinstance(num_neurons, int) or num_neurons < 1:
            raise ValueError(f"num_neurons must be a positive integer, got {num_neurons!r}")
        self.num_neurons, self.threshold = num_neurons, float(threshold)
        self.add_state("fired", torch.zeros(num_neurons, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("seen", torch.zeros(num_neurons, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("nonfinite", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, a: Tensor) -> None:
        """``a``: ``(samples, N)`` activations."""
        if a.dim() != 2 or a.shape[1] != self.num_neurons:
            raise ValueError(f"expected activations of shape (samples, {self.num_neurons}), got {tuple(a.shape)}")
        fired, nonfinite = count_above(nan_marked(a), self.threshold, dim=0)  # fp32 counts, exact below 2**24 rows
        self.fired += fired.long()
        self.seen += (a.shape[0] - nonfinite).long()
        self.nonfinite += nonfinite.sum().long()

    def dead_mask(self) -> Tensor:
        """``(N,)`` bool: seen at least once and never fired (call after a sync for the DDP-wide decision)."""
        return (self.fired == 0) & (self.seen > 0)

    def compute(self) -> dict[str, Tensor]:
        """``dead_fraction`` (over neurons seen), ``living_activation_frequency`` (mean over living neurons; NaN when
        none) and ``nonfinite``."""
        observed = self.seen > 0
        living = (self.fired > 0) & observed
        freq = self.fired[living].double() / self.seen[living]
        nan = torch.tensor(float("nan"), device=self.fired.device)
        dead = self.dead_mask().sum() / observed.sum().clamp(min=1)
        return {"dead_fraction": torch.where(observed.any(), dead.float(), nan),
                "living_activation_frequency": torch.where(living.any(), freq.mean().float(), nan),
                "nonfinite": self.nonfinite.float()}
