"""``kanify``: swap the MLP blocks of any ``nn.Module`` for KAN-family layers.

Recognised blocks (a module whose name matches ``match``; its direct children are read in registration order,
``nn.Dropout`` / ``nn.Identity`` children ignored, and are assumed to be called in that order by ``forward``):

* **two-layer MLP** ``Linear(d_in, h) -> act -> Linear(h, d_out)`` (e.g. ``TransformerLM``'s ``blocks.N.mlp``,
  ``nn.Sequential(Linear, GELU, Linear)``): ``fc_in`` becomes ``layer(d_in, h')``, ``act`` becomes ``nn.Identity``,
  ``fc_out`` becomes ``layer(h', d_out)`` -- KAN's two-layer ``[d_in, h', d_out]`` shape, with the nonlinearity on
  the edges. **Parameter rule**: ``h'`` is the width whose parameter count is closest to the MLP's
  (``d_in h + h + h d_out + d_out``); the layers' counts are affine in ``h'``, measured on two widths; for
  grouped layers (``num_groups``) ``h'`` is a multiple of ``num_groups``. For GR-KAN
  this gives ``h' ~= h`` (KAT's choice); for a cubic KAN with ``G = 5``, ``h' ~= h / 10``.
* **Linear -> activation** (e.g. ``MLPClassifier``'s ``hidden.N``: ``linear -> act -> dropout``): ``linear``
  becomes ``layer(d_in, d_out)`` and ``act`` becomes ``nn.Identity``. The widths are fixed by the neighbours, so
  the parameter count grows by the layer's per-edge factor (reported in the returned :class:`Replacement`); lower
  ``grid_size`` to trade accuracy for size. For ``MLPClassifier`` use ``match="hidden.*"``; the ``head`` is kept.

Children keep their names (``blocks.N.mlp.fc_in`` is now a KAN layer), so name-filtered hooks still find them;
a ``BatchNorm`` wrapped inside ``act`` is removed together with the activation.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from lit_act.kan.fourier import FourierKANLinear
from lit_act.kan.grkan import GRKANLinear
from lit_act.kan.kan_linear import KANLinear
from lit_act.kan.skan import SKANLinear
from lit_act.selection import match_glob

__all__ = ["LAYERS", "Replacement", "kanify", "layer_class"]

LAYERS: dict[str, type[nn.Module]] = {"kan": KANLinear, "fourier_kan": FourierKANLinear, "skan": SKANLinear,
                                      "grkan": GRKANLinear}


@dataclass(frozen=True)
class Replacement:
    """One swapped block: its name, kind (``"mlp"`` or ``"linear_act"``), widths and parameter counts."""

    name: str
    kind: str
    in_features: int
    hidden: int | None
    out_features: int
    params_before: int
    params_after: int


def layer_class(layer: str) -> type[nn.Module]:
    """The KAN-family layer class registered as ``layer``."""
    if layer not in LAYERS:
        raise ValueError(f"unknown KAN layer {layer!r}; valid: {sorted(LAYERS)}")
    return LAYERS[layer]


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _structure(module: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """``[(name, Linear), (name, act)(, (name, Linear))]`` when ``module`` is a recognised block, else ``None``."""
    kids = [(n, m) for n, m in module.named_children() if not isinstance(m, (nn.Dropout, nn.Identity))]
    if len(kids) not in (2, 3) or not isinstance(kids[0][1], nn.Linear):
        return None
    act = kids[1][1]
    if any(isinstance(m, nn.Linear) for m in act.modules()):
        return None
    if len(kids) == 3:
        fc_in, fc_out = kids[0][1], kids[2][1]
        if not isinstance(fc_out, nn.Linear) or fc_in.out_features != fc_out.in_features:
            return None
    return kids


def _build(cls: type[nn.Module], d_in: int, d_out: int, position: int, kwargs: dict) -> nn.Module:
    if cls is GRKANLinear and "act_init" not in kwargs:
        kwargs = {**kwargs, "act_init": ("identity", "gelu")[position]}  # KAT: identity then gelu
    return cls(d_in, d_out, **kwargs)


def _matched_width(cls: type[nn.Module], d_in: int, d_out: int, target: int, kwargs: dict) -> int:
    """Width ``h'`` (a multiple of ``num_groups`` for grouped layers) whose two-layer count is closest to ``target``."""
    groups = inspect.signature(cls).parameters.get("num_groups")
    step = int(kwargs.get("num_groups", groups.default if groups is not None else 1))

    def count(h: int) -> int:
        return _n_params(_build(cls, d_in, h, 0, kwargs)) + _n_params(_build(cls, h, d_out, 1, kwargs))

    p1, p2 = count(step), count(2 * step)  # the count is affine in h'
    per_unit = (p2 - p1) / step
    return max(step, step * round((step + (target - p1) / per_unit) / step))


