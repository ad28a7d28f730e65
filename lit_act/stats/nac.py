"""Neuron Activation Coverage (NAC; Liu, Lochman, Zach, "Neuron Activation Coverage: Rethinking Out-of-distribution
Detection and Generalization", ICLR 2024; reference code BierOne/ood_coverage, ``openood/postprocessors/nac``).

**Neuron state** (paper Eq. 3). For a sample ``x`` with logits ``f(x)`` and a hooked layer output ``z``::

    g = d KL(u || softmax(f(x))) / d z            u = uniform distribution over the C classes
    s = sigmoid(alpha * pool(z) * pool(g))        (one state per sample and neuron)

``pool`` sums over every position that is not the batch or the neuron dimension (conv maps over H x W, sequences over
tokens), separately for ``z`` and ``g`` -- the reference's ``avg_pooling``, which sums ("the denominator can be scaled
by sigmoid smooth"). Neurons follow :func:`lit_act.stats.tap.neuron_view` (last dim; channel dim 1 of conv maps).
``KL(u||p) = -log C - mean_c log p_c`` so its gradient equals that of the reference's uniform-target cross-entropy.
Each sample's gradient is its own (``loss.sum()`` over the batch, model in eval mode).

**Coverage** (paper Eq. 4-5). States in ``[0, 1]`` fall into ``M`` bins with edges ``e_0 = 0 < ... < e_M = 1``
(bin ``k`` is ``[e_k, e_{k+1})``, the last one closed so a saturated state ``1.0`` counts). With ``c_{k,n}`` the number
of fitting samples whose state of neuron ``n`` is in bin ``k`` and saturation ``O``::

    t_{k,n} = min(c_{k,n} / O, 1)         coverage(n) = sum_k t_{k,n} / M         coverage(layer) = mean_n coverage(n)

**NAC-UE** (uncertainty estimation, paper Eq. 6): a sample's score is the mean over neurons of ``t`` of the bin each
of its states lands in, averaged over layers; higher = more in-distribution.

**NAC-ME** (model evaluation, paper Sec. 5): layer coverage of a *fixed* model over its *correctly classified*
training samples (:func:`nac_me`). The paper uses ``O = 500, M = 50, alpha = 0.1`` and linear bins on large training
sets; lit-act's fixed-model default (:data:`NAC_ME_PROBE_PARAMS`, :func:`nac_me_params`) is scale-free -- see below.

Deviations from the reference code (all documented in the report and tests):

* ``M`` is the number of bins (the reference passes ``M`` thresholds, i.e. ``M - 1`` intervals, still divides by ``M``,
  and its last interval ``[1.01, 1.2)`` can never be reached by a sigmoid);
* default NAC-UE bins (``"symlog"``) are the reference's mirrored-log spacing, dense around ``0.5``, but span exactly
  ``[0, 1]`` with a reachable last bin; ``"linear"`` bins are available (NAC-ME default);
* ``alpha="auto"`` (the default of :class:`LayerParams`) makes alpha scale-free: ``alpha = auto_gain / q`` with ``q``
  the ``auto_quantile`` of ``|pool(z) * pool(g)|`` over the fitting samples of that layer, so the states spread over
  the bins for any architecture (the paper's fixed alphas range from 1e-3 to 3e3 between models and layers; on our
  digits MLP ``q ~ 0.2``, on the digits CNN ``q ~ 10-90``). The defaults ``auto_gain = 8, auto_quantile = 0.9,
  O = 20, M = 50`` (symlog bins, every activation layer) were chosen on the reference MLP and CNN trained on digits:
  they keep NAC-UE well above chance against noise and transformed digits on both, where any fixed alpha fails on
  one of them (see ``tests/test_nac_search.py`` and the ``nac_ood`` experiment);
* NAC-UE fits on all fitting samples (the reference's ``sigmoid(o*g_kl)`` method also ignores correctness); only
  NAC-ME keeps the correctly classified ones;
* NAC-UE's recommended layer set adds the **logits** as a layer (``NACModel(..., logits_layer=True)``, products
  ``z * (softmax(z) - 1/C)`` -- exactly what hooking the classifier head gives) to the activation modules, and its
  parameters are ``alpha="auto"`` with ``auto_gain = 2``, ``O = 20``, ``M = 100`` symlog bins (:data:`NAC_UE_PARAMS`;
  :class:`LayerParams` keeps the earlier activation-only defaults ``auto_gain = 8, M = 50``).
  They were chosen by validation AUROC against the search's own proxies (shuffled + class-mixture validation digits),
  never on the test OOD sets. On the reference digits MLP and CNN (classes 0-7, seed 0) NAC-UE's mean AUROC is then
  >= the better of MSP and energy on far-OOD (noise, transformed digits) and near-OOD (held-out classes, letters)
  sets; on the MLP the near-OOD lead over energy is small and not seed-robust, and an under-trained MLP fails on
  inverted digits (limits and tables in ``docs/nac.md``). The activation layers alone trail energy on held-out
  classes;
* NAC-ME on a fixed model (:func:`nac_me`, :data:`NAC_ME_PROBE_PARAMS`) defaults to ``alpha="auto"`` with ``auto_gain = 1`` (each layer's 0.9-quantile of
  ``|pool z * pool g|`` maps to ``sigmoid(+-1)``), ``M = 100`` linear bins and the saturation rule
  ``O = 2 * probe_samples / M`` (:func:`nac_me_params`; ``O = 20`` for 1,000 probe samples). With the paper's
  ``alpha = 0.1`` our models' states fall into a handful of bins and ``O = 500`` exceeds every bin count of a
  1,000-sample probe, so NAC-ME reduces to a constant times the number of correct samples (``~0.037`` for every
  decent model; :data:`NAC_ME_PARAMS` keeps the paper's setting). The scale-free rule measures how widely the correct samples spread over the states: over 8-10 digits
  MLPs of different width, epochs and label noise its Spearman correlation with test accuracy is 0.93-0.95 (paper
  setting on the same fixed models: 0.88-0.90; ``docs/nac.md``, ``tests/test_nac_me.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import Tensor, nn
from torchmetrics import Metric

from lit_act.stats.ood import inputs_of
from lit_act.stats.tap import check_mask, neuron_view, tap
from lit_act.utils.modes import evaluating

LogitsFn = Callable[[Any], Tensor]
BIN_SPACINGS = ("symlog", "linear")
AUTO = "auto"
LOGITS = "logits"
"""Name of the logits layer of :class:`NACModel` (``logits_layer=True``)."""


# --------------------------------------------------------------------------------------------------- parameters
@dataclass(frozen=True)
class LayerParams:
    """NAC hyper-parameters of one layer.

    Args:
        alpha: sigmoid steepness, a positive float or ``"auto"`` (``auto_gain / quantile(|pool z * pool g|)``).
        saturation: ``O``, the count at which a bin is fully covered (``>= 1``).
        bins: ``M``, the number of bins (``>= 2``).
        spacing: ``"symlog"`` (dense around 0.5, as the reference) or ``"linear"``.
        auto_gain, auto_quantile: the scale rule used when ``alpha="auto"``.
    """

    alpha: float | str = AUTO
    saturation: float = 20.0
    bins: int = 50
    spacing: str = "symlog"
    auto_gain: float = 8.0
    auto_quantile: float = 0.9

    def __post_init__(self) -> None:
        if self.alpha != AUTO and not (isinstance(self.alpha, int | float) and self.alpha > 0
                                       and math.isfinite(self.alpha)):
            raise ValueError(f"alpha must be a positive finite number or 'auto', got {self.alpha!r}")
        if not self.saturation >= 1:
            raise ValueError(f"saturation (O) must be >= 1, got {self.saturation!r}")
        if not isinstance(self.bins, int) or self.bins < 2:
            raise ValueError(f"bins (M) must be an integer >= 2, got {self.bins!r}")
        if self.spacing not in BIN_SPACINGS:
            raise ValueError(f"unknown bin spacing {self.spacing!r}; valid: {', '.join(BIN_SPACINGS)}")
        if not self.auto_gain > 0 or not 0 < self.auto_quantile <= 1:
            raise ValueError("auto_gain must be > 0 and auto_quantile in (0, 1], got "
                             f"{self.auto_gain!r}, {self.auto_quantile!r}")


NAC_UE_PARAMS = LayerParams(alpha=AUTO, saturation=20.0, bins=100, spacing="symlog", auto_gain=2.0, auto_quantile=0.9)
"""NAC-UE defaults (use with ``NACModel(..., logits_layer=True)``): ``alpha="auto"`` (gain 2, 0.9-quantile),
``O = 20``, ``M = 100`` symlog bins."""

NAC_ME_PROBE_SAMPLES = 1000
"""Probe size the NAC-ME defaults are stated for (the first 1,000 training samples)."""


def nac_me_params(probe_samples: int = NAC_ME_PROBE_SAMPLES, bins: int = 100) -> LayerParams:
    """NAC-ME parameters for a probe of ``probe_samples`` samples: ``alpha="auto"`` with ``auto_gain = 1``, ``bins``
    linear bins and the saturation rule ``O = max(1, 2 * probe_samples / bins)`` (a neuron whose correct samples
    spread evenly over half of the bins is fully covered).

    Example:
        >>> nac_me_params(1000).saturation, nac_me_params(500).saturation
        (20.0, 10.0)
    """
    if not isinstance(probe_samples, int) or probe_samples < 1:
        raise ValueError(f"probe_samples must be a positive integer, got {probe_samples!r}")
    return LayerParams(alpha=AUTO, saturation=max(1.0, 2.0 * probe_samples / bins), bins=bins, spacing="linear",
                       auto_gain=1.0, auto_quantile=0.9)


NAC_ME_PROBE_PARAMS = nac_me_params(NAC_ME_PROBE_SAMPLES)
"""NAC-ME defaults for a 1,000-sample probe on a fixed model: ``alpha="auto"`` (gain 1), ``O = 20``, ``M = 100``
linear bins."""

NAC_ME_PARAMS = LayerParams(alpha=0.1, saturation=500, bins=50, spacing="linear")
"""The paper's NAC-ME setting (Sec. 5.2): O = 500, M = 50, alpha = 0.1, linear bins. Kept for the running-window
mode; on a small probe of a fixed model it reduces to a multiple of the number of correct samples."""


def _log_half(bins: int) -> Tensor:
    """``bins + 1`` edges on ``[0, 0.5]``, ``log_1000`` of ``linspace(1, sqrt(1000))``: denser towards 0.5."""
    return torch.log(torch.linspace(1.0, math.sqrt(1e3), bins + 1, dtype=torch.float64)) / math.log(1e3)


def bin_edges(bins: int, spacing: str = "symlog") -> Tensor:
    """``bins + 1`` increasing edges from exactly 0 to exactly 1 (float64).

    ``"linear"``: ``linspace(0, 1)``. ``"symlog"``: the reference's ``logspace(1e3, M)`` layout -- ``log_1000`` of a
    linear grid on ``[1, sqrt(1000)]`` gives edges on ``[0, 0.5]`` that get denser towards 0.5, mirrored onto
    ``[0.5, 1]`` -- re-indexed so that it has exactly ``bins`` bins, all reachable.
    """
    LayerParams(bins=bins, spacing=spacing)  # validates
    if spacing == "linear":
        return torch.linspace(0.0, 1.0, bins + 1, dtype=torch.float64)
    left = bins // 2  # bins in [0, 0.5]
    right = bins - left
    lo = _log_half(left)
    hi = 1.0 - _log_half(right).flip(0)
    return torch.cat([lo[:-1], hi])


# ------------------------------------------------------------------------------------------------------ states
def kl_uniform(logits: Tensor) -> Tensor:
    """Per-sample ``KL(u || softmax(logits))`` with ``u`` uniform over the last dimension, shape ``logits.shape[:-1]``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -math.log(logits.shape[-1]) - logp.mean(-1)


