"""S-KAN: a KAN layer whose nodes select their activation space from a pool.

After "Activation Space Selectable KAN" (S-KAN, 2024): every input node ``i`` holds several function spaces
``s`` (here B-spline, Fourier, Chebyshev, Gaussian RBF) with learnable selection weights; training runs in three
stages -- full training of all spaces, selective training that sharpens the selection, and pruning to one space per
node. The paper has no public code; the choices below are ours and are tested.

Layer (``w_is`` selection weights, ``phi_{s,m}`` the ``K`` basis functions of space ``s``, ``C_s`` ``(out, in, K)``)::

    y_j = b_j + sum_i sum_s w_is sum_m C_s[j, i, m] phi_{s,m}(x_i),      w_i = softmax(alpha_i / tau)

Choices where the paper is open:

* **Granularity**: one selection per *input node* (shared by its ``out`` edges), so pruning leaves each input
  with one space and really removes compute and parameters.
* **Spaces on a common domain** ``[lo, hi]`` (``grid_range``) with ``K`` functions each (default ``K = 8``):
  ``bspline``: cubic B-splines on ``K - 3`` intervals (as :class:`~lit_act.kan.KANLinear`, zero far outside);
  ``fourier``: ``cos, sin(k omega (x - c))``, ``k = 1..K/2``, ``omega = 2 pi / (hi - lo)`` (period = domain);
  ``chebyshev``: ``T_m(tanh(x))``, ``m = 0..K-1`` (ChebyKAN's squashing, defined on all of R);
  ``rbf``: ``exp(-((x - mu_m) / h)^2)``, ``K`` centres uniform on ``[lo, hi]``, ``h`` their spacing (FastKAN).
* **Stage 1** (``stage="full"``): ``tau = 1``, all spaces trained jointly, alpha learnable (init 0 = uniform mix).
* **Stage 2** (``stage="selective"``): ``tau`` annealed geometrically from 1 to ``tau_min`` (by
  :class:`SKANStageCallback` over the stage's epochs) plus :meth:`SKANLinear.selection_entropy` as a penalty
  (``entropy_weight`` in the callback), pushing each node to one space while the coefficients adapt.
* **Stage 3** (``stage="pruned"``, :meth:`SKANLinear.select`): each node keeps ``argmax_s alpha_is``; the kept
  space's coefficients are multiplied by its current weight ``w_is`` (so the output changes only by the dropped
  spaces' residual share), the other spaces' coefficients and ``alpha`` are deleted.

Checkpoints: ``stage`` and ``temperature`` travel in the ``state_dict`` (``_extra_state``), the selection in the
``chosen`` and ``nodes_<space>`` buffers. Loading a pruned layer's state into an unpruned layer (a model rebuilt by
``load_from_checkpoint`` or by a resumed ``Trainer.fit``) prunes it to the saved shapes first, so checkpoints from
every stage reload without replaying :meth:`SKANLinear.select`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning import LightningModule, Trainer
from torch import Tensor, nn
from typing_extensions import override

from lit_act.callbacks.core import LitActCallback
from lit_act.kan.kan_linear import MAX_GRID, bspline_bases, check_in_features, uniform_grid
from lit_act.utils import validate as v

__all__ = ["SPACES", "SKANLinear", "SKANStageCallback", "space_bases"]

SPACES = ("bspline", "fourier", "chebyshev", "rbf")


def _check_spaces(spaces: Sequence[str]) -> tuple[str, ...]:
    spaces = v.str_sequence("spaces", spaces)
    unknown = [s for s in spaces if s not in SPACES]
    if unknown or not spaces or len(set(spaces)) != len(spaces):
        raise v.ConfigError(f"spaces={list(spaces)!r}: expected distinct, known activation spaces (unknown, empty or "
                            f"repeated); valid: {list(SPACES)}")
    return spaces


def space_bases(space: str, x: Tensor, num_bases: int, grid_range: Sequence[float], grid: Tensor | None = None
                ) -> Tensor:
    """The ``K`` basis functions of ``space`` at ``x`` ``(N, n)`` -> ``(N, n, K)`` (definitions in module docstring)."""
    lo, hi = grid_range
    if space == "bspline":
        return bspline_bases(x, grid, 3)
    if space == "fourier":
        omega = 2 * math.pi / (hi - lo)
        k = torch.arange(1, num_bases // 2 + 1, dtype=x.dtype, device=x.device)
        kx = (x - 0.5 * (lo + hi)).unsqueeze(-1) * (omega * k)
        return torch.cat([torch.cos(kx), torch.sin(kx)], -1)
    if space == "chebyshev":
        t = torch.tanh(x)
        polys = [torch.ones_like(t), t]
        for _ in range(2, num_bases):
            polys.append(2 * t * polys[-1] - polys[-2])
        return torch.stack(polys[:num_bases], -1)
    if space == "rbf":
        centres = torch.linspace(lo, hi, num_bases, dtype=x.dtype, device=x.device)
        width = (hi - lo) / (num_bases - 1)
        return torch.exp(-(((x.unsqueeze(-1) - centres) / width) ** 2))
    raise ValueError(f"unknown activation space {space!r}; valid: {list(SPACES)}")


class SKANLinear(nn.Module):
    """S-KAN layer ``in_features -> out_features`` mixing activation spaces per input node.

    Args:
        spaces: subset of ``SPACES`` (default all four).
        num_bases: ``K`` functions per space; even and >= 4 (B-splines use ``K - 3`` cubic intervals).
        grid_range: common domain ``[lo, hi]`` of the spaces.
        bias: learn ``b_j``.

    Attributes:
        stage: ``"full"``, ``"selective"`` or ``"pruned"`` (set by :meth:`set_stage` / :meth:`select`).
        temperature: ``tau`` of the selection softmax.
        selection_logits: ``alpha`` ``(in, S)``; ``None`` after :meth:`select`.
        chosen: buffer ``(in,)`` with the index (into ``spaces``) of each node's space after :meth:`select`.
    """

    STAGES = ("full", "selective", "pruned")

    def __init__(self, in_features: int, out_features: int, spaces: Sequence[str] = SPACES, num_bases: int = 8,
                 grid_range: Sequence[float] = (-1.0, 1.0), bias: bool = True) -> None:
        super().__init__()
        in_features, out_features = v.positive_int("in_features", in_features), v.positive_int("out_features",
                                                                                                out_features)
        num_bases = v.positive_int("num_bases", num_bases, high=MAX_GRID)
        if num_bases < 4 or num_bases % 2:
            raise v.ConfigError(f"num_bases={num_bases!r}: expected an even integer in [4, {MAX_GRID}]")
        v.float_pair("grid_range", grid_range)
        bias = v.boolean("bias", bias)
        self.spaces = _check_spaces(spaces)
        self.in_features, self.out_features, self.num_bases = in_features, out_features, int(num_bases)
        self.grid_range = tuple(float(v) for v in grid_range)
        self.register_buffer("grid", uniform_grid(in_features, num_bases - 3, 3, self.grid_range))
        std = 1.0 / math.sqrt(in_features * num_bases)
        self.coefficients = nn.ParameterDict(
            {s: nn.Parameter(torch.randn(out_features, in_features, num_bases) * std) for s in self.spaces})
        self.selection_logits: nn.Parameter | None = nn.Parameter(torch.zeros(in_features, len(self.spaces)))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("chosen", torch.full((in_features,), -1, dtype=torch.long))
        self.stage = "full"
        self.temperature = 1.0

    def set_stage(self, stage: str, temperature: float | None = None) -> None:
        """Switch between ``"full"`` (tau reset to 1) and ``"selective"``; use :meth:`select` for pruning."""
        if stage not in self.STAGES[:2]:
            raise ValueError(f"set_stage accepts 'full' or 'selective' (got {stage!r}); prune with select()")
        if self.stage == "pruned":
            raise RuntimeError("the layer was pruned by select(); its dropped spaces cannot be restored")
        self.stage = stage
        self.temperature = 1.0 if temperature is None else float(temperature)
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")

    def selection_weights(self) -> Tensor:
        """``w`` ``(in, S)``: ``softmax(alpha / tau)``, or one-hot on the chosen space after :meth:`select`."""
        if self.selection_logits is None:
            return F.one_hot(self.chosen, len(self.spaces)).float()
        return torch.softmax(self.selection_logits / self.temperature, dim=-1)

    def selection_entropy(self) -> Tensor:
        """Mean over nodes of ``-sum_s w_is log w_is`` (stage-2 penalty; 0 after :meth:`select`)."""
        w = self.selection_weights()
        return -(w * w.clamp_min(1e-12).log()).sum(-1).mean()

    def forward(self, x: Tensor) -> Tensor:
        check_in_features(x, self.in_features, type(self).__name__)
        shape = x.shape
        x = x.reshape(-1, self.in_features)
        if self.stage == "pruned":
            y = self._pruned_forward(x)
        else:
            w = self.selection_weights().to(x.dtype)
            feats = torch.cat([space_bases(s, x, self.num_bases, self.grid_range, self.grid) * w[:, n, None]
                               for n, s in enumerate(self.spaces)], dim=-1)  # (N, in, S K)
            weight = torch.cat([self.coefficients[s] for s in self.spaces], dim=-1)  # (out, in, S K)
            y = F.linear(feats.reshape(x.shape[0], -1), weight.reshape(self.out_features, -1))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def _pruned_forward(self, x: Tensor) -> Tensor:
        y = x.new_zeros(x.shape[0], self.out_features)
        for s in self.coefficients:
            idx = getattr(self, f"nodes_{s}")
            feats = space_bases(s, x[:, idx], self.num_bases, self.grid_range, self.grid[idx])
            y = y + F.linear(feats.reshape(x.shape[0], -1), self.coefficients[s].reshape(self.out_features, -1))
        return y

    @torch.no_grad()
    def select(self) -> dict[str, int]:
        """Stage 3: keep ``argmax_s alpha_is`` per node, fold its weight into its coefficients, drop the rest.

        Returns ``{space: number of nodes that chose it}``. Irreversible; the optimizer must be rebuilt afterwards
        (:class:`SKANStageCallback` does it via ``trainer.strategy.setup_optimizers``).
        """
        if self.stage == "pruned":
            raise RuntimeError("select() was already called on this layer")
        w = self.selection_weights()
        self.chosen.copy_(w.argmax(-1))
        kept = nn.ParameterDict()
        for n, s in enumerate(self.spaces):
            idx = (self.chosen == n).nonzero().flatten()
            if idx.numel():
                coeff = self.coefficients[s][:, idx] * w[idx, n][None, :, None]
                kept[s] = nn.Parameter(coeff.contiguous())
                self.register_buffer(f"nodes_{s}", idx)
        self.coefficients = kept
        self.selection_logits = None
        self.stage = "pruned"
        return {s: int((self.chosen == n).sum()) for n, s in enumerate(self.spaces)}

    def get_extra_state(self) -> dict[str, Any]:
        """``stage`` and ``temperature``, saved in the ``state_dict`` next to the parameters."""
        return {"stage": self.stage, "temperature": self.temperature}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.stage, self.temperature = state["stage"], float(state["temperature"])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict) and extra.get("stage") == "pruned":
            self._prune_like(state_dict, prefix)
        elif isinstance(extra, dict) and self.stage == "pruned":
            error_msgs.append(f"{prefix or 'SKANLinear'}: cannot load a {extra.get('stage')!r}-stage state into a "
                              "pruned layer (its dropped spaces cannot be restored)")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _prune_like(self, state_dict, prefix: str) -> None:
        """Give this layer the pruned structure (kept spaces, their shapes and node buffers) of a saved state;
        ``load_state_dict`` then fills in the values."""
        ref = next(iter(self.coefficients.values()))
        kept = nn.ParameterDict()
        for s in self.spaces:
            if prefix + f"coefficients.{s}" in state_dict:
                shape = state_dict[prefix + f"coefficients.{s}"].shape
                kept[s] = nn.Parameter(ref.new_empty(shape))
                self.register_buffer(f"nodes_{s}", torch.empty(state_dict[prefix + f"nodes_{s}"].shape,
                                                                dtype=torch.long, device=ref.device))
            elif hasattr(self, f"nodes_{s}"):
                delattr(self, f"nodes_{s}")
        self.coefficients = kept
        self.selection_logits = None
        self.stage = "pruned"

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, spaces={list(self.spaces)}, "
                f"num_bases={self.num_bases}, stage={self.stage}")


def skan_layers(module: nn.Module) -> list[SKANLinear]:
    """Every :class:`SKANLinear` inside ``module``."""
    return [m for m in module.modules() if isinstance(m, SKANLinear)]


class SKANStageCallback(LitActCallback):
    """Drives S-KAN's three stages over epochs for every :class:`SKANLinear` in the LightningModule.

    Epochs ``[0, full_epochs)``: stage 1 (full). ``[full_epochs, full_epochs + selective_epochs)``: stage 2, with
    ``tau`` annealed geometrically from 1 to ``tau_min`` (``tau_e = tau_min ** (e / (selective_epochs - 1))``,
    ``e`` counted from the stage start). A callback cannot change the loss, so the optional entropy penalty is
    exposed as :meth:`penalty`: return ``loss + callback.penalty(self)`` from ``training_step`` to use it; with
    ``entropy_weight=0`` annealing alone sharpens the choice.
    At the start of epoch ``full_epochs + selective_epochs``: stage 3, :meth:`SKANLinear.select` on every layer
    and the optimizers are rebuilt so they no longer hold the dropped parameters.

    Logged keys (loggers and ``trainer.callback_metrics``, through :meth:`LitActCallback.log_metrics`):
    ``skan/temperature`` and ``skan/selection_entropy`` (mean over layers) each epoch;
    ``skan/nodes_<space>`` (nodes choosing each space, summed over layers) once, when pruning.
    """

    def __init__(self, full_epochs: int = 1, selective_epochs: int = 1, tau_min: float = 0.05,
                 entropy_weight: float = 0.0) -> None:
        full_epochs = v.non_negative_int("full_epochs", full_epochs)
        selective_epochs = v.non_negative_int("selective_epochs", selective_epochs)
        tau_min = v.finite_float("tau_min", tau_min, low=0.0, high=1.0, low_open=True)
        entropy_weight = v.finite_float("entropy_weight", entropy_weight, low=0.0)
        super().__init__()
        if full_epochs < 0 or selective_epochs < 0:
            raise ValueError(f"epochs must be >= 0, got full={full_epochs}, selective={selective_epochs}")
        if not 0 < tau_min <= 1:
            raise ValueError(f"tau_min must lie in (0, 1], got {tau_min}")
        if entropy_weight < 0:
            raise ValueError(f"entropy_weight must be >= 0, got {entropy_weight}")
        self.full_epochs, self.selective_epochs = full_epochs, selective_epochs
        self.tau_min, self.entropy_weight = tau_min, entropy_weight

    def temperature(self, epoch: int) -> float:
        """``tau`` during selective epoch ``epoch`` (counted from the start of training)."""
        e = epoch - self.full_epochs
        if self.selective_epochs <= 1:
            return self.tau_min
        return self.tau_min ** (e / (self.selective_epochs - 1))

    def penalty(self, module: nn.Module) -> Tensor | float:
        """``entropy_weight * mean selection entropy`` of the unpruned S-KAN layers (0 outside stage 2)."""
        layers = [m for m in skan_layers(module) if m.stage == "selective"]
        if not layers or self.entropy_weight == 0:
            return 0.0
        return self.entropy_weight * torch.stack([m.selection_entropy() for m in layers]).mean()

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not skan_layers(pl_module):
            raise ValueError("SKANStageCallback: the model has no SKANLinear layer; kanify(model, layer='skan') "
                             "first")

    @override
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch
        layers = skan_layers(pl_module)
        if epoch >= self.full_epochs + self.selective_epochs:
            if layers[0].stage != "pruned":
                counts: dict[str, int] = {}
                for m in layers:
                    for s, c in m.select().items():
                        counts[s] = counts.get(s, 0) + c
                trainer.strategy.setup_optimizers(trainer)
                _forget_checkpoints_before_pruning(trainer)
                self.log_metrics(trainer, {f"skan/nodes_{s}": float(c) for s, c in counts.items()}, trainer.global_step)
            return
        for m in layers:
            if epoch < self.full_epochs:
                m.set_stage("full")
            else:
                m.set_stage("selective", self.temperature(epoch))
        with torch.no_grad():
            entropy = torch.stack([m.selection_entropy() for m in layers]).mean()
        self.log_metrics(trainer, {"skan/temperature": layers[0].temperature, "skan/selection_entropy": entropy},
                 trainer.global_step)


def _forget_checkpoints_before_pruning(trainer: Trainer) -> None:
    """Make every ``ModelCheckpoint`` rank only checkpoints of the pruned model: a best checkpoint from before
    ``select()`` holds parameters the pruned layers no longer have, so ``trainer.test(ckpt_path="best")`` could not
    load it. The earlier files stay on disk."""
    for callback in trainer.checkpoint_callbacks:
        callback.best_k_models = {}
        callback.best_model_path = callback.kth_best_model_path = ""
        callback.best_model_score = None
        callback.kth_value = torch.tensor(float("inf") if callback.mode == "min" else -float("inf"))
