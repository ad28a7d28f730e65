"""Automatic parameter search for NAC-UE (the reference's ``APS_mode``, BierOne/ood_coverage: a sweep over
``O``, ``M`` and ``sig_alpha`` per layer scored by AUROC on validation ID vs OOD data).

:func:`search_parameters`:

1. computes the neuron products ``pool(z) * pool(g)`` once for ``fit_samples`` training samples, the in-distribution
   validation data and the OOD proxy (bounded by those sizes, never stored across training steps);
2. per layer, scores every candidate ``(alpha, O, M)`` -- the full grid (``strategy="grid"``) or ``num_trials``
   random draws from it (``strategy="random"``, seeded) -- by the validation AUROC of that layer alone, and keeps
   the best;
3. chooses the layer set: every non-empty subset of the candidate layers (the ``max_layers`` best ones when there
   are more) is scored with each layer's best parameters, and the best subset wins (ties: fewer layers).

The OOD proxy is the user's ``ood_loader`` or, when none is given, built from the validation data (``proxy``):
``"shuffled"`` -- :func:`lit_act.data.ood.shuffled_proxy` of the validation inputs (every sample's entries randomly
permuted within the sample: same value histogram, no structure; a far-OOD stand-in); ``"mixture"`` --
:func:`lit_act.data.ood.mixture_proxy` (convex mixtures of two validation inputs of different classes; a near-OOD
stand-in); ``"both"`` (default) -- their union, whose AUROC is the mean of the two. The shuffled proxy alone favours
settings that lose on near-OOD: on the reference digits MLP (classes 0-7) the search's near-OOD AUROC (held-out 8-9
and letters) is 0.660 with it and 0.952 with ``"both"`` and ``logits_layer=True`` (far-OOD 0.914 -> 0.948).
With ``logits_layer=True`` the logits are a candidate layer too (:data:`lit_act.stats.nac.LOGITS`).
Everything is deterministic given ``seed`` (ties broken by candidate order).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lit_act.data.ood import mixture_proxy, shuffled_proxy
from lit_act.stats.nac import AUTO, LayerParams, LogitsFn, NACModel, collect_products
from lit_act.stats.ood import auroc, inputs_of

DEFAULT_ALPHAS: tuple[float | str, ...] = (AUTO, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
DEFAULT_SATURATIONS: tuple[float, ...] = (5.0, 20.0, 50.0, 200.0)
DEFAULT_BINS: tuple[int, ...] = (20, 50, 200)
PROXIES = ("shuffled", "mixture", "both")


@dataclass
class SearchResult:
    """Outcome of :func:`search_parameters`: the chosen ``params`` per chosen layer, their validation AUROC, and
    every scored ``(layer, LayerParams, auroc)`` trial and ``(layers, auroc)`` subset."""

    params: dict[str, LayerParams]
    val_auroc: float
    trials: list[tuple[str, LayerParams, float]] = field(default_factory=list)
    subsets: list[tuple[tuple[str, ...], float]] = field(default_factory=list)

    def flat(self, prefix: str = "search/nac") -> dict[str, float]:
        """Loggable scalars: ``{prefix}/val_auroc``, ``{prefix}/num_layers`` and per chosen layer
        ``{prefix}/{alpha,saturation,bins}/{layer}`` (an ``"auto"`` alpha is logged as ``-1``)."""
        out = {f"{prefix}/val_auroc": self.val_auroc, f"{prefix}/num_layers": float(len(self.params))}
        for name, p in self.params.items():
            out[f"{prefix}/alpha/{name}"] = -1.0 if p.alpha == AUTO else float(p.alpha)
            out[f"{prefix}/saturation/{name}"] = float(p.saturation)
            out[f"{prefix}/bins/{name}"] = float(p.bins)
        return out

    def describe(self) -> str:
        layers = "; ".join(f"{n}: {({k: v for k, v in asdict(p).items() if not k.startswith('auto')})}"
                           for n, p in self.params.items())
        return f"NAC-UE search: validation AUROC {self.val_auroc:.4f} with {layers}"


def _candidates(alphas: Sequence[float | str], saturations: Sequence[float], bins: Sequence[int], spacing: str,
                strategy: str, num_trials: int | None, generator: torch.Generator,
                base: LayerParams) -> list[LayerParams]:
    grid = [LayerParams(alpha=a, saturation=o, bins=m, spacing=spacing, auto_gain=base.auto_gain,
                        auto_quantile=base.auto_quantile) for a, o, m in itertools.product(alphas, saturations, bins)]
    if strategy == "grid":
        return grid
    order = torch.randperm(len(grid), generator=generator)[:num_trials].tolist()
    return [grid[i] for i in sorted(order)]


def search_parameters(model: nn.Module, train_loader: Iterable[Any], val_loader: Iterable[Any],
                      modules: Mapping[str, nn.Module], ood_loader: Iterable[Any] | None = None, *,
                      alphas: Sequence[float | str] = DEFAULT_ALPHAS,
                      saturations: Sequence[float] = DEFAULT_SATURATIONS, bins: Sequence[int] = DEFAULT_BINS,
                      spacing: str = "symlog", strategy: str = "grid", num_trials: int | None = None,
                      search_layers: bool = True, max_layers: int = 6, fit_samples: int = 1000,
                      val_samples: int = 1000, seed: int = 0, logits_fn: LogitsFn | None = None,
                      neuron_dim: int | None = None, base: LayerParams | None = None,
                      logits_layer: bool = False, proxy: str = "both",
                      mask_fn: Callable[[Any], Tensor | None] | None = None) -> SearchResult:
    """Search NAC-UE parameters (see the module docstring).

    Args:
        model: the trained classifier.
        train_loader: ``(inputs, targets)`` in-distribution batches the coverage is fitted on (first ``fit_samples``).
        val_loader: in-distribution validation batches (first ``val_samples``), the positives of the AUROC.
        modules: candidate layers ``{name: module}`` (e.g. :func:`lit_act.stats.tap.select_modules`).
        ood_loader: the OOD proxy batches; ``None``: shuffled + class-mixture proxies of the validation data.
        alphas, saturations, bins: candidate values (``"auto"`` allowed among alphas); spacing: bin spacing.
        strategy: ``"grid"`` (all combinations) or ``"random"`` (``num_trials`` seeded draws from the grid).
        search_layers: also choose the layer subset (else use every layer in ``modules``).
        max_layers: at most this many best layers enter the subset search (``2**max_layers - 1`` subsets).
        seed: seeds the proxy and the random draws; the result is a function of the data, model and seed.
        base: source of ``auto_gain`` / ``auto_quantile`` for ``"auto"`` alphas (default :class:`LayerParams`).
        proxy: the built-in proxy when ``ood_loader`` is ``None``: ``"both"`` (shuffled + class mixtures; the
            mixtures need labelled validation batches, else only the shuffled proxy is used), ``"shuffled"`` or
            ``"mixture"``.
        logits_layer: also consider the logits as a layer (named :data:`~lit_act.stats.nac.LOGITS` in the result;
            build the scorer with ``NACModel(..., logits_layer=LOGITS in result.params)``).
        mask_fn: ``inputs -> (B, T) bool token mask | None`` (:class:`~lit_act.stats.nac.NACModel`): padding is left
            out of the pooling, as in the final scorer.
    """
    if proxy not in PROXIES:
        raise ValueError(f"unknown proxy {proxy!r}; valid: {', '.join(PROXIES)}")
    if strategy not in ("grid", "random"):
        raise ValueError(f"strategy must be 'grid' or 'random', got {strategy!r}")
    if strategy == "random" and (not isinstance(num_trials, int) or num_trials < 1):
        raise ValueError(f"strategy='random' needs num_trials >= 1, got {num_trials!r}")
    if not alphas or not saturations or not bins:
        raise ValueError("alphas, saturations and bins must each hold at least one candidate")
    if max_layers < 1 or fit_samples < 1 or val_samples < 1:
        raise ValueError("max_layers, fit_samples and val_samples must be >= 1")
    base = base or LayerParams()
    generator = torch.Generator().manual_seed(seed)
    probe = NACModel(modules, base, logits_fn, neuron_dim, sync=False, logits_layer=logits_layer, mask_fn=mask_fn)
    fit, _, _ = collect_products(probe, model, train_loader, fit_samples)
    val, _, val_labels = collect_products(probe, model, val_loader, val_samples)
    proxies = 1
    if ood_loader is None:
        val_inputs = torch.cat([inputs_of(b) for b in val_loader])[:val_samples]
        ood_loader = [(shuffled_proxy(val_inputs, seed),)] if proxy != "mixture" else []
        if proxy == "mixture" and val_labels is None:
            raise ValueError("proxy='mixture' needs (inputs, labels) validation batches")
        if proxy != "shuffled" and val_labels is not None and val_labels.unique().numel() > 1:
            ood_loader.append((mixture_proxy(val_inputs, val_labels.to(val_inputs.device), seed),))
            proxies = len(ood_loader)
    ood, _, _ = collect_products(probe, model, ood_loader, val_samples * proxies)

    def layer_scores(params: Mapping[str, LayerParams]) -> tuple[Tensor, Tensor]:
        nac = probe.with_params(params)
        nac.fit_products({n: fit[n] for n in params})
        return nac.score_products(val), nac.score_products(ood)

    candidates = _candidates(alphas, saturations, bins, spacing, strategy, num_trials, generator, base)
    trials: list[tuple[str, LayerParams, float]] = []
    best: dict[str, tuple[LayerParams, float, Tensor, Tensor]] = {}
    for name in probe.layers:
        for params in candidates:
            s_in, s_out = layer_scores({name: params})
            score = auroc(s_in, s_out)
            trials.append((name, params, score))
            if name not in best or score > best[name][1]:
                best[name] = (params, score, s_in, s_out)
    names = sorted(best, key=lambda n: -best[n][1])[:max_layers] if search_layers else list(probe.layers)
    subsets: list[tuple[tuple[str, ...], float]] = []
    sizes = range(1, len(names) + 1) if search_layers else [len(names)]
    for size in sizes:
        for subset in itertools.combinations(names, size):
            s_in = torch.stack([best[n][2] for n in subset]).mean(0)
            s_out = torch.stack([best[n][3] for n in subset]).mean(0)
            subsets.append((subset, auroc(s_in, s_out)))
    chosen, score = max(subsets, key=lambda item: (item[1], -len(item[0])))
    ordered = [n for n in probe.layers if n in chosen]
    return SearchResult({n: best[n][0] for n in ordered}, score, trials, subsets)