def as_logits(output: Any, logits_fn: LogitsFn | None = None) -> Tensor:
    """The classification logits ``(B, C)`` of a model output (after ``logits_fn`` when given).

    Raises:
        TypeError / ValueError: with a fix, when the output is not a floating Tensor with a class dimension.
    """
    logits = logits_fn(output) if logits_fn is not None else output
    fix = ("NAC needs the model's classification logits (B, num_classes): pass logits_fn=<callable mapping the "
           "model output to logits>, e.g. logits_fn=lambda out: out.logits")
    if not isinstance(logits, Tensor):
        raise TypeError(f"the model returned {type(logits).__name__}, not a logits Tensor. {fix}")
    if not logits.is_floating_point():
        raise TypeError(f"the model returned a {logits.dtype} tensor, not floating-point logits. {fix}")
    if logits.dim() != 2 or logits.shape[-1] < 2:
        raise ValueError(f"the model returned a tensor of shape {tuple(logits.shape)}; NAC needs logits of shape "
                         f"(batch, num_classes >= 2). {fix} (for sequence models, pick one position per sample)")
    return logits


def pooled(x: Tensor, module: nn.Module, batch_size: int, neuron_dim: int | None = None,
           mask: Tensor | None = None, name: str = "") -> Tensor:
    """``(batch, neurons)``: ``x`` summed over every non-batch, non-neuron position (conv maps over H x W); with a
    ``(B, T)`` token ``mask`` over the real tokens only (a per-sequence ``(B, N)`` output, e.g. a pooler, has no token
    axis and so no padding)."""
    if mask is not None and not (x.dim() == 2 and mask.dim() == 2 and x.shape[0] == mask.shape[0]):
        check_mask(name, x, mask)
        x = x * mask.to(x.device).reshape(*mask.shape, *([1] * (x.dim() - mask.dim()))).to(x.dtype)
    view = neuron_view(x, module, neuron_dim)
    if view.shape[0] % batch_size:
        raise ValueError(f"cannot pool an activation of shape {tuple(x.shape)} per sample of a batch of {batch_size}: "
                         "its first dimension must be the batch")
    return view.reshape(batch_size, -1, view.shape[-1]).sum(1)


