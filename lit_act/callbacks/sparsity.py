"""ActivationSparsity: exact-zero / thresholded sparsity, per-token activation ratios and Sparsing-Law CETT
sparsity of the neuron activations feeding each MLP's down-projection (or of any selected module)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lit_act.batch import BatchAdapter
from lit_act.callbacks.base import DEFAULT_PROBE_SAMPLES, ActivationStatisticCallback
from lit_act.callbacks.core import leading_batches, probe_batches, stage_loader
from lit_act.selection import default_preset, down_projection, linear_features, linear_weight
from lit_act.stats.sparsing_law import CETTSparsityMetric, calibrate_thresholds, find_down_projection
from lit_act.stats.sparsity import ActivationSparsityMetric
from lit_act.stats.tap import ModuleSelector, neuron_view, site_of, tap, valid_tokens
from lit_act.utils import validate as v

DEFAULT_CETT_CALIBRATION_TOKENS = 512
DEFAULT_CETT_MEASURE_TOKENS = 128


class _Projection(NamedTuple):
    """``W_out`` in ``nn.Linear`` layout ``(out, in)`` and its bias, for :func:`calibrate_thresholds`."""

    weight: Tensor
    bias: Tensor | None


class ActivationSparsity(ActivationStatisticCallback):
    """Activation sparsity (Li et al. 2023) and Sparsing-Law CETT sparsity (Luo et al. 2024) of every selected site.

    **Default selection** (:func:`lit_act.selection.default_preset`): on transformer-like models the ``"mlp_hidden"``
    preset, the neuron activations that feed each MLP's down-projection (GPT-2's / BERT's activation output; for gated
    MLPs such as LLaMA's ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` the *input of* ``down_proj``, which is what
    Sparsing Law's CETT measures); on other models every activation-function module (``"activations"``).

    Statistics (:mod:`lit_act.stats.sparsity`, :mod:`lit_act.stats.sparsing_law`) on ``(samples, neurons)`` views
    (:func:`lit_act.stats.tap.neuron_view`: tokens x last dim, conv maps: positions x channels; padding excluded),
    accumulated over one observed training batch, or over a whole validation/test epoch.

    **Which entries are active** (``mode``, ``threshold``; one definition shared with :class:`DeadNeurons`):

    =====================  ===================================  ===============================================
    activation family      default here: ``mode="abs"``, 0     what it measures / alternative
    =====================  ===================================  ===============================================
    ReLU, ReLU^2, hard     exact zeros (Lazy Neuron, Li et al.) ``"signed"`` agrees at threshold 0
    GELU, SiLU, smooth     ~0 (exact zeros are rare)            ``mode="signed"``: the negative lobe as "not
                                                                firing"; ``"abs"`` with ``threshold > 0``:
                                                                magnitude sparsity; CETT: the paper's criterion
    gated (SwiGLU, GeGLU)  ``|act(gate) * up| <= threshold``    ``"abs"`` is the meaningful mode (signed product)
    =====================  ===================================  ===============================================

    Logged keys (``{stage}`` = ``train`` / ``val`` / ``test`` / ``probe``; ``{module}`` = name in ``named_modules()``;
    every key except ``nonfinite`` also as ``{stage}/<statistic>/mean``, the mean over modules, NaN layers left out):

    * ``{stage}/sparsity/{module}``: fraction of inactive entries;
    * ``{stage}/token_activation_ratio/{module}``: mean over tokens of the fraction of active neurons;
    * ``{stage}/token_activation_ratio_min/{module}``, ``..._max/{module}``: its minimum / maximum over tokens;
    * ``{stage}/sparsity/{module}/nonfinite``: NaN/Inf entries seen (excluded from every statistic);
    * with ``cett_target`` (validation/test epochs, sites with a down-projection ``W_out``, found by
      :func:`lit_act.selection.down_projection`, GPT-2's ``Conv1D`` included):
      ``{stage}/cett_threshold/{module}`` (the layer's exact CETT threshold ``eps``),
      ``{stage}/cett_activation_ratio/{module}`` (fraction of neuron outputs ``|a_i| ||W_out[:, i]||`` at or above
      ``eps`` over every real token of the epoch; CETT sparsity is ``1 -`` it) and ``{stage}/cett/{module}`` (the
      achieved token-mean CETT, measured on at most ``cett_measure_tokens`` tokens per batch).

    **CETT procedure** (the reference's calibrate-then-apply, ``calc_threshold_for_each_layer.py``): at the start of
    every validation/test epoch the thresholds are calibrated once, exactly
    (:func:`~lit_act.stats.sparsing_law.calibrate_thresholds`), on a fixed calibration set: the first
    ``cett_max_tokens`` real tokens per layer of that stage's dataset in dataset order (the same samples on every DDP
    rank, hence the same thresholds; the training split's probe set when the stage's loader is not a map-style
    DataLoader), in a quiet eval pass no other callback observes. Every batch of the epoch then only counts
    ``n_i >= eps``. The thresholds are not metric states: a restored run recalibrates at its next epoch start.

    Figure at train end: ``figures/sparsity_per_layer.png`` (training sparsity per module vs step).

    Args:
        modules: selector (:func:`lit_act.selection.select_sites`; default :func:`~lit_act.selection.default_preset`).
        threshold: activity threshold (default 0).
        mode: ``"abs"`` (default: inactive iff ``|a| <= threshold``) or ``"signed"`` (inactive iff
            ``a <= threshold``); see the table above.
        every_n_steps: observe one training batch every ``every_n_steps`` steps (``None``: never).
        on_validation, on_test: observe whole validation / test epochs.
        cett_target: CETT target in (0, 1) for the Sparsing-Law statistics (``None``: off).
        cett_max_tokens: real tokens per layer in the calibration set (``None``: the whole stage dataset).
        cett_measure_tokens: tokens per batch on which the achieved CETT is measured (evenly strided; ``None``: all).
        down_projections: ``{site name: down-projection name}`` where it is not found automatically.
        neuron_dim: override the neuron dimension of :func:`~lit_act.stats.tap.neuron_view`.
        figures: save the per-layer heatmap at train end.
        probe, probe_samples: probe-pass schedule (``None``, ``"epoch"`` or every n steps; keys ``probe/...``)
            and probe-set size (:class:`~lit_act.callbacks.base.ActivationStatisticCallback`).
        adapter: batch adapter (:class:`lit_act.batch.BatchAdapter`); its token mask (default
            ``batch["attention_mask"]``) excludes padding from every statistic, CETT calibration included.

    Example::

        Trainer(callbacks=[ActivationSparsity(cett_target=0.2)]).fit(lightning_module_wrapping_llama, data)
        # logs val/sparsity/model.model.layers.0.mlp.down_proj, val/cett_activation_ratio/..., ...
    """

    statistic = "sparsity"
    history_statistic = "sparsity"

    def __init__(self, modules: ModuleSelector = None, threshold: float = 0.0, mode: str = "abs",
                 every_n_steps: int | None = 50,
                 on_validation: bool = True, on_test: bool = False, cett_target: float | None = 0.2,
                 cett_max_tokens: int | None = DEFAULT_CETT_CALIBRATION_TOKENS,
                 cett_measure_tokens: int | None = DEFAULT_CETT_MEASURE_TOKENS,
                 down_projections: Mapping[str, str] | None = None,
                 neuron_dim: int | None = None, figures: bool = True, probe: str | int | None = None,
                 probe_samples: int = DEFAULT_PROBE_SAMPLES, adapter: BatchAdapter | None = None) -> None:
        threshold = v.finite_float("threshold", threshold)  # mode="signed" allows < 0; the metric checks "abs"
        cett_target = v.optional(v.finite_float, "cett_target", cett_target, low=0.0, high=1.0, low_open=True,
                                 high_open=True)
        cett_max_tokens = v.optional(v.positive_int, "cett_max_tokens", cett_max_tokens)
        cett_measure_tokens = v.optional(v.positive_int, "cett_measure_tokens", cett_measure_tokens)
        down_projections = v.optional(v.mapping, "down_projections", down_projections)
        neuron_dim = v.optional(v.integer, "neuron_dim", neuron_dim)
        super().__init__(modules, every_n_steps, on_validation, on_test, figures, probe, probe_samples, adapter)
        ActivationSparsityMetric(threshold, mode)  # validates threshold and mode
        if cett_target is not None:
            CETTSparsityMetric(cett_target, cett_max_tokens)  # validates the arguments
            CETTSparsityMetric(cett_target, cett_measure_tokens)
        elif down_projections:
            raise ValueError("down_projections is only used with cett_target; set cett_target (e.g. 0.2)")
        self.threshold = threshold
        self.mode = mode
        self.cett_target = cett_target
        self.cett_max_tokens = cett_max_tokens
        self.cett_measure_tokens = cett_measure_tokens
        self.cett_thresholds: dict[str, Tensor] = {}  # calibrated at each validation/test epoch start
        self.down_projection_names = dict(down_projections or {})
        self.neuron_dim = neuron_dim
        self.down_projections: dict[str, nn.Module] = {}  # selected name -> linear-like down-projection

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=repr(self.modules), every_n_steps=self.every_n_steps,
                                        threshold=self.threshold, mode=self.mode)

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
                                 f"{linear_features(down)[0]} inputs; pass down_projections= or cett_target=None")
            metrics["cett"] = CETTSparsityMetric(self.cett_target, self.cett_measure_tokens,
                                                 threshold=self.cett_thresholds.get(name))
        return metrics

    def update(self, metrics: dict[str, Metric], stage: str, name: str, module: nn.Module, x: Tensor) -> None:
        a = neuron_view(self.tokens(name, x), module, self.neuron_dim)
        metrics["sparsity"].update(a)
        if "cett" in metrics:
            down = self.down_projections[name]
            metrics["cett"].update(a, linear_weight(down), down.bias)

    # ------------------------------------------------------------------------------------------ CETT calibration
    @override
    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_epoch_start(trainer, pl_module)
        if self._collecting == "val":
            self.calibrate(trainer, pl_module, "val")

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_test_epoch_start(trainer, pl_module)
        if self._collecting == "test":
            self.calibrate(trainer, pl_module, "test")

    def calibration_batches(self, trainer: Trainer, stage: str, device: torch.device) -> Any:
        """The calibration set: ``stage``'s dataset from sample 0 (:func:`lit_act.callbacks.core.leading_batches`),
        else the training split's probe set."""
        batches = leading_batches(stage_loader(trainer, stage), device)
        if batches is None:
            samples = self.cett_max_tokens or self.probe_samples
            batches = probe_batches(trainer, samples, device)
        return batches

    def calibrate(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> dict[str, Tensor]:
        """Exact CETT thresholds of every layer with a down-projection on the calibration set (a quiet eval pass),
        set on ``stage``'s metrics; returns them (also in :attr:`cett_thresholds`)."""
        if not self.down_projections:
            return {}
        sites = {name: self.selected[name] for name in self.down_projections}
        limit = self.cett_max_tokens
        rows: dict[str, list[Tensor]] = {name: [] for name in sites}
        seen = dict.fromkeys(sites, 0)
        mask: list[Tensor | None] = [None]

        def keep(name: str, module: nn.Module, x: Tensor) -> None:
            if limit is not None and seen[name] >= limit:
                return
            a = neuron_view(valid_tokens(name, x, mask[0]), module, self.neuron_dim).detach().float()
            a = a[a.isfinite().all(dim=1)]
            if limit is not None:
                a = a[: limit - seen[name]]
            rows[name].append(a)
            seen[name] += a.shape[0]

        with self.quiet_pass(pl_module), torch.no_grad(), tap(sites, keep):
            for batch in self.calibration_batches(trainer, stage, pl_module.device):
                mask[0] = self.adapter.mask(batch)
                self.adapter.forward(pl_module, batch)
                if limit is not None and min(seen.values()) >= limit:
                    break
        calibration = {name: torch.cat(r) for name, r in rows.items() if r}
        projections = {name: _Projection(linear_weight(d).detach(), None if d.bias is None else d.bias.detach())
                       for name, d in self.down_projections.items()}
        self.cett_thresholds = calibrate_thresholds(calibration, projections, self.cett_target)
        for name, metrics in self.metrics.get(stage, {}).items():
            if "cett" in metrics:
                metrics["cett"].set_threshold(self.cett_thresholds.get(name))
        return self.cett_thresholds
