"""NeuronActivationCoverage: NAC-ME during training and an end-of-run NAC-UE OOD evaluation (with parameter search)
next to the MSP and energy baselines. The math lives in :mod:`lit_act.stats.nac`, :mod:`lit_act.stats.nac_search` and
:mod:`lit_act.stats.ood`."""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lit_act.batch import BatchAdapter
from lit_act.callbacks.base import PROBE_EPOCH, probe_due, validate_probe
from lit_act.callbacks.core import (
    LitActCallback,
    assign_states,
    batch_length,
    leading_batches,
    metric_key,
    probe_batches,
    rank,
    reduced_states,
    training_loader,
)
from lit_act.selection import select_sites
from lit_act.stats.nac import (
    BIN_SPACINGS,
    LOGITS,
    NAC_ME_PARAMS,
    NAC_ME_PROBE_PARAMS,
    NAC_ME_PROBE_SAMPLES,
    NAC_UE_PARAMS,
    LayerParams,
    LogitsFn,
    NACModel,
    nac_me_params,
)
from lit_act.stats.nac_search import SearchResult, search_parameters
from lit_act.stats.ood import auroc, logits_scorer, score_batches
from lit_act.stats.tap import ModuleSelector, require_uncompiled
from lit_act.utils import validate as v
from lit_act.utils.schedule import due, is_real_run, planned_steps, validate_every_n

OODSets = Mapping[str, Dataset | DataLoader] | Callable[[LightningDataModule], Mapping[str, Dataset | DataLoader]]
EVALUATE_ON = (None, "test", "fit")
_SEARCH_ARGS = set(inspect.signature(search_parameters).parameters) - {
    "model", "train_loader", "val_loader", "modules", "ood_loader", "logits_fn", "neuron_dim", "base", "logits_layer",
    "mask_fn"}


class AdaptedModel(nn.Module):
    """``batch -> logits`` view of a LightningModule through a :class:`~lit_act.batch.BatchAdapter`, so NAC's passes
    (:mod:`lit_act.stats.nac`, :mod:`lit_act.stats.ood`) run on any model and batch format."""

    def __init__(self, module: nn.Module, adapter: BatchAdapter, logits_fn: LogitsFn | None) -> None:
        super().__init__()
        self.module = module
        self.adapter = adapter
        self.logits_fn = logits_fn

    def forward(self, batch: Any) -> Tensor:
        out = self.adapter.forward(self.module, batch)
        logits = self.logits_fn(out) if self.logits_fn is not None else self.adapter.logits(out)
        if logits is None:
            raise TypeError(f"the model output ({type(out).__name__}) has no logits: pass "
                            "adapter=BatchAdapter(logits_fn=...) or logits_fn=")
        return logits


