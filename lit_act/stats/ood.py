"""Out-of-distribution detection scores and their AUROC.

Convention: every score is *higher for in-distribution* inputs; AUROC treats in-distribution as the positive class
(0.5 = chance, 1 = perfect separation, < 0.5 = the score ranks OOD inputs as more in-distribution).

Baselines computed on the same logits:

* **MSP** (Hendrycks & Gimpel, ICLR 2017): ``max_c softmax(f(x))_c``;
* **energy** (Liu et al., NeurIPS 2020, Eq. 4 negated): ``T * logsumexp(f(x) / T)`` with ``T = 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_auroc

from lit_act.utils.modes import evaluating

ScoreFn = Callable[[Any], Tensor]


def msp_scores(logits: Tensor) -> Tensor:
    """Maximum softmax probability per sample."""
    return torch.softmax(logits.float(), dim=-1).amax(-1)


def energy_scores(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` per sample."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return temperature * torch.logsumexp(logits.float() / temperature, dim=-1)


BASELINES: dict[str, Callable[[Tensor], Tensor]] = {"msp": msp_scores, "energy": energy_scores}


def auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """AUROC of separating ``in_scores`` (positives) from ``out_scores`` with torchmetrics' exact binary AUROC."""
    in_scores, out_scores = in_scores.detach().float().flatten(), out_scores.detach().float().flatten()
    if in_scores.numel() == 0 or out_scores.numel() == 0:
        raise ValueError("AUROC needs at least one in-distribution and one OOD score")
    scores = torch.cat([in_scores, out_scores.to(in_scores.device)])
    if not torch.isfinite(scores).all():
        raise ValueError("OOD scores contain NaN/Inf")
    labels = torch.cat([torch.ones_like(in_scores), torch.zeros_like(out_scores)]).long()
    return float(binary_auroc(scores, labels, thresholds=None))


def inputs_of(batch: Any) -> Any:
    """The inputs of an ``(inputs, targets)`` batch, or the batch itself."""
    return batch[0] if isinstance(batch, list | tuple) else batch


def score_batches(score_fn: ScoreFn, batches: Iterable[Any]) -> Tensor:
    """``score_fn(inputs)`` over every batch, concatenated on the CPU."""
    return torch.cat([score_fn(inputs_of(batch)).detach().float().cpu() for batch in batches])


def ood_auroc(score_fn: ScoreFn, in_loader: Iterable[Any], out_loader: Iterable[Any]) -> float:
    """AUROC of ``score_fn`` (inputs -> per-sample scores, higher = in-distribution) on two loaders."""
    return auroc(score_batches(score_fn, in_loader), score_batches(score_fn, out_loader))


def logits_scorer(model: nn.Module, baseline: str, logits_fn: Callable[[Any], Tensor] | None = None) -> ScoreFn:
    """A :data:`ScoreFn` applying the named baseline (``"msp"`` or ``"energy"``) to ``model``'s logits (eval mode,
    no grad, flags restored)."""
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; valid: {', '.join(BASELINES)}")

    def score(inputs: Any) -> Tensor:
        param = next(model.parameters(), None)
        if param is not None:
            inputs = move_data_to_device(inputs, param.device)
        with evaluating(model), torch.no_grad():
            out = model(inputs)
            return BASELINES[baseline](logits_fn(out) if logits_fn is not None else out)

    return score
