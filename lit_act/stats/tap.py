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
* **Sites** (:func:`tap`): ``{name: module}`` observes outputs; ``{name: Site}`` (any object with ``.module`` and
  ``.port`` in ``"output"``/``"input"``, e.g. :class:`lit_act.selection.Site`) observes the output or the module's
  input (its first positional Tensor argument: the input of a down-projection, as Sparsing Law's CETT needs).
* **Isolation** (:func:`paused`): while open, every callback's (owned) tap is a no-op except the one it allows, so
  lit-act's internal passes (NAC, Hessian-vector products, probe passes, dry runs) are seen by no other callback.
* **Padding** (:func:`valid_tokens`): a ``(B, T)`` token mask selects the real tokens of a ``(B, T, ...)`` output;
  a mask that does not fit raises, naming the module and both shapes.
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


class _TapGate:
    """Global switch of every lit-act tap hook (see :func:`paused`)."""

    depth = 0
    allowed: tuple[object, ...] = ()


@contextmanager
def paused(allow: object | None = None) -> Iterator[None]:
    """While open, every owned tap hook (the taps of lit-act callbacks, ``tap(..., owner=callback)``) is a no-op,
    except those whose ``owner`` is ``allow``. Anonymous taps (``owner=None``: a library pass's own, local taps, as in
    :func:`lit_act.stats.nac.neuron_products`) keep working.

    lit-act's own passes (NAC's forward/backward, Hessian-vector products, shape probes, dry runs, probe passes) run
    inside it, so no callback records another callback's passes::

        with paused():            # nobody observes this pass
            model(batch)
        with paused(allow=self):  # only this callback's taps observe it (a probe pass)
            model(batch)
    """
    previous = _TapGate.allowed
    _TapGate.depth += 1
    _TapGate.allowed = () if allow is None else (allow,)
    try:
        yield
    finally:
        _TapGate.depth -= 1
        _TapGate.allowed = previous


def taps_live(owner: object | None = None) -> bool:
    """Whether a tap of ``owner`` fires now: anonymous taps always; owned ones when no :func:`paused` block is open
    or it allows ``owner``."""
    return owner is None or _TapGate.depth == 0 or owner in _TapGate.allowed


PORTS = ("output", "input")


def site_of(value) -> tuple[nn.Module, str]:
    """``(module, port)`` of a tap target: an ``nn.Module`` (its output) or a site object with ``.module`` and
    ``.port`` (``"output"`` or ``"input"``, e.g. :class:`lit_act.selection.Site`)."""
    if isinstance(value, nn.Module):
        return value, "output"
    module, port = getattr(value, "module", None), getattr(value, "port", None)
    if not isinstance(module, nn.Module) or port not in PORTS:
        raise TypeError(f"a tap target must be an nn.Module or a Site(name, module, port) with port in {PORTS}; "
                        f"got {value!r}")
    return module, port


@contextmanager
def tap(modules: Mapping[str, object], fn: Callable[[str, nn.Module, Tensor], None],
        owner: object | None = None) -> Iterator[None]:
    """Call ``fn(name, module, x)`` after every forward of each target in ``modules`` while the context is open;
    every hook handle is removed on exit, including when the body raises.

    ``modules`` maps names to ``nn.Module``s (``x`` = :func:`extract_tensor` of the output) or to sites with a
    ``port`` (``"output"``, or ``"input"``: ``x`` = the first positional argument of the module's forward, or its
    first Tensor keyword argument). Owned hooks (``owner`` set, e.g. a callback) do nothing inside :func:`paused`
    unless it allows ``owner``."""
    handles = []
    try:
        for name, target in modules.items():
            module, port = site_of(target)
            if port == "output":
                handles.append(module.register_forward_hook(_hook(name, fn, owner)))
            else:
                handles.append(module.register_forward_hook(_input_hook(name, fn, owner), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hook(name: str, fn: Callable[[str, nn.Module, Tensor], None], owner: object | None):
    def hook(module: nn.Module, args, output) -> None:
        if taps_live(owner):
            fn(name, module, extract_tensor(name, output))

    return hook


def _input_hook(name: str, fn: Callable[[str, nn.Module, Tensor], None], owner: object | None):
    def hook(module: nn.Module, args, kwargs, output) -> None:
        if not taps_live(owner):
            return
        values = [*args, *kwargs.values()]
        x = next((v for v in values if isinstance(v, Tensor)), None)
        if x is None:
            raise TypeError(f"the input of module {name!r} holds no Tensor to observe; select its output instead")
        fn(name, module, x)

    return hook


def valid_tokens(name: str, x: Tensor, mask: Tensor | None) -> Tensor:
    """``x`` restricted to the real tokens of a ``(B, T)`` boolean token ``mask``: ``(n_valid, ...)`` for an output
    ``(B, T, ...)``; ``x`` itself when ``mask`` is ``None`` or when ``x`` is a per-sequence ``(B, N)`` output with no
    token axis (a pooler, a classification head: it holds no padding).

    Raises:
        ValueError: naming the module and both shapes, when ``x`` does not start with the mask's ``(B, T)``.
    """
    if mask is None or (x.dim() == 2 and mask.dim() == 2 and x.shape[0] == mask.shape[0]):
        return x
    cacheable = not (x.is_inference() or mask.is_inference())  # inference tensors have no version counter
    if cacheable and _TokenCache.holds(x, mask):
        return _TokenCache.last[3]
    check_mask(name, x, mask)
    tokens = x[mask.to(x.device)]
    _TokenCache.last = (x, mask, (x._version, mask._version), tokens) if cacheable else None
    return tokens


class _TokenCache:
    """The last :func:`valid_tokens` result ``(x, mask, their versions, x[mask])``, shared by every callback observing
    the same output ``x`` (the same tensor object, not modified since) with a mask equal to the cached one (itself not
    modified since): several callbacks on one site copy ``x[mask]`` once. One entry (at most one extra copy alive),
    dropped by :func:`clear_token_cache` when a callback stops collecting. Callers treat the result as read-only."""

    last: tuple[Tensor, Tensor, tuple[int, int], Tensor] | None = None

    @classmethod
    def holds(cls, x: Tensor, mask: Tensor) -> bool:
        if cls.last is None:
            return False
        cached_x, cached_mask, versions, _ = cls.last
        return (cached_x is x and versions == (x._version, cached_mask._version) and cached_mask.shape == mask.shape
                and cached_mask.device == mask.device and (cached_mask is mask or torch.equal(cached_mask, mask)))


def clear_token_cache() -> None:
    """Drop the tensors held by :func:`valid_tokens`' one-entry cache."""
    _TokenCache.last = None


def check_mask(name: str, x: Tensor, mask: Tensor) -> None:
    """Raise a ``ValueError`` naming module ``name`` and both shapes unless ``x`` starts with ``mask.shape``."""
    if x.dim() < mask.dim() or tuple(x.shape[:mask.dim()]) != tuple(mask.shape):
        raise ValueError(f"token mask of shape {tuple(mask.shape)} does not fit the output of module {name!r} of "
                         f"shape {tuple(x.shape)}: its leading dimensions must be (batch, tokens). Select modules "
                         "with (batch, tokens, ...) outputs, or pass adapter=BatchAdapter(mask_fn=...) "
                         "(mask_fn=lambda batch: None turns masking off)")


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
