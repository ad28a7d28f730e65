"""``HessianSpectrum``: Hessian eigenvalues, trace and spectral density of the training loss during training."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from typing_extensions import override

from lit_act.batch import DEFAULT_ADAPTER, BatchAdapter
from lit_act.callbacks.core import LitActCallback, probe_batches
from lit_act.callbacks.hessian_config import HessianConfig
from lit_act.hessian.blocks import block_eigenvalues, block_sizes, check_block_k
from lit_act.hessian.curvature import curvature_operator
from lit_act.hessian.density import gaussian_density, lla_criteria, slq
from lit_act.hessian.krylov_trace import lanczos_trace
from lit_act.hessian.memory import ChunkPlan
from lit_act.hessian.operator import HessianOperator, LossFn, batch_size
from lit_act.hessian.trace import trace
from lit_act.stats.tap import paused
from lit_act.utils import validate as v
from lit_act.utils.modes import evaluating
from lit_act.utils.schedule import due, is_real_run, planned_steps, validate_every_n

PREFIX = "train/hessian/"


@contextlib.contextmanager
def preserved_training_state(module: nn.Module, eval_mode: bool = True) -> Iterator[None]:
    """Run a block on ``module`` and leave no trace: on exit (also on exceptions) restore every submodule's
    ``training`` flag, every buffer (BatchNorm running statistics and ``num_batches_tracked``), every parameter's
    ``.grad`` (values and ``None``-ness, same tensor object) and the global torch RNG state (CPU, and CUDA when
    initialised). With ``eval_mode`` the block runs with ``module.eval()`` (BatchNorm uses running statistics,
    dropout is off)."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    grads = [(p, p.grad, None if p.grad is None else p.grad.detach().clone()) for p in module.parameters()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        with evaluating(module, eval_mode):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
            for p, grad_obj, saved in grads:
                if grad_obj is not None:
                    grad_obj.copy_(saved)
                p.grad = grad_obj
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


class AdaptedLoss:
    """The default Hessian loss ``(module, batch) -> scalar`` through a :class:`~lit_act.batch.BatchAdapter`: the model
    output's ``.loss`` when there is one (HF models given labels), otherwise ``module.loss(logits, targets)``; raises
    ``TypeError`` with the fix otherwise. (A class, not a closure, so DDP-spawn can pickle it.)"""

    def __init__(self, adapter: BatchAdapter) -> None:
        self.adapter = adapter

    def __call__(self, module: nn.Module, batch: Any) -> Tensor:
        out = self.adapter.forward(module, batch)
        loss = self.adapter.loss(out)
        if loss is not None:
            return loss
        if not callable(getattr(module, "loss", None)):
            raise TypeError(f"the output of {type(module).__name__} has no `.loss` and the module has no "
                            "`loss(logits, targets)` method: pass HessianSpectrum(loss_fn=lambda module, batch: "
                            "<scalar loss>), or batches with labels for a Hugging Face model")
        logits, targets = self.adapter.logits(out), self.adapter.targets(batch)
        if logits is None or targets is None:
            raise TypeError(f"the default Hessian loss module.loss(logits, targets) found "
                            f"{'no logits in the output' if logits is None else 'no targets in the batch'}: pass "
                            "HessianSpectrum(loss_fn=lambda module, batch: <scalar loss>) or "
                            "adapter=BatchAdapter(logits_fn=..., targets_fn=...)")
        return module.loss(logits, targets)


