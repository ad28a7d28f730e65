"""Activation sparsity (Lazy Neuron Phenomenon, Li et al., ICLR 2023, "The Lazy Neuron Phenomenon: On Emergence of
Activation Sparsity in Transformers").

For activations ``a`` viewed as ``(samples, neurons)`` (tokens x neurons for a Transformer MLP, positions x channels
for a conv map; see :func:`lit_act.stats.tap.neuron_view`), a threshold ``tau`` and a ``mode`` that defines "active":

* ``mode="abs"``: active iff ``|a| > tau`` (``tau >= 0``). With ``tau = 0`` this is the paper's statistic, the
  fraction of nonzero entries after ReLU (Sec. 2, "% nonzero entries", 3.0% for T5-Base, 6.3% for ViT-B16);
* ``mode="signed"``: active iff ``a > tau`` (any ``tau``). With ``tau = 0``, "the neuron fires", Voita et al.'s
  definition (2023, Sec. 3: "activation > 0"), the same one :class:`lit_act.stats.dead.DeadNeuronMetric` uses.

Statistics: sparsity = #{inactive (s, i)} / #{(s, i)}; per-token activation ratio r_s = #{i active} / N, the fraction of
neurons token ``s`` uses, reported as its mean (equal to 1 - sparsity when every entry is finite), minimum and maximum.

Which mode per activation family (the defaults the callbacks should use):

* ReLU / ReLU^2 / hard thresholds: outputs are exact zeros or positive, so both modes agree at ``tau = 0``; ``"abs"``
  with ``tau = 0`` is the Lazy-Neuron statistic.
* GELU / SiLU / smooth activations: exact zeros almost never occur, so ``"abs"`` at ``tau = 0`` gives sparsity ~ 0
  (honest but uninformative); ``"signed"`` at ``tau = 0`` counts the negative lobe as not firing (75-85% of GELU
  outputs in our models), matching "activation > 0". Use ``"signed"``, ``tau = 0`` to ask "how many neurons do not
  fire", or ``"abs"`` with ``tau > 0`` for magnitude sparsity; the Sparsing-Law CETT
  (:mod:`lit_act.stats.sparsing_law`) is the paper-backed magnitude criterion for such activations.
* Gated MLPs (SwiGLU, GeGLU): the product ``act(gate) * up`` is signed; ``"abs"`` is the meaningful mode there.

NaN/Inf entries are excluded from both numerator and denominator and counted as ``nonfinite``. A layer with no finite
entry logs NaN for every statistic.

Example:
    >>> a = torch.tensor([[0.0, 1.0, -2.0, 0.5]])
    >>> activation_sparsity(a)["sparsity"].item(), activation_sparsity(a, mode="signed")["sparsity"].item()
    (0.25, 0.5)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

from lit_act.stats.tap import count_above, nan_marked

ACTIVITY_MODES = ("abs", "signed")


def _activity_arg_validation(threshold: float, mode: str) -> None:
    """``mode`` is one of :data:`ACTIVITY_MODES`; in ``"abs"`` mode ``threshold >= 0``."""
    if mode not in ACTIVITY_MODES:
        raise ValueError(f"mode must be one of {list(ACTIVITY_MODES)} ('abs': active iff |a| > threshold; "
                         f"'signed': active iff a > threshold), got {mode!r}")
    if mode == "abs" and not threshold >= 0:
        raise ValueError(f"threshold must be >= 0 in mode='abs' (|a| <= threshold counts as inactive), got {threshold}")
    if not threshold == threshold:
        raise ValueError("threshold must be a number, got NaN")


def active_counts(a: Tensor, threshold: float, mode: str, dim: int) -> tuple[Tensor, Tensor]:
    """``(#active entries, #NaN/Inf entries)`` along ``dim`` (fp32 counts, exact below 2**24 per slice), with "active"
    as defined by ``mode`` and ``threshold``; no host sync."""
    marked = nan_marked(a)
    return count_above(marked.abs_() if mode == "abs" else marked, threshold, dim=dim)


def _activation_sparsity_update(a: Tensor, threshold: float, mode: str) -> dict[str, Tensor]:
    """Per-batch sums: ``finite``, ``small`` (inactive), ``nonfinite``, ``tokens`` (with a finite entry),
    ``ratio_sum``, ``ratio_min``, ``ratio_max`` of the per-token activation ratio."""
    active_per_token, nonfinite_per_token = active_counts(a, threshold, mode, dim=1)
    finite_per_token = a.shape[1] - nonfinite_per_token
    counted = finite_per_token > 0
    ratio = active_per_token / finite_per_token.clamp(min=1)
    n_finite = finite_per_token.sum(dtype=torch.float64)
    return {"finite": n_finite.long(), "small": (n_finite - active_per_token.sum(dtype=torch.float64)).long(),
            "nonfinite": (a.numel() - n_finite).long(), "tokens": counted.sum(),
            "ratio_sum": torch.where(counted, ratio, 0.0).sum(dtype=torch.float64),
            "ratio_min": torch.where(counted, ratio, float("inf")).min(),
            "ratio_max": torch.where(counted, ratio, float("-inf")).max()}


def _activation_sparsity_compute(small: Tensor, finite: Tensor, nonfinite: Tensor, tokens: Tensor, ratio_sum: Tensor,
                                 ratio_min: Tensor, ratio_max: Tensor) -> dict[str, Tensor]:
    nan = torch.tensor(float("nan"), device=finite.device)
    seen = tokens > 0
    return {
        "sparsity": torch.where(finite > 0, small / finite.clamp(min=1), nan).float(),
        "token_activation_ratio": torch.where(seen, ratio_sum / tokens.clamp(min=1), nan).float(),
        "token_activation_ratio_min": torch.where(seen, ratio_min, nan),
        "token_activation_ratio_max": torch.where(seen, ratio_max, nan),
        "nonfinite": nonfinite.float(),
    }


def activation_sparsity(a: Tensor, threshold: float = 0.0, mode: str = "abs") -> dict[str, Tensor]:
    """The statistics of :class:`ActivationSparsityMetric` on one ``(samples, neurons)`` tensor."""
    _activity_arg_validation(threshold, mode)
    s = _activation_sparsity_update(a, threshold, mode)
    return _activation_sparsity_compute(s["small"], s["finite"], s["nonfinite"], s["tokens"], s["ratio_sum"],
                                        s["ratio_min"], s["ratio_max"])


class ActivationSparsityMetric(Metric):
    """Fixed-shape accumulator of the sparsity statistics above over every ``update`` since the last ``reset``.

    States (fp32/int64 scalars, DDP reduce): ``small`` and ``finite`` counts (sum), ``nonfinite`` (sum),
    ``ratio_sum`` and ``tokens`` (sum) for the mean per-token ratio, ``ratio_min`` (min), ``ratio_max`` (max).

    Args:
        threshold: tau; an entry is inactive when ``|a| <= tau`` (``mode="abs"``, tau >= 0) or ``a <= tau``
            (``mode="signed"``).
        mode: ``"abs"`` (default, the Lazy-Neuron exact-zero statistic at tau = 0) or ``"signed"``.

    Example:
        >>> metric = ActivationSparsityMetric(mode="signed")
        >>> metric.update(torch.tensor([[-0.1, 0.0, 0.3, 2.0]]))
        >>> metric.compute()["sparsity"].item()
        0.5
    """

    full_state_update = False

    def __init__(self, threshold: float = 0.0, mode: str = "abs", **kwargs) -> None:
        super().__init__(**kwargs)
        _activity_arg_validation(threshold, mode)
        self.threshold, self.mode = float(threshold), mode
        for name in ("small", "finite", "nonfinite", "tokens"):
            self.add_state(name, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("ratio_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("ratio_min", torch.full((), float("inf")), dist_reduce_fx="min")
        self.add_state("ratio_max", torch.full((), float("-inf")), dist_reduce_fx="max")

    def update(self, a: Tensor) -> None:
        """``a``: ``(samples, neurons)`` activations (any float dtype); in-place float arithmetic, no host sync."""
        s = _activation_sparsity_update(a, self.threshold, self.mode)
        for name in ("small", "finite", "nonfinite", "tokens", "ratio_sum"):
            setattr(self, name, getattr(self, name) + s[name])
        self.ratio_min.copy_(torch.minimum(self.ratio_min, s["ratio_min"]))
        self.ratio_max.copy_(torch.maximum(self.ratio_max, s["ratio_max"]))

    def compute(self) -> dict[str, Tensor]:
        """``sparsity``, ``token_activation_ratio`` (mean), ``token_activation_ratio_min``/``_max`` and ``nonfinite``
        (NaN when nothing finite was seen)."""
        return _activation_sparsity_compute(self.small, self.finite, self.nonfinite, self.tokens, self.ratio_sum,
                                            self.ratio_min, self.ratio_max)


__all__ = ["ACTIVITY_MODES", "ActivationSparsityMetric", "active_counts", "activation_sparsity"]
