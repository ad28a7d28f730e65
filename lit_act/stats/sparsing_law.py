"""Sparsing Law (Luo et al. 2024, "Sparsing Law: Towards Large Language Models with Greater Activation Sparsity",
thunlp/SparsingLaw): CETT-calibrated activation sparsity of feed-forward blocks ``W_out act(W_in x)``.

* Neuron output norm (Sec. 3.1): ``n_i = |a_i| * ||W_out[:, i]||_2``, the size of neuron ``i``'s contribution to the
  block output for one token.
* CETT, the cumulative error of tail truncation, for a threshold ``eps`` (Eq. 2)::

      CETT(eps) = || sum_{i : n_i < eps} a_i W_out[:, i] || / || FFN(x) ||,   FFN(x) = W_out a + b_out

  (the reference models have no bias; with one, ``FFN(x)`` is the full down-projection output). A layer's threshold is
  the largest ``eps`` whose token-mean CETT stays ``<= target`` (bisection, 16 halvings as the reference's binary search
  over 65,536 candidates); its activation ratio is the fraction of entries with ``n_i >= eps``, sparsity ``1 -`` that.
* PPL-p% sparsity (Sec. 3.2): one CETT target shared by all layers, bisected so ``exp(L_sparse - L_dense) <= 1 + p``
  (perplexity rises by at most ``p``, 1% by default): :func:`ppl_p_sparsity`.

Thresholds are calibrated per batch (the tokens that go through the layer together); the metric averages a batch's
threshold, CETT and activation ratio over batches (and DDP ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lit_act.stats.tap import finite_fp32, select_modules

CETT_BISECTION_STEPS = 16


def neuron_output_norm(a: Tensor, w_out: Tensor) -> Tensor:
    """``n = |a| * ||W_out[:, i]||`` for activations ``a (tokens, N)`` and a down-projection weight ``(D, N)``."""
    return a.abs() * w_out.norm(dim=0)


def cett(a: Tensor, w_out: Tensor, b_out: Tensor | None, threshold: Tensor | float) -> Tensor:
    """Per-token CETT ``(tokens,)`` when neurons with output norm ``< threshold`` are dropped (formula above)."""
    return _tail_norm(a, w_out, neuron_output_norm(a, w_out), threshold) / _ffn_norm(a, w_out, b_out)


def _ffn_norm(a: Tensor, w_out: Tensor, b_out: Tensor | None) -> Tensor:
    full = F.linear(a, w_out, b_out).norm(dim=-1)
    return full.clamp(min=torch.finfo(full.dtype).tiny)


def _tail_norm(a: Tensor, w_out: Tensor, norms: Tensor, threshold: Tensor | float) -> Tensor:
    return F.linear(a * (norms < threshold), w_out).norm(dim=-1)


def cett_threshold(a: Tensor, w_out: Tensor, b_out: Tensor | None, target: float,
                   steps: int = CETT_BISECTION_STEPS) -> Tensor:
    """Largest ``eps`` (to ``max n / 2**steps``) with ``mean_tokens CETT(eps) <= target``; a 0-d tensor (no host sync).

    Mean CETT is non-decreasing in ``eps``: 0 at ``eps = 0``, ``||W_out a|| / ||FFN(x)||`` once every neuron drops.
    Cost: one ``(tokens, N) x (N, D)`` matmul per step.
    """
    norms = neuron_output_norm(a, w_out)
    denominator = _ffn_norm(a, w_out, b_out)
    lo = torch.zeros((), device=a.device, dtype=a.dtype)
    hi = norms.max() * (1 + 1e-6) + torch.finfo(a.dtype).tiny
    for _ in range(steps):
        mid = (lo + hi) / 2
        ok = (_tail_norm(a, w_out, norms, mid) / denominator).mean() <= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    return lo


def find_down_projection(model: nn.Module, act_name: str) -> nn.Linear:
    """The down-projection ``W_out`` of activation ``act_name`` in a ``Linear -> act -> Linear`` block.

    First the ``nn.Linear`` registered right after the activation in its parent (``fc_in, act, fc_out``); otherwise
    the first ``nn.Linear`` after it in ``named_modules()`` order whose ``in_features`` equals the ``out_features`` of
    the last ``nn.Linear`` before it (blocks split across parents, e.g. ``hidden.0.{linear,act}`` -> ``hidden.1.linear``).
    Raises ``ValueError`` asking for ``down_projections=`` otherwise (e.g. convolutional activations).
    """
    parent_name, _, leaf = act_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    children = list(parent.named_children())
    names = [n for n, _ in children]
    after = children[names.index(leaf) + 1:] if leaf in names else []
    for _, child in after:
        if isinstance(child, nn.Linear):
            return child
    modules = list(model.named_modules())
    position = [n for n, _ in modules].index(act_name)
    before = [m for _, m in modules[:position] if isinstance(m, nn.Linear)]
    if before:
        width = before[-1].out_features
        for name, module in modules[position + 1:]:
            if isinstance(module, nn.Linear) and not name.startswith(act_name + "."):
                if module.in_features == width:
                    return module
                break
    raise ValueError(f"no nn.Linear follows {act_name!r} in a Linear -> act -> Linear block, so its down-projection "
                     f"W_out cannot be found; pass down_projections={{{act_name!r}: '<name of the Linear after it>'}}")


def down_projections_for(model: nn.Module, act_names: Iterable[str],
                         explicit: Mapping[str, str] | None = None) -> dict[str, nn.Linear]:
    """``{act_name: down-projection Linear}``: ``explicit`` names first, else :func:`find_down_projection`."""
    explicit = dict(explicit or {})
    result = {}
    for name in act_names:
        if name in explicit:
            linear = model.get_submodule(explicit[name])
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"down_projections[{name!r}] = {explicit[name]!r} is a {type(linear).__name__}, "
                                 "not an nn.Linear")
            result[name] = linear
        else:
            result[name] = find_down_projection(model, name)
    return result


def _finite_tokens(a: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 rows of ``a (tokens, N)`` without NaN/Inf, and the number of non-finite entries."""
    a, finite = finite_fp32(a)
    keep = finite.all(dim=1)
    return a[keep], (~finite).sum()