class HessianSpectrum(LitActCallback):
    """Hessian spectrum of the training loss on a fixed set of cached training batches, every N steps or epochs.

    The first ``num_batches`` training batches are cached (detached copies) and reused at every evaluation, so values
    are comparable over training. Each evaluation runs outside ``inference_mode`` on ``pl_module`` itself (never the
    DDP wrapper), by default in eval mode (BatchNorm running statistics, no dropout), and restores train/eval flags,
    buffers, ``.grad`` and the global RNG exactly (:func:`preserved_training_state`). Under DDP every rank caches its
    own batches; every rank uses rank 0's buffers (as DDP's forward does), Hessian-vector products are summed over
    ranks (weighted by batch size), and every rank does the same products in the same order, so results are
    identical on all ranks.

    Before training a dry run on the first training batch (one loss, one Hessian-vector product) surfaces a missing
    loss, missing logits or an autograd limitation. The evaluations run with every other callback's taps paused.

    One evaluation is one Lanczos pass (:func:`lit_act.hessian.krylov_trace.lanczos_trace`) from a Rademacher vector,
    which gives together the top-``k`` eigenvalues, the smallest one and one SLQ run, then the trace (exact, or the
    covered blocks exactly plus ``trace_budget`` products of the interleaved estimator; with ``"krylov"`` the pass's
    Krylov part plus deflated probes) and ``slq_runs - 1`` further SLQ runs (``trace_budget``, ``slq_runs`` and the
    other settings of an evaluation are fields of ``config``, :class:`~lit_act.callbacks.hessian_config.HessianConfig`).
    On the reference TransformerLM (``python -m benchmarks.bench_hessian --only transformer``) this takes ~6x fewer
    Hessian-vector products than separate top-k, smallest-eigenvalue, trace and SLQ runs at equal settings.

    Logged keys (through the emitter: every evaluation reaches the loggers at its step and
    ``trainer.callback_metrics``, also with ``every_n_steps``):

    * ``train/hessian/eig_1`` .. ``eig_k``: largest eigenvalues (Ritz values of the pass);
    * ``train/hessian/lambda_min``: smallest eigenvalue (the pass runs until it passes the same test);
    * ``train/hessian/trace``, ``train/hessian/trace_se``: the trace and its standard error (0 when exact);
    * ``train/hessian/re``, ``train/hessian/kh``: LLA criteria from the SLQ nodes/weights
      (:func:`lit_act.hessian.density.lla_criteria`);
    * ``train/hessian/converged``: 1.0 when every Lanczos Ritz value passed its residual test, else 0.0;
    * ``train/hessian/matvecs``: Hessian-vector products of the evaluation; ``train/hessian/seconds``: its wall time;
    * with ``config.per_block_top_k``: ``train/hessian/block_top{i}/{block}``, the ``i``-th largest eigenvalue of the
      diagonal block of each module owning parameters (:func:`lit_act.hessian.block_eigenvalues`), and
      ``train/hessian/block_converged``.

    The SLQ density is saved as ``figures/hessian_density_step<step>.png`` (and a W&B image when W&B is on). A NaN/Inf
    in a Hessian-vector product is reported (warning, all keys logged as NaN, ``nan_events`` incremented) instead of
    stopping training.

    Args:
        every_n_steps: evaluate after every ``every_n_steps`` optimizer steps.
        every_n_epochs: evaluate at the end of every ``every_n_epochs`` training epochs (default 1).
        num_batches: training batches to cache and average over (weighted by batch size); the cache takes one
            training batch per step, so ``every_n_steps`` evaluations before it is full use the batches cached so
            far (a warning at setup says so).
        config: what an evaluation computes and how (:class:`~lit_act.callbacks.hessian_config.HessianConfig`: top-k,
            trace method and budget, density, curvature, backend, memory), or a mapping of its fields; ``None``: the
            defaults.
        loss_fn: ``loss_fn(module, batch) -> scalar``; default (:class:`AdaptedLoss`): the output's ``.loss`` when
            there is one (HF with labels), else ``module.loss(logits, targets)`` through ``adapter``.
        adapter: batch / output adapter of the default loss (:class:`lit_act.batch.BatchAdapter`).
        dry_run: run one loss and one Hessian-vector product on the first training batch at train start.
        checkpoint_vector: also store the warm-start vector in checkpoints (``dim`` floats).
        save_density_figure: save the density plot.
        progress: show a progress bar over Hessian-vector products on rank zero.
    """

    def __init__(self, every_n_steps: int | None = None, every_n_epochs: int | None = 1, num_batches: int = 1,
                 config: HessianConfig | Mapping[str, Any] | None = None, loss_fn: LossFn | None = None,
                 adapter: BatchAdapter | None = None, dry_run: bool = True, checkpoint_vector: bool = False,
                 save_density_figure: bool = True, progress: bool = True, **config_fields: Any) -> None:
        if config_fields:  # the flat arguments of earlier versions: say where they went
            fields = {f.name for f in dataclasses.fields(HessianConfig)}
            known = sorted(set(config_fields) & fields)
            if len(known) < len(config_fields):
                raise TypeError(f"HessianSpectrum got unexpected keyword argument(s) "
                                f"{sorted(set(config_fields) - fields)}")
            example = ", ".join(f"{k}={config_fields[k]!r}" for k in known)
            raise v.ConfigError(f"{known} are fields of the evaluation's config: pass HessianSpectrum(config="
                                f"HessianConfig({example})) (Hydra: callbacks.hessian.config.{known[0]}=...)")
        self.every_n_steps = validate_every_n("every_n_steps", every_n_steps)
        self.every_n_epochs = validate_every_n("every_n_epochs", every_n_epochs)
        if self.every_n_steps is None and self.every_n_epochs is None:
            raise ValueError("set every_n_steps or every_n_epochs (both are None: the callback would never run)")
        self.num_batches = v.positive_int("num_batches", num_batches)
        self.config = HessianConfig.of(config)
        self.user_loss_fn = v.callable_or_none("loss_fn", loss_fn)
        self.dry_run, self.progress = v.boolean("dry_run", dry_run), v.boolean("progress", progress)
        self.checkpoint_vector = v.boolean("checkpoint_vector", checkpoint_vector)
        super().__init__(adapter, v.boolean("save_density_figure", save_density_figure))
        self.loss_fn = loss_fn or AdaptedLoss(self.adapter)
        self._block_names: list[str] = []
        self._chunk_plans: list[ChunkPlan] | None = None  # memory_budget's plan for the cached batches
        self.cached_batches: list[Any] = []
        self.last_metrics: dict[str, float] = {}
        self.evaluations = 0
        self.nan_events = 0
        self._warm_vector: Tensor | None = None
        self._exact_unavailable = False  # "auto": the exact rules failed once this fit; the model's modules are fixed
        self._last_step = -1

    @property
    @override
    def state_key(self) -> str:
        params = self.config.params
        return self._generate_state_key(every_n_steps=self.every_n_steps, every_n_epochs=self.every_n_epochs,
                                        params=None if params is None else list(params))  # the key checkpoints carry

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.fast_dev_run:
            return
        if stage != "fit":
            if self.evaluations == 0:
                self.warn(f"computes nothing under trainer.{stage} (the Hessian is evaluated during fit)")
            return
        self._exact_unavailable = False
        self._chunk_plans = None
        if self.every_n_steps is not None and self.every_n_steps < self.num_batches:
            self.warn(f"every_n_steps={self.every_n_steps} < num_batches={self.num_batches}: the cache holds one "
                      f"training batch per step, so evaluations before step {self.num_batches} use the batches "
                      "cached so far")
        steps = planned_steps(trainer)
        if steps is not None and self.every_n_steps is not None and self.every_n_steps > steps \
                and self.every_n_epochs is None:
            self.warn(f"every_n_steps={self.every_n_steps} but the run plans {steps} steps: no evaluation runs; "
                      "lower every_n_steps or set every_n_epochs")
        epochs = trainer.max_epochs
        if self.every_n_steps is None and epochs is not None and epochs > 0 and self.every_n_epochs > epochs \
                and trainer.max_steps < 0:
            self.warn(f"every_n_epochs={self.every_n_epochs} but the run has {epochs} epochs: no evaluation runs")
        if self.config.per_block_top_k:
            sizes = block_sizes(pl_module, self.config.params)
            check_block_k(sizes, self.config.per_block_top_k)
            self._block_names = list(sizes)

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.dry_run and is_real_run(trainer):
            self.check(trainer, pl_module)

    def check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Dry run on the first training samples: the loss and one Hessian-vector product (nothing recorded, no
        trace on the module); raises with the fix before training starts."""
        batch = next(iter(probe_batches(trainer, 2, pl_module.device)), None)
        if batch is None:
            return
        c = self.config
        try:
            with preserved_training_state(pl_module, c.eval_mode), paused(), torch.inference_mode(False), \
                    torch.enable_grad():
                op = HessianOperator(pl_module, self.loss_fn, [batch], params=c.params, backend=c.backend,
                                     chunk_size=c.chunk_size)
                op.matvec(torch.zeros(op.dim, dtype=op.dtype, device=op.device))
        except FloatingPointError:
            return  # a non-finite loss is reported by each evaluation (nan_events), not a setup error
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as err:
            fix = ("an op of the model has no double backward (e.g. fused/flash attention): compute the loss with "
                   "the math SDPA backend (torch.nn.attention.sdpa_kernel(SDPBackend.MATH)) or eager attention"
                   if "derivative for" in str(err) else
                   "pass loss_fn=lambda module, batch: <scalar loss>, or adapter=BatchAdapter(forward_fn=...) so "
                   "module(batch) runs (default: module(**batch) for dicts, module(batch[0]) for tuples)")
            raise type(err)(f"HessianSpectrum dry run on the first training batch failed: {err}. Fix: {fix}") \
                from err

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if len(self.cached_batches) < self.num_batches:
            self.cached_batches.append(apply_to_collection(batch, Tensor, lambda t: t.detach().clone()))
        step = trainer.global_step
        if due(step, self.every_n_steps) and step != self._last_step and step > 0 and is_real_run(trainer):
            self._last_step = step
            self._evaluate(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0
                and is_real_run(trainer)):
            self._evaluate(trainer, pl_module, on_step=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"last_metrics": dict(self.last_metrics), "evaluations": self.evaluations,
                                 "nan_events": self.nan_events, "last_step": self._last_step}
        if self.checkpoint_vector and self._warm_vector is not None:
            state["warm_vector"] = self._warm_vector.cpu()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_metrics = dict(state_dict.get("last_metrics", {}))
        self.evaluations = int(state_dict.get("evaluations", 0))
        self.nan_events = int(state_dict.get("nan_events", 0))
        self._last_step = int(state_dict.get("last_step", -1))
        self._warm_vector = state_dict.get("warm_vector")

    # ------------------------------------------------------------------ computation
    def _evaluate(self, trainer: Trainer, pl_module: LightningModule, on_step: bool) -> None:
        all_reduce = None
        if trainer.world_size > 1:
            def all_reduce(t: Tensor) -> Tensor:
                return trainer.strategy.reduce(t, reduce_op="sum")
        try:
            metrics, density = self.compute(pl_module, all_reduce=all_reduce,
                                            show_progress=self.progress and trainer.is_global_zero,
                                            broadcast_buffers=trainer.world_size > 1)
        except FloatingPointError as err:
            self.nan_events += 1
            rank_zero_warn(f"HessianSpectrum at step {trainer.global_step}: {err}; logging NaN")
            metrics, density = dict.fromkeys(self.metric_names(), math.nan), None
        self.evaluations += 1
        self.last_metrics = metrics
        self.log_metrics(trainer, metrics, trainer.global_step)
        rank_zero_info(f"HessianSpectrum step {trainer.global_step}: "
                       + ", ".join(f"{k.removeprefix(PREFIX)}={v:.4g}" for k, v in metrics.items()))
        if density is not None and self.figures and trainer.is_global_zero:
            self.save_figure(trainer, self._density_figure(*density, trainer.global_step), "hessian_density",
                             step=trainer.global_step)

    def operator_loss_fn(self, module: nn.Module) -> LossFn | None:
        """The loss handed to the curvature operator: ``None`` (the operator's own default,
        ``module.loss(module(inputs), targets)``, whose output Hessian is known, so exact diagonals apply) when neither
        ``loss_fn`` nor a custom adapter was given and ``module`` is a lit-act model; otherwise :attr:`loss_fn`."""
        from lit_act.models.base import LitActModule

        if self.user_loss_fn is None and self.adapter == DEFAULT_ADAPTER and isinstance(module, LitActModule):
            return None
        return self.loss_fn

    def metric_names(self) -> list[str]:
        """Every key an evaluation logs, in order."""
        c = self.config
        names = [f"{PREFIX}eig_{i + 1}" for i in range(c.top_k)]
        names += [f"{PREFIX}lambda_min"] if c.lambda_min else []
        names += [f"{PREFIX}trace", f"{PREFIX}trace_se"] if c.trace_budget else []
        names += [f"{PREFIX}re", f"{PREFIX}kh"] if c.slq_iter else []
        names += [f"{PREFIX}block_top{i + 1}/{b}" for b in self._block_names for i in range(c.per_block_top_k)]
        names += [f"{PREFIX}block_converged"] if c.per_block_top_k else []
        return [*names, f"{PREFIX}converged", f"{PREFIX}matvecs", f"{PREFIX}seconds"]

    def compute(self, module: nn.Module, batches: Sequence[Any] | None = None,
                all_reduce: Callable[[Tensor], Tensor] | None = None, show_progress: bool = False,
                broadcast_buffers: bool = False) -> tuple[dict[str, float], tuple[Tensor, Tensor] | None]:
        """One evaluation on ``module`` over ``batches`` (default: the cached ones), leaving no trace on the module
        or the RNG. Returns the metrics and the ``(grid, density)`` pair (``None`` without SLQ).

        ``broadcast_buffers`` (DDP): use rank 0's buffers on every rank during the evaluation, as DDP's own forward
        does (``broadcast_buffers=True``); without it, eval-mode BatchNorm would differ across ranks by their last
        local running-statistics update. Local buffers are restored afterwards."""
        c = self.config
        batches = self.cached_batches if batches is None else list(batches)
        start = time.perf_counter()
        planned = c.pass_steps() + c.trace_budget + c.slq_iter * (c.slq_runs - 1)
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved_training_state(module, c.eval_mode))
            stack.enter_context(paused())  # no callback observes the Hessian-vector products
            if broadcast_buffers:
                for buffer in module.buffers():
                    torch.distributed.broadcast(buffer, src=0)
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            bar = stack.enter_context(_progress_bar(planned, show_progress))
            op = curvature_operator(module, self.operator_loss_fn(module), batches, curvature=c.curvature, loss=c.loss,
                                    params=c.params, backend=c.backend, all_reduce=all_reduce, on_matvec=bar,
                                    **self._chunking(batches))
            if op.chunk_plans is not None:
                self._chunk_plans = op.chunk_plans
            metrics, density = self._spectrum(op)
        metrics[f"{PREFIX}matvecs"] = float(op.matvecs)
        metrics[f"{PREFIX}seconds"] = time.perf_counter() - start
        return metrics, density

    def _chunking(self, batches: Sequence[Any]) -> dict[str, Any]:
        """How the operator bounds a product's memory: ``chunk_size`` (or nothing), this fit's plan for these
        batches, or ``memory_budget`` (planned by the operator)."""
        c = self.config
        if c.memory_budget is None:
            return {"chunk_size": c.chunk_size}
        plans = self._chunk_plans
        if plans is not None and [sum(p.sizes) for p in plans] == [batch_size(b) for b in batches]:
            return {"chunk_plans": plans}
        return {"memory_budget": c.memory_budget}

    def _spectrum(self, op: HessianOperator) -> tuple[dict[str, float], tuple[Tensor, Tensor] | None]:
        c = self.config
        warm = self._warm_vector if c.warm_start and not c.slq_iter else None
        if warm is not None and warm.shape != (op.dim,):
            warm = None
        warm = None if warm is None else warm.to(dtype=op.dtype, device=op.device)
        trace_result = None
        if c.trace_budget and c.trace_method == "auto":
            trace_result = self._auto_trace(op)
        krylov = bool(c.trace_budget) and trace_result is None and c.trace_method in ("auto", "krylov")
        res = lanczos_trace(op, c.top_k, c.tol, min(op.dim, max(c.pass_steps(), c.top_k)),
                            probes=c.trace_budget if krylov else 0, smallest=c.lambda_min, v0=warm,
                            seed=c.seed, min_steps=c.slq_iter)
        if c.warm_start and not c.slq_iter:  # the only case in which the next pass starts from it
            self._warm_vector = res.top.eigenvectors.sum(1).detach().clone()
        metrics = {f"{PREFIX}eig_{i + 1}": float(v) for i, v in enumerate(res.top.eigenvalues)}
        converged = bool(res.top.converged.all())
        if res.smallest is not None:
            metrics[f"{PREFIX}lambda_min"] = float(res.smallest.eigenvalues[0])
            converged = converged and bool(res.smallest.converged.all())
        if krylov:
            trace_result = res.trace
        elif c.trace_budget and trace_result is None:
            trace_result = trace(op, c.trace_budget, c.trace_method, seed=c.seed + 2,
                                 on_uncovered=c.on_uncovered, loss=self._diagonal_loss(op))
        if trace_result is not None:
            metrics[f"{PREFIX}trace"], metrics[f"{PREFIX}trace_se"] = trace_result.estimate, trace_result.std_error
        density = None
        if c.slq_iter:
            nodes, weights = [res.nodes], [res.weights]
            if c.slq_runs > 1:
                extra = slq(op, c.slq_iter, c.slq_runs - 1, seed=c.seed + 3)
                nodes += list(extra.nodes)
                weights += list(extra.weights)
            nodes, weights = _stack_runs(nodes, weights)
            crit = lla_criteria(nodes, weights, c.kh_power)
            metrics[f"{PREFIX}re"], metrics[f"{PREFIX}kh"] = crit.re, crit.kh
            density = gaussian_density(nodes, weights)
        if c.per_block_top_k:
            metrics.update(self._block_spectrum(op))
        if not converged:
            rank_zero_warn(f"HessianSpectrum: Lanczos did not reach tol={c.tol} within max_iter; "
                           "raise max_iter for converged eigenvalues")
        metrics[f"{PREFIX}converged"] = float(converged)
        return metrics, density

    def _diagonal_loss(self, op: HessianOperator) -> str | None:
        return self.config.loss if self.config.curvature == "hessian" else op.loss

    def _auto_trace(self, op: HessianOperator):
        """``trace_method="auto"``: for the Hessian, ``trace(method="auto")`` (exact when every parameter is covered
        by the diagonal rules, else the covered blocks exactly plus the interleaved estimator on the rest); for the
        GGN / Fishers the exact trace, or ``None`` when a module is uncovered (the pass's Krylov trace is used)."""
        c = self.config
        if c.curvature == "hessian":
            return trace(op, c.trace_budget, "auto", seed=c.seed + 2, loss=self._diagonal_loss(op))
        if self._exact_unavailable:  # found uncovered at an earlier evaluation: do not redo the partial diagonal
            return None
        try:
            return trace(op, c.trace_budget, "exact", on_uncovered="error", loss=self._diagonal_loss(op))
        except (ValueError, TypeError):  # an uncovered module (UncoveredModuleError), unknown loss or batch convention
            self._exact_unavailable = True
            return None

    def _block_spectrum(self, op: HessianOperator) -> dict[str, float]:
        """Per-block top eigenvalues (one lockstep pass over all blocks), a separate step of the evaluation."""
        c = self.config
        results = block_eigenvalues(op, c.per_block_top_k, "largest", c.max_iter, c.tol, seed=c.seed + 4)
        self._block_names = list(results)
        metrics = {f"{PREFIX}block_top{i + 1}/{b}": float(value) for b, r in results.items()
                   for i, value in enumerate(r.eigenvalues)}
        converged = all(bool(r.converged.all()) for r in results.values())
        if not converged:
            rank_zero_warn(f"HessianSpectrum: per-block Lanczos did not reach tol={c.tol} within max_iter")
        metrics[f"{PREFIX}block_converged"] = float(converged)
        return metrics

    @staticmethod
    def _density_figure(grid: Tensor, density: Tensor, step: int):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5, 3.5))
        ax = fig.add_subplot()
        ax.semilogy(grid.numpy(), density.clamp_min(1e-12).numpy())
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density (log scale)")
        ax.set_title(f"Hessian spectral density (SLQ), step {step}")
        return fig


def _stack_runs(nodes: list[Tensor], weights: list[Tensor]) -> tuple[Tensor, Tensor]:
    """``(runs, m)`` nodes/weights from runs of different lengths: shorter runs are padded with their first node at
    weight 0 (no effect on the density, ``re`` or ``Kh_n``)."""
    m = max(n.numel() for n in nodes)
    pad = [(torch.cat([n, n[:1].expand(m - n.numel())]), torch.cat([w, w.new_zeros(m - w.numel())]))
           for n, w in zip(nodes, weights)]
    return torch.stack([p[0] for p in pad]), torch.stack([p[1] for p in pad])


@contextlib.contextmanager
def _progress_bar(total: int, show: bool) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar over Hessian-vector products (``None`` when hidden)."""
    if not show:
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="Hessian spectrum", unit="HVP", leave=False)
    try:
        yield lambda count: bar.update(count - bar.n)
    finally:
        bar.close()
