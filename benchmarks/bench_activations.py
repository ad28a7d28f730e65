"""Learnable activations vs GELU on CPU: fwd+bwd time (incl. coefficient gradients) and memory, input 8x197x768 fp32.

Goals (issue 5): PAU (5,4) versions A and B <= 1.5x GELU time and >= 10x faster than rational-activations 0.2.0's
pure-PyTorch version A; PAU memory <= 2x GELU; PolyReLU / PolyNorm <= 2x GELU time.

Method. Time: every candidate runs ``y = f(x); y.backward(g)`` once per round, rounds interleave the candidates
(so load from other processes hits all of them alike), and each figure is the median over rounds; ratios are
against GELU's median from the same run. lit-act's modules run with ``backend="auto"`` (the ``torch.compile``'d
kernels at this size; compilation happens in the warm-up, outside the timed rounds); the eager fused kernels are
reported too. Memory: the bytes autograd keeps between forward and backward -- every tensor packed by
``torch.autograd.graph.saved_tensors_hooks`` (deduplicated by storage) plus the output -- which is what an
activation adds to training memory per call.

The reference needs ``.venv/bin/pip install --no-deps rational-activations==0.2.0``; only its pure-PyTorch
function module is imported, and its column is skipped with a message when that import fails.
Run: ``.venv/bin/python -m benchmarks.bench_activations``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from lit_act.activations import PolyNorm, PolyReLU, Rational

SHAPE = (8, 197, 768)
ROUNDS = 15
# rational_activations' own leaky_relu (5, 4) init (REFERENCES.md)
RA_NUM = [0.029793, 0.618374, 2.323309, 3.051936, 1.485420, 0.251024]
RA_DEN = [-1.141955, 4.393160, 0.871471, 0.347197]


def _reference_version_a() -> Callable[[torch.Tensor], torch.Tensor] | None:
    try:
        from rational.torch.rational_pytorch_functions import Rational_PYTORCH_A_F
    except Exception as err:  # noqa: BLE001 - any import failure: report and skip this column
        print(f"rational-activations 0.2.0 not importable ({type(err).__name__}: {err}); skipping its column. "
              "Install: .venv/bin/pip install --no-deps rational-activations==0.2.0")
        return None
    num = nn.Parameter(torch.tensor(RA_NUM))
    den = nn.Parameter(torch.tensor(RA_DEN))
    return lambda x: Rational_PYTORCH_A_F(x, num, den, True)


def _candidates() -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    cands: dict[str, Callable] = {
        "gelu": nn.GELU(),
        "pau_A": Rational(version="A"),
        "pau_B": Rational(version="B"),
        "pau_A_eager": Rational(version="A", backend="eager"),
        "poly_relu": PolyReLU(),
        "poly_norm": PolyNorm(),
        "poly_norm_eager": PolyNorm(backend="eager"),
    }
    reference = _reference_version_a()
    if reference is not None:
        cands["rational_activations_A"] = reference
    return cands


def _step(fn: Callable, x: torch.Tensor, grad: torch.Tensor) -> float:
    start = time.perf_counter()
    fn(x).backward(grad)
    elapsed = time.perf_counter() - start
    x.grad = None
    return elapsed


def saved_bytes(fn: Callable, x: torch.Tensor) -> int:
    """Bytes kept for backward (saved tensors, deduplicated by storage) plus the output."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    storages.setdefault(y.untyped_storage().data_ptr(), y.untyped_storage().nbytes())
    y.sum().backward()
    x.grad = None
    return sum(storages.values())


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(*SHAPE, requires_grad=True)
    grad = torch.randn(*SHAPE)
    cands = _candidates()
    for fn in cands.values():  # warm-up: compiles the fused kernels outside the timed rounds
        for _ in range(2):
            _step(fn, x, grad)
    times: dict[str, list[float]] = {name: [] for name in cands}
    for _ in range(ROUNDS):
        for name, fn in cands.items():
            times[name].append(_step(fn, x, grad))
    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    mem = {name: saved_bytes(fn, x) for name, fn in cands.items()}
    print(f"CPU fwd+bwd, input {'x'.join(map(str, SHAPE))} fp32, {torch.get_num_threads()} threads, "
          f"median of {ROUNDS} interleaved rounds")
    print(f"{'activation':<24}{'ms':>9}{'x GELU':>9}{'memory MB':>11}{'x GELU':>9}")
    for name in cands:
        print(f"{name:<24}{med[name]:>9.2f}{med[name] / med['gelu']:>9.2f}{mem[name] / 2**20:>11.1f}"
              f"{mem[name] / mem['gelu']:>9.2f}")
    print("goals: pau_A/pau_B <= 1.5x GELU time, <= 2x GELU memory; poly_relu/poly_norm <= 2x GELU time")
    if "rational_activations_A" in med:
        for name in ("pau_A", "pau_B"):
            print(f"speed-up {name} vs rational-activations 0.2.0 pure-PyTorch A: "
                  f"{med['rational_activations_A'] / med[name]:.1f}x (goal >= 10x)")


if __name__ == "__main__":
    main()
