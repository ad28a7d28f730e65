"""Figures of what learnable activations and KAN layers have learned."""

from __future__ import annotations

import torch
from lightning import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch import Tensor, nn
from typing_extensions import override

from lit_act.callbacks.core import LitActCallback
from lit_act.stats.tap import ModuleSelector, select_modules
from lit_act.utils import validate as v
from lit_act.utils.schedule import is_real_run, validate_every_n

_LEARNABLE_PACKAGES = ("lit_act.activations", "lit_act.kan")


def is_learnable_activation(name: str, module: nn.Module) -> bool:
    """Default selection: modules of ``lit_act.activations`` / ``lit_act.kan`` that own parameters directly."""
    return type(module).__module__.startswith(_LEARNABLE_PACKAGES) and any(
        True for _ in module.parameters(recurse=False))


def _width(module: nn.Module) -> int:
    for attr in ("in_features", "num_features", "num_channels"):
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1


def elementwise_curves(module: nn.Module, x: Tensor, max_curves: int) -> Tensor | None:
    """``(points, curves)``: ``f`` applied to the grid ``x`` replicated over the module's width (at least 2), one
    curve per distinct column (per channel / group); ``None`` when ``f`` is not elementwise (PolyNorm, TopK, layers),
    tested by changing the last column and checking that no other column's output moves."""
    grid = x[:, None].expand(-1, max(_width(module), 2)).contiguous()
    try:
        y = module(grid)
    except (RuntimeError, ValueError):
        return None
    probe = grid.clone()
    probe[:, -1] = 2 * x.flip(0) + 0.5
    if y.shape != grid.shape or not torch.allclose(module(probe)[:, :-1], y[:, :-1], atol=1e-5, rtol=1e-4):
        return None
    return y.unique_consecutive(dim=1)[:, :max_curves]


def response_curves(module: nn.Module, x: Tensor, max_curves: int) -> tuple[Tensor, list[str]]:
    """``(points, curves)``: ``f(x e_i)_j - f(0)_j`` for the first edges ``(i, j)`` of a layer; for a KAN layer these are
    its learned edge functions ``phi_{j,i}`` minus their value at 0."""
    width = _width(module)
    zero = module(torch.zeros(1, width, device=x.device))
    curves, labels = [], []
    for i in range(min(width, max_curves)):
        inputs = torch.zeros(len(x), width, device=x.device)
        inputs[:, i] = x
        out = module(inputs) - zero
        j = i % out.shape[1]
        curves.append(out[:, j])
        labels.append(f"in {i} -> out {j}")
    return torch.stack(curves, dim=1), labels


class LearnedActivationShapes(LitActCallback):
    """Plot the learned shapes: ``f(x)`` of every elementwise learnable activation (PAU / rational per layer, channel
    or group, PolyReLU, APA, ...) and the edge functions ``phi_{j,i}(x) - phi_{j,i}(0)`` of KAN-family layers, on
    ``x`` in ``x_range``, in eval mode and without touching gradients (a quiet pass: no other callback observes it).

    Figures (no logged scalars): ``figures/learned_shapes_epoch<e>.png`` every ``every_n_epochs`` training epochs and
    ``figures/learned_shapes.png`` at train end (PNG + W&B image via :func:`lit_act.utils.figures.save_figure`).

    Args:
        modules: selector (:func:`lit_act.stats.tap.select_modules`); default :func:`is_learnable_activation`. An
            explicit selector that matches nothing raises; the default only says that there is nothing to plot.
        every_n_epochs: also plot at the end of every n-th training epoch (``None``: only at train end).
        x_range, points: the plotted inputs.
        max_curves: curves per module (channels, groups or edges).
    """

    def __init__(self, modules: ModuleSelector = None, every_n_epochs: int | None = None,
                 x_range: tuple[float, float] = (-3.0, 3.0), points: int = 201, max_curves: int = 6) -> None:
        modules, x_range = v.module_selector("modules", modules), v.float_pair("x_range", x_range)
        every_n_epochs = validate_every_n("every_n_epochs", every_n_epochs)
        points = v.integer("points", points, low=2, high=100_000)
        max_curves = v.positive_int("max_curves", max_curves, high=1000)
        super().__init__()
        validate_every_n("every_n_epochs", every_n_epochs)
        if not x_range[0] < x_range[1] or points < 2 or max_curves < 1:
            raise ValueError(f"need x_range[0] < x_range[1], points >= 2, max_curves >= 1; got {x_range}, {points}, "
                             f"{max_curves}")
        self.modules, self.every_n_epochs = modules, every_n_epochs
        self.x_range, self.points, self.max_curves = tuple(x_range), points, max_curves
        self.selected: dict[str, nn.Module] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.modules is not None:
            self.selected = select_modules(pl_module, self.modules)
            return
        self.selected = {n: m for n, m in pl_module.named_modules() if n and is_learnable_activation(n, m)}
        if not self.selected:
            rank_zero_info("LearnedActivationShapes: the model has no learnable activation or KAN layer; nothing "
                           "to plot")

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0 and is_real_run(trainer):
            self.plot(trainer, pl_module, f"learned_shapes_epoch{epoch:04d}")

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if is_real_run(trainer):
            self.plot(trainer, pl_module, "learned_shapes")

    @rank_zero_only
    def plot(self, trainer: Trainer, pl_module: LightningModule, name: str) -> None:
        """Draw one panel per selected module and save it as ``figures/<name>.png``."""
        if not self.selected:
            return
        import matplotlib.pyplot as plt

        device = next(pl_module.parameters()).device
        x = torch.linspace(*self.x_range, self.points, device=device)
        fig, axes = plt.subplots(len(self.selected), 1, figsize=(5, 2.2 * len(self.selected) + 0.5), squeeze=False)
        with self.quiet_pass(pl_module), torch.no_grad():
            for ax, (module_name, module) in zip(axes[:, 0], self.selected.items()):
                curves = elementwise_curves(module, x, self.max_curves)
                labels = [f"channel/group {i}" for i in range(curves.shape[1])] if curves is not None else []
                if curves is None:
                    curves, labels = response_curves(module, x, self.max_curves)
                for curve, label in zip(curves.float().cpu().T, labels):
                    ax.plot(x.cpu(), curve, label=label, linewidth=1.2)
                ax.set_title(f"{module_name} ({type(module).__name__})", fontsize=9)
                ax.set_xlabel("input x")
                ax.set_ylabel("output")
                if len(labels) > 1:
                    ax.legend(fontsize=6)
        fig.tight_layout()
        self.save_figure(trainer, fig, name)