@dataclass
class NACBatch:
    """Result of :func:`neuron_products`: detached fp32 ``logits (B, C)`` and per layer ``pool(z) * pool(g)`` ``(B, N)``."""

    logits: Tensor
    products: dict[str, Tensor]


def _grad_ready(inputs: Any) -> Any:
    """Clone tensors (also inference-mode ones) so a graph can be built; float inputs require grad, so hooked outputs
    are differentiable even when every parameter is frozen."""
    if isinstance(inputs, Tensor):
        out = inputs.detach().clone()
        return out.requires_grad_(True) if out.is_floating_point() else out
    if isinstance(inputs, list | tuple):
        return type(inputs)(_grad_ready(v) for v in inputs)
    if isinstance(inputs, Mapping):
        return {k: _grad_ready(v) for k, v in inputs.items()}
    return inputs


def neuron_products(model: nn.Module, inputs: Any, modules: Mapping[str, nn.Module],
                    logits_fn: LogitsFn | None = None, neuron_dim: int | None = None,
                    mask: Tensor | None = None) -> NACBatch:
    """``pool(z) * pool(d KL(u || softmax) / dz)`` for every module in ``modules`` on one batch (pooled over the real
    tokens of a ``(B, T)`` token ``mask`` when given).

    Runs its own forward and backward in eval mode under ``torch.inference_mode(False)`` and ``torch.enable_grad()``
    (so it works inside Lightning's validation/test loops), differentiating only with respect to the hooked outputs
    (``torch.autograd.grad``): no parameter's ``.grad``, optimizer or BN running statistic changes; the train/eval
    flags are restored.
    """
    captured: dict[str, tuple[nn.Module, Tensor]] = {}

    def keep(name: str, module: nn.Module, x: Tensor) -> None:
        if name in captured:
            raise RuntimeError(f"module {name!r} ran twice in one forward; NAC needs one output per sample -- "
                               "select modules that run once (modules=...)")
        captured[name] = (module, x)

    with evaluating(model), torch.inference_mode(False), torch.enable_grad(), tap(dict(modules), keep):
        x = _grad_ready(inputs)
        logits = as_logits(model(x), logits_fn)
        missing = [n for n in modules if n not in captured]
        if missing:
            raise RuntimeError(f"modules {missing} did not run in the forward pass; select modules on the path to "
                               "the logits")
        names = list(captured)
        outs = [captured[n][1] for n in names]
        if not logits.requires_grad or any(not o.requires_grad for o in outs):
            raise RuntimeError("NAC cannot differentiate the logits with respect to the hooked outputs: the model "
                               "detaches them or has integer inputs with frozen parameters; make the selected "
                               "modules part of the differentiable path to the logits")
        grads = torch.autograd.grad(kl_uniform(logits).sum(), outs, allow_unused=True)
    batch = logits.shape[0]
    products = {}
    for name, out, grad in zip(names, outs, grads, strict=True):
        module = captured[name][0]
        if grad is None:
            grad = torch.zeros_like(out)
        z = pooled(out.detach().float(), module, batch, neuron_dim, mask, name)
        g = pooled(grad.float(), module, batch, neuron_dim, mask, name)
        products[name] = z * g
    return NACBatch(logits.detach().float(), products)


