"""KAN-family layers vs Linear+GELU: CPU fp32 forward+backward time and memory, 64 -> 64 features, batch 512.

Printed ratios (goal in brackets), each against ``Linear(64, 64) + GELU`` measured in the same run:

* ``KANLinear`` (grid 5, cubic) time (<= 7x; efficient-kan's own code sits at ~15x on this machine);
* ``FourierKANLinear`` (G = 8) time (<= 10x; GistNoesis' naive broadcast ~200x), and the naive broadcast formula
  ``sum((cos(k x) * A), (-2, -1)) + ...`` on the same coefficients, timed and measured;
* ``kan_eager`` (our KANLinear without ``torch.compile``) and ``efficient_kan`` (efficient-kan's forward, autograd
  through the recursion, on the same parameters), informational;
* ``SKANLinear`` (4 spaces x 8 bases), ``GRKANLinear`` (8 groups) and pykan's ``KANLayer`` (grid 5, cubic;
  ``pip install pykan``; skipped with a message when it cannot be imported), informational.

Time: one step = ``layer(x).sum().backward()`` on a fresh input with ``requires_grad`` (so the input gradient is
computed too). Candidates run interleaved, ``ROUNDS`` rounds of ``STEPS`` timed steps after a warm-up, the order
rotating each round; each is summarised by the median of all its steps (robust to load from other processes on the
shared machine). ``torch`` runs on one thread.

Memory, two numbers per candidate:

* **saved for backward**: bytes of every tensor autograd saves between forward and backward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``, storages de-duplicated) -- exact and load-independent, the
  activation memory a training step holds per layer;
* **peak RSS growth**: in a fresh subprocess (layer and input built, one warm-up step run), the peak-RSS counter
  is reset (``/proc/self/clear_refs`` ``5``), one forward+backward runs, and we report ``VmHWM`` minus the ``VmRSS``
  before the step -- includes transient temporaries such as the naive formula's ``(batch, out, in, G)`` product
  (Linux only; reported as n/a elsewhere).

Also printed: PSNR of the FKAN image representation (:class:`~lit_act.kan.FKANImage`, Fourier-KAN first layer)
vs a ReLU MLP of the same widths on scikit-learn's bundled ``china.jpg`` (32 x 32), same steps and learning rate.

Run: ``.venv/bin/python -m benchmarks.bench_kan``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from lit_act.kan import (
    FKANImage,
    FourierKANLinear,
    GRKANLinear,
    KANLinear,
    SKANLinear,
    fit_image,
    load_sample_image,
)
from lit_act.kan.kan_linear import _bspline_math

IN, OUT, BATCH = 64, 64, 512
WARMUP, STEPS, ROUNDS = 5, 20, 5


class NaiveFourier(nn.Module):
    """GistNoesis' ``NaiveFourierKANLayer`` forward on a :class:`FourierKANLinear`'s coefficients (the broadcast
    through a ``(batch, out, in, G)`` intermediate)."""

    def __init__(self, layer: FourierKANLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        k = self.layer.frequencies.view(1, 1, 1, -1)
        kx = x.view(x.shape[0], 1, x.shape[1], 1) * k
        a, b = self.layer.fouriercoeffs
        return (torch.cos(kx) * a).sum((-2, -1)) + (torch.sin(kx) * b).sum((-2, -1)) + self.layer.bias


class EfficientKANReference(nn.Module):
    """efficient-kan's forward as written there: autograd through every step of the Cox-de Boor recursion (our
    :class:`KANLinear` instead uses an analytic bases gradient and fused kernels); same parameters."""

    def __init__(self, layer: KANLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        m = self.layer
        bases = _bspline_math(x, m.grid, m.spline_order)[0]
        spline = torch.nn.functional.linear(bases.reshape(x.shape[0], -1),
                                            m.scaled_spline_weight.reshape(m.out_features, -1))
        return torch.nn.functional.linear(m.base_activation(x), m.base_weight) + spline


class PyKAN(nn.Module):
    """pykan's ``KANLayer`` (returns a tuple; we keep ``y``)."""

    def __init__(self) -> None:
        super().__init__()
        from kan.KANLayer import KANLayer

        self.layer = KANLayer(in_dim=IN, out_dim=OUT, num=5, k=3, device="cpu")

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)[0]


def candidates() -> dict[str, Callable[[], nn.Module]]:
    """Name -> factory (factories so the memory subprocess can rebuild each one)."""
    out: dict[str, Callable[[], nn.Module]] = {
        "linear_gelu": lambda: nn.Sequential(nn.Linear(IN, OUT), nn.GELU()),
        "kan": lambda: KANLinear(IN, OUT),
        "kan_eager": lambda: KANLinear(IN, OUT, backend="eager"),
        "efficient_kan": lambda: EfficientKANReference(KANLinear(IN, OUT)),
        "fourier_kan": lambda: FourierKANLinear(IN, OUT, grid_size=8),
        "fourier_naive": lambda: NaiveFourier(FourierKANLinear(IN, OUT, grid_size=8)),
        "skan": lambda: SKANLinear(IN, OUT),
        "grkan": lambda: GRKANLinear(IN, OUT),
    }
    try:
        PyKAN()
        out["pykan"] = PyKAN
    except Exception as err:  # any import/construct failure: report and skip
        print(f"pykan KANLayer skipped: {type(err).__name__}: {err} (install with `.venv/bin/pip install pykan`)")
    return out


