"""Memory of Hessian-vector products: measured tensor memory, and the chunk plan that keeps one product within a
budget of one backward pass.

A cached product (:class:`lit_act.hessian.operator.HessianOperator`, ``backend="cached"``) keeps the first-order graph
of its batch (``torch.autograd.grad(loss, params, create_graph=True)``) between products. That graph holds the
forward activations *and* the intermediate gradients of the first backward, and the double backward adds its own
transients: on the reference TransformerLM one cached product peaks at ~4.4x one backward pass, at any batch size
(the costs are linear in the examples). Splitting the batch bounds the peak (every chunk's product is exact for a mean
of per-example losses, see the operator's "Batch chunking"), but a chunk whose graph is not kept is recomputed for
every product. :func:`plan_chunks` therefore keeps the graph of as many examples as the budget allows and recomputes
the rest in the largest chunks that still fit beside it.

The costs are measured, not modelled: :class:`TensorMemory` is a ``TorchDispatchMode`` that adds up the storages
allocated by every op run under it (forward, backward and double backward: autograd's ops pass through the
dispatcher) until they are freed, so it works on any device, for any model. It counts tensor bytes, as CUDA's
``max_memory_allocated`` does, without an allocator's reserve (not checked on a GPU: none was lent). On the reference
TransformerLM its ratio of one cached product to one backward (4.4x at batch 16) is close to the resident-set
high-water mark of a fresh process (4.0-4.2x, ``python -m benchmarks.bench_hessian --only transformer``). Storages
allocated outside the mode (parameters, inputs, the product's vector) and workspace buffers inside kernels are not
counted.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _tensors(value) -> Iterator[torch.Tensor]:
    """The tensors in an op's arguments or outputs (nested tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _storage(tensor: torch.Tensor) -> tuple[torch.UntypedStorage | None, int | None]:
    """The tensor's storage and its address; ``(None, None)`` for tensors without one (functorch wrappers, tensor
    subclasses whose storage lives in their inner tensors, which the mode sees separately)."""
    try:
        storage = tensor.untyped_storage()
        return storage, storage.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None, None


