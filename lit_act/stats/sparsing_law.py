"""Sparsing Law (Luo et al. 2024, "Sparsing Law: Towards Large Language Models with Greater Activation Sparsity",
thunlp/SparsingLaw): CETT-calibrated activation sparsity of feed-forward blocks ``W_out act(W_in x)``.

* Neuron output norm (Sec. 3.1): ``n_i = |a_i| * ||W_out[:, i]||_2``, the size of neuron ``i``'s contribution to the
  block output for one token.
* CETT, the cumulative error of tail truncation, for a threshold ``eps`` (Eq. 2)::

      CETT(eps) = || sum_{i : n_i < eps} a_i W_out[:, i] || / || FFN(x) ||,   FFN(x) = W_out a + b_out

  (the reference models have no bias; with one, ``FFN(x)`` is the full down-projection output).
* A layer's threshold (Sec. 3.1; reference ``calc_thresholds_given_cett``) is the largest ``eps`` whose token-mean CETT
  stays ``<= target``. The mean CETT only changes where ``eps`` crosses one of the observed norms ``n_si``, so the
  largest such ``eps`` is one of them: :func:`cett_threshold` bisects over the *sorted observed norms* (plus ``+inf``,
  "drop everything"), exact in ``ceil(log2(#entries + 1))`` evaluations, one ``(tokens, N) x (N, D)`` matmul each.
  The activation ratio is the fraction of entries with ``n_i >= eps``, sparsity ``1 -`` that.
* Calibrate once, apply everywhere (the reference's procedure: ``calc_threshold_for_each_layer.py`` computes the
  per-layer thresholds on dense forward passes, the sparse model then applies them): :func:`calibrate_thresholds` on a
  fixed calibration set, then :class:`CETTSparsityMetric` with ``threshold=`` (or :meth:`~CETTSparsityMetric.set_threshold`)
  only counts ``n_i >= eps`` on every batch (and measures the achieved CETT with one matmul).
* PPL-p% sparsity (Sec. 3.2; reference ``calc_cett.py`` / ``inspect_sparsity.py``): one CETT target shared by all
  layers, bisected so that the perplexity ratio stays below ``1 + p``: :func:`ppl_p_sparsity`.

Deviations from the reference, listed:

* Threshold candidates: the reference searches 65,536 points of ``linspace(min n, 0.99-quantile of n)`` (the quantile on
  a strided subsample), so it never returns a threshold above that quantile and is exact only to the grid spacing;
  here every observed norm is a candidate (exact; with outlier neurons the grid loses precision: e.g. a layer whose
  largest neuron norm is 2000x the median). The reference drops ``n <= t`` while calibrating and ``n < t`` while
  applying; here both drop ``n < eps`` (identical partitions except for ties at the threshold).
* Monotonicity: the bisection (here and in the reference) assumes the mean CETT is non-decreasing in ``eps``. It is
  when the dropped contributions do not cancel; a norm of a vector sum can decrease when a term is added, so on real
  data the result is *a* crossing point of the target (the largest one whenever the curve is monotone).
* Which tensor is ``a``: the reference takes the input of ``down_proj``, i.e. ``act(gate) * up`` in its gated MLP;
  callers must pass that tensor for gated MLPs (LLaMA-style ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``), not
  the activation module's output. Padded tokens are left out by the reference (``att_mask``); pass only real tokens.
* Batch calibration mode (``threshold=None``): each batch is calibrated on its own tokens (capped at ``max_tokens``) and
  thresholds, CETT and activation ratio are averaged over batches, as ``calc_threshold_for_each_layer.py`` averages
  per-batch thresholds over its 10 dense batches.
* PPL-p%: the reference returns the midpoint of the final CETT bracket (width 1/1024); :func:`ppl_p_sparsity` returns
  the bracket's lower end, the largest CETT verified within budget (at most 2**-11 below).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lit_act.stats.tap import finite_fp32, nan_marked, select_modules


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


def _cett_arg_validation(target: float, max_tokens: int | None) -> None:
    if not 0 < target < 1:
        raise ValueError(f"CETT target must lie in (0, 1), got {target}")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ValueError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")


def cett_threshold(a: Tensor, w_out: Tensor, b_out: Tensor | None, target: float) -> Tensor:
    """The largest ``eps`` with ``mean_tokens CETT(eps) <= target``, exactly; a 0-d tensor (no host sync).

    Candidates are the sorted observed norms ``n_si`` and ``+inf`` (drop every neuron; returned only when even that
    keeps the mean CETT within ``target``, possible with a bias). Bisection over the candidate index finds the crossing
    in ``ceil(log2(#candidates))`` evaluations of the mean CETT, one ``(tokens, N) x (N, D)`` matmul each.

    Example:
        >>> a, w = torch.tensor([[1.0, 2.0, 4.0]]), torch.eye(3)
        >>> cett_threshold(a, w, None, 0.5)  # dropping 1 and 2: ||(1, 2, 0)|| / ||(1, 2, 4)|| = 0.488
        tensor(4.)
    """
    norms = neuron_output_norm(a, w_out)
    denominator = _ffn_norm(a, w_out, b_out)
    candidates = torch.cat([norms.flatten().sort().values, norms.new_full((1,), math.inf)])
    lo = torch.zeros((), dtype=torch.long, device=a.device)  # candidate 0 (the minimum) drops nothing: CETT 0
    hi = torch.full((), candidates.numel() - 1, dtype=torch.long, device=a.device)
    for _ in range(math.ceil(math.log2(candidates.numel()))):
        mid = (lo + hi + 1) // 2
        ok = (_tail_norm(a, w_out, norms, candidates[mid]) / denominator).mean() <= target
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid - 1)
    return candidates[lo]


def strided_subsample(a: Tensor, max_tokens: int | None) -> Tensor:
    """At most ``max_tokens`` evenly strided rows of ``a`` (every ``ceil(rows / max_tokens)``-th; ``None``: all)."""
    if max_tokens is not None and a.shape[0] > max_tokens:
        return a[:: -(-a.shape[0] // max_tokens)]
    return a


def calibrate_thresholds(activations: Mapping[str, Tensor], down_projections: Mapping[str, nn.Linear],
                         target: float = 0.2, max_tokens: int | None = None) -> dict[str, Tensor]:
    """Per-layer CETT thresholds (:func:`cett_threshold`) on a fixed calibration set.

    Args:
        activations: ``{layer: (tokens, N) activations}`` of the calibration set (dense pass; tokens holding NaN/Inf
            are dropped).
        down_projections: ``{layer: the nn.Linear after the activation}`` (:func:`down_projections_for`).
        target: CETT target in ``(0, 1)``.
        max_tokens: calibrate on at most this many evenly strided tokens per layer (``None``: all).

    Returns:
        ``{layer: 0-d threshold}`` (NaN for a layer without a finite token). Pass each to
        ``CETTSparsityMetric(threshold=...)`` or :meth:`CETTSparsityMetric.set_threshold`; compute them from the same
        calibration set on every DDP rank (or all-reduce their mean) so ranks apply the same thresholds.

    Example:
        >>> down = nn.Linear(3, 3, bias=False)
        >>> _ = down.weight.data.copy_(torch.eye(3))
        >>> calibrate_thresholds({"act": torch.tensor([[1.0, 2.0, 4.0]])}, {"act": down}, 0.5)
        {'act': tensor(4.)}
    """
    _cett_arg_validation(target, max_tokens)
    out = {}
    for name, a in activations.items():
        down = down_projections[name]
        a, _ = _finite_tokens(a.reshape(-1, a.shape[-1]))
        if not a.shape[0]:
            out[name] = torch.tensor(math.nan, device=a.device)
            continue
        w, b = down.weight.detach().float(), None if down.bias is None else down.bias.detach().float()
        out[name] = cett_threshold(strided_subsample(a, max_tokens), w, b, target)
    return out


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
    """CETT statistics of one layer, in one of two modes.

    * Fixed threshold (``threshold=`` or :meth:`set_threshold`, from :func:`calibrate_thresholds` on a calibration
      set): every batch only counts entries with ``n_i >= eps`` (``cett_activation_ratio`` over all tokens seen) and,
      with ``measure_cett``, the achieved token-mean CETT on at most ``max_tokens`` tokens per batch (one matmul, two
      without ``ffn_out``). This is the reference's dense-calibrate-then-apply procedure and costs a fraction of a
      forward pass.
    * Batch calibration (``threshold=None``): each batch is calibrated on its own tokens (at most ``max_tokens``) with
      the exact :func:`cett_threshold` (``ceil(log2(tokens x N + 1))`` matmuls); threshold, CETT and activation ratio
      are averaged over batches.

    States (sum-reduced): ``threshold_sum``, ``cett_sum``, ``ratio_sum``, ``batches`` (batch calibration),
    ``kept``, ``entries``, ``cett_token_sum``, ``cett_tokens`` (fixed threshold), ``nonfinite`` (entries; tokens
    holding any are left out).

    Args:
        target: CETT target in ``(0, 1)`` (the paper's default 0.2).
        max_tokens: tokens per batch used for calibration / CETT measurement (evenly strided; ``None``: all).
        threshold: a fixed threshold (``None``: batch calibration).
        measure_cett: in fixed-threshold mode, also measure the achieved CETT (``False``: ``cett`` is NaN).

    Example:
        >>> w = torch.eye(3)
        >>> metric = CETTSparsityMetric(0.5, threshold=4.0)
        >>> metric.update(torch.tensor([[1.0, 2.0, 4.0], [4.0, 4.0, 1.0]]), w, None)
        >>> {k: round(v.item(), 3) for k, v in metric.compute().items()}
        {'cett_threshold': 4.0, 'cett': 0.331, 'cett_activation_ratio': 0.5, 'nonfinite': 0.0}
    """

    full_state_update = False

    def __init__(self, target: float = 0.2, max_tokens: int | None = 512, threshold: float | Tensor | None = None,
                 measure_cett: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        _cett_arg_validation(target, max_tokens)
        self.target, self.max_tokens, self.measure_cett = float(target), max_tokens, measure_cett
        self.threshold: Tensor | None = None
        if threshold is not None:
            self.set_threshold(threshold)
        for name in ("threshold_sum", "cett_sum", "ratio_sum", "cett_token_sum"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("batches", "nonfinite", "kept", "entries", "cett_tokens"):
            self.add_state(name, torch.zeros((), dtype=torch.int64), dist_reduce_fx="sum")

    def set_threshold(self, threshold: float | Tensor | None) -> None:
        """Fix the threshold applied by later updates (``None``: back to batch calibration). Not a state: set it
        after every calibration (and after a checkpoint restore)."""
        if threshold is None:
            self.threshold = None
            return
        threshold = torch.as_tensor(threshold, dtype=torch.float32).detach()
        if threshold.numel() != 1 or bool(threshold < 0):
            raise ValueError(f"threshold must be one number >= 0 (or NaN for an uncalibrated layer), got {threshold}")
        self.threshold = threshold.reshape(())

    def update(self, a: Tensor, w_out: Tensor, b_out: Tensor | None, ffn_out: Tensor | None = None) -> None:
        """``a``: ``(tokens, N)`` activations entering the down-projection ``(w_out (D, N), b_out)``; ``ffn_out``:
        optional ``(tokens, D)`` down-projection output for the same tokens (fixed-threshold mode: saves one
        matmul)."""
        w_out = w_out.detach().float()
        b_out = None if b_out is None else b_out.detach().float()
        if self.threshold is None:
            a, nonfinite = _finite_tokens(a)
            self.nonfinite += nonfinite
            if a.shape[0]:
                self._update_calibrated(strided_subsample(a, self.max_tokens), w_out, b_out)
        else:
            self._update_fixed(a, w_out, b_out, ffn_out)

    def _update_calibrated(self, a: Tensor, w_out: Tensor, b_out: Tensor | None) -> None:
        eps = cett_threshold(a, w_out, b_out, self.target)
        self.threshold_sum += eps
        self.cett_sum += cett(a, w_out, b_out, eps).mean()
        self.ratio_sum += (neuron_output_norm(a, w_out) >= eps).float().mean()
        self.batches += 1

    def _update_fixed(self, a: Tensor, w_out: Tensor, b_out: Tensor | None, ffn_out: Tensor | None) -> None:
        """Counting only (no copy of ``a`` beyond one fp32 buffer, no host sync); NaN/Inf entries are left out of the
        ratio one by one, tokens holding any out of the CETT mean."""
        eps = self.threshold.to(a.device)
        norms = nan_marked(a).abs_().mul_(w_out.norm(dim=0))  # n_si, NaN where a is NaN/Inf
        # int32 bool sums are ~3x faster than the default int64 on CPU (exact below 2**31 entries per batch)
        nonfinite = norms.isnan().sum(dtype=torch.int32).long()
        self.nonfinite += nonfinite
        self.kept += (norms >= eps).sum(dtype=torch.int32).long()
        self.entries += norms.numel() - nonfinite
        if not self.measure_cett:
            return
        sub = strided_subsample(a.detach().float(), self.max_tokens)
        if ffn_out is not None:
            full = strided_subsample(ffn_out.detach().reshape(-1, ffn_out.shape[-1]).float(), self.max_tokens)
            full = full.norm(dim=-1).clamp(min=torch.finfo(torch.float32).tiny)
        else:
            full = _ffn_norm(sub, w_out, b_out)
        values = _tail_norm(sub, w_out, strided_subsample(norms, self.max_tokens), eps) / full
        measured = values.isfinite()
        self.cett_token_sum += torch.where(measured, values, 0.0).sum(dtype=torch.float64)
        self.cett_tokens += measured.sum()

    def compute(self) -> dict[str, Tensor]:
        """``cett_threshold``, ``cett`` (achieved mean CETT) and ``cett_activation_ratio``, ``nonfinite``; NaN for
        what was not measured (nothing finite seen, ``measure_cett=False``)."""
        nan = torch.tensor(math.nan, device=self.batches.device, dtype=torch.float64)
        if self.threshold is None:
            n = self.batches.clamp(min=1)
            out = {key: torch.where(self.batches > 0, getattr(self, state) / n, nan).float()
                   for key, state in (("cett_threshold", "threshold_sum"), ("cett", "cett_sum"),
                                      ("cett_activation_ratio", "ratio_sum"))}
        else:
            seen = self.entries > 0
            out = {"cett_threshold": torch.where(seen, self.threshold.to(nan.device).double(), nan).float(),
                   "cett": torch.where(self.cett_tokens > 0, self.cett_token_sum / self.cett_tokens.clamp(min=1),
                                       nan).float(),
                   "cett_activation_ratio": torch.where(seen, self.kept / self.entries.clamp(min=1), nan).float()}
        return out | {"nonfinite": self.nonfinite.float()}


@dataclass(frozen=True)
class PPLSparsity:
    """Result of :func:`ppl_p_sparsity`: the shared CETT, dense/sparse perplexities (``exp`` of the token-mean
    losses), ``ppl_ratio`` (the reference's mean over batches of ``exp(L_sparse - L_dense)``, the quantity held below
    ``1 + p``), and the activation ratio per module and on average at that CETT (``sparsity = 1 - activation_ratio``)."""

    cett: float
    ppl_dense: float
    ppl_sparse: float
    ppl_ratio: float
    activation_ratio: dict[str, float]
    mean_activation_ratio: float

    @property
    def sparsity(self) -> float:
        return 1.0 - self.mean_activation_ratio


def _default_loss(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    if callable(getattr(model, "loss", None)):
        return model.loss
    return lambda logits, targets: F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def ppl_p_sparsity(model: nn.Module, data: Iterable, p: float = 0.01, modules=None,
                   down_projections: Mapping[str, str] | None = None,
                   loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None, steps: int = 10) -> PPLSparsity:
    """PPL-``p`` sparsity, the reference procedure (``calc_cett.py`` + ``inspect_sparsity.inspect_model``): bisect one
    CETT ``c`` shared by every selected activation (``steps`` halvings of ``[0, 1]``; 10 gives the reference's 0.001
    tolerance) so that the PPL ratio ``mean_batches exp(L_sparse - L_dense) < 1 + p``, then report the activation
    ratios at ``c``.

    For each batch and candidate ``c``: a dense forward records every selected activation; each layer's threshold is
    :func:`cett_threshold` of those *dense* activations for ``c``; a sparse forward then zeroes the entries with
    ``n_i < eps`` (thresholds applied, not recomputed from the sparse pass, whose inputs differ once an earlier layer
    is sparsified). Activation ratios are the kept fractions of the sparse pass.

    ``data`` is a re-iterable of ``(inputs, targets)`` batches (e.g. a validation DataLoader); ``loss_fn(logits,
    targets)`` defaults to ``model.loss`` or token cross-entropy. ``modules`` selects the activations (default: every
    activation module), ``down_projections`` maps an activation name to its down-projection when it is not the next
    ``nn.Linear``. The model's train/eval flag is restored.
    """
    if not p > 0:
        raise ValueError(f"p must be a positive relative perplexity increase (0.01 = PPL-1%), got {p}")
    acts = select_modules(model, modules)
    downs = down_projections_for(model, acts, down_projections)
    loss_fn = loss_fn or _default_loss(model)
    was_training = model.training
    model.eval()
    try:
        batches = [(x.to(_device(model)), y.to(_device(model))) for x, y in data]
        if not batches:
            raise ValueError("data yielded no (inputs, targets) batch")
        dense = [float(loss_fn(model(x), y)) for x, y in batches]
        sizes = [y.numel() for _, y in batches]

        def sparse_run(c: float) -> tuple[float, list[float], dict[str, float]]:
            kept = {name: [0.0, 0] for name in acts}
            losses = []
            for x, y in batches:
                recorded: dict[str, Tensor] = {}
                handles = [module.register_forward_hook(_recorder(name, recorded)) for name, module in acts.items()]
                try:
                    model(x)
                finally:
                    for handle in handles:
                        handle.remove()
                thresholds = calibrate_thresholds(recorded, downs, c)
                handles = [module.register_forward_hook(_sparsifier(name, downs[name], thresholds[name], kept))
                           for name, module in acts.items()]
                try:
                    losses.append(float(loss_fn(model(x), y)))
                finally:
                    for handle in handles:
                        handle.remove()
            ratio = sum(math.exp(s - d) for s, d in zip(losses, dense, strict=True)) / len(batches)
            return ratio, losses, {name: s / max(n, 1) for name, (s, n) in kept.items()}

        lo, hi = 0.0, 1.0
        best = (0.0, 1.0, dense, {name: 1.0 for name in acts})
        for _ in range(steps):
            mid = (lo + hi) / 2
            ratio, losses, ratios = sparse_run(mid)
            if ratio < 1 + p:
                lo, best = mid, (mid, ratio, losses, ratios)
            else:
                hi = mid
    finally:
        model.train(was_training)
    c, ratio, losses, ratios = best

    def ppl(values: list[float]) -> float:
        return math.exp(sum(v * n for v, n in zip(values, sizes, strict=True)) / sum(sizes))

    return PPLSparsity(cett=c, ppl_dense=ppl(dense), ppl_sparse=ppl(losses), ppl_ratio=ratio,
                       activation_ratio=ratios, mean_activation_ratio=sum(ratios.values()) / len(ratios))


def _recorder(name: str, recorded: dict[str, Tensor]):
    """Forward hook storing an activation's output as ``(tokens, N)`` fp32 in ``recorded[name]``."""

    def hook(module: nn.Module, args, output: Tensor) -> None:
        recorded[name] = output.detach().reshape(-1, output.shape[-1]).float()

    return hook


def _sparsifier(name: str, down: nn.Linear, threshold: Tensor, kept: dict[str, list]):
    """Forward hook zeroing entries whose neuron output norm is below the fixed ``threshold``; tallies kept entries."""

    def hook(module: nn.Module, args, output: Tensor) -> Tensor:
        a = output.reshape(-1, output.shape[-1]).float()
        keep = neuron_output_norm(a, down.weight.float()) >= threshold
        kept[name][0] += float(keep.float().sum())
        kept[name][1] += keep.numel()
        return (a * keep).to(output.dtype).reshape(output.shape)

    return hook


__all__ = ["CETTSparsityMetric", "PPLSparsity", "calibrate_thresholds", "cett", "cett_threshold",
           "down_projections_for", "find_down_projection", "neuron_output_norm", "ppl_p_sparsity",
           "strided_subsample"]