def step(module: nn.Module) -> float:
    x = (torch.rand(BATCH, IN) * 2 - 1).requires_grad_()
    t0 = time.perf_counter()
    module(x).sum().backward()
    return time.perf_counter() - t0


def time_all(mods: dict[str, nn.Module]) -> dict[str, float]:
    for m in mods.values():
        for _ in range(WARMUP):
            step(m)
    samples: dict[str, list[float]] = {n: [] for n in mods}
    names = list(mods)
    for r in range(ROUNDS):
        for n in names[r % len(names):] + names[: r % len(names)]:
            samples[n] += [step(mods[n]) for _ in range(STEPS)]
    return {n: statistics.median(v) for n, v in samples.items()}


def saved_bytes(module: nn.Module) -> int:
    """Bytes autograd saves for backward in one forward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    x = (torch.rand(BATCH, IN) * 2 - 1).requires_grad_()
    params = {id(p) for p in module.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    for p in module.parameters():  # parameters are held anyway; do not count them as activation memory
        if id(p) in params:
            seen.pop(p.untyped_storage().data_ptr(), None)
    y.sum().backward()
    return sum(seen.values())


def rss_growth(name: str) -> int | None:
    """Peak RSS growth (bytes) of one forward+backward of ``name``, in a fresh subprocess (``None``: not Linux)."""
    code = (
        "import json, torch; torch.set_num_threads(1)\n"
        "from benchmarks.bench_kan import candidates, IN, BATCH\n"
        f"m = candidates()[{name!r}]()\n"
        "def step():\n"
        "    x = (torch.rand(BATCH, IN) * 2 - 1).requires_grad_(); m(x).sum().backward()\n"
        "def status(key):\n"
        "    return next(int(line.split()[1]) * 1024 for line in open('/proc/self/status') if line.startswith(key))\n"
        "step(); m.zero_grad(set_to_none=False)\n"
        "open('/proc/self/clear_refs', 'w').write('5'); before = status('VmRSS:')\n"
        "step(); print(json.dumps(status('VmHWM:') - before))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def image_psnr(steps: int = 300) -> tuple[float, float, int, int]:
    """PSNR (dB) of FKAN and of a ReLU MLP (``Linear(2, 64)`` first layer) fitted to the same image."""
    image = load_sample_image(size=32)
    torch.manual_seed(0)
    fkan = FKANImage(hidden=64, depth=3, grid_size=16)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 3))
    count = sum(p.numel() for p in fkan.parameters()), sum(p.numel() for p in mlp.parameters())
    return fit_image(fkan, image, steps, 3e-3), fit_image(mlp, image, steps, 3e-3), *count


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    factories = candidates()
    mods = {n: f() for n, f in factories.items()}
    times = time_all(mods)
    base = times["linear_gelu"]
    goals = {"kan": 7.0, "fourier_kan": 10.0}
    print(f"CPU fp32, 1 thread, {IN}->{OUT}, batch {BATCH}, fwd+bwd; medians of {ROUNDS}x{STEPS} interleaved steps")
    print(f"{'layer':<14} {'median ms':>10} {'x Linear+GELU':>14} {'goal':>6} {'saved MiB':>10} {'peak RSS +MiB':>14}")
    for n in mods:
        goal = f"<={goals[n]:.0f}x" if n in goals else ""
        saved = saved_bytes(mods[n]) / 2**20
        rss = rss_growth(n)
        rss_text = "n/a" if rss is None else f"{rss / 2**20:.1f}"
        print(f"{n:<14} {times[n] * 1e3:>10.3f} {times[n] / base:>13.2f}x {goal:>6} {saved:>10.2f} {rss_text:>14}")
    fk, naive = rss_growth("fourier_kan"), rss_growth("fourier_naive")
    mem = "n/a" if not fk or naive is None else f"{naive / fk:.1f}x smaller"
    print(f"FourierKANLinear vs naive broadcast: time {times['fourier_naive'] / times['fourier_kan']:.1f}x faster, "
          f"peak RSS growth {mem}")
    fkan_psnr, mlp_psnr, fkan_n, mlp_n = image_psnr()
    print(f"image fit (china.jpg 32x32, 300 Adam steps): FKAN {fkan_psnr:.1f} dB ({fkan_n} params) vs ReLU MLP "
          f"{mlp_psnr:.1f} dB ({mlp_n} params)")
    for n, g in goals.items():
        status = "OK" if times[n] / base <= g else "MISSED"
        print(f"goal {n} <= {g:.0f}x Linear+GELU: {times[n] / base:.2f}x {status}")


if __name__ == "__main__":
    main()