class CETTSparsityMetric(Metric):
    """Per-batch CETT calibration of one layer, averaged over batches.

    States (sum-reduced scalars): ``threshold_sum``, ``cett_sum`` (achieved mean CETT), ``ratio_sum`` (activation
    ratio at the threshold), ``batches``, ``nonfinite`` (entries; tokens holding any are left out).

    Args:
        target: CETT target in ``(0, 1)`` (the paper's default 0.2).
        max_tokens: calibrate on at most this many tokens per batch (an evenly strided subsample; ``None``: all),
            which caps the cost at 16 ``(max_tokens, N) x (N, D)`` matmuls per batch.
    """

    full_state_update = False

    def __init__(self, target: float = 0.2, max_tokens: int | None = 512, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0 < target < 1:
            raise ValueError(f"CETT target must lie in (0, 1), got {target}")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
        self.target, self.max_tokens = float(target), max_tokens
        for name in ("threshold_sum", "cett_sum", "ratio_sum"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("batches", "nonfinite"):
            self.add_state(name, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, a: Tensor, w_out: Tensor, b_out: Tensor | None) -> None:
        """``a``: ``(tokens, N)`` activations entering the down-projection ``(w_out (D, N), b_out)``."""
        a, nonfinite = _finite_tokens(a)
        self.nonfinite += nonfinite
        if not a.shape[0]:
            return
        if self.max_tokens is not None and a.shape[0] > self.max_tokens:
            a = a[:: -(-a.shape[0] // self.max_tokens)]
        w_out = w_out.detach().float()
        b_out = None if b_out is None else b_out.detach().float()
        eps = cett_threshold(a, w_out, b_out, self.target)
        self.threshold_sum += eps
        self.cett_sum += cett(a, w_out, b_out, eps).mean()
        self.ratio_sum += (neuron_output_norm(a, w_out) >= eps).float().mean()
        self.batches += 1

    def compute(self) -> dict[str, Tensor]:
        """``cett_threshold``, ``cett`` and ``cett_activation_ratio`` (batch means), ``nonfinite``."""
        n = self.batches.clamp(min=1)
        nan = torch.tensor(float("nan"), device=n.device, dtype=torch.float64)
        return {key: torch.where(self.batches > 0, getattr(self, state) / n, nan).float()
                for key, state in (("cett_threshold", "threshold_sum"), ("cett", "cett_sum"),
                                   ("cett_activation_ratio", "ratio_sum"))} | {"nonfinite": self.nonfinite.float()}


@dataclass(frozen=True)
class PPLSparsity:
    """Result of :func:`ppl_p_sparsity`: the shared CETT, dense/sparse perplexities, and the activation ratio per
    module and on average at that CETT (``sparsity = 1 - activation_ratio``)."""

    cett: float
    ppl_dense: float
    ppl_sparse: float
    activation_ratio: dict[str, float]
    mean_activation_ratio: float

    @property
    def sparsity(self) -> float:
        return 1.0 - self.mean_activation_ratio


def _default_loss(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(getattr(model, "loss", None)):
        return model.loss
    return lambda logits, targets: F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def _mean_loss(model: nn.Module, data: Iterable, loss_fn: Callable[[Tensor, Tensor], Tensor]) -> float:
    total, count = 0.0, 0
    for inputs, targets in data:
        inputs, targets = inputs.to(_device(model)), targets.to(_device(model))
        total += float(loss_fn(model(inputs), targets)) * targets.numel()
        count += targets.numel()
    if not count:
        raise ValueError("data yielded no (inputs, targets) batch")
    return total / count


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def ppl_p_sparsity(model: nn.Module, data: Iterable, p: float = 0.01, modules=None,
                   down_projections: Mapping[str, str] | None = None,
                   loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, steps: int = 10) -> PPLSparsity:
    """PPL-``p`` sparsity: bisect one CETT ``c`` shared by every selected activation so that
    ``PPL_sparse / PPL_dense = exp(L_sparse - L_dense) <= 1 + p``, then report the activation ratios at ``c``.

    In the sparse forward each selected activation's output is multiplied by ``n_i >= eps`` with ``eps`` the layer's
    CETT threshold for ``c`` on the current batch. ``data`` is a re-iterable of ``(inputs, targets)`` batches (e.g. a
    validation DataLoader); ``loss_fn(logits, targets)`` defaults to ``model.loss`` or token cross-entropy.
    ``modules`` selects the activations (default: every activation module), ``down_projections`` maps an activation
    name to its down-projection when it is not the next ``nn.Linear``. The model's train/eval flag is restored.
    """
    if not p > 0:
        raise ValueError(f"p must be a positive relative perplexity increase (0.01 = PPL-1%), got {p}")
    acts = select_modules(model, modules)
    downs = down_projections_for(model, acts, down_projections)
    loss_fn = loss_fn or _default_loss(model)
    was_training = model.training
    model.eval()
    try:
        dense = _mean_loss(model, data, loss_fn)

        def sparse_run(c: float) -> tuple[float, dict[str, float]]:
            kept = {name: [0.0, 0] for name in acts}
            handles = [module.register_forward_hook(_sparsifier(name, downs[name], c, kept))
                       for name, module in acts.items()]
            try:
                loss = _mean_loss(model, data, loss_fn)
            finally:
                for handle in handles:
                    handle.remove()
            return loss, {name: s / max(n, 1) for name, (s, n) in kept.items()}

        lo, hi = 0.0, 1.0
        best = (0.0, dense, {name: 1.0 for name in acts})
        for _ in range(steps):
            mid = (lo + hi) / 2
            loss, ratios = sparse_run(mid)
            if torch.tensor(loss - dense).exp().item() <= 1 + p:
                lo, best = mid, (mid, loss, ratios)
            else:
                hi = mid
    finally:
        model.train(was_training)
    c, loss, ratios = best
    return PPLSparsity(cett=c, ppl_dense=float(torch.tensor(dense).exp()), ppl_sparse=float(torch.tensor(loss).exp()),
                       activation_ratio=ratios, mean_activation_ratio=sum(ratios.values()) / len(ratios))


def _sparsifier(name: str, down: nn.Linear, target: float, kept: dict[str, list]):
    """Forward hook zeroing neurons below the layer's CETT-``target`` threshold; tallies kept entries in ``kept``."""

    def hook(module: nn.Module, args, output: Tensor) -> Tensor:
        a = output.reshape(-1, output.shape[-1]).float()
        w, b = down.weight.float(), None if down.bias is None else down.bias.float()
        keep = neuron_output_norm(a, w) >= cett_threshold(a, w, b, target)
        kept[name][0] += float(keep.float().sum())
        kept[name][1] += keep.numel()
        return (a * keep).to(output.dtype).reshape(output.shape)

    return hook


__all__ = ["CETTSparsityMetric", "PPLSparsity", "cett", "cett_threshold", "down_projections_for",
           "find_down_projection", "neuron_output_norm", "ppl_p_sparsity"]