def kanify(model: nn.Module, layer: str = "kan", match: str | Sequence[str] = "**.mlp", hidden: int | None = None,
           **layer_kwargs) -> list[Replacement]:
    """Replace every recognised MLP block whose qualified name matches ``match`` in place.

    Args:
        model: any ``nn.Module`` (a LightningModule included).
        layer: one of :data:`LAYERS` (``kan``, ``fourier_kan``, ``skan``, ``grkan``).
        match: glob or list of globs on ``named_modules()`` names (:func:`lit_act.selection.match_glob`: ``*``
            within one dotted segment, ``**`` across dots; the default ``"**.mlp"`` is every module called ``mlp``).
            A block is swapped when any glob matches it, so one list serves several models (``["**.mlp",
            "hidden.*"]`` for ``TransformerLM`` and ``MLPClassifier``).
        hidden: force the hidden width ``h'`` of two-layer replacements instead of the parameter rule.
        **layer_kwargs: passed to every new layer (e.g. ``grid_size=3``).

    Returns:
        One :class:`Replacement` per swapped block. Raises ``ValueError`` when no recognised block matches.
    """
    cls = layer_class(layer)
    patterns = [match] if isinstance(match, str) else list(match)
    matched = [(n, m) for n, m in model.named_modules() if n and any(match_glob(p, n) for p in patterns)]
    blocks = [(n, m, s) for n, m in matched if (s := _structure(m)) is not None]
    if not blocks:
        names = [n for n, _ in matched][:8]
        hint = [n for n, m in model.named_modules() if n and _structure(m) is not None][:8]
        raise ValueError(f"kanify: no Linear -> activation (-> Linear) block matches {patterns}; names matched: "
                         f"{names or 'none'}; recognised blocks in this model: {hint or 'none'}")
    done: list[Replacement] = []
    for name, module, kids in blocks:
        if any(name.startswith(r.name + ".") for r in done):
            continue  # nested inside a block already swapped
        fc_in = kids[0][1]
        ref = fc_in.weight
        before = _n_params(module)
        if len(kids) == 3:
            fc_out = kids[2][1]
            d_in, d_out = fc_in.in_features, fc_out.out_features
            mlp_params = _n_params(fc_in) + _n_params(fc_out)
            width = hidden or _matched_width(cls, d_in, d_out, mlp_params, layer_kwargs)
            setattr(module, kids[0][0], _build(cls, d_in, width, 0, layer_kwargs).to(ref.device, ref.dtype))
            setattr(module, kids[2][0], _build(cls, width, d_out, 1, layer_kwargs).to(ref.device, ref.dtype))
            kind = "mlp"
        else:
            d_in, d_out, width = fc_in.in_features, fc_in.out_features, None
            setattr(module, kids[0][0], _build(cls, d_in, d_out, 1, layer_kwargs).to(ref.device, ref.dtype))
            kind = "linear_act"
        setattr(module, kids[1][0], nn.Identity())
        done.append(Replacement(name, kind, d_in, width, d_out, before, _n_params(module)))
    return done