def logit_products(logits: Tensor) -> Tensor:
    """``z * dKL(u || softmax(z)) / dz = z * (softmax(z) - 1/C)`` for the logits ``z`` themselves, shape ``(B, C)``:
    the NAC product of the classifier's output layer (exactly what hooking the head module gives), from the logits
    alone -- no extra forward or backward."""
    logits = logits.float()
    return logits * (torch.softmax(logits, -1) - 1.0 / logits.shape[-1])


def resolve_alpha(params: LayerParams, products: Tensor) -> float:
    """The numeric alpha of ``params`` (the ``"auto"`` rule uses the finite entries of ``products``)."""
    if params.alpha != AUTO:
        return float(params.alpha)
    values = products[torch.isfinite(products)].abs().double()
    if values.numel() == 0:
        raise ValueError("alpha='auto' needs finite neuron products to calibrate on")
    scale = torch.quantile(values.flatten()[:1_000_000], params.auto_quantile).item()
    return params.auto_gain / scale if scale > 0 else 1.0


def neuron_states(products: Tensor, alpha: float) -> Tensor:
    """``sigmoid(alpha * pool(z) * pool(g))``."""
    return torch.sigmoid(alpha * products)


# ---------------------------------------------------------------------------------------------------- coverage
class NACCoverage(Metric):
    """Fixed-shape coverage histogram of one layer: ``counts (M, N)`` summed over batches and DDP ranks.

    ``update(states (B, N))`` adds each finite state to its bin; NaN/Inf states are counted in ``nonfinite`` and
    skipped. ``compute()`` returns the layer coverage ``mean_n sum_k min(c_{k,n}/O, 1) / M``.

    Args:
        num_neurons: ``N``.
        saturation: ``O``.
        edges: ``M + 1`` bin edges from 0 to 1 (:func:`bin_edges`).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, num_neurons: int, saturation: float, edges: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_neurons < 1:
            raise ValueError(f"num_neurons must be >= 1, got {num_neurons}")
        edges = torch.as_tensor(edges, dtype=torch.float64)
        if edges.dim() != 1 or edges.numel() < 3 or edges[0] != 0 or edges[-1] != 1 or (edges.diff() <= 0).any():
            raise ValueError("edges must be >= 3 increasing values from 0 to 1 (see bin_edges)")
        if not saturation >= 1:
            raise ValueError(f"saturation (O) must be >= 1, got {saturation}")
        self.num_neurons = num_neurons
        self.saturation = float(saturation)
        self.register_buffer("edges", edges.float(), persistent=False)
        self.add_state("counts", torch.zeros(edges.numel() - 1, num_neurons, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("nonfinite", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def num_bins(self) -> int:
        return self.edges.numel() - 1

    def bin_index(self, states: Tensor) -> Tensor:
        """Bin of each state (``edges[k] <= s < edges[k+1]``, last bin closed), clamped to ``[0, M-1]``."""
        return torch.bucketize(states.float().contiguous(), self.edges[1:-1].to(states.device), right=True)

    def update(self, states: Tensor) -> None:
        if states.dim() != 2 or states.shape[1] != self.num_neurons:
            raise ValueError(f"states must be (batch, {self.num_neurons}), got {tuple(states.shape)}")
        finite = torch.isfinite(states)
        self.nonfinite += (~finite).sum()
        index = self.bin_index(states.nan_to_num(0.5)) * self.num_neurons + torch.arange(
            self.num_neurons, device=states.device)
        self.counts.view(-1).index_add_(0, index[finite], torch.ones_like(index[finite], dtype=self.counts.dtype))

    def bin_scores(self) -> Tensor:
        """``t = min(counts / O, 1)``, shape ``(M, N)`` (this rank's counts; call after syncing for DDP totals)."""
        return (self.counts / self.saturation).clamp(max=1.0)

    def neuron_coverage(self) -> Tensor:
        """``sum_k t_{k,n} / M`` per neuron, shape ``(N,)``."""
        return self.bin_scores().sum(0) / self.num_bins

    def compute(self) -> Tensor:
        return self.neuron_coverage().mean().float()

    def score(self, states: Tensor) -> Tensor:
        """NAC-UE of one layer: ``mean_n t[bin(s_{b,n}), n]`` per sample, shape ``(B,)``; non-finite states score 0."""
        t = self.bin_scores().to(states.device)
        gathered = t.gather(0, self.bin_index(states.nan_to_num(0.5)))
        return torch.where(torch.isfinite(states), gathered, torch.zeros_like(gathered)).mean(1).float()


# ------------------------------------------------------------------------------------------------------ models
class NACModel:
    """NAC-UE / NAC-ME of a model over a set of layers, each with its own :class:`LayerParams`.

    Fit it on in-distribution (training) data with :meth:`fit` (or :meth:`fit_products` / :meth:`update`), then score
    new batches with :meth:`score` (higher = more in-distribution) or a loader with :meth:`score_loader`.

    Args:
        modules: ``{name: module}`` to observe (e.g. from :func:`lit_act.stats.tap.select_modules`).
        params: one :class:`LayerParams` for every layer, or ``{name: LayerParams}``.
        logits_fn: maps the model output to logits ``(B, C)`` when it is not already.
        neuron_dim: neuron dimension override (:func:`lit_act.stats.tap.neuron_view`).
        correct_only: count only correctly classified samples (NAC-ME).
        sync: sync the histograms across DDP ranks on compute/score (``False`` when every rank sees the same data).
        logits_layer: also observe the logits as a layer named :data:`LOGITS` (:func:`logit_products`; its
            parameters are ``params[LOGITS]`` when ``params`` is a mapping). NAC-UE's default layer set is every
            activation module plus the logits (see :data:`NAC_UE_PARAMS`).
        mask_fn: ``inputs -> (B, T) bool token mask | None``: pool over real tokens only (padding excluded).
    """

    def __init__(self, modules: Mapping[str, nn.Module], params: LayerParams | Mapping[str, LayerParams] = LayerParams(),
                 logits_fn: LogitsFn | None = None, neuron_dim: int | None = None, correct_only: bool = False,
                 sync: bool = True, logits_layer: bool = False,
                 mask_fn: Callable[[Any], Tensor | None] | None = None) -> None:
        if not modules and not logits_layer:
            raise ValueError("NACModel needs at least one module (or logits_layer=True)")
        if logits_layer and LOGITS in modules:
            raise ValueError(f"a selected module is named {LOGITS!r}, which is the name of the logits layer: rename "
                             "it or pass logits_layer=False")
        self.modules = dict(modules)
        self.logits_layer = logits_layer
        self.layers = [*self.modules, *([LOGITS] if logits_layer else [])]
        if isinstance(params, LayerParams):
            params = {name: params for name in self.layers}
        unknown = set(params) - set(self.layers)
        missing = set(self.layers) - set(params)
        if unknown or missing:
            raise ValueError(f"params must name exactly the modules (and the logits layer, if on) {sorted(self.layers)}; missing {sorted(missing)}, "
                             f"unknown {sorted(unknown)}")
        self.params = dict(params)
        self.logits_fn = logits_fn
        self.neuron_dim = neuron_dim
        self.correct_only = correct_only
        self.sync = sync
        self.mask_fn = mask_fn
        self.alphas: dict[str, float] = {}
        self.coverage: dict[str, NACCoverage] = {}

    def products(self, model: nn.Module, inputs: Any) -> NACBatch:
        """:func:`neuron_products` of one batch (moved to the model's device), plus the logits layer's products."""
        param = next(model.parameters(), None)
        if param is not None:
            inputs = move_data_to_device(inputs, param.device)
        if self.modules:
            mask = None if self.mask_fn is None else self.mask_fn(inputs)
            batch = neuron_products(model, inputs, self.modules, self.logits_fn, self.neuron_dim, mask)
        else:  # logits layer only: no hooks, no backward
            with evaluating(model), torch.no_grad():
                batch = NACBatch(as_logits(model(inputs), self.logits_fn).float(), {})
        if self.logits_layer:
            batch.products[LOGITS] = logit_products(batch.logits)
        return batch

    def _ensure(self, name: str, products: Tensor) -> NACCoverage:
        cov = self.coverage.get(name)
        if cov is None:
            p = self.params[name]
            self.alphas[name] = resolve_alpha(p, products)
            cov = NACCoverage(products.shape[1], p.saturation, bin_edges(p.bins, p.spacing),
                              sync_on_compute=self.sync).to(products.device)
            self.coverage[name] = cov
        return cov

    def fit_products(self, products: Mapping[str, Tensor], logits: Tensor | None = None,
                     targets: Tensor | None = None) -> None:
        """Add precomputed products (``{name: (B, N)}``) to the histograms. The first call fixes ``"auto"`` alphas,
        so pass all fitting samples at once when using them (as :meth:`fit` does)."""
        keep = None
        if self.correct_only:
            if logits is None or targets is None:
                raise ValueError("correct_only=True (NAC-ME) needs logits and targets")
            keep = logits.argmax(-1) == targets.to(logits.device)
        for name in self.layers:
            cov = self._ensure(name, products[name])
            states = neuron_states(products[name], self.alphas[name])
            cov.update(states if keep is None else states[keep])

    def update(self, model: nn.Module, inputs: Any, targets: Tensor | None = None) -> NACBatch:
        """Compute one batch's products and add them to the histograms; returns the :class:`NACBatch`."""
        batch = self.products(model, inputs)
        self.fit_products(batch.products, batch.logits, targets)
        return batch

    def fit(self, model: nn.Module, batches: Iterable[Any], max_samples: int | None = None) -> NACModel:
        """Fit on ``(inputs, targets)`` batches (a DataLoader), at most ``max_samples`` samples (the reference
        uses 1,000 training samples)."""
        products, logits, targets = collect_products(self, model, batches, max_samples)
        self.fit_products(products, logits, targets)
        return self

    def score_products(self, products: Mapping[str, Tensor]) -> Tensor:
        """NAC-UE per sample: mean over layers of the per-layer scores, shape ``(B,)``."""
        if not self.coverage:
            raise RuntimeError("NACModel is not fitted: call fit(...) on in-distribution data first")
        scores = [self.coverage[n].score(neuron_states(products[n], self.alphas[n])) for n in self.layers]
        return torch.stack(scores).mean(0)

    def score(self, model: nn.Module, inputs: Any) -> Tensor:
        """NAC-UE scores ``(B,)`` of one batch (higher = more in-distribution)."""
        return self.score_products(self.products(model, inputs).products)

    def layer_coverage(self) -> dict[str, float]:
        """``{name: layer coverage}`` (NAC-ME when ``correct_only``)."""
        return {name: float(cov.compute()) for name, cov in self.coverage.items()}

    def with_params(self, params: Mapping[str, LayerParams]) -> NACModel:
        """An unfitted copy observing ``params``' layers with those parameters."""
        return NACModel({n: self.modules[n] for n in params if n != LOGITS or not self.logits_layer}, dict(params),
                        self.logits_fn, self.neuron_dim, self.correct_only, self.sync,
                        logits_layer=self.logits_layer and LOGITS in params, mask_fn=self.mask_fn)


def collect_products(nac: NACModel, model: nn.Module, batches: Iterable[Any],
                     max_samples: int | None = None) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """Products of every layer of ``nac`` over ``(inputs, targets)`` batches, concatenated (at most ``max_samples``):
    ``({name: (S, N)}, logits (S, C), targets (S,) or None)``."""
    products: dict[str, list[Tensor]] = {n: [] for n in nac.layers}
    logits, targets = [], []
    seen = 0
    for batch in batches:
        inputs = inputs_of(batch)
        labels = batch[1] if isinstance(batch, list | tuple) and len(batch) >= 2 else None
        out = nac.products(model, inputs)
        for name, value in out.products.items():
            products[name].append(value)
        logits.append(out.logits)
        if labels is not None:
            targets.append(labels.to(out.logits.device))
        seen += out.logits.shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    if not logits:
        raise ValueError("no batches to compute NAC products on")
    cut = slice(0, max_samples)
    return ({n: torch.cat(v)[cut] for n, v in products.items()}, torch.cat(logits)[cut],
            torch.cat(targets)[cut] if targets else None)


def nac_me(model: nn.Module, batches: Iterable[Any], modules: Mapping[str, nn.Module],
           params: LayerParams | None = None, logits_fn: LogitsFn | None = None,
           max_samples: int | None = NAC_ME_PROBE_SAMPLES, neuron_dim: int | None = None) -> dict[str, float]:
    """NAC-ME of a fixed model: layer coverage over the correctly classified samples among the first ``max_samples``
    of ``(inputs, targets)`` batches (a fixed probe of training data), model in eval mode; ``{name: coverage}`` plus
    ``"mean"``. ``params=None`` uses :func:`nac_me_params` for the probe's actual size; ``"auto"`` alphas are
    calibrated on all probe samples of each layer.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
        >>> me = nac_me(model, [(x, y)], {"1": model[1]})
        >>> 0 <= me["mean"] <= 1
        True
    """
    nac = NACModel(modules, params or NAC_ME_PROBE_PARAMS, logits_fn, neuron_dim, correct_only=True, sync=False)
    products, logits, targets = collect_products(nac, model, batches, max_samples)
    if params is None:
        nac = nac.with_params({n: nac_me_params(logits.shape[0]) for n in nac.layers})
    nac.fit_products(products, logits, targets)
    out = nac.layer_coverage()
    out["mean"] = sum(out.values()) / len(out)
    return out
