"""The tap: select modules of any ``nn.Module`` and observe their outputs with forward hooks that always go away.

TransformerLens-style name-filtered hooks in a context manager::

    modules = select_modules(model, "blocks.*.mlp.act")
    with tap(modules, lambda name, module, x: stats[name].update(neuron_view(x, module))):
        model(batch)
    # every hook is removed here, also when the forward raised

Conventions (shared by every lit-act statistic):

* **Selection** lives in :mod:`lit_act.selection` (``select_modules`` / ``ModuleSelector`` are re-exported here):
  presets (``"activations"``, ``"residual_stream"``, ``"mlp_hidden"``), name globs (``*`` within one dotted
  segment, ``**`` across dots), types, predicates.
* **Observed tensor** (:func:`extract_tensor`): a Tensor output as is; the first element of a tuple/list; for a dict or
  HF ``ModelOutput`` the ``last_hidden_state``, else ``hidden_states``, else the first Tensor value.
* **Neurons** (:func:`neuron_view`): the last dimension for linear / attention / activation outputs of any rank
  ``(..., N)``; the channel dimension 1 for conv layers and for 4-D maps ``(B, C, H, W)`` (3-D ``(B, C, L)`` for
  ``Conv1d``, 5-D for ``Conv3d``). ``neuron_dim=`` overrides.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lit_act.selection import ModuleSelector, select_modules

__all__ = ["ModuleSelector", "count_above", "extract_tensor", "finite_fp32", "is_compiled", "nan_marked",
           "neuron_view", "require_uncompiled", "select_modules", "tap"]  # selection re-exported from its home

_CONV_TYPES = (_ConvNd,)
_SPATIAL_RANKS = (3, 4, 5)  # (B, C, L), (B, C, H, W), (B, C, D, H, W)


def extract_tensor(name: str, output) -> Tensor:
    """The tensor a statistic observes in module ``name``'s ``output``.

    A Tensor is returned as is; a tuple/list gives its first element; a dict or HF-style ``ModelOutput`` (a Mapping)
    gives ``last_hidden_state``, else ``hidden_states`` (its last entry when it is a tuple of per-layer states), else
    its first Tensor value.

    Raises:
        TypeError: naming the module and the type it returned, when no tensor can be found.
    """
    if isinstance(output, Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping):
        for key in ("last_hidden_state", "hidden_states"):
            value = output.get(key)
            if isinstance(value, tuple | list) and value and isinstance(value[-1], Tensor):
                return value[-1]
            if isinstance(value, Tensor):
                return value
        for value in output.values():
            if isinstance(value, Tensor):
                return value
    raise TypeError(f"module {name!r} returned {type(output).__name__}, which holds no tensor the tap can observe "
                    "(expected a Tensor, a tuple/list starting with one, or a dict/ModelOutput with "
                    "'last_hidden_state', 'hidden_states' or a Tensor value); select another module with modules=")


def neuron_view(x: Tensor, module: nn.Module, neuron_dim: int | None = None) -> Tensor:
    """``x`` as a 2-D ``(samples, neurons)`` tensor.

    Neurons are dimension ``neuron_dim`` when given; otherwise the channel dimension 1 when ``module`` is a conv layer
    or ``x`` is a 4-D/5-D map (and 3-D for ``Conv1d``), every other position (batch, space) being a sample; otherwise
    the last dimension (linear, attention, activation outputs ``(..., N)``; tokens are samples).

    Raises:
        ValueError: ``x`` is a scalar, or ``neuron_dim`` is out of range.
    """
    if x.dim() == 0:
        raise ValueError("cannot take neurons of a 0-d tensor; select a module with a (batch, ..., neurons) output")
    if neuron_dim is None:
        conv_map = isinstance(module, _CONV_TYPES) and x.dim() in _SPATIAL_RANKS
        neuron_dim = 1 if conv_map or x.dim() in (4, 5) else -1
    if not -x.dim() <= neuron_dim < x.dim():
        raise ValueError(f"neuron_dim {neuron_dim} out of range for an activation of shape {tuple(x.shape)}")
    if x.dim() == 1:
        return x.unsqueeze(0)
    return x.movedim(neuron_dim, -1).reshape(-1, x.shape[neuron_dim])


@contextmanager
def tap(modules: dict[str, nn.Module], fn: Callable[[str, nn.Module, Tensor], None]) -> Iterator[None]:
    """Call ``fn(name, module, extract_tensor(name, output))`` after every forward of each module in ``modules``
    while the context is open; every hook handle is removed on exit, including when the body raises."""
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(_hook(name, fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(name: str, fn: Callable[[str, nn.Module, Tensor], None]):
    def hook(module: nn.Module, args, output) -> None:
        fn(name, module, extract_tensor(name, output))

    return hook


def finite_fp32(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x.detach() as float32, mask of finite entries)``: statistics accumulate in fp32 (also under bf16/fp16
    autocast) and exclude NaN/Inf entries, which they count instead."""
    x = x.detach().float()
    return x, torch.isfinite(x)


def nan_marked(x: Tensor) -> Tensor:
    """A new fp32 tensor equal to ``x`` with NaN in place of every NaN/Inf entry (``(x - x) + x``: ``x - x`` is 0
    for finite ``x``, NaN otherwise). One allocation; statistics then work in place on it (on CPU, allocating fresh
    activation-sized buffers and boolean masks costs more than the arithmetic itself)."""
    x = x.detach()
    zero_or_nan = torch.sub(x, x)
    return (zero_or_nan if x.dtype == torch.float32 else zero_or_nan.float()).add_(x)


def count_above(marked: Tensor, threshold: float, dim: int) -> tuple[Tensor, Tensor]:
    """``(#entries > threshold, #NaN entries)`` along ``dim`` of a :func:`nan_marked` tensor, as float tensors
    (exact below 2**24 entries per slice). Consumes ``marked`` (overwritten in place)."""
    marked.sub_(threshold).clamp_(min=0).ceil_().clamp_(max=1)  # 1 above, 0 at or below, NaN stays NaN
    above = marked.nansum(dim)
    twice_nan_plus_above = marked.nan_to_num_(nan=2.0).sum(dim)
    return above, (twice_nan_plus_above - above) / 2


def is_compiled(model: nn.Module) -> bool:
    """True when ``model`` was handed to Lightning as a ``torch.compile``'d module, or any of its submodules is
    compiled (``torch.compile(sub)`` wrappers or ``sub.compile()``): forward hooks added afterwards are not seen."""
    if getattr(model, "_compiler_ctx", None) is not None:
        return True
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None
               for m in model.modules())


def require_uncompiled(model: nn.Module, who: str) -> None:
    """Raise a ``RuntimeError`` with the fix when :func:`is_compiled` (``who`` names the callback in the message)."""
    if is_compiled(model):
        raise RuntimeError(
            f"{who} cannot observe a torch.compile'd module: forward hooks added after compilation are not seen by "
            "the compiled graph. Pass the uncompiled LightningModule to the Trainer (or remove this callback when "
            "compiling).")
