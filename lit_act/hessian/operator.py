"""The Hessian of a training loss as a linear operator on the flattened parameters.

For batches ``b = 1..B`` with ``n_b`` examples each and a per-batch mean loss ``L_b(theta)``, the operator is

    H = (sum_b n_b * Hess L_b(theta)) / (sum_b n_b),

the Hessian of the example-weighted mean loss over the cached batches (PyHessian's ``dataloader_hv_product`` uses the
same weighting). Under DDP the numerator and ``sum_b n_b`` are summed over ranks by ``all_reduce``, so every rank
applies the same global operator and all ranks do the same number of products.

Backends for ``H v``:

* ``"cached"`` (default): double backward re-using the first-order graph of each batch across products (PyHessian's
  trick for a single batch). The fastest exact backend on CPU (~2x ``"forward"`` on the 784-256-256-10 MLP, see
  ``benchmarks/bench_hessian.py``), but it keeps every cached batch's activations alive while the operator lives.
* ``"forward"``: forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` through
  ``torch.func.functional_call`` (Pearlmutter's R-operator). No graph is kept between products; several vectors are
  pushed through one ``vmap`` call when ``vmap_size > 1`` (the default on CUDA, where it pays; on CPU only for small
  models).
  Falls back to ``"reverse"`` (with a warning) the first time an op lacks forward-mode AD support.
* ``"reverse"``: double backward, ``grad(grad(L) . v)``, rebuilding the graph for every product.

Batch chunking (``chunk_size=c``): each batch of ``n_b`` examples is split along its leading (example) dimension
into sub-batches of at most ``c`` examples (:func:`chunk_batch`; tensors, tuples/lists, Mappings incl. Hugging Face
``BatchEncoding``, dataclasses), and each chunk enters the weighted mean above with its own size. For a loss that is the
mean of per-example losses with the same number of terms per example (classification, an LM's mean token loss without
padding) this is the same operator exactly, in exact arithmetic: ``n_b Hess L_b = sum_c n_c Hess L_c``. With a padding
mask or ``ignore_index`` the per-chunk means weight tokens slightly differently (as gradient accumulation would).
Peak memory then scales with ``c`` instead of ``n_b``; each product costs one pass per chunk. The ``"cached"`` backend
keeps a graph only while the batches make a single chunk in total: with several chunks the products recompute each
chunk's first-order graph (the ``"reverse"`` path), since caching every chunk would keep all activations alive and
undo the saving (:attr:`HessianOperator.caching` says which applies). ``memory_budget=3.0`` chooses the chunks instead:
the graph of as many examples as fit within 3x one backward pass is kept, the rest recomputed
(:mod:`lit_act.hessian.memory`).

Every forward and backward pass of the operator runs under ``sdpa_kernel(SDPBackend.MATH)``: the fused
``scaled_dot_product_attention`` kernels (flash, memory-efficient) have no double backward, the math one is composed of
differentiable ops, so Transformers work with every backend.

No backend touches ``param.grad``. Train-mode BatchNorm updates its running statistics during each forward pass, as any
forward does; :class:`lit_act.callbacks.hessian.HessianSpectrum` restores them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import itertools
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from lit_act.hessian.memory import ChunkPlan, LinearCost, ProductCosts, TensorMemory, plan_chunks

LossFn = Callable[[nn.Module, Any], Tensor]
Backend = Literal["forward", "reverse", "cached"]
BACKENDS = ("forward", "reverse", "cached")


def default_loss_fn(module: nn.Module, batch: Any) -> Tensor:
    """lit-act convention (``lit_act/models/base.py``): ``batch = (inputs, targets)``,
    ``loss = module.loss(module(inputs), targets)``."""
    if not callable(getattr(module, "loss", None)):
        raise TypeError(f"{type(module).__name__} has no `loss(logits, targets)` method; pass "
                        "`loss_fn=lambda module, batch: <scalar loss>` to compute the Hessian of another loss")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError("the default loss expects batches `(inputs, targets)`, got "
                        f"{type(batch).__name__}; pass `loss_fn=lambda module, batch: <scalar loss>`")
    inputs, targets = batch
    return module.loss(module(inputs), targets)


def _is_dataclass_instance(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type)


def _children(batch: Any) -> list[Any] | None:
    """The items of a container batch (tuple/list, Mapping, dataclass) in order; ``None`` for a leaf."""
    if isinstance(batch, Mapping):
        return list(batch.values())
    if _is_dataclass_instance(batch):
        return [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    if isinstance(batch, (tuple, list)):
        return list(batch)
    return None


def _find_size(batch: Any) -> int | None:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.ndim else None
    for item in _children(batch) or []:
        size = _find_size(item)
        if size is not None:
            return size
    return None


def batch_size(batch: Any) -> int:
    """Number of examples in ``batch``: the leading size of its first tensor with at least one dimension, searched
    through tuples/lists, Mappings (``dict``, Hugging Face ``BatchEncoding``) and dataclass fields, in order (weights
    the batch in the mean). A 0-d tensor batch counts as one example."""
    if isinstance(batch, Tensor) and batch.ndim == 0:
        return 1
    size = _find_size(batch)
    if size is None:
        raise TypeError(f"cannot infer the batch size of a {type(batch).__name__}; batches must contain a tensor with "
                        "a leading example dimension (in a tuple/list, Mapping or dataclass)")
    return size


def example_mean(sums: Sequence[Tensor], count: float,
                 all_reduce: Callable[[Tensor], Tensor] | None = None) -> list[Tensor]:
    """``sums / count``: example-weighted sums over ``count`` examples as means. Under DDP (``all_reduce`` sums a tensor
    over processes) each rank holds its own examples' sums and count, so both are reduced first, one reduction per
    tensor."""
    if all_reduce is not None and sums:
        count = float(all_reduce(torch.tensor(count, dtype=torch.float64, device=sums[0].device)))
        sums = [all_reduce(t) for t in sums]
    return [t / count for t in sums]


def _rebuild(batch: Any, items: list[Any]) -> Any:
    """``batch``'s container type around new ``items`` (same order as :func:`_children`)."""
    if isinstance(batch, Mapping):
        data = dict(zip(batch.keys(), items))
        try:
            return type(batch)(data)
        except TypeError:  # a Mapping type without a dict constructor: a plain dict (the forward sees the same keys)
            return data
    if _is_dataclass_instance(batch):
        return dataclasses.replace(batch, **{f.name: item for f, item in zip(dataclasses.fields(batch), items)
                                             if f.init})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*items)
    return type(batch)(items)


