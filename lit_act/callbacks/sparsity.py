"""ActivationSparsity: exact-zero / thresholded sparsity, per-token activation ratios and Sparsing-Law CETT
sparsity of activation modules."""

from __future__ import annotations

from collections.abc import Mapping

from lightning import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import Metric

from lit_act.batch import BatchAdapter
from lit_act.callbacks.base import DEFAULT_PROBE_SAMPLES, ActivationStatisticCallback
from lit_act.selection import default_preset, down_projection, linear_features, linear_weight
from lit_act.stats.sparsing_law import CETTSparsityMetric, find_down_projection
from lit_act.stats.sparsity import ActivationSparsityMetric
from lit_act.stats.tap import ModuleSelector, neuron_view, site_of


class ActivationSparsity(ActivationStatisticCallback):
    """Activation sparsity of every selected module (default: every activation-function module).

    Statistics (:mod:`lit_act.stats.sparsity`, Li et al. 2023; :mod:`lit_act.stats.sparsing_law`, Luo et al. 2024) on
    ``(samples, neurons)`` views (:func:`lit_act.stats.tap.neuron_view`: tokens x last dim, conv maps: positions x
    channels), accumulated over one observed training batch, or over a whole validation/test epoch.

    Logged keys (``{stage}`` = ``train`` / ``val`` / ``test``; ``{module}`` = name in ``named_modules()``; every key
    except ``nonfinite`` also as ``{stage}/<statistic>/mean``, the mean over modules):

    * ``{stage}/sparsity/{module}``: fraction of entries with ``|a| <= threshold``;
    * ``{stage}/token_activation_ratio/{module}``: mean over tokens of the fraction of neurons with ``|a| > threshold``;
    * ``{stage}/token_activation_ratio_min/{module}``, ``..._max/{module}``: its minimum / maximum over tokens;
    * ``{stage}/sparsity/{module}/nonfinite``: NaN/Inf entries seen (excluded from every statistic);
    * with ``cett_target`` (validation/test only, modules with a down-projection):
      ``{stage}/cett_activation_ratio/{module}`` (fraction of neuron outputs ``|a_i| ||W_out[:, i]||`` at or above the
      layer's CETT threshold; sparsity is ``1 -`` it), ``{stage}/cett_threshold/{module}`` and the achieved mean
      ``{stage}/cett/{module}`` (batch means).

    Figure at train end: ``figures/sparsity_per_layer.png`` (training sparsity per module vs step).

    Args:
        modules: module selector (default: every activation module).
        threshold: ``|a| <= threshold`` counts as inactive (default 0: exact zeros).
        every_n_steps: observe one training batch every ``every_n_steps`` steps (``None``: never).
        on_validation, on_test: observe whole validation / test epochs.
        cett_target: CETT target in (0, 1) for the Sparsing-Law statistics (``None``: off). Calibration costs 16
            down-projection matmuls per layer and batch, so it runs at validation/test only.
        cett_max_tokens: calibrate each batch on at most this many tokens (evenly strided; ``None``: all).
        down_projections: ``{activation name: down-projection Linear name}`` where it is not the ``nn.Linear``
            registered right after the activation in its parent (``fc_in -> act -> fc_out``).
        neuron_dim: override the neuron dimension of :func:`~lit_act.stats.tap.neuron_view`.
        figures: save the per-layer heatmap at train end.
        probe, probe_samples: probe-pass schedule (``None``, ``"epoch"`` or every n steps; keys ``probe/...``)
            and probe-set size (:class:`~lit_act.callbacks.base.ActivationStatisticCallback`).
        adapter: batch adapter (:class:`lit_act.batch.BatchAdapter`); its token mask (default
            ``batch["attention_mask"]``) excludes padding from every statistic.
    """

    statistic = "sparsity"
    history_statistic = "sparsity"

    def __init__(self, modules: ModuleSelector = None, threshold: float = 0.0, mode: str = "abs",
                 every_n_steps: int | None = 50,
                 on_validation: bool = True, on_test: bool = False, cett_target: float | None = 0.2,
                 cett_max_tokens: int | None = 512, down_projections: Mapping[str, str] | None = None,
                 neuron_dim: int | None = None, figures: bool = True, probe: str | int | None = None,
                 probe_samples: int = DEFAULT_PROBE_SAMPLES, adapter: BatchAdapter | None = None) -> None:
        super().__init__(modules, every_n_steps, on_validation, on_test, figures, probe, probe_samples, adapter)
        ActivationSparsityMetric(threshold, mode)  # validates threshold and mode
        if cett_target is not None:
            CETTSparsityMetric(cett_target, cett_max_tokens)  # validates the arguments
        elif down_projections:
            raise ValueError("down_projections is only used with cett_target; set cett_target (e.g. 0.2)")
        self.threshold = threshold
        self.mode = mode
        self.cett_target = cett_target
        self.cett_max_tokens = cett_max_tokens
        self.down_projection_names = dict(down_projections or {})
        self.neuron_dim = neuron_dim
        self.down_projections: dict[str, nn.Module] = {}  # selected name -> linear-like down-projection

    def check_setup(self, pl_module: LightningModule) -> None:
        """Resolve down-projections: explicit names must exist and be linear-like; others are found automatically
        (:func:`lit_act.selection.down_projection` for ``mlp_hidden`` sites, else the ``nn.Linear`` after the
        activation, :func:`lit_act.stats.sparsing_law.find_down_projection`)."""
        unknown = set(self.down_projection_names) - set(self.selected)
        if unknown:
            raise ValueError(f"down_projections names {sorted(unknown)} are not among the selected modules "
                             f"{list(self.selected)}")
        self.down_projections = {}
        if self.cett_target is None:
            return
        for name, site in self.selected.items():
            if name in self.down_projection_names:
                linear = pl_module.get_submodule(self.down_projection_names[name])
                if linear_features(linear) is None:
                    raise ValueError(f"down_projections[{name!r}] names a {type(linear).__name__}, not a linear "
                                     "layer (nn.Linear or transformers' Conv1D)")
                self.down_projections[name] = linear
                continue
            try:
                self.down_projections[name] = down_projection(pl_module, name)
            except ValueError:
                if site_of(site)[1] != "output":
                    continue
                try:
                    self.down_projections[name] = find_down_projection(pl_module, name)
                except ValueError:
                    continue
        missing = [n for n in self.selected if n not in self.down_projections]
        if missing:
            rank_zero_info(f"ActivationSparsity: no down-projection for {missing}; CETT statistics skip them "
                           "(pass down_projections= to include them)")

    def default_selection(self, pl_module: LightningModule) -> str:
        """:func:`lit_act.selection.default_preset`: ``"mlp_hidden"`` on transformer-like models (the tensor entering
        each MLP's down-projection), ``"activations"`` otherwise."""
        return default_preset(pl_module)

    def make_metrics(self, stage: str, name: str, module: nn.Module, x: Tensor) -> dict[str, Metric]:
        metrics: dict[str, Metric] = {"sparsity": ActivationSparsityMetric(self.threshold, self.mode)}
        if stage not in ("train", "probe") and name in self.down_projections:
            down = self.down_projections[name]
            neurons = neuron_view(x, module, self.neuron_dim).shape[1]
            if neurons != linear_features(down)[0]:
                raise ValueError(f"{name!r} has {neurons} neurons but its down-projection expects "
                                 f"{down.in_features} inputs; pass down_projections= or cett_target=None")
            metrics["cett"] = CETTSparsityMetric(self.cett_target, self.cett_max_tokens)
        return metrics

    def update(self, metrics: dict[str, Metric], stage: str, name: str, module: nn.Module, x: Tensor) -> None:
        a = neuron_view(self.tokens(name, x), module, self.neuron_dim)
        metrics["sparsity"].update(a)
        if "cett" in metrics:
            down = self.down_projections[name]
            metrics["cett"].update(a, linear_weight(down), down.bias)