class NeuronActivationCoverage(LitActCallback):
    """Neuron Activation Coverage (Liu et al., ICLR 2024; :mod:`lit_act.stats.nac` has the formulas and the deviations
    from BierOne/ood_coverage) of the selected modules (default: every activation-function module).

    **NAC-ME on probe passes** (default; the paper's model evaluation over correctly classified training samples).
    At every training epoch end (``probe="epoch"``, or every ``n`` steps with ``probe=n``) the current model is
    evaluated on the first ``probe_samples`` training samples in dataset order (the same samples on every DDP rank, so
    every rank computes the same number without a sync): a separate forward/backward per batch in eval mode (no
    ``.grad``, optimizer or BN statistics touched; flags and RNG restored; no other callback observes it), and the
    states ``sigmoid(alpha * pool(z) * pool(dKL/dz))`` of the correctly classified samples fill per-module coverage
    histograms with the probe rule :func:`~lit_act.stats.nac.nac_me_params` for the probe's actual size (as
    :func:`~lit_act.stats.nac.nac_me`: ``alpha="auto"`` calibrated on all probe samples, 100 linear bins, saturation
    ``O = 2 x samples / bins``), logged as ``probe/nac_me/...``.

    **NAC-ME running mode** (``every_n_steps`` set): the paper's setting (:data:`~lit_act.stats.nac.NAC_ME_PARAMS`) on
    every ``every_n_steps``-th training batch, while the weights move; the histograms (fixed shape, summed over DDP
    ranks) are logged as ``train/nac_me/...`` and reset at each training epoch end.

    **Any model.** Batches are run through the :class:`~lit_act.batch.BatchAdapter` (``adapter=``: default
    ``module(**batch)`` for dicts / ``BatchEncoding``, ``module(batch[0])`` for tuples), logits are read from the
    output (``.logits``, a Tensor, the first tuple element), targets from ``batch["labels"]`` / ``batch[1]``, and
    padding (``batch["attention_mask"]``) is excluded from the pooling. A dry run on the first training batch at train
    start raises with the fix when the logits, the targets (NAC-ME) or the gradient path are missing.

    **NAC-UE OOD evaluation** at the end of ``trainer.test`` (``evaluate_on="test"``) or of ``trainer.fit``
    (``"fit"``), on the trainer's datamodule: optionally :func:`~lit_act.stats.nac_search.search_parameters` (fit on
    the train split, scored on the val split against ``search_ood`` or the built-in shuffled + class-mixture proxies),
    then NAC-UE (defaults :data:`~lit_act.stats.nac.NAC_UE_PARAMS` on every selected module plus the logits as a
    layer, ``logits_layer=True``) is fitted on ``fit_samples`` training samples and its AUROC -- and those of MSP and energy on the same model -- is
    measured on the test split against each OOD set of ``ood_sets``. Every rank computes the same numbers (no DDP
    sharding of this offline pass); rank zero logs them and saves ``figures/nac_ood_auroc.png`` (table).

    Logged keys (``{module}`` as in ``named_modules()``):

    * ``probe/nac_me/{module}``, ``probe/nac_me/mean``: NAC-ME coverage of the probe set's correct samples
      (``train/nac_me/...`` in running mode);
    * ``{probe,train}/nac_me/{module}/nonfinite``: NaN/Inf states excluded from the histograms;
    * ``test/{method}/auroc/{ood_set}`` and ``test/{method}/auroc/mean`` for ``method`` in ``nac``, ``msp``,
      ``energy``: in-distribution test split vs each OOD set (in-distribution = positive; 0.5 = chance);
    * ``test/nac/coverage/{module}``: NAC-UE coverage of the fitted (training) histograms;
    * with ``search=True``: ``search/nac/val_auroc``, ``search/nac/num_layers``, ``search/nac/{alpha,saturation,bins}/
      {module}`` for the chosen layers (alpha ``-1`` = ``"auto"``).

    Args:
        modules: module selector (:func:`lit_act.stats.tap.select_modules`).
        alpha, saturation, bins, spacing: NAC-UE defaults for every layer (:data:`~lit_act.stats.nac.NAC_UE_PARAMS`:
            ``"auto"``, 20, 100, ``"symlog"``; ``alpha="auto"`` scales alpha to each layer's products with gain 2).
        layer_params: per-layer overrides ``{module or "logits": {alpha: ..., saturation: ..., bins: ...}}``.
        logits_layer: NAC-UE also observes the logits as a layer named ``"logits"`` (the paper's recommended set).
        every_n_steps: running-mode NAC-ME period in training steps (``None``: off).
        evaluate_on: ``"test"``, ``"fit"`` or ``None`` (no OOD evaluation).
        ood_sets: ``{name: Dataset | DataLoader}`` or a callable ``datamodule -> {name: ...}`` (e.g.
            :func:`lit_act.data.ood.digits_ood_sets`); required when ``evaluate_on`` is set.
        search: run the parameter search before the evaluation.
        search_ood: the search's OOD proxy (Dataset, DataLoader or callable ``datamodule -> Dataset``); ``None``:
            the synthetic shuffled proxy.
        search_kwargs: extra arguments of :func:`~lit_act.stats.nac_search.search_parameters` (``alphas``,
            ``saturations``, ``bins``, ``strategy``, ``num_trials``, ``seed``, ...).
        fit_samples: training samples the NAC-UE histograms are fitted on (the reference uses 1,000).
        batch_size: batch size of loaders built from ``Dataset`` OOD sets.
        logits_fn: maps the model output to logits ``(B, C)`` when it is not already.
        neuron_dim: neuron dimension override.
        figures: save the AUROC table figure.
        probe: NAC-ME probe schedule: ``"auto"`` (``"epoch"`` unless ``every_n_steps`` is set, then ``None``),
            ``None``, ``"epoch"`` or every ``n`` steps.
        probe_samples: NAC-ME probe-set size (the first training samples; default 1,000, the size the probe rule is
            stated for).
        adapter: batch / output adapter (:class:`lit_act.batch.BatchAdapter`).

    Attributes after a run: ``last_me`` (the last logged NAC-ME keys; both NAC-ME modes log reduced, DDP-summed
    histograms and checkpoint them reduced, restored on rank 0), ``results`` (every evaluation key above),
    ``search_result`` (:class:`~lit_act.stats.nac_search.SearchResult` with all trials).

    The evaluation calls ``datamodule.setup("fit")`` and builds fresh ``train/val/test_dataloader()``s (the train
    split's first ``fit_samples`` samples in its loader's order).
    """

    def __init__(self, modules: ModuleSelector = None, alpha: float | str = NAC_UE_PARAMS.alpha,
                 saturation: float = NAC_UE_PARAMS.saturation, bins: int = NAC_UE_PARAMS.bins,
                 spacing: str = NAC_UE_PARAMS.spacing, layer_params: Mapping[str, Mapping[str, Any]] | None = None,
                 logits_layer: bool = True,
                 every_n_steps: int | None = None, evaluate_on: str | None = "test", ood_sets: OODSets | None = None,
                 search: bool = False, search_ood: Any = None, search_kwargs: Mapping[str, Any] | None = None,
                 fit_samples: int = 1000, batch_size: int = 256, logits_fn: LogitsFn | None = None,
                 neuron_dim: int | None = None, figures: bool = True, probe: str | int | None = "auto",
                 probe_samples: int = NAC_ME_PROBE_SAMPLES, adapter: BatchAdapter | None = None) -> None:
        modules, every_n_steps = v.module_selector("modules", modules), validate_every_n("every_n_steps", every_n_steps)
        alpha = alpha if alpha == "auto" else v.positive_float("alpha", alpha)
        saturation = v.finite_float("saturation", saturation, low=1.0)
        bins, spacing = v.integer("bins", bins, low=2, high=v.MAX_BINS), v.choice("spacing", spacing, BIN_SPACINGS)
        layer_params = v.optional(v.mapping, "layer_params", layer_params)
        evaluate_on = v.choice("evaluate_on", evaluate_on, EVALUATE_ON)
        if ood_sets is not None and not callable(ood_sets):
            try:
                ood_sets = v.mapping("ood_sets", ood_sets)
            except v.ConfigError:
                raise v.ConfigError(f"ood_sets={ood_sets!r}: expected a mapping {{name: Dataset | DataLoader}} or a "
                                    "callable datamodule -> that mapping") from None
        search, figures = v.boolean("search", search), v.boolean("figures", figures)
        search_kwargs = v.optional(v.mapping, "search_kwargs", search_kwargs)
        fit_samples, batch_size = v.positive_int("fit_samples", fit_samples), v.positive_int("batch_size", batch_size)
        neuron_dim = v.optional(v.integer, "neuron_dim", neuron_dim)
        probe = v.probe_schedule("probe", probe, ("auto", "epoch"))
        probe_samples = v.positive_int("probe_samples", probe_samples)
        logits_layer = v.boolean("logits_layer", logits_layer)
        super().__init__(adapter, figures)
        validate_every_n("every_n_steps", every_n_steps)
        if probe == "auto":
            probe = PROBE_EPOCH if every_n_steps is None else None
        validate_probe(probe, probe_samples)
        validate_every_n("fit_samples", fit_samples)
        validate_every_n("batch_size", batch_size)
        if evaluate_on not in EVALUATE_ON:
            raise ValueError(f"evaluate_on must be one of {EVALUATE_ON}, got {evaluate_on!r}")
        if evaluate_on is not None and ood_sets is None:
            raise ValueError("evaluate_on is set but ood_sets is None: pass ood_sets={name: Dataset} or a callable "
                             "datamodule -> {name: Dataset} (e.g. lit_act.data.ood.digits_ood_sets), or "
                             "evaluate_on=None")
        if every_n_steps is None and probe is None and evaluate_on is None:
            raise ValueError("NeuronActivationCoverage would do nothing: set probe or every_n_steps (NAC-ME) or "
                             "evaluate_on")
        unknown = set(search_kwargs or {}) - _SEARCH_ARGS
        if unknown:
            raise ValueError(f"unknown search_kwargs {sorted(unknown)}; valid: {sorted(_SEARCH_ARGS)}")
        self.params = dataclasses.replace(NAC_UE_PARAMS, alpha=alpha, saturation=saturation, bins=bins,
                                          spacing=spacing)
        self.logits_layer = logits_layer
        self.layer_params = {name: LayerParams(**{**self._fields(self.params), **dict(over)})
                             for name, over in (layer_params or {}).items()}
        self.modules = modules
        self.every_n_steps = every_n_steps
        self.evaluate_on = evaluate_on
        self.ood_sets = ood_sets
        self.search = search
        self.search_ood = search_ood
        self.search_kwargs = dict(search_kwargs or {})
        self.fit_samples = fit_samples
        self.batch_size = batch_size
        self.logits_fn = logits_fn
        self.neuron_dim = neuron_dim
        self.probe = probe
        self.probe_samples = probe_samples
        self.selected: dict[str, nn.Module] = {}
        self.me: NACModel | None = None
        self.model: AdaptedModel | None = None
        self._pending_me: dict[str, dict[str, Tensor]] = {}
        self.search_result: SearchResult | None = None
        self.results: dict[str, float] = {}
        self.last_me: dict[str, float] = {}
        self._due = False

    @staticmethod
    def _fields(params: LayerParams) -> dict[str, Any]:
        return {k: getattr(params, k) for k in params.__dataclass_fields__}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(modules=repr(self.modules), every_n_steps=self.every_n_steps)

    # ------------------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        require_uncompiled(pl_module, "NeuronActivationCoverage")
        self.selected = select_sites(pl_module, self.modules)  # {name: Site} (outputs or down-projection inputs)
        if self.logits_layer and LOGITS in self.selected:
            raise ValueError(f"a selected module is named {LOGITS!r}, the name of the logits layer: pass "
                             "logits_layer=False or select other modules")
        layers = [*self.selected, *([LOGITS] if self.logits_layer else [])]
        unknown = set(self.layer_params) - set(layers)
        if unknown:
            raise ValueError(f"layer_params name layers that are not selected: {sorted(unknown)}; observed: "
                             f"{sorted(layers)}")
        self.model = AdaptedModel(pl_module, self.adapter, self.logits_fn)
        if self.me is None:
            self.me = NACModel(self.selected, NAC_ME_PARAMS, None, self.neuron_dim, correct_only=True,
                               mask_fn=self.adapter.mask)
        self.warn_if_idle(trainer, stage)

    def warn_if_idle(self, trainer: Trainer, stage: str) -> None:
        """Warn when nothing will be computed in the configured run."""
        if trainer.fast_dev_run:
            return
        steps = planned_steps(trainer)
        if stage == "fit" and steps is not None:
            if self.every_n_steps is not None and self.every_n_steps > 1 and self.every_n_steps >= steps:
                self.warn(f"every_n_steps={self.every_n_steps} but the run plans {steps} steps: NAC-ME observes "
                          "step 0 only; lower every_n_steps or use probe='epoch'")
            if isinstance(self.probe, int) and self.probe > steps:
                self.warn(f"probe={self.probe} but the run plans {steps} steps: no NAC-ME probe pass runs")
        if stage == "validate":
            self.warn("computes nothing under trainer.validate (NAC-ME runs during fit, NAC-UE at test/fit end)")
        if stage == "test" and self.evaluate_on != "test":
            self.warn(f"evaluate_on={self.evaluate_on!r}: trainer.test computes nothing; set evaluate_on='test'")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (self.every_n_steps is not None or self.probe is not None) and is_real_run(trainer):
            self.dry_run(trainer, pl_module)

    def dry_run(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """One NAC forward/backward on the first training samples (nothing recorded): raises before training when
        the logits, the targets or the gradient path to the selected modules are missing."""
        batch = next(iter(probe_batches(trainer, 2, pl_module.device)), None)
        if batch is None:
            return
        if self.adapter.targets(batch) is None:
            raise ValueError("NeuronActivationCoverage: NAC-ME counts correctly classified samples but the batch "
                             f"({type(batch).__name__}) carries no targets (batch['labels'] or batch[1]); pass "
                             "adapter=BatchAdapter(targets_fn=lambda batch: ...), or probe=None, every_n_steps=None")
        try:
            with self.quiet_pass(pl_module):
                logits = self.me.products(self.model, batch).logits
            targets = self.adapter.targets(batch)
            if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
                raise ValueError(f"NAC needs one logit row per sample: logits {tuple(logits.shape)} do not match "
                                 f"targets {tuple(targets.shape)} (a per-token output such as (batch * tokens, "
                                 "vocab) has no class per sample)")
        except (TypeError, ValueError, RuntimeError) as err:
            raise type(err)(f"NeuronActivationCoverage dry run on the first training batch failed: {err}. Fix: "
                            "pass adapter=BatchAdapter(forward_fn=..., logits_fn=...) so the model maps a batch "
                            "to logits (batch, num_classes), or select other modules=") from err

    def layer_params_for(self, names: list[str]) -> dict[str, LayerParams]:
        """NAC-UE parameters of ``names`` (defaults and ``layer_params`` overrides)."""
        return {n: self.layer_params.get(n, self.params) for n in names}

    # -------------------------------------------------------------------------------------------------- NAC-ME
    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._due = due(trainer.global_step, self.every_n_steps) and is_real_run(trainer)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.me is not None and self._due:
            self._update_me(pl_module, batch)
        if probe_due(self.probe, trainer.global_step) and is_real_run(trainer):
            self.run_probe(trainer, pl_module)

    def _update_me(self, pl_module: LightningModule, batch: Any) -> None:
        with self.quiet_pass(pl_module):
            self.me.update(self.model, batch, self.adapter.targets(batch))
        for name, states in self._pending_me.items():
            cov = self.me.coverage.get(name)
            if cov is not None:  # created by this first update: add the restored counts to it
                assign_states(cov, {k: v.to(cov.device) + getattr(cov, k) for k, v in states.items()})
        self._pending_me = {k: v for k, v in self._pending_me.items() if k not in self.me.coverage}

    def probe_set(self, trainer: Trainer, device: torch.device) -> Iterator[Any]:
        """The first ``probe_samples`` training samples in dataset order, the same on every rank
        (:func:`~lit_act.callbacks.core.leading_batches`; this rank's share of them for iterable datasets)."""
        batches = leading_batches(training_loader(trainer), device)
        if batches is None:
            yield from probe_batches(trainer, self.probe_samples, device)
            return
        seen = 0
        for batch in batches:
            if seen >= self.probe_samples:
                break
            yield batch
            seen += batch_length(batch)

    def run_probe(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """NAC-ME of the current model on the probe set with the probe rule :func:`~lit_act.stats.nac.nac_me_params`
        for its size (fresh histograms; ``alpha="auto"`` calibrated on all probe samples), logged as
        ``probe/nac_me/...``."""
        probe = NACModel(self.selected, NAC_ME_PROBE_PARAMS, None, self.neuron_dim, correct_only=True, sync=False,
                         mask_fn=self.adapter.mask)
        products: dict[str, list[Tensor]] = {name: [] for name in probe.layers}
        logits, targets = [], []
        with self.quiet_pass(pl_module):
            for batch in self.probe_set(trainer, pl_module.device):
                out = probe.products(self.model, batch)
                for name, value in out.products.items():
                    products[name].append(value)
                logits.append(out.logits)
                targets.append(self.adapter.targets(batch).to(out.logits.device))
        if not logits:
            return {}
        cut = slice(0, self.probe_samples)
        logits_, targets_ = torch.cat(logits)[cut], torch.cat(targets)[cut]
        products_ = {name: torch.cat(v)[cut] for name, v in products.items()}
        rule = nac_me_params(logits_.shape[0])
        # a layer without one finite product has nothing to calibrate "auto" on: its states are all NaN (counted)
        probe = probe.with_params({name: rule if products_[name].isfinite().any() else
                                   dataclasses.replace(rule, alpha=1.0) for name in probe.layers})
        probe.fit_products(products_, logits_, targets_)
        return self._emit_me(trainer, probe, "probe")

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not is_real_run(trainer):
            return
        if self.me is not None and self.me.coverage:
            self._emit_me(trainer, self.me, "train")
        if self.probe == PROBE_EPOCH:
            self.run_probe(trainer, pl_module)

    def _emit_me(self, trainer: Trainer, nac: NACModel, stage: str) -> dict[str, float]:
        logged = {}
        for name, cov in nac.coverage.items():
            # DDP-summed states in running mode; a probe's are the same on every rank
            states = reduced_states(cov) if nac.sync else {"counts": cov.counts, "nonfinite": cov.nonfinite}
            nonfinite = float(states["nonfinite"].sum())
            value = float(cov.compute())
            if nonfinite > 0 and float(states["counts"].sum()) == 0:
                value = math.nan  # every state non-finite: NaN, left out of the mean
            logged[metric_key(stage, "nac_me", name)] = value
            logged[metric_key(stage, "nac_me", name, nonfinite=True)] = nonfinite
            cov.reset()
        if not logged:
            return {}
        values = [v for k, v in logged.items() if not k.endswith("/nonfinite") and not math.isnan(v)]
        logged[metric_key(stage, "nac_me", "mean")] = sum(values) / len(values) if values else math.nan
        bad = {k: v for k, v in logged.items() if k.endswith("/nonfinite") and v > 0}
        if bad:
            self.warn(f"NaN/Inf neuron states were excluded from NAC-ME ({bad})")
        self.last_me = logged
        return self.log_metrics(trainer, logged, trainer.global_step)

    # ------------------------------------------------------------------------------------------- evaluation
    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.evaluate_on == "fit" and is_real_run(trainer):
            self.evaluate(trainer, pl_module)

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.evaluate_on == "test" and is_real_run(trainer):
            self.evaluate(trainer, pl_module)

    def _loader(self, data: Any) -> DataLoader:
        if isinstance(data, DataLoader):
            return data
        if isinstance(data, Dataset):
            return DataLoader(data, batch_size=self.batch_size, shuffle=False)
        raise TypeError(f"expected a Dataset or DataLoader, got {type(data).__name__}")

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """Run the (search and) NAC-UE / MSP / energy AUROC evaluation on ``trainer.datamodule``; returns and logs
        the numbers (also stored in :attr:`results`)."""
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("NeuronActivationCoverage's OOD evaluation needs a LightningDataModule: call "
                               "trainer.fit/test(model, datamodule=...) or set evaluate_on=None")
        datamodule.setup("fit")
        train, val, test = datamodule.train_dataloader(), datamodule.val_dataloader(), datamodule.test_dataloader()
        sets = self.ood_sets(datamodule) if callable(self.ood_sets) else self.ood_sets
        ood_loaders = {name: self._loader(data) for name, data in sets.items()}
        if not ood_loaders:
            raise ValueError("ood_sets is empty: give at least one OOD set")
        logged: dict[str, float] = {}
        params = self.layer_params_for([*self.selected, *([LOGITS] if self.logits_layer else [])])
        model = self.model
        if self.search:
            proxy = self.search_ood(datamodule) if callable(self.search_ood) else self.search_ood
            with self.quiet_pass(pl_module):
                self.search_result = search_parameters(
                    model, train, val, self.selected, None if proxy is None else self._loader(proxy),
                    **{"fit_samples": self.fit_samples, **self.search_kwargs}, logits_fn=None,
                    neuron_dim=self.neuron_dim, base=self.params, logits_layer=self.logits_layer,
                    mask_fn=self.adapter.mask)
            params = self.search_result.params
            logged.update(self.search_result.flat())
            rank_zero_info(self.search_result.describe())
        nac = NACModel({n: self.selected[n] for n in params if n != LOGITS}, params, None, self.neuron_dim, sync=False,
                       logits_layer=LOGITS in params, mask_fn=self.adapter.mask)
        with self.quiet_pass(pl_module):
            nac.fit(model, train, self.fit_samples)
            for name, value in nac.layer_coverage().items():
                logged[f"test/nac/coverage/{name}"] = value
            scorers = {"nac": lambda x: nac.score(model, x), "msp": logits_scorer(model, "msp"),
                       "energy": logits_scorer(model, "energy")}
            for method, scorer in scorers.items():
                in_scores = score_batches(scorer, test)
                values = []
                for set_name, loader in ood_loaders.items():
                    value = auroc(in_scores, score_batches(scorer, loader))
                    logged[f"test/{method}/auroc/{set_name}"] = value
                    values.append(value)
                logged[f"test/{method}/auroc/mean"] = sum(values) / len(values)
        self.results = logged
        self.log_metrics(trainer, logged, trainer.global_step)
        self._report(trainer, list(ood_loaders))
        return logged

    @rank_zero_only
    def _report(self, trainer: Trainer, set_names: list[str]) -> None:
        methods = ("nac", "msp", "energy")
        rows = [[f"{self.results[f'test/{m}/auroc/{s}']:.3f}" for m in methods] for s in [*set_names, "mean"]]
        lines = ["OOD AUROC (in-distribution test split vs each set):", f"{'set':<12}" + "".join(
            f"{m:>9}" for m in methods)]
        lines += [f"{s:<12}" + "".join(f"{v:>9}" for v in row) for s, row in zip([*set_names, "mean"], rows,
                                                                                  strict=True)]
        rank_zero_info("\n".join(lines))
        if self.figures:
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5, 0.5 + 0.3 * len(rows)))
            ax.axis("off")
            ax.table(cellText=rows, rowLabels=[*set_names, "mean"], colLabels=["NAC-UE", "MSP", "energy"],
                     loc="center")
            ax.set_title("OOD AUROC (test split)")
            self.save_figure(trainer, fig, "nac_ood_auroc")

    # ---------------------------------------------------------------------------------------------- resume
    @override
    def state_dict(self) -> dict[str, Any]:
        """Running-mode NAC-ME histograms reduced over DDP ranks (as every lit-act statistic callback)."""
        me = {} if self.me is None else {name: reduced_states(cov) for name, cov in self.me.coverage.items()}
        me.update({k: v for k, v in self._pending_me.items() if k not in me})
        return {"nac_me": me}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the reduced histograms on rank 0 only, so the next DDP reduction counts them once."""
        self._pending_me = {}
        if rank() != 0:
            return
        for name, states in state_dict["nac_me"].items():
            cov = None if self.me is None else self.me.coverage.get(name)
            if cov is None:
                self._pending_me[name] = states
            else:
                assign_states(cov, states)
