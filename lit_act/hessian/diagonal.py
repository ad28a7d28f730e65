"""Exact Hessian and GGN diagonals in one extended backward pass.

Becker & LeCun (1988) backpropagate second derivatives through a layered network; BackPACK's ``DiagHessian`` and
``DiagGGNExact`` (Dangel, Kunstner & Hennig, "BackPACK: Packing more into backprop", ICLR 2020, Sec. 2 and App. A)
make it exact by backpropagating a symmetric factorisation of the Hessian w.r.t. each layer's output instead of its
diagonal. For one block ``r`` (a row: an example, or a position of a sequence model; an example once convolutions or
pooling mix positions) and a chain ``f = m_L o ... o m_1``:

* at the outputs, ``d2L/df_r^2 = S_r S_r^T`` (:func:`lit_act.hessian.losses.output_hessian_factor`; for
  cross-entropy the exact square root of ``diag(p) - p p^T``);
* through ``z = a W^T + b``: ``diag_W += sum_r (sum_k S_r[:,k]^2) (a_r^2)^T``, ``diag_b += sum_r sum_k S_r[:,k]^2``,
  and ``S <- W^T S``;
* through a convolution (BackPACK's ``DiagHConv2d``: weight sharing over positions makes the column's Jacobian a
  sum): with the patches ``U_r`` (``F.unfold``, ``(C_in k^2, P)``), ``diag_W += sum_{r,k} (S_r[k] U_r^T)^2``,
  ``diag_b += sum_{r,k} (sum_p S_r[k, :, p])^2``, and ``S <- conv_transpose(S)``;
* through max pooling ``S`` is scattered to the max positions (kept at the pooled size until a layer needs it, so
  the next convolution gathers only those patches); average pooling, flatten: their transposed Jacobians;
* through an elementwise ``a = phi(h)``: ``S <- phi'(h) S``, and for the Hessian (not the GGN) the residual
  ``diag(phi''(h) * dL/da)`` joins as a diagonal Hessian: one column ``sqrt|res_i|`` per entry with the sign of
  ``res_i`` (BackPACK splits it into ``+`` and ``-`` halves, twice the columns), propagated like the others.
  A residual at a convolution's output that reaches the first convolution (through elementwise layers and at most
  one max pooling) is contracted there from the unfolded gains and patches, without a dense column per entry
  (BackPACK builds a dense ``[V, N, V]`` tensor, ``V`` = the activation's size per example).

So ``diag(H)`` (and the GGN's) for every parameter of the chain costs one forward and roughly one backward per
factor column (``C`` columns for ``C`` classes, plus one per entry of each curved activation after a second
parametrised layer). The output factor is built and column blocks are run to the input ``_BLOCK_ELEMENTS`` entries
at a time, so the memory stays bounded. A chain whose only parametrised layer is the last Linear (a Transformer LM's
head: the walk stops at the final LayerNorm) needs no factor at all, only ``diag(d2L/df_r^2)`` (``p (1 - p)`` for
cross-entropy): on a 2,048-token vocabulary and 32 rows, building the factor (0.5 GB, and its temporaries) had
made the process peak at 2 GB. For ReLU (``phi'' = 0``) there is
no residual and the Hessian diagonal is the GGN's.

The chain is found from the modules, not assumed: one forward with hooks on the leaf modules records their calls, then
walking back from the model's output, each call must have produced exactly the tensor the next one consumed. The
covered modules are ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` (zero padding; stride, dilation, groups, ``"same"``),
parameter-free elementwise activations (:data:`ELEMENTWISE`, and the other parameter-free classes of lit-act's
activation table, such as Hugging Face's ``GELUActivation``, once checked to act elementwise), max and average pooling
(1d/2d, adaptive), ``nn.Identity``, dropout in eval mode and ``nn.Flatten``; a view of the previous output with the
same memory and layout (``hidden[:, 0:]``) counts as that output. The walk stops at the first module outside these rules or
the first functional op / residual connection; parameters before it are "uncovered". When it stops at a final
``nn.LayerNorm`` / ``nn.RMSNorm`` before a Linear head, the pre-norm tail rule (:mod:`lit_act.hessian.norm_tail`)
covers that normalisation and the residual MLP branch before it in closed form. :func:`exact_diagonal` raises
naming that module, or (``on_uncovered="partial"``) returns the covered blocks only, which
:func:`lit_act.hessian.trace.trace` uses as a control variate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_act.hessian.losses import (
    class_targets,
    output_gradient,
    output_hessian_diagonal,
    output_hessian_factor,
    output_loss,
    resolve_output_loss,
    split_batch,
)
from lit_act.hessian.norm_tail import NORMS, NormTail, norm_tail_diagonal
from lit_act.hessian.operator import LossFn, batch_size, example_mean, math_attention, select_parameters
from lit_act.hessian.results import DiagonalResult, block_of
from lit_act.selection import is_activation

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.Softplus, nn.ELU, nn.CELU, nn.SELU,
               nn.Mish, nn.Hardtanh, nn.ReLU6, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid, nn.Hardswish,
               nn.Hardsigmoid)
PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh)  # zero second derivative almost everywhere
CONVS = (nn.Conv1d, nn.Conv2d)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_ONE_D = (nn.Conv1d, nn.MaxPool1d, nn.AdaptiveMaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d)
_SPATIAL = ("conv", "maxpool", "avgpool")
DIAGONAL_CURVATURES = ("hessian", "ggn")
ON_UNCOVERED = ("error", "partial")
COVERED = ("nn.Linear, nn.Conv1d/nn.Conv2d with zero padding, parameter-free elementwise activations, max and average "
           "pooling (1d/2d, adaptive), nn.Flatten, nn.Identity, dropout in eval mode")
_BLOCK_ELEMENTS = 1 << 24  # largest backpropagated factor block (columns are drained in chunks beyond it)


class UncoveredModuleError(ValueError):
    """The exact diagonal rules do not cover a module that owns chosen parameters."""


@dataclass
class _Call:
    name: str
    module: nn.Module
    input: Tensor
    output: Tensor
    indices: Tensor | None = None  # a max pooling layer's argmax indices, recorded in the same forward
    versions: tuple[int, int] | None = None  # the input's and output's ``_version`` right after the call

    def unchanged(self) -> bool:
        """Whether nothing modified the recorded input or output in place after the call."""
        return self.input is None or (self.input._version, self.output._version) == self.versions


@dataclass(frozen=True)
class Chain:
    """The covered tail of the network: calls in forward order, the parameter names they own, and why the walk
    stopped (``None`` when it reached the input); ``norm_tail`` when the walk stopped at a final normalisation layer
    before a Linear head and a residual MLP branch precedes it (:mod:`lit_act.hessian.norm_tail`, whose parameters
    ``covered`` includes)."""

    calls: list[_Call]
    covered: list[str]
    stop: str | None
    norm_tail: NormTail | None = None


def _declared_as(module: nn.Module, classes: tuple[type[nn.Module], ...]) -> bool:
    """``isinstance(module, classes)`` with that class's own ``forward`` (a subclass overriding it, such as
    ``1.7159 * tanh(2 x / 3)`` under ``nn.Tanh``, computes something else)."""
    return any(isinstance(module, c) and type(module).forward is c.forward for c in classes)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, CONVS) and module.padding_mode == "zeros":
        return "conv"
    if isinstance(module, nn.RReLU) and module.training:  # random slopes at every call
        return None
    if (isinstance(module, ELEMENTWISE) or is_activation(module)) and not any(True for _ in module.parameters()):
        return "elementwise"
    if isinstance(module, nn.Identity) or (isinstance(module, nn.modules.dropout._DropoutNd)
                                           and (not module.training or module.p == 0)):
        return "identity"
    if isinstance(module, nn.Flatten):
        return "flatten"
    if isinstance(module, MAX_POOLS) and not module.return_indices:
        return "maxpool"
    if isinstance(module, AVG_POOLS):
        return "avgpool"
    return None


def _shared(module: nn.Module, owners: dict[int, list[str]]) -> bool:
    """Whether one of ``module``'s own parameters is also another module's (tied weights)."""
    return any(len(owners.get(id(p), [])) > 1 for p in module.parameters())


def _not_covered(call: _Call, kind: str | None, calls: int, spatial_after: bool) -> str | None:
    """Why ``call`` cannot join the chain (``None`` if it can), tied weights aside (:func:`_shared`);
    ``spatial_after``: a convolution, pooling or reshaping flatten comes later in the forward pass (its factor then
    has one block per example, not per row)."""
    if kind is None:
        return "is not covered"
    if kind == "elementwise" and getattr(call.module, "inplace", False) and not _declared_as(call.module, (nn.ReLU,)):
        return "works in place (its recorded input is overwritten)"
    if kind == "elementwise" and not _acts_elementwise(call):
        return "is an activation that does not act elementwise (its vector-Jacobian product is not phi' * v)"
    if kind in ("linear", "conv") and not _as_declared(call):
        return ("has parameters other than weight and bias (an adapter such as LoRA?) or a forward that does not "
                "compute its layer")
    if calls > 1:
        return "is called more than once"
    batched = 3 if isinstance(call.module, _ONE_D) else 4
    if kind in _SPATIAL and call.input.ndim != batched:
        return f"has a {call.input.ndim}-D input (only batched {batched}-D inputs are covered)"
    if kind == "flatten" and call.output.shape[:1] != call.input.shape[:1]:
        return "flattens the batch dimension"
    if kind == "linear" and spatial_after and call.input.ndim > 2:
        return f"acts on a {call.input.ndim}-D input before a convolution, pooling or flatten layer"
    return None


_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.RMSNorm)


def _as_declared(call: _Call) -> bool:
    """Whether a Linear, convolution or normalisation call computes what its base class declares from ``weight`` and
    ``bias`` alone: no other parameters (LoRA adapters, ``weight_norm``'s ``weight_g``), and a subclass that
    overrides ``forward`` (e.g. a norm scaling by ``1 + weight``) is checked on the recorded call, entry by entry to a
    few rounding errors of its dtype (convolutions are not: they need the base class's own forward); a check that
    fails to run is a refusal."""
    module = call.module
    if not {n for n, _ in module.named_parameters(recurse=False)} <= {"weight", "bias"}:
        return False
    base = next(b for b in _BASES if isinstance(module, b))
    if type(module).forward is base.forward:
        return True
    if call.input is None or base in (nn.Conv1d, nn.Conv2d):
        return False
    x, bias = call.input, getattr(module, "bias", None)
    try:
        with torch.no_grad():
            if base is nn.Linear:
                expected = F.linear(x, module.weight, bias)
                scale = F.linear(x.abs(), module.weight.abs(), None if bias is None else bias.abs())
            else:
                expected = (F.layer_norm(x, module.normalized_shape, module.weight, bias, module.eps)
                            if base is nn.LayerNorm else F.rms_norm(x, module.normalized_shape, module.weight,
                                                                    module.eps))
                scale = expected.abs() + (0 if bias is None else 2 * bias.abs())
            tol = 4 * torch.finfo(expected.dtype).eps * scale + torch.finfo(expected.dtype).tiny
            return expected.shape == call.output.shape and bool(((expected - call.output).abs() <= tol).all())
    except Exception:  # noqa: BLE001  (mixed dtypes of a casting wrapper, ...): not shown to compute its layer
        return False


def _acts_elementwise(call: _Call) -> bool:
    """Whether an activation call acts entry by entry: the torch classes of :data:`ELEMENTWISE` do; any other
    parameter-free class of the activation table (:func:`lit_act.selection.activation_types`: Hugging Face's
    ``GELUActivation``, your registered ones) is checked on its recorded input, as ``J^T v = phi'(x) * v`` (with
    ``phi' = J^T 1``) for a random ``v``."""
    if _declared_as(call.module, ELEMENTWISE):
        return True
    x = call.input
    if call.output is None or call.output.shape != x.shape or not x.is_floating_point() or not x.numel():
        return False
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 rounding would hide the test
    v = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(0), dtype=x.dtype, device=x.device)
    try:
        with torch.enable_grad():
            xr = x.detach().clone().requires_grad_(True)
            y = call.module(xr * 1)  # not the leaf itself: an in-place module must not fail here
            if not isinstance(y, Tensor) or not y.requires_grad or y.shape != x.shape:
                return False
            (jv,) = torch.autograd.grad(y, xr, v, retain_graph=True)
            (d1,) = torch.autograd.grad(y, xr, torch.ones_like(v))
    except Exception:  # noqa: BLE001  (any failure of a user's module: not shown to act elementwise)
        return False
    return bool(torch.allclose(jv, d1 * v, rtol=1e-4, atol=1e-6 * float(d1.abs().max()) + 1e-30))


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    """``a`` is ``b``, or a differentiable view of it with the same memory and layout (``hidden[:, 0:]`` before a
    Hugging Face LM head): the same values, an identity in between (``detach()`` shares the memory but has no
    ``_base``: a stop-gradient is not an identity)."""
    if a is b:
        return True
    if a is None or b is None or a._base is None and b._base is None:
        return False
    related = a._base is b or b._base is a or a._base is b._base
    return related and a.shape == b.shape and a.stride() == b.stride() and a.data_ptr() == b.data_ptr()


def trace_chain(model: nn.Module, inputs: Tensor) -> tuple[Chain, Tensor]:
    """Run ``model(inputs)`` once (no grad) with hooks on the leaf modules and return the covered tail (module
    docstring) and the outputs."""
    calls: list[_Call] = []
    counts: dict[int, int] = {}
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    # max pooling layers without other forward hooks return their indices to our hook, which passes the output on
    pools = [] if nn.modules.module._global_forward_hooks else [
        m for _, m in leaves if _kind(m) == "maxpool" and not m._forward_hooks]
    with_indices = {id(m) for m in pools}

    def record(name: str, module: nn.Module, args: tuple, output: Any) -> Any:
        counts[id(module)] = counts.get(id(module), 0) + 1
        indices = None
        if id(module) in with_indices:
            output, indices = output
        if len(args) == 1 and isinstance(args[0], Tensor) and isinstance(output, Tensor):
            calls.append(_Call(name, module, args[0], output, indices, (args[0]._version, output._version)))
        else:
            calls.append(_Call(name, module, None, None))  # type: ignore[arg-type]
        return output if indices is not None else None

    handles = [m.register_forward_hook(lambda mod, args, out, n=n: record(n, mod, args, out)) for n, m in leaves]
    try:
        for pool in pools:
            pool.return_indices = True
        with torch.no_grad(), math_attention():
            outputs = model(inputs)
    finally:
        for pool in pools:
            pool.return_indices = False
        for handle in handles:
            handle.remove()
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, p in module.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{module_name}.{pname}" if module_name else pname)
    tail: list[_Call] = []
    current, stop, spatial, norm_tail = outputs, None, False, None
    for index in range(len(calls) - 1, -1, -1):
        call = calls[index]
        if call.output is None or not _same(call.output, current):
            if tail:
                stop = (f"the input of {tail[-1].name!r} is not the output of the module called before it "
                        f"({call.name!r}, {type(call.module).__name__}): a functional op, a residual connection or "
                        "a container's own computation sits between them")
            else:
                stop = ("the model's output is not the output of its last leaf module "
                        f"({call.name!r}, {type(call.module).__name__})")
            break
        if not _read_as_written(call, tail[-1] if tail else None, outputs):
            stop = (f"the output of {call.name!r} ({type(call.module).__name__}) or the input recorded after it is "
                    "modified in place before it is read: the recorded values are not what the loss saw")
            break
        kind = _kind(call.module)
        why = _not_covered(call, kind, counts[id(call.module)], spatial)
        untied = why is None
        if untied and _shared(call.module, owners):
            why = "shares a parameter (tied weights)"
        if why is not None:
            stop = f"module {call.name!r} ({type(call.module).__name__}) {why}; the exact rules cover {COVERED}"
            start = _norm_before_head(calls, index, tail, untied)
            if start is not None:
                norm_tail, stop = _find_norm_tail(calls, *start, counts, owners)
            break
        spatial = spatial or kind in _SPATIAL or (kind == "flatten" and call.input.shape != call.output.shape)
        tail.append(call)
        current = call.input
    tail.reverse()
    covered = [f"{c.name}.{n}" if c.name else n for c in tail for n, _ in c.module.named_parameters(recurse=False)]
    if norm_tail is not None:
        covered += [f"{name}.{n}" for name, module in (norm_tail.fc_in, norm_tail.fc_out, norm_tail.norm)
                    for n, _ in module.named_parameters(recurse=False)]
    return Chain(tail, covered, stop, norm_tail), outputs


def _read_as_written(producer: _Call, consumer: _Call | None, outputs: Tensor) -> bool:
    """Whether ``consumer`` read ``producer``'s output as written, and its recorded input is still what it read (or,
    without a consumer, the model returned it unchanged): no in-place change in between (``_version``), but an
    in-place elementwise activation's own."""
    if consumer is None:
        return outputs._version == producer.versions[1]
    bump = 1 if getattr(consumer.module, "inplace", False) and _kind(consumer.module) == "elementwise" else 0
    return consumer.versions[0] == producer.versions[1] + bump and consumer.input._version == consumer.versions[0]


def _norm_before_head(calls: list[_Call], index: int, tail: list[_Call], untied: bool) -> tuple[int, _Call] | None:
    """Where the walk stopped at ``calls[index]``: ``(index of a normalisation call, the Linear head reading its
    output)`` when the stop is that normalisation right before the covered head, or the head itself when only its
    tied weight stopped it (``untied``: covered but for the sharing; the tail before it is covered all the same),
    only identity calls after the head; else ``None``."""
    call = calls[index]
    if not all(_kind(c.module) == "identity" for c in tail[:-1]):
        return None
    if isinstance(call.module, NORMS) and tail and _kind(tail[-1].module) == "linear":
        return index, tail[-1]
    if untied and _kind(call.module) == "linear" and index > 0 and isinstance(calls[index - 1].module, NORMS) \
            and all(_kind(c.module) == "identity" for c in tail) and _same(calls[index - 1].output, call.input):
        return index - 1, call
    return None


def _find_norm_tail(calls: list[_Call], index: int, head: _Call, counts: dict[int, int],
                    owners: dict[int, list[str]]) -> tuple[NormTail | None, str]:
    """The residual MLP branch ``fc_out(phi(fc_in(h)))`` (identity calls between allowed) whose output, plus a
    tensor computed before ``fc_in`` ran (or nothing), is the input of the normalisation call ``calls[index]``
    before the Linear ``head`` (:mod:`lit_act.hessian.norm_tail`), and where the rules stop; or
    ``(None, why not)``. Every call from ``fc_in`` to the head must be as recorded (nothing modified in place)."""
    norm = calls[index]
    prefix = f"the final normalisation {norm.name!r} ({type(norm.module).__name__}) is covered only after a residual " \
             "MLP branch fc_out(act(fc_in(h))) of nn.Linear layers and a parameter-free elementwise activation"
    d = norm.input.shape[-1] if norm.input is not None else 0
    if tuple(norm.module.normalized_shape) != (d,):
        return None, f"{prefix}; it must normalise the last dimension only"
    if counts[id(norm.module)] > 1 or _shared(norm.module, owners) or not _as_declared(norm):
        return None, (f"{prefix}; the normalisation must be called once, own only its weight and bias, and compute "
                      "what its torch base class computes")

    def back(j: int, consumer: Tensor) -> int:  # the call producing ``consumer``, through identity calls
        while j >= 0 and _same(calls[j].output, consumer) and _kind(calls[j].module) == "identity":
            consumer, j = calls[j].input, j - 1
        return j if j >= 0 and _same(calls[j].output, consumer) else -1

    end = calls[index - 1] if index > 0 else None
    if end is None or end.output is None:
        return None, prefix
    j_out = back(index - 1, end.output)
    j_act = back(j_out - 1, calls[j_out].input) if j_out > 0 else -1
    j_in = back(j_act - 1, calls[j_act].input) if j_act > 0 else -1
    if j_in < 0 or [_kind(calls[j].module) for j in (j_in, j_act, j_out)] != ["linear", "elementwise", "linear"]:
        return None, prefix
    fc_in, act, fc_out = calls[j_in], calls[j_act], calls[j_out]
    for c in (fc_in, act, fc_out):
        why = _not_covered(c, _kind(c.module), 1 if c is act else counts[id(c.module)], False) or (
            "shares a parameter (tied weights)" if _shared(c.module, owners) else None)
        if why is not None:
            return None, f"{prefix}; {c.name!r} {why}"
    if not all(c.unchanged() for c in [*calls[j_in:index + 1], head]):
        return None, f"{prefix}; a tensor between {fc_in.name!r} and the head was modified in place after its call"
    r, z = norm.input, end.output
    if not _same(r, z):
        if r.shape != z.shape:
            return None, f"{prefix}; its input is not the branch's output plus a residual"
        if bool((z.reshape(-1, d) == 0).all(0).any()):  # a zero channel hides how the branch enters r
            return None, (f"{prefix}; a channel of the branch's output is zero on every row (zero-initialised "
                          f"{fc_out.name!r}?), so how it enters the residual cannot be checked")
        s, tol = r - z, 8 * torch.finfo(r.dtype).eps * (r.abs() + z.abs()) + torch.finfo(r.dtype).tiny
        earlier = [fc_in.input] + [t for c in reversed(calls[:j_in]) for t in (c.input, c.output)]  # nearest first
        if not any(t is not None and t.shape == s.shape and bool(((t - s).abs() <= tol).all()) for t in earlier):
            return None, f"{prefix}; the residual added to the branch's output is not computed before {fc_in.name!r}"
    d1, d2 = _elementwise_derivatives(act.module, act.input, act.output)
    return (NormTail((fc_in.name, fc_in.module), (fc_out.name, fc_out.module), (norm.name, norm.module), head.module,
                     fc_in.input, act.output, r, d1, d2),
            f"the pre-norm tail rule covers {fc_in.name!r}, {fc_out.name!r} and {norm.name!r}; what computes the "
            f"input of {fc_in.name!r} and the residual stream is not covered")


def _elementwise_derivatives(module: nn.Module, h: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """``(phi'(h), phi''(h))``: closed forms for ReLU/tanh/sigmoid from the recorded output ``a``; for every other
    elementwise module its exact derivatives by double backward of ``sum(phi(x))`` (elementwise, so the gradient of the
    sum is the derivative at each entry; forward-mode AD is not used: e.g. ``aten::silu_backward`` has none)."""
    if _declared_as(module, (nn.ReLU,)):
        return (h > 0).to(h.dtype), torch.zeros_like(h)
    if _declared_as(module, (nn.Tanh,)):
        d1 = 1 - a.square()
        return d1, -2 * a * d1
    if _declared_as(module, (nn.Sigmoid,)):
        d1 = a * (1 - a)
        return d1, d1 * (1 - 2 * a)
    with torch.enable_grad():
        x = h.detach().requires_grad_(True)
        (d1,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
        d2 = torch.autograd.grad(d1.sum(), x)[0] if d1.requires_grad else torch.zeros_like(h)
    return d1.detach(), d2


@dataclass
class _Factor:
    """A factor ``S diag(signs) S^T`` of the Hessian w.r.t. the tensor ``X`` the pass has reached (``signs`` ``(R, K)``
    of +-1 per column, ``None`` for all +1), ``S[r, k, ...]`` stored in one of four forms:

    * ``dense`` ``(R, K, *feat)``, ``K`` columns per block, in the *row* layout (``R = prod(X.shape[:-1])``,
      ``feat = X.shape[-1:]``: every position of a sequence is its own block, enough for Linear chains) or the
      *example* layout (``R = X.shape[0]``, ``feat = X.shape[1:]``: convolutions and pooling mix positions);
    * ``hessian`` shaped like ``X``: a diagonal Hessian (a residual term, signed entries, one factor column
      ``sqrt|h|`` per entry with the sign of ``h``);
    * ``D[r, k] M[k, i] E[r, i]`` (``diag`` ``(R, d_out)``, ``scale`` ``(d_out, d_in)`` = a Linear weight, ``gain``
      ``(R, d_in)``): a residual term after one Linear layer, kept unexpanded until another layer needs it;
    * ``dense`` ``(N, K, C, Q)`` with ``index`` ``(N, C, Q)``: columns just mapped back through a max pooling layer,
      kept at the pooled size (``S[n, k, c, index[n, c, q]] += dense[n, k, c, q]`` over ``X``'s flattened planes,
      ``shape = X.shape[1:]``) so that an elementwise gain and the next convolution's weight diagonal work on ``Q``
      instead of all positions; scattered when another layer needs it."""

    dense: Tensor | None = None
    signs: Tensor | None = None
    hessian: Tensor | None = None
    diag: Tensor | None = None
    scale: Tensor | None = None
    gain: Tensor | None = None
    index: Tensor | None = None
    shape: tuple[int, ...] | None = None

    def weighted(self, squares: Tensor) -> Tensor:
        """``sum_k signs[r, k] squares[r, k, ...]`` (``squares`` ``(R, K, ...)``)."""
        if self.signs is None:
            return squares.sum(1)
        return (squares * self.signs.reshape(*self.signs.shape, *[1] * (squares.ndim - 2))).sum(1)

    def squares(self, width: int) -> Tensor:
        """``sum_k signs_k S[r, k, i]^2`` in the row layout, ``(R, width)``."""
        if self.hessian is not None:
            return self.hessian.reshape(-1, width)
        if self.index is not None:
            return self.weighted(self.expanded().square()).reshape(-1, width)
        if self.dense is not None:
            return self.weighted(self.dense.square())
        d2 = self.diag.square() if self.signs is None else self.diag.square() * self.signs
        out = d2 @ self.scale.square()
        return out if self.gain is None else out.mul_(self.gain.square())

    def expanded(self) -> Tensor:
        if self.index is not None:
            return self.columns(0, self.dense.shape[1])
        if self.dense is not None:
            return self.dense
        out = self.diag[:, :, None] * self.scale
        return out if self.gain is None else out.mul_(self.gain[:, None, :])

    def columns(self, lo: int, hi: int) -> Tensor:
        """Columns ``lo:hi`` of a dense factor in the example layout, ``(N, hi - lo, *feat)``."""
        block = self.dense[:, lo:hi]
        if self.index is None:
            return block
        n, k, c = block.shape[:3]
        out = block.new_zeros(n, k, c, math.prod(self.shape[1:]))
        out.scatter_add_(3, self.index[:, None].expand(n, k, *self.index.shape[1:]), block)
        return out.reshape(n, k, *self.shape)

    def examples(self, shape: torch.Size) -> _Factor:
        """The example layout for ``X.shape == shape`` (row blocks become one block-diagonal block per example)."""
        if self.hessian is not None:
            return self
        dense = self.expanded()
        n = shape[0]
        if dense.shape[0] == n and dense.shape[2:] == shape[1:]:
            return _Factor(dense, self.signs)
        rows, k, d = dense.shape
        t = rows // n
        blocks = dense.new_zeros(n, t, k, t, d)
        index = torch.arange(t, device=dense.device)
        blocks[:, index, :, index, :] = dense.reshape(n, t, k, d).transpose(0, 1)
        signs = None if self.signs is None else self.signs.reshape(n, t * k)
        return _Factor(blocks.reshape(n, t * k, *shape[1:]), signs)

    def through_linear(self, weight: Tensor) -> _Factor:
        if self.hessian is not None:
            h = self.hessian.reshape(-1, weight.shape[0])
            return _Factor(signs=h.sign(), diag=h.abs().sqrt(), scale=weight)
        f = self.expanded()
        return _Factor((f.reshape(-1, f.shape[-1]) @ weight).reshape(f.shape[0], f.shape[1], -1), self.signs)

    def through_elementwise(self, d1: Tensor) -> _Factor:
        """``d1 = phi'(h)`` shaped like ``X``."""
        if self.index is not None:
            gain = d1.reshape(*self.index.shape[:2], -1).gather(2, self.index)[:, None]
            return _Factor(self.dense * gain, self.signs, index=self.index, shape=self.shape)
        if self.dense is not None:
            example = self.dense.shape[0] == d1.shape[0] and self.dense.shape[2:] == d1.shape[1:]
            return _Factor(self.dense * (d1[:, None] if example else d1.reshape(-1, 1, d1.shape[-1])), self.signs)
        if self.hessian is not None:
            return _Factor(hessian=self.hessian * d1.square())
        d1 = d1.reshape(self.diag.shape[0], -1)
        return _Factor(signs=self.signs, diag=self.diag, scale=self.scale,
                       gain=d1 if self.gain is None else self.gain * d1)


def _nonzero_columns(hessian: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The factor columns of ``diag(h)`` per example that are not zero: ``(index, value, sign)``, all ``(N, K)``
    with ``K`` the largest count (shorter lists padded with zero columns)."""
    flat = hessian.reshape(hessian.shape[0], -1)
    nonzero = flat.ne(0)
    k = int(nonzero.sum(1).max())
    order = torch.sort(nonzero.logical_not().to(torch.uint8), dim=1, stable=True).indices[:, :k]
    h = flat.gather(1, order)
    return order, h.abs().sqrt(), h.sign()


@dataclass
class _ConvGeometry:
    """A Conv1d/Conv2d call as a 2-D convolution (Conv1d has height 1) with explicit zero padding."""

    weight: Tensor  # (C_out, C_in / groups, kh, kw)
    pad: tuple[int, int, int, int]  # F.pad order: left, right, top, bottom
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    padded: tuple[int, int]  # padded input height and width

    @staticmethod
    def of(module: nn.Module, x: Tensor) -> _ConvGeometry:
        one_d = isinstance(module, nn.Conv1d)
        weight = module.weight.unsqueeze(2) if one_d else module.weight
        kernel = module.weight.shape[2:]
        if isinstance(module.padding, str):  # "valid", or "same": the extra padding of an odd total on the right
            totals = [0 if module.padding == "valid" else d * (k - 1) for d, k in zip(module.dilation, kernel)]
            pairs = [(t // 2, t - t // 2) for t in totals]
        else:
            pairs = [(p, p) for p in module.padding]
        pairs = [(0, 0), *pairs] if one_d else pairs
        spatial = x.shape[2:] if not one_d else (1, x.shape[2])
        return _ConvGeometry(weight, (*pairs[1], *pairs[0]), (1, *module.stride) if one_d else tuple(module.stride),
                             (1, *module.dilation) if one_d else tuple(module.dilation), module.groups,
                             (spatial[0] + sum(pairs[0]), spatial[1] + sum(pairs[1])))

    def unfold(self, x: Tensor) -> Tensor:
        """Patches ``(N, groups, C_in / groups * kh * kw, P)`` of the 3-D or 4-D input ``x``."""
        x4 = x.unsqueeze(2) if x.ndim == 3 else x
        left, right, top, bottom = self.pad
        if (left, top) == (right, bottom):  # padded by unfold itself, no padded copy
            cols = F.unfold(x4, self.weight.shape[2:], self.dilation, (top, left), self.stride)
        else:
            cols = F.unfold(F.pad(x4, self.pad), self.weight.shape[2:], dilation=self.dilation, stride=self.stride)
        return cols.reshape(x.shape[0], self.groups, -1, cols.shape[-1])

    def transpose(self, s: Tensor, in_shape: torch.Size) -> Tensor:
        """The adjoint of the convolution (no bias) applied to ``s`` ``(B, C_out, *out)``: ``(B, *in_shape)``."""
        s4 = s.unsqueeze(2) if s.ndim == 3 else s
        kernel = self.weight.shape[2:]
        extra = [size - ((o - 1) * st + d * (k - 1) + 1)
                 for size, o, st, d, k in zip(self.padded, s4.shape[2:], self.stride, self.dilation, kernel)]
        left, right, top, bottom = self.pad
        if (left, top) == (right, bottom):  # cropped by conv_transpose2d itself
            out = F.conv_transpose2d(s4, self.weight, None, self.stride, (top, left), extra, self.groups,
                                     self.dilation)
        else:
            out = F.conv_transpose2d(s4, self.weight, None, self.stride, 0, extra, self.groups, self.dilation)
            out = out[:, :, top:self.padded[0] - bottom, left:self.padded[1] - right]
        return out.reshape(s.shape[0], *in_shape)


class _Backprop:
    """One batch's extended backward pass over ``chain`` (state shared with the column chunks drained separately).

    ``run(i, factors, grad)`` processes calls ``i, i-1, ..., 0``: the factors and ``grad = dL/dX`` are w.r.t. the
    output ``X`` of call ``i``. A Linear or Conv layer adds ``sum_k (J_k)^2`` of each factor's columns to its
    parameters' diagonals; every call then maps the factors to its input (its transposed Jacobian); a curved
    elementwise activation adds its residual factors (Hessian only). A factor whose mapped block would exceed
    ``_BLOCK_ELEMENTS`` is split into column chunks, each run to the input on its own (the diagonal is a sum over
    columns), so the memory stays bounded."""

    def __init__(self, chain: Chain, curvature: str) -> None:
        self.calls = chain.calls
        self.kinds = [_kind(c.module) for c in self.calls]
        self.params_before = [any(k in ("linear", "conv") for k in self.kinds[:i]) for i in range(len(self.calls))]
        self.curved = [curvature == "hessian" and k == "elementwise" and self.params_before[i]
                       and not _declared_as(c.module, PIECEWISE_LINEAR)
                       for i, (k, c) in enumerate(zip(self.kinds, self.calls))]
        self.grad_needed = [any(self.curved[:i + 1]) for i in range(len(self.calls))]
        self.result: dict[str, Tensor] = {}
        self._cache: dict[tuple[str, int], Any] = {}

    def _cached(self, key: str, index: int, make: Callable[[], Any]) -> Any:
        if (key, index) not in self._cache:
            self._cache[key, index] = make()
        return self._cache[key, index]

    def run(self, index: int, factors: list[_Factor], grad: Tensor | None) -> None:
        for i in range(index, -1, -1):
            kind = self.kinds[i]
            if kind == "conv":  # pooled columns are scattered once here unless the patches are gathered instead
                factors = [f if f.index is None or self._gathers(i, f) else _Factor(f.expanded(), f.signs)
                           for f in factors]
            if kind in ("linear", "conv"):
                self._accumulate(i, factors)
            if not self.params_before[i]:
                return
            residual = []
            if kind == "elementwise" and grad is not None and self.curved[i]:
                res = self._derivatives(i)[1] * grad
                if bool(res.ne(0).any()):
                    residual = [_Factor(hessian=res)]
            factors = [g for f in factors for g in self._back(i, f)] + residual
            if grad is not None:
                grad = self._map_grad(i, grad) if self.grad_needed[i - 1] else None

    def _derivatives(self, i: int) -> tuple[Tensor, Tensor]:
        call = self.calls[i]
        return self._cached("d", i, lambda: _elementwise_derivatives(call.module, call.input, call.output))

    def _add(self, i: int, pname: str, value: Tensor) -> None:
        name = f"{self.calls[i].name}.{pname}" if self.calls[i].name else pname
        if name in self.result:
            self.result[name].add_(value)
        else:
            self.result[name] = value

    def _accumulate(self, i: int, factors: list[_Factor]) -> None:
        """Adds the factors' ``sum_k (dX_k / dtheta)^2`` to the diagonal of call ``i``'s parameters."""
        call = self.calls[i]
        module = call.module
        if self.kinds[i] == "linear":
            width = call.output.shape[-1]
            sq = sum(f.squares(width) for f in factors)
            a2 = self._cached("a2", i, lambda: call.input.reshape(-1, call.input.shape[-1]).square())
            self._add(i, "weight", sq.T @ a2)
            if module.bias is not None:
                self._add(i, "bias", sq.sum(0))
            return
        geometry = self._geometry(i)
        patches = self._cached("u", i, lambda: geometry.unfold(call.input))  # (N, G, J, P)
        n, groups, p = patches.shape[0], geometry.groups, patches.shape[-1]
        for f in factors:
            if f.index is not None:  # pooled columns (max pooling next): J = S_k[:, index] U[:, index]^T
                gathered = self._cached("ug", i, lambda f=f: _gather_patches(patches, f.index))  # (N, C, Q, J)
                w = f.weighted(torch.matmul(f.dense.transpose(1, 2), gathered).square_().transpose(1, 2)).sum(0)
                b = f.weighted(f.dense.sum(-1).square_()).sum(0)
            elif f.hessian is not None:  # one (channel, position) entry per column
                h = f.hessian.reshape(n, groups, -1, p)
                u2 = self._cached("u2", i, patches.square)
                w, b = torch.einsum("ngop,ngjp->goj", h, u2), h.sum((0, 3))
            else:  # per column: J = S_k U^T, summed squares
                f = f.examples(call.output.shape)
                k = f.dense.shape[1]
                if groups == 1:
                    w = torch.matmul(f.dense.reshape(n, -1, p), patches[:, 0].transpose(1, 2))
                    w = f.weighted(w.square_().reshape(n, k, -1, w.shape[-1])).sum(0)
                else:
                    s = f.dense.reshape(n, k, groups, -1, p)
                    w = f.weighted(torch.einsum("nkgop,ngjp->nkgoj", s, patches).square_()).sum(0)
                b = f.weighted(f.dense.reshape(n, k, -1, p).sum(-1).square_()).sum(0)
            self._add(i, "weight", w.reshape(module.weight.shape))
            if module.bias is not None:
                self._add(i, "bias", b.reshape(-1))

    def _pool_indices(self, i: int) -> Tensor:
        call = self.calls[i]
        if call.indices is not None:
            return call.indices.reshape(*call.input.shape[:2], -1)
        return self._cached("idx", i, lambda: _max_pool_indices(call.module, call.input))

    def _gathers(self, i: int, f: _Factor) -> bool:
        """Whether conv call ``i`` takes the weight diagonal of pooled columns ``f`` from patches gathered at the
        pooled positions (``J Q`` entries per channel) rather than from the scattered columns (``K P``)."""
        patches = self._cached("u", i, lambda: self._geometry(i).unfold(self.calls[i].input))
        return patches.shape[2] * f.dense.shape[-1] <= f.dense.shape[1] * patches.shape[-1]

    def _geometry(self, i: int) -> _ConvGeometry:
        return self._cached("g", i, lambda: _ConvGeometry.of(self.calls[i].module, self.calls[i].input))

    def _map(self, i: int, s: Tensor) -> Tensor:
        """The transposed Jacobian of the linear (at the recorded input) spatial call ``i`` on ``s``
        ``(N, K, *out)``: ``(N, K, *in)``."""
        call = self.calls[i]
        x, module = call.input, call.module
        n, k = s.shape[:2]
        flat = s.reshape(n * k, *s.shape[2:])
        if self.kinds[i] == "conv":
            out = self._geometry(i).transpose(flat, x.shape[1:])
        elif self.kinds[i] == "maxpool":
            index = self._pool_indices(i)  # (N, C, P_out) into (N, C, P_in)
            channels = x.shape[1]
            out = s.new_zeros(n, k, channels, x[0, 0].numel()).scatter_add_(
                3, index[:, None].expand(n, k, *index.shape[1:]), s.reshape(n, k, channels, -1))
        else:  # average pooling is linear: its adjoint is its gradient
            with torch.enable_grad():
                z = torch.zeros((n * k, *x.shape[1:]), dtype=s.dtype, device=s.device, requires_grad=True)
                (out,) = torch.autograd.grad(module.forward(z), z, flat)
        return out.reshape(n, k, *x.shape[1:])

    def _back(self, i: int, f: _Factor) -> list[_Factor]:
        """``f`` mapped to the input of call ``i`` (``[]`` when its columns were drained in chunks)."""
        call, kind = self.calls[i], self.kinds[i]
        if kind == "identity" or (kind == "flatten" and call.input.shape == call.output.shape):
            return [f]
        if kind == "elementwise":
            return [f.through_elementwise(self._derivatives(i)[0])]
        if kind == "linear":
            return [f.through_linear(call.module.weight)]
        if kind == "maxpool" and f.dense is not None and f.index is None:
            f = f.examples(call.output.shape)
            x = call.input
            index = self._pool_indices(i)
            return [_Factor(f.dense.reshape(*f.dense.shape[:3], -1), f.signs, index=index, shape=x.shape[1:])]
        if f.index is None:
            f = f.examples(call.output.shape)
        if kind == "flatten":
            if f.hessian is not None:
                return [_Factor(hessian=f.hessian.reshape(call.input.shape))]
            dense = f.expanded()
            return [_Factor(dense.reshape(*dense.shape[:2], *call.input.shape[1:]), f.signs)]
        if kind == "maxpool" and f.hessian is not None:  # P^T diag(h) P is diagonal: each output picks one input entry
            x = call.input
            index = self._pool_indices(i)
            h = f.hessian.reshape(*index.shape)
            return [_Factor(hessian=h.new_zeros(*x.shape[:2], x[0, 0].numel()).scatter_add_(2, index, h)
                            .reshape(x.shape))]
        if kind == "conv" and f.hessian is not None and self._into_first_conv(i, f):
            return []
        if f.dense is not None:
            columns, block, signs = f.dense.shape[1], f.columns, f.signs
        else:  # a diagonal Hessian becomes one dense column per nonzero entry
            index, value, signs = _nonzero_columns(f.hessian)
            columns = index.shape[1]

            def block(lo: int, hi: int) -> Tensor:
                out = value.new_zeros(value.shape[0], hi - lo, f.hessian[0].numel())
                out.scatter_(2, index[:, lo:hi, None], value[:, lo:hi, None])
                return out.reshape(value.shape[0], hi - lo, *f.hessian.shape[1:])
        size = call.input.shape[0] * max(call.input[0].numel(), call.output[0].numel())
        chunk = max(1, _BLOCK_ELEMENTS // size)
        if columns <= chunk:
            return [_Factor(self._map(i, block(0, columns)), signs)] if columns else []
        for lo in range(0, columns, chunk):
            hi = min(lo + chunk, columns)
            self.run(i - 1, [_Factor(self._map(i, block(lo, hi)), None if signs is None else signs[:, lo:hi])], None)
        return []

    def _into_first_conv(self, i: int, f: _Factor) -> bool:
        """A diagonal factor at the output of conv call ``i`` whose only parametrised predecessor is conv call
        ``m`` (elementwise layers and at most one max pooling in between, no groups): adds its whole contribution to
        ``m``'s parameters without dense columns, and returns ``True`` (else ``False``, nothing done).

        Column ``(n, o, p)`` is ``D[n, o, p] W_i[o, c, u]`` on input position ``q(p, u)`` of patch ``p``, so
        ``dX_i[o, p] / dW_m[c, j] = D sum_u W_i[o, c, u] g[c, q(p, u)] U_m[j, r(c, q(p, u))]`` with ``g`` the
        elementwise gains, ``r`` the max position (or ``q``) and ``U_m`` the patches of ``m``: unfolding the gains and
        the (gathered) patches with ``i``'s geometry costs ``O(C_out C_in J k^2 P)`` per example instead of a dense
        column of the whole input per ``(o, p)``."""
        before, after, pool, m = [], [], None, i - 1
        while m >= 0 and self.kinds[m] not in ("linear", "conv"):
            kind, call = self.kinds[m], self.calls[m]
            if kind == "elementwise":
                (before if pool is not None else after).append(self._derivatives(m)[0])
            elif kind == "maxpool" and pool is None:
                pool = m
            elif not (kind == "identity" or (kind == "flatten" and call.input.shape == call.output.shape)):
                return False
            m -= 1
        if m < 0 or self.kinds[m] != "conv" or self.params_before[m] or self.calls[i].module.groups != 1 \
                or self.calls[m].module.groups != 1:
            return False
        geometry, x = self._geometry(i), self.calls[i].input
        n, channels = x.shape[:2]
        patches = self._cached("u", m, lambda: self._geometry(m).unfold(self.calls[m].input))  # (N, 1, J, P_m)
        j = patches.shape[2]
        gain = math.prod(after) if after else torch.ones_like(x)
        if pool is not None:
            index = self._pool_indices(pool)  # (N, C, Q)
            if before:
                gain = gain * math.prod(before).reshape(n, channels, -1).gather(2, index).reshape(x.shape)
            image = self._cached("ug", m, lambda: _gather_patches(patches, index)).transpose(2, 3)  # (N, C, J, Q)
            columns = geometry.unfold(image.reshape(n, channels * j, *x.shape[2:]))
        else:
            columns = geometry.unfold(patches.reshape(n, j, *x.shape[2:]))
        p = columns.shape[-1]
        columns = columns.reshape(n, -1, j, geometry.weight[0, 0].numel(), p)  # (N, C or 1, J, k^2, P)
        gains = geometry.unfold(gain).reshape(n, channels, 1, -1, p)  # zero outside the input
        weight = geometry.weight.reshape(geometry.weight.shape[0], channels, -1).transpose(0, 1)  # (C, O, k^2)
        h = f.hessian.reshape(n, weight.shape[1], p).transpose(0, 1)  # (O, N, P)
        columns, gains = columns.permute(1, 3, 0, 4, 2), gains.permute(1, 3, 0, 4, 2)  # (C, k^2, N, P, J or 1)
        w, b = 0, 0
        step = max(1, _BLOCK_ELEMENTS // (weight.shape[0] * weight.shape[1] * j * p))
        for lo in range(0, n, step):  # M[c, o, n, p, j] = sum_u W_i[o, c, u] g U, a few examples at a time
            hi = min(lo + step, n)
            hv = h[:, lo:hi].reshape(1, 1, -1).expand(channels, 1, -1)  # (C, 1, O n P)
            a = torch.mul(columns[:, :, lo:hi], gains[:, :, lo:hi],
                          out=h.new_empty(channels, weight.shape[2], hi - lo, p, j))
            mj = torch.bmm(weight, a.view(channels, weight.shape[2], -1)).square_()
            w = w + torch.bmm(hv, mj.view(channels, -1, j))[:, 0]  # sum_{o, n, p} h M^2
            g = gains[:, :, lo:hi, :, 0].reshape(channels, weight.shape[2], -1)
            b = b + torch.bmm(hv, torch.bmm(weight, g).square_().view(channels, -1, 1))[:, 0, 0]
        module = self.calls[m].module
        self._add(m, "weight", w.reshape(module.weight.shape))
        if module.bias is not None:
            self._add(m, "bias", b)
        return True

    def _map_grad(self, i: int, grad: Tensor) -> Tensor:
        """``dL/d(input of call i)`` from ``grad = dL/d(output)``."""
        call, kind = self.calls[i], self.kinds[i]
        if kind == "identity":
            return grad
        if kind == "elementwise":
            return grad * self._derivatives(i)[0]
        if kind == "linear":
            return grad @ call.module.weight
        if kind == "flatten":
            return grad.reshape(call.input.shape)
        return self._map(i, grad[:, None])[:, 0]


def _gather_patches(patches: Tensor, index: Tensor) -> Tensor:
    """``patches`` ``(N, G, J, P)`` at each output channel's pooled positions ``index`` ``(N, C, Q)``:
    ``(N, C, Q, J)``."""
    n, groups = patches.shape[:2]
    c = index.shape[1]
    rows = patches.transpose(2, 3).contiguous()  # (N, G, P, J): one gathered row per position
    group = torch.arange(c, device=index.device) // (c // groups)
    return rows[torch.arange(n, device=index.device)[:, None, None], group[None, :, None], index]


def _max_pool_indices(module: nn.Module, x: Tensor) -> Tensor:
    """``(N, C, P_out)`` flat indices of the maxima in each input plane (as ``return_indices=True`` gives them)."""
    if isinstance(module, nn.AdaptiveMaxPool1d):
        _, index = F.adaptive_max_pool1d(x, module.output_size, return_indices=True)
    elif isinstance(module, nn.AdaptiveMaxPool2d):
        _, index = F.adaptive_max_pool2d(x, module.output_size, return_indices=True)
    else:
        pool = F.max_pool1d if isinstance(module, nn.MaxPool1d) else F.max_pool2d
        _, index = pool(x, module.kernel_size, module.stride, module.padding, module.dilation, module.ceil_mode,
                        return_indices=True)
    return index.reshape(*x.shape[:2], -1)


def _batch_diagonal(chain: Chain, outputs: Tensor, targets: Tensor, loss: str,
                    curvature: str) -> dict[str, Tensor]:
    """``{parameter name: diagonal}`` of one batch's mean loss for the covered parameters (:class:`_Backprop`)."""
    tail = {} if chain.norm_tail is None else norm_tail_diagonal(chain.norm_tail, outputs, targets, loss, curvature)
    if not chain.calls:  # a tied head: the tail before it alone
        return tail
    bp = _Backprop(chain, curvature)
    bp.result.update(tail)
    last = len(chain.calls) - 1
    grad = output_gradient(loss, outputs, targets) if bp.grad_needed[last] else None
    if bp.kinds[last] == "linear" and not bp.params_before[last]:  # the head alone: only diag(d2L/df^2) is needed
        bp.run(last, [_Factor(hessian=output_hessian_diagonal(loss, outputs))], grad)
        return bp.result
    classes = outputs.shape[-1] if outputs.ndim > 1 else 1
    step = max(1, _BLOCK_ELEMENTS // outputs.numel())  # a block of columns holds R C step entries
    for lo in range(0, classes, step):  # factor columns in blocks (a large C: R C^2 entries in all)
        factor = output_hessian_factor(loss, outputs, slice(lo, lo + step))
        bp.run(last, [_Factor(factor.transpose(1, 2))], grad if lo == 0 else None)  # residuals joined once
    return bp.result


def exact_diagonal(model: nn.Module, batches: Sequence[Any], loss_fn: LossFn | None = None, loss: str | None = None,
                   curvature: str = "hessian", params: Sequence[str] | None = None, on_uncovered: str = "error",
                   all_reduce: Callable[[Tensor], Tensor] | None = None) -> DiagonalResult:
    """Exact diagonal of the Hessian (or GGN) of the example-weighted mean loss over ``batches``.

    Args:
        model: the network (eval mode for dropout; its chain is detected, see the module docstring).
        batches: ``(inputs, targets)`` batches.
        loss_fn: the training loss; it must equal the named ``loss`` on ``model(inputs)`` (checked on the first batch).
        loss: ``"cross_entropy"`` or ``"mse"`` (default: detected for lit-act models).
        curvature: ``"hessian"`` or ``"ggn"``.
        params: parameter names or patterns (``None`` = all trainable).
        on_uncovered: ``"error"`` raises :class:`UncoveredModuleError` naming the first uncovered module;
            ``"partial"`` returns the covered blocks (``result.covered``; uncovered entries are NaN).
        all_reduce: sums over processes (DDP).

    Example::

        res = exact_diagonal(model, [(x, y)], loss="cross_entropy")
        res.trace, res.blocks["0"]
    """
    if curvature not in DIAGONAL_CURVATURES:
        raise ValueError(f"unknown curvature {curvature!r} for an exact diagonal; valid: {list(DIAGONAL_CURVATURES)}")
    if on_uncovered not in ON_UNCOVERED:
        raise ValueError(f"unknown on_uncovered {on_uncovered!r}; valid: {list(ON_UNCOVERED)}")
    batches = list(batches)
    if not batches:
        raise ValueError("exact_diagonal needs at least one batch, got an empty batch list")
    name = resolve_output_loss(model, loss_fn, loss)
    start = time.perf_counter()
    chosen = select_parameters(model, params)
    sums = {n: torch.zeros_like(p, dtype=p.dtype) for n, p in chosen.items()}
    weights = [float(batch_size(b)) for b in batches]
    chain = None
    for index, (batch, weight) in enumerate(zip(batches, weights)):
        inputs, targets = split_batch(batch)
        chain, outputs = trace_chain(model, inputs)
        if name == "cross_entropy":
            class_targets(targets, outputs.shape[-1])
        if index == 0:
            _check_loss_matches(model, loss_fn, batch, name, outputs, targets)
            missing = [n for n in chosen if n not in chain.covered]
            if missing and on_uncovered == "error":
                raise UncoveredModuleError(
                    f"no exact diagonal for {missing[:4]}{' ...' if len(missing) > 4 else ''}: {chain.stop}. Pass "
                    "on_uncovered='partial' (or trace(..., on_uncovered='control_variate')) to compute the covered "
                    "blocks exactly and estimate the rest")
            covered = [n for n in chosen if n in chain.covered]
        elif [n for n in chosen if n in chain.covered] != covered:
            raise ValueError(f"the exact rules cover other parameters on batch {index} than on batch 0 ({chain.stop}); "
                             "pass batches on which the model computes the same way")
        with torch.no_grad():
            values = _batch_diagonal(chain, outputs, targets, name, curvature)
            if not set(covered) <= set(values):
                raise RuntimeError(f"the exact rules returned no value for {sorted(set(covered) - set(values))}")
            for pname in covered:
                sums[pname].add_(values[pname].reshape(sums[pname].shape), alpha=weight)
    parts = example_mean(list(sums.values()), sum(weights), all_reduce)
    blocks: dict[str, float] = {}
    for pname, part in zip(chosen, parts):
        if pname in covered:
            if not torch.isfinite(part.sum()):
                raise FloatingPointError(f"NaN/Inf in the exact diagonal of {pname}: the loss or its curvature is "
                                         "not finite at the current parameters")
            owner = block_of(pname)
            blocks[owner] = blocks.get(owner, 0.0) + float(part.double().sum())
        else:
            part.fill_(float("nan"))
    flat = torch.cat([t.reshape(-1) for t in parts])
    return DiagonalResult(diagonal=flat, names=list(chosen), covered=covered,
                          trace=sum(blocks.values()), blocks=blocks, curvature=curvature,
                          passes=len(batches), seconds=time.perf_counter() - start,
                          uncovered_reason=None if len(covered) == len(chosen) else chain.stop)


def _check_loss_matches(model: nn.Module, loss_fn: LossFn | None, batch: Any, name: str, outputs: Tensor,
                        targets: Tensor) -> None:
    """A custom ``loss_fn`` must be the named loss of ``model(inputs)`` (otherwise the diagonal is another
    function's)."""
    from lit_act.hessian.operator import default_loss_fn

    if loss_fn in (None, default_loss_fn):
        return
    with torch.no_grad(), math_attention():
        given, ours = float(loss_fn(model, batch)), float(output_loss(name, outputs, targets))
    if abs(given - ours) > 1e-5 * max(1.0, abs(ours)):
        raise ValueError(f"loss_fn(model, batch) = {given:.6g} differs from {name}(model(inputs), targets) = "
                         f"{ours:.6g}; the curvature needs the loss named by `loss` (one of cross_entropy, mse) "
                         "applied to model(inputs)")