class TensorMemory(TorchDispatchMode):
    """Bytes of the tensor storages allocated under the mode and still alive (:attr:`current`), and their maximum
    (:attr:`peak`). Outputs that share an input's storage (views, in-place ops) are not new allocations.

    Example::

        with TensorMemory() as mem:
            torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
        mem.peak  # bytes: activations, gradients and backward transients
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {key for t in _tensors((args, kwargs)) if (key := _storage(t)[1]) is not None}
        for tensor in _tensors(out):
            self._track(*_storage(tensor), inputs)
        return out

    def _track(self, storage: torch.UntypedStorage | None, key: int | None, inputs: set[int]) -> None:
        if storage is None:
            return
        size = storage.nbytes()
        if size == 0 or key in self._live or key in inputs:
            return
        self.current += size
        self.peak = max(self.peak, self.current)
        self._live[key] = weakref.ref(storage, lambda _ref, key=key, size=size: self._free(key, size))

    def _free(self, key: int, size: int) -> None:
        self.current -= size
        self._live.pop(key, None)


@dataclasses.dataclass(frozen=True)
class LinearCost:
    """``bytes(n) = intercept + slope * n`` for a batch of ``n`` examples."""

    intercept: float
    slope: float

    @classmethod
    def fit(cls, sizes: tuple[int, int], values: tuple[float, float]) -> LinearCost:
        """Through two measurements; one size (a one-example batch) gives a line through the origin."""
        (n1, n2), (v1, v2) = sizes, values
        if n1 == n2:
            return cls(0.0, v1 / n1)
        slope = max((v2 - v1) / (n2 - n1), 0.0)
        return cls(max(v1 - slope * n1, 0.0), slope)

    def __call__(self, n: int) -> float:
        return self.intercept + self.slope * n


@dataclasses.dataclass(frozen=True)
class ProductCosts:
    """Measured memory of one batch (bytes, each peak counted from before the pass): ``backward`` the peak of one
    forward + backward of the whole batch; as functions of the examples in a chunk, ``graph`` a kept first-order
    graph, ``cached`` building that graph and one product that keeps it, ``fresh`` building a graph and one product
    that frees it as it goes."""

    examples: int
    backward: float
    graph: LinearCost
    cached: LinearCost
    fresh: LinearCost

    def scaled(self, factor: float) -> ProductCosts:
        """The product costs (not the backward's) times ``factor``."""
        return dataclasses.replace(self, **{name: LinearCost(cost.intercept * factor, cost.slope * factor)
                                            for name, cost in (("graph", self.graph), ("cached", self.cached),
                                                               ("fresh", self.fresh))})


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """How one batch is split: ``sizes[i]`` examples per chunk, in order, and whether the chunk's first-order graph is
    kept between products (``cached[i]``; only the first chunk can be). ``peak`` is the peak of a product over the
    whole operator (predicted by :func:`plan_chunks`, measured once the operator has checked the plan) and ``limit``
    the budget, in bytes."""

    sizes: tuple[int, ...]
    cached: tuple[bool, ...]
    peak: float
    limit: float


def _largest(upper: int, fits) -> int:
    """Largest ``c`` in ``1..upper`` with ``fits(c)`` (monotone), 0 if none."""
    low, high = 0, upper
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def _even(total: int, largest: int) -> list[int]:
    """``total`` examples in the fewest chunks of at most ``largest``, sizes differing by at most one."""
    count = math.ceil(total / largest)
    return [total // count + (i < total % count) for i in range(count)]


def plan_chunks(costs: Sequence[ProductCosts], budget: float) -> list[ChunkPlan]:
    """Chunks for every batch so that one product peaks at no more than ``budget`` x one backward pass of the largest
    batch, keeping as many examples' graphs as fit (a kept graph makes later products ~1.4-2x cheaper per example than
    recomputed ones).

    The peak of a product is the memory of every kept graph plus the largest transient: a cached chunk's
    (``cached - graph``) or a recomputed chunk's (``fresh``). If every batch fits whole and cached, nothing is split.
    Otherwise each batch, in order, keeps the graph of its first ``h`` examples, the largest ``h`` whose graph fits
    beside the graphs kept so far and the largest transient so far, including a recomputed one-example chunk; its
    other examples go into the fewest equal chunks whose recomputed product fits beside all kept graphs. When even one
    recomputed example exceeds the budget, the chunks have one example and :attr:`ChunkPlan.peak` says by how much
    the plan misses.

    Example (per example: backward 1, kept graph 2.5, cached product 4.4, recomputed product 3.5; the reference
    TransformerLM's ratios are close to these)::

        per_example = lambda slope: LinearCost(0.0, slope)
        costs = ProductCosts(16, 16.0, per_example(2.5), per_example(4.4), per_example(3.5))
        plan_chunks([costs], 3.0)[0].sizes  # (10, 6): 10 examples' graph kept, 6 recomputed per product
    """
    if not budget > 0:
        raise ValueError(f"memory_budget must be a positive multiple of one backward pass, got {budget!r}")
    limit = budget * max(c.backward for c in costs)

    def transient(c: ProductCosts, n: int) -> float:
        return c.cached(n) - c.graph(n)

    kept = sum(c.graph(c.examples) for c in costs)
    if kept + max(transient(c, c.examples) for c in costs) <= limit:
        return [ChunkPlan((c.examples,), (True,), kept + max(transient(c, c.examples) for c in costs), limit)
                for c in costs]
    heads, kept, largest = [], 0.0, max(c.fresh(1) for c in costs)
    for c in costs:
        head = _largest(c.examples, lambda n, c=c, kept=kept, largest=largest:
                        kept + c.graph(n) + max(largest, transient(c, n)) <= limit)
        heads.append(head)
        if head:
            kept, largest = kept + c.graph(head), max(largest, transient(c, head))
    chunks = []
    for c, head in zip(costs, heads):
        rest = c.examples - head
        size = _largest(rest, lambda n, c=c: kept + c.fresh(n) <= limit) or 1
        chunks.append(_even(rest, size) if rest else [])
    peak = kept + max([transient(c, h) for c, h in zip(costs, heads) if h]
                      + [c.fresh(max(sizes)) for c, sizes in zip(costs, chunks) if sizes])
    return [ChunkPlan(((head,) if head else ()) + tuple(sizes), ((True,) if head else ()) + (False,) * len(sizes),
                      peak, limit) for head, sizes in zip(heads, chunks)]
