"""Dead neurons (Voita et al. 2023, "Neurons in Large Language Models: Dead, N-gram, Positional", Sec. 3): a neuron is
dead when it never activates over a large, diverse dataset for a *fixed* model, i.e. ``a_si <= threshold`` (default 0,
"activation > 0" never happens) for every sample ``s`` seen; the paper reports the dead fraction per layer. Alongside,
the activation frequency of the living neurons, ``freq_i = #{s : a_si active} / #{s}`` averaged over living neurons.

"Active" follows :mod:`lit_act.stats.sparsity` (one definition for both statistics): ``mode="signed"`` (default,
Voita's "activation > 0": active iff ``a > threshold``) or ``mode="abs"`` (active iff ``|a| > threshold``, e.g. a gated
MLP's signed product, where a neuron that is always exactly 0 is dead). For ReLU both modes agree at threshold 0; for
GELU/SiLU ``"signed"`` treats the negative lobe as not firing (as the paper, whose OPT models use ReLU).

Counts are per neuron (fixed shape ``(N,)``) and summed across DDP ranks *before* the decision, so a neuron that fires
on any rank is alive. NaN/Inf entries are excluded from the counts and tallied as ``nonfinite``; a layer with no finite
entry logs NaN for every statistic. Per-batch counts are formed in fp32 (exact below 2**24 samples per batch) and
accumulated in int64.

Deviation from the paper: which model the counts describe is the caller's choice. Voita et al. count on one fixed
checkpoint; counts accumulated over training steps (a running window) describe moving weights. Feed this metric from
a probe pass over a fixed set on a fixed model to match the paper.

Example:
    >>> out = dead_neurons(torch.tensor([[0.0, 1.0, -1.0], [0.0, 2.0, 0.5]]))
    >>> out["dead_fraction"].item()  # neuron 0 never fires
    0.3333333432674408
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lit_act.stats.sparsity import _activity_arg_validation, active_counts


def _dead_neuron_arg_validation(num_neurons: int, threshold: float, mode: str) -> None:
    if not isinstance(num_neurons, int) or num_neurons < 1:
        raise ValueError(f"num_neurons must be a positive integer, got {num_neurons!r}")
    _activity_arg_validation(threshold, mode)


def _dead_neuron_update(a: Tensor, num_neurons: int, threshold: float, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(fired (N,), seen (N,), nonfinite)`` int64 counts of one ``(samples, N)`` batch."""
    if a.dim() != 2 or a.shape[1] != num_neurons:
        raise ValueError(f"expected activations of shape (samples, {num_neurons}), got {tuple(a.shape)}")
    fired, nonfinite = active_counts(a, threshold, mode, dim=0)
    return fired.long(), (a.shape[0] - nonfinite).long(), nonfinite.sum().long()


def _dead_neuron_compute(fired: Tensor, seen: Tensor, nonfinite: Tensor) -> dict[str, Tensor]:
    observed = seen > 0
    living = (fired > 0) & observed
    freq = fired[living].double() / seen[living]
    nan = torch.tensor(float("nan"), device=fired.device)
    dead = ((fired == 0) & observed).sum() / observed.sum().clamp(min=1)
    return {"dead_fraction": torch.where(observed.any(), dead.float(), nan),
            "living_activation_frequency": torch.where(living.any(), freq.mean().float(), nan),
            "nonfinite": nonfinite.float()}


def dead_neurons(a: Tensor, threshold: float = 0.0, mode: str = "signed") -> dict[str, Tensor]:
    """The statistics of :class:`DeadNeuronMetric` on one ``(samples, N)`` tensor."""
    _dead_neuron_arg_validation(a.shape[-1], threshold, mode)
    return _dead_neuron_compute(*_dead_neuron_update(a, a.shape[-1], threshold, mode))


class DeadNeuronMetric(Metric):
    """Per-neuron firing counts over a window.

    States: ``fired (N,)`` and ``seen (N,)`` (int64 counts, sum), ``nonfinite`` (sum). ``N`` is fixed at construction.

    Args:
        num_neurons: N (>= 1).
        threshold: a neuron fires on a sample when its activation (``mode="signed"``) or its magnitude
            (``mode="abs"``, threshold >= 0) exceeds this value.
        mode: ``"signed"`` (default, Voita et al.'s "activation > 0") or ``"abs"``.

    Example:
        >>> metric = DeadNeuronMetric(2, mode="abs")
        >>> metric.update(torch.tensor([[-1.0, 0.0], [0.5, 0.0]]))
        >>> metric.compute()["dead_fraction"].item()
        0.5
    """

    full_state_update = False

    def __init__(self, num_neurons: int, threshold: float = 0.0, mode: str = "signed", **kwargs) -> None:
        super().__init__(**kwargs)
        _dead_neuron_arg_validation(num_neurons, threshold, mode)
        self.num_neurons, self.threshold, self.mode = num_neurons, float(threshold), mode
        self.add_state("fired", torch.zeros(num_neurons, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("seen", torch.zeros(num_neurons, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("nonfinite", torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, a: Tensor) -> None:
        """``a``: ``(samples, N)`` activations."""
        fired, seen, nonfinite = _dead_neuron_update(a, self.num_neurons, self.threshold, self.mode)
        self.fired += fired
        self.seen += seen
        self.nonfinite += nonfinite

    def dead_mask(self) -> Tensor:
        """``(N,)`` bool: seen at least once and never fired (call after a sync for the DDP-wide decision)."""
        return (self.fired == 0) & (self.seen > 0)

    def compute(self) -> dict[str, Tensor]:
        """``dead_fraction`` (over neurons seen), ``living_activation_frequency`` (mean over living neurons; NaN when
        none) and ``nonfinite``."""
        return _dead_neuron_compute(self.fired, self.seen, self.nonfinite)


__all__ = ["DeadNeuronMetric", "dead_neurons"]