def _slice(batch: Any, start: int, stop: int, size: int) -> Any:
    if isinstance(batch, Tensor):
        return batch[start:stop] if batch.ndim and batch.shape[0] == size else batch
    items = _children(batch)
    if items is None:
        return batch  # non-tensor leaves (strings, flags) are shared by every chunk
    return _rebuild(batch, [_slice(item, start, stop, size) for item in items])


def chunk_batch(batch: Any, chunk_size: int) -> list[Any]:
    """``batch`` as consecutive sub-batches of at most ``chunk_size`` examples (the last one may be smaller): every
    tensor whose leading size equals :func:`batch_size` is sliced along it, other tensors and non-tensor leaves are
    shared; tuples/lists/namedtuples, Mappings and dataclasses keep their type. Slices are views (no copies).

    Example::

        chunk_batch({"input_ids": ids, "labels": labels}, 4)  # ids (10, T) -> chunks of 4, 4, 2 examples
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer (examples per chunk), got {chunk_size!r}")
    size = batch_size(batch)
    return split_examples(batch, [min(chunk_size, size - start) for start in range(0, size, chunk_size)])


def split_examples(batch: Any, sizes: Sequence[int]) -> list[Any]:
    """``batch`` as consecutive sub-batches of ``sizes[i]`` examples (summing to :func:`batch_size`), sliced as
    :func:`chunk_batch` does; one size returns ``[batch]`` itself."""
    size = batch_size(batch)
    if sum(sizes) != size or min(sizes) < 1:
        raise ValueError(f"chunk sizes {list(sizes)} must be positive and sum to the batch size {size}")
    if len(sizes) == 1:
        return [batch]
    bounds = [0, *itertools.accumulate(sizes)]
    return [_slice(batch, start, stop, size) for start, stop in zip(bounds, bounds[1:])]


def select_parameters(model: nn.Module, params: Sequence[str] | None) -> dict[str, nn.Parameter]:
    """Trainable parameters of ``model`` by name; ``params`` holds names or ``fnmatch`` patterns (``"hidden.0.*"``),
    ``None`` selects every parameter with ``requires_grad``."""
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if params is None:
        if not trainable:
            raise ValueError(f"{type(model).__name__} has no parameter with requires_grad=True")
        return trainable
    if isinstance(params, str):
        params = [params]
    chosen: dict[str, nn.Parameter] = {}
    for pattern in params:
        hits = [name for name in trainable if fnmatch.fnmatchcase(name, pattern)]
        if not hits:
            raise ValueError(f"parameter pattern {pattern!r} matches no trainable parameter of "
                             f"{type(model).__name__}; trainable parameters: {sorted(trainable)}")
        chosen.update((name, trainable[name]) for name in hits)
    return chosen


class _LossModule(nn.Module):
    """Wraps ``(model, loss_fn)`` so ``functional_call`` can substitute the model's parameters inside ``loss_fn``."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class HessianOperator:
    """``v -> H v`` for the Hessian of ``loss_fn`` over ``batches`` w.r.t. the chosen parameters, flattened in
    ``named_parameters`` order.

    Args:
        model: the module (unwrapped: not the DDP wrapper).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default :func:`default_loss_fn`.
        batches: non-empty sequence of batches (kept as given: move them to the model's device first).
        params: parameter names or ``fnmatch`` patterns; ``None`` = all trainable parameters.
        backend: ``"cached"`` (default), ``"forward"`` or ``"reverse"`` (see the module docstring).
        vmap_size: vectors per ``vmap`` call in :meth:`matmat`; ``None`` = 8 on CUDA, 1 on CPU. With the cached
            backend, blocks of more than one vector then go through vmapped forward-over-reverse products (single
            vectors, as in Lanczos, keep the cached graph): ~1.3x faster per product on a 3.7k-parameter MLP, no gain
            on the 784-256-256-10 MLP (``benchmarks/bench_hessian.py``).
        all_reduce: sums a tensor over processes (DDP); ``None`` for a single process.
        on_matvec: called with the running matvec count after every product (progress bars).
        chunk_size: examples per sub-batch (module docstring, "Batch chunking"): each batch is split along its
            example dimension and the chunks are combined with their sizes as weights, so the operator is unchanged
            and the peak memory of a product is that of one chunk. ``None`` (default): whole batches.
        memory_budget: the most memory one product may take, as a multiple of one backward pass of the (largest)
            batch (e.g. ``3.0``), instead of a fixed ``chunk_size``: the memory of each batch is measured on two
            small sub-batches (:class:`lit_act.hessian.memory.TensorMemory`) and
            :func:`lit_act.hessian.memory.plan_chunks` keeps the graph of as many examples as fit and recomputes
            the rest in the largest chunks that fit (a warning says when even one-example chunks cannot). The
            measurement runs cached products on up to a quarter of each batch, once per operator; pass
            ``chunk_plans`` to reuse a plan. ``None`` (default): no limit.
        chunk_plans: the :attr:`chunk_plans` of an earlier operator with ``memory_budget`` on the same batches.

    Attributes:
        dim: number of scalar parameters.
        matvecs: Hessian-vector products done so far (one per vector, whatever the number of batches).
        names: chosen parameter names.
        batches: the batches the products run over (the chunks when ``chunk_size`` or a plan splits them).
        keep_graph: per entry of ``batches``, whether its first-order graph is kept between products.
        caching: whether every first-order graph is kept (``"cached"`` backend, no recomputed chunk).
        chunk_plans: with ``memory_budget``, the :class:`lit_act.hessian.memory.ChunkPlan` of every batch.

    Example::

        op = HessianOperator(model, None, [(x, y)], chunk_size=8)  # the same H, one 8-example chunk alive at a time
        hv = op.matvec(v)
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn | None, batches: Sequence[Any],
                 params: Sequence[str] | None = None, backend: Backend = "cached", vmap_size: int | None = None,
                 all_reduce: Callable[[Tensor], Tensor] | None = None,
                 on_matvec: Callable[[int], None] | None = None, chunk_size: int | None = None,
                 memory_budget: float | None = None, chunk_plans: Sequence[ChunkPlan] | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {list(BACKENDS)}")
        given = {k: v for k, v in (("chunk_size", chunk_size), ("memory_budget", memory_budget),
                                   ("chunk_plans", chunk_plans)) if v is not None}
        if len(given) > 1:
            raise ValueError(f"give one of chunk_size, memory_budget and chunk_plans, got {sorted(given)}")
        if backend != "cached" and (memory_budget is not None or chunk_plans is not None):
            raise ValueError(f"memory_budget / chunk_plans plan which graphs the 'cached' backend keeps; got "
                             f"backend={backend!r} (use chunk_size to bound its memory)")
        batches = list(batches)
        if not batches:
            raise ValueError("HessianOperator needs at least one batch, got an empty batch list")
        if chunk_plans is not None and [batch_size(b) for b in batches] != [sum(p.sizes) for p in chunk_plans]:
            raise ValueError(f"chunk_plans for batches of {[sum(p.sizes) for p in chunk_plans]} examples do not "
                             f"fit batches of {[batch_size(b) for b in batches]}")
        self.chunk_size = chunk_size
        self.model = model
        self.loss_fn = loss_fn or default_loss_fn
        self.backend: str = backend
        self.all_reduce = all_reduce
        self.on_matvec = on_matvec
        self._params = select_parameters(model, params)
        self.names = list(self._params)
        self._shapes = [p.shape for p in self._params.values()]
        self._numels = [p.numel() for p in self._params.values()]
        self.dim = sum(self._numels)
        first = next(iter(self._params.values()))
        self.dtype, self.device = first.dtype, first.device
        self.chunk_plans: list[ChunkPlan] | None = None
        if memory_budget is not None or chunk_plans is not None:
            self.chunk_plans = list(chunk_plans) if chunk_plans is not None else self._plan(batches, memory_budget)
            batches = [c for b, plan in zip(batches, self.chunk_plans) for c in split_examples(b, plan.sizes)]
            self.keep_graph = [keep for plan in self.chunk_plans for keep in plan.cached]
        else:
            if chunk_size is not None:
                batches = [chunk for batch in batches for chunk in chunk_batch(batch, chunk_size)]
            whole = backend == "cached" and (chunk_size is None or len(batches) == 1)
            self.keep_graph = [whole] * len(batches)
        self.batches = batches
        if vmap_size is None:
            vmap_size = 8 if self.device.type == "cuda" else 1
        if vmap_size < 1:
            raise ValueError(f"vmap_size must be >= 1, got {vmap_size}")
        self.vmap_size = vmap_size
        self._weights = [float(batch_size(b)) for b in batches]
        total = torch.tensor(sum(self._weights), dtype=torch.float64, device=self.device)
        self._total_weight = float(all_reduce(total) if all_reduce is not None else total)
        self._wrapper = _LossModule(model, self.loss_fn)
        self._graphs: dict[int, Any] = {}
        self._vmap_ok = True
        self.matvecs = 0
        with math_attention():
            self._check_loss()

    @classmethod
    def blocks(cls, model: nn.Module, loss_fn: LossFn | None, batches: Sequence[Any],
               **kwargs: Any) -> dict[str, HessianOperator]:
        """One operator per module that directly owns trainable parameters: the diagonal blocks of ``H``
        (per-layer Hessians), keyed by module name."""
        owners = {}
        for module_name, module in model.named_modules():
            own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if own:
                prefix = f"{module_name}." if module_name else ""
                owners[module_name or "<root>"] = [prefix + n for n in own]
        return {name: cls(model, loss_fn, batches, params=names, **kwargs) for name, names in owners.items()}

    # ------------------------------------------------------------------ checks
    def _check_loss(self) -> None:
        """Scalar loss that depends on the chosen parameters (checked on the first batch)."""
        with torch.enable_grad():
            loss = self.loss_fn(self.model, self.batches[0])
            if not isinstance(loss, Tensor) or loss.numel() != 1:
                shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"loss_fn must return a scalar tensor, got {shape}; reduce it (e.g. .mean())")
            if not loss.requires_grad:
                raise ValueError("the loss does not depend on the chosen parameters (it does not require grad); "
                                 f"chosen: {self.names}")
            cached = self.keep_graph[0]  # keep this first-order graph: it is the first batch's cached graph
            grads = torch.autograd.grad(loss.reshape(()), list(self._params.values()), allow_unused=True,
                                        create_graph=cached)
        if cached:
            self._graphs[0] = grads
        unused = [n for n, g in zip(self.names, grads) if g is None]
        if len(unused) == len(self.names):
            raise ValueError(f"the loss does not depend on any chosen parameter: {self.names}")
        if unused:
            warnings.warn(f"the loss does not depend on {unused}; their Hessian rows are zero", stacklevel=3)

    # ------------------------------------------------------------------ vectors
    def split(self, v: Tensor) -> dict[str, Tensor]:
        """Flat ``(dim, ...)`` vector -> ``{name: tensor of the parameter's shape (+ trailing dims)}``."""
        extra = v.shape[1:]
        return {n: t.reshape(*s, *extra) for n, t, s in zip(self.names, v.split(self._numels), self._shapes)}

    def flatten(self, parts: Sequence[Tensor | None], extra: tuple[int, ...] = ()) -> Tensor:
        """Inverse of :meth:`split`; ``None`` parts (unused parameters) become zeros."""
        flat = [torch.zeros(n, *extra, dtype=self.dtype, device=self.device) if t is None else t.reshape(n, *extra)
                for t, n in zip(parts, self._numels)]
        return torch.cat(flat)

    # ------------------------------------------------------------------ products
    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat vector ``v`` of length ``dim``."""
        if v.shape != (self.dim,):
            raise ValueError(f"matvec expects a vector of shape ({self.dim},), got {tuple(v.shape)}")
        return self.matmat(v[:, None])[:, 0]

    def matmat(self, vs: Tensor) -> Tensor:
        """``H V`` for ``V`` of shape ``(dim, m)``, ``vmap_size`` columns per call.

        Columns are processed as contiguous rows of ``V^T`` (a free view when ``V`` is itself the transpose of a
        row-major ``(m, dim)`` block, as the trace estimators pass it); the result is returned the same way, so no
        strided column is ever copied."""
        if vs.ndim != 2 or vs.shape[0] != self.dim:
            raise ValueError(f"matmat expects a matrix of shape ({self.dim}, m), got {tuple(vs.shape)}")
        rows = vs.T.to(dtype=self.dtype, device=self.device).contiguous()
        if rows.shape[0] <= self.vmap_size:  # one call: no output buffer beside the product itself
            with math_attention():
                return self._products(rows).T
        out = torch.empty_like(rows)
        with math_attention():
            for start in range(0, rows.shape[0], self.vmap_size):
                chunk = rows[start:start + self.vmap_size]
                out[start:start + chunk.shape[0]] = self._products(chunk)
        return out.T

    def _products(self, rows: Tensor) -> Tensor:
        """``(m, dim)`` rows -> their products, as rows."""
        if len(self.batches) == 1 and self.all_reduce is None:  # one batch: its own mean, no weighting pass
            acc = self._batch_products(0, self.batches[0], rows)
        else:
            acc = torch.zeros_like(rows)
            for index, (batch, weight) in enumerate(zip(self.batches, self._weights)):
                acc.add_(self._batch_products(index, batch, rows), alpha=weight)
            if self.all_reduce is not None:
                acc = self.all_reduce(acc)
            acc.div_(self._total_weight)
        count = rows.shape[0]
        if not torch.isfinite(acc.sum()) and not torch.isfinite(acc).all():  # the cheap sum test first
            raise FloatingPointError(
                f"NaN/Inf in Hessian-vector product #{self.matvecs + 1}: the loss or its curvature is not finite "
                "at the current parameters (check for diverged training or NaN inputs)")
        for _ in range(count):
            self.matvecs += 1
            if self.on_matvec is not None:
                self.on_matvec(self.matvecs)
        return acc

    def _batch_products(self, index: int, batch: Any, rows: Tensor) -> Tensor:
        """Products of batch ``index``'s mean-loss Hessian with the ``(m, dim)`` rows, as rows."""
        if self.backend == "forward" or (self.backend == "cached" and rows.shape[0] > 1 and self._vmap_ok):
            try:
                return self._forward_products(batch, rows).detach()
            except (RuntimeError, NotImplementedError) as err:
                warnings.warn(f"forward-over-reverse HVP failed ({err}); falling back to double backward",
                              stacklevel=5)
                self._vmap_ok = False
                if self.backend == "forward":
                    self.backend = "reverse"
        if rows.shape[0] == 1:
            return self._reverse_product(index, batch, rows[0])[None]
        return torch.stack([self._reverse_product(index, batch, v) for v in rows])

    def _forward_products(self, batch: Any, rows: Tensor) -> Tensor:
        primals = {f"model.{n}": p.detach() for n, p in self._params.items()}

        def loss_at(values: dict[str, Tensor]) -> Tensor:
            return functional_call(self._wrapper, values, (batch,)).reshape(())

        def hvp(tangent: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(grad(loss_at), (primals,), (tangent,))[1]

        if rows.shape[0] == 1:
            out = hvp({f"model.{n}": t for n, t in self.split(rows[0]).items()})
            return self.flatten([out[f"model.{n}"] for n in self.names])[None]
        tangents = {f"model.{n}": t.reshape(rows.shape[0], *s)
                    for n, t, s in zip(self.names, rows.split(self._numels, dim=1), self._shapes)}
        out = vmap(hvp)(tangents)
        return torch.cat([out[f"model.{n}"].reshape(rows.shape[0], -1) for n in self.names], dim=1)

    @property
    def batch_weights(self) -> list[float]:
        """Each batch's weight in the operator, ``n_b / sum_b n_b`` (summed over processes under DDP)."""
        return [w / self._total_weight for w in self._weights]

    def first_order(self, index: int) -> tuple[Tensor | None, ...]:
        """The gradient of batch ``index``'s mean loss w.r.t. the chosen parameters with its graph (``create_graph``;
        ``None`` for unused parameters): the kept one when ``keep_graph[index]``, else built now."""
        if index in self._graphs:
            return self._graphs[index]
        grads = self._first_order(self.batches[index], list(self._params.values()))
        if self.keep_graph[index]:
            self._graphs[index] = grads
        return grads

    @property
    def caching(self) -> bool:
        """Whether every first-order graph is kept between products."""
        return all(self.keep_graph)

    def _reverse_product(self, index: int, batch: Any, v: Tensor) -> Tensor:
        return self.flatten(self._double_backward(self.first_order(index), list(self.split(v).values()),
                                                  retain=self.keep_graph[index]))

    def _double_backward(self, grads: Sequence[Tensor | None], vparts: Sequence[Tensor],
                         retain: bool) -> list[Tensor | None]:
        """``H v`` per parameter from a first-order graph (``None`` for parameters it does not reach)."""
        params = list(self._params.values())
        keep = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        if not keep:
            return [None] * len(params)
        return list(torch.autograd.grad([grads[i] for i in keep], params, [vparts[i] for i in keep],
                                        retain_graph=retain, allow_unused=True))

    def _plan(self, batches: list[Any], budget: float) -> list[ChunkPlan]:
        """:func:`plan_chunks` from each batch's measured costs, then checked: an operator with the plan does one
        product under :class:`TensorMemory`. A plan over the limit (the costs are not quite linear in the examples,
        e.g. where parameter-sized buffers dominate) is replanned with the costs scaled by measured / predicted, at
        most three times; the plan with the lowest measured peak wins, with a warning if it is still over. The checks
        run the plans themselves: a plan over the limit exceeds the budget while it is checked."""
        # 5% margin: the linear fit from small chunks ran 1-2% low on the reference LM, and a first plan over the
        # limit would exceed the budget while it is being checked
        costs = [self._measure(b).scaled(1.05) for b in batches]
        plans = plan_chunks(costs, budget)
        tried: list[list[ChunkPlan]] = []
        for _ in range(3):
            peak = self._peak(batches, plans)
            tried.append([dataclasses.replace(p, peak=peak) for p in plans])
            if peak <= plans[0].limit:
                break
            costs = [c.scaled(peak / plans[0].peak) for c in costs]
            plans, previous = plan_chunks(costs, budget), plans
            if [p.sizes for p in plans] == [p.sizes for p in previous]:
                break
        best = min(tried, key=lambda ps: ps[0].peak)
        if best[0].peak > best[0].limit:
            warnings.warn(f"memory_budget={budget} cannot be met: the smallest plan found ({best[0].sizes[:4]}... "
                          f"examples per chunk) needs {best[0].peak / best[0].limit * budget:.2f}x one backward "
                          "pass (parameter-sized buffers count too); using it. Raise memory_budget or pass None",
                          stacklevel=3)
        return best

    def _peak(self, batches: list[Any], plans: list[ChunkPlan]) -> int:
        """Measured peak bytes of building an operator with ``plans`` and one product (the kept graphs are built
        with the operator, so one product shows the steady state: every kept graph and one transient at a time)."""
        v = torch.ones(self.dim, dtype=self.dtype, device=self.device)
        with TensorMemory() as mem:
            HessianOperator(self.model, self.loss_fn, batches, params=self.names, chunk_plans=plans).matvec(v)
        return mem.peak

    def _measure(self, batch: Any) -> ProductCosts:
        """:class:`ProductCosts` of ``batch``: one backward pass of it as training runs it (any attention kernel),
        and, on two sub-batches (``n // 8`` and twice that, at least 1 and 2 examples), one :meth:`matvec` of an
        operator that keeps its graph and of one that does not: the same code as the real products, with their
        parameter-sized buffers."""
        n = batch_size(batch)
        params = list(self._params.values())
        with torch.enable_grad(), TensorMemory() as backward:
            torch.autograd.grad(self.loss_fn(self.model, batch).reshape(()), params, allow_unused=True)
        small = max(1, n // 8)
        sizes = (small, min(2 * small, n))
        v = torch.randn(self.dim, generator=torch.Generator(device=self.device).manual_seed(0), dtype=self.dtype,
                        device=self.device)
        values = []
        for size in sizes:
            sub = [split_examples(batch, [size, n - size])[0] if size < n else batch]
            with TensorMemory() as cached:
                op = HessianOperator(self.model, self.loss_fn, sub, params=self.names, backend="cached")
                graph = cached.current
                op.matvec(v)
            del op
            with TensorMemory() as fresh:
                HessianOperator(self.model, self.loss_fn, sub, params=self.names, backend="reverse").matvec(v)
            values.append((graph, cached.peak, fresh.peak))
        return ProductCosts(n, backward.peak, *(LinearCost.fit(sizes, pair) for pair in zip(*values)))

    def _first_order(self, batch: Any, params: list[Tensor]) -> tuple[Tensor, ...]:
        with torch.enable_grad():
            loss = self.loss_fn(self.model, batch).reshape(())
            return torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)

    def release(self) -> None:
        """Drop cached graphs (``"cached"`` backend)."""
        self._graphs = {}


def math_attention() -> contextlib.AbstractContextManager:
    """``sdpa_kernel(SDPBackend.MATH)``: the only ``scaled_dot_product_attention`` backend with a double backward."""
    return sdpa_kernel(SDPBackend.MATH)
