"""Rational activations: PAU (Molina et al., "Padé Activation Units", ICLR 2020) and KAT's Group-Rational
(Yang & Wang, "Kolmogorov-Arnold Transformer", ICLR 2025).

``F(x) = P(x) / Q(x)`` with ``P(x) = sum_{j=0..m} a_j x^j`` and, following ml-research/rational_activations,

* version A (safe PAU, paper eq. 3): ``Q = 1 + sum_{k=1..n} |b_k| |x|^k``
* version B: ``Q = 1 + |sum_{k=1..n} b_k x^k|``
* version C: ``Q = 0.1 + |sum_{k=0..n} b_k x^k|``
* version D: B, with every coefficient multiplied by fresh ``U[0.9, 1.1]`` noise in training (numerator and
  denominator; rational_activations' pure-PyTorch D noises only the numerator)
* version N: the unsafe plain Padé ``Q = 1 + sum_k b_k x^k`` (can have poles); only with ``allow_unsafe=True``.

A, B, D have ``Q >= 1`` and C has ``Q >= 0.1``, so they never divide by zero. Coefficients are the parameters
``numerator`` (ascending powers ``0..m``) and ``denominator`` (ascending powers ``1..n``, or ``0..n`` for C).
Evaluation is the fused Horner kernel of :mod:`lit_act.activations.fused`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from lit_act.activations.fit_rational import TABLE_PATH, TARGETS, fit_rational, table_key
from lit_act.activations.fused import RATIONAL_VERSIONS, check_backend, check_floating, rational
from lit_act.activations.registry import register
from lit_act.utils.validate import ConfigError, boolean, choice, int_pair, optional, positive_int

log = logging.getLogger(__name__)

SAFE_VERSIONS = ("A", "B", "C", "D")
# Degrees above this are refused: the fit of a new init grows with m + n (about 35 s at (10, 10) and 2 minutes at
# (40, 40) on one CPU core) and x^m on [-3, 3] in float32 loses the low-order terms well before that.
MAX_DEGREE = 12
SHARING = ("layer", "channel", "group")
NOISE = 0.1  # version D: U[1 - 0.1, 1 + 0.1]


@functools.lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads(TABLE_PATH.read_text())["entries"]


def cache_dir() -> Path:
    """Where fitted inits of unshipped degrees are kept: ``$LIT_ACT_CACHE/rational_init`` (default
    ``~/.cache/lit_act/rational_init``)."""
    root = os.environ.get("LIT_ACT_CACHE") or Path.home() / ".cache" / "lit_act"
    return Path(root) / "rational_init"


def expected_fit_seconds(degrees: tuple[int, int]) -> float:
    """Upper estimate of the CPU time of :func:`fit_rational` for ``degrees`` (measured on one core: (2, 1) 0.05 s,
    (3, 3) 3 s, (6, 5) 20-40 s, (10, 10) 35 s; it depends on how fast the least-squares converges)."""
    return 5.0 + 2.0 * sum(degrees)


def _fit_and_cache(target: str, degrees: tuple[int, int], version: str) -> dict:
    path = cache_dir() / f"{table_key(version, degrees, target).replace('/', '_').replace(',', '-')}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("ignoring unreadable cached rational init %s", path)
    message = (f"rational init for degrees={degrees}, version={version!r}, init={target!r} is not shipped: fitting it "
               f"now (up to about {expected_fit_seconds(degrees):.0f} s on one CPU core; once: cached in {path.parent})")
    log.warning(message)
    warnings.warn(message, UserWarning, stacklevel=4)
    start = time.perf_counter()
    entry = fit_rational(target, degrees, version)
    log.warning("rational init fitted in %.1f s", time.perf_counter() - start)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entry))
        tmp.replace(path)
    except OSError as err:
        log.warning("could not cache the rational init in %s: %s", path, err)
    return entry


@functools.lru_cache(maxsize=256)
def _init_coefficients(target: str, degrees: tuple[int, int], version: str) -> tuple[tuple, tuple]:
    fitted = "B" if version == "D" else version
    entry = _table().get(table_key(fitted, degrees, target))
    if entry is None:  # not shipped: fit once with the routine that generated the table, then cache it
        entry = _fit_and_cache(target, degrees, fitted)
    return tuple(entry["numerator"]), tuple(entry["denominator"])


def rational_init(target: str, degrees: tuple[int, int] = (5, 4), version: str = "A") -> tuple[Tensor, Tensor]:
    """``(numerator, denominator)`` float32 coefficients fitted to ``target`` on [-3, 3].

    Degrees ``(3, 2)``, ``(4, 3)``, ``(5, 4)`` of versions A/B/C/D are shipped (``rational_init.json``). Others (up to
    :data:`MAX_DEGREE` each) are fitted once, with a warning giving the expected seconds, and cached under
    :func:`cache_dir` (``$LIT_ACT_CACHE``)."""
    choice("init", target, sorted(TARGETS))
    degrees = int_pair("degrees", degrees, low=0, high=MAX_DEGREE)
    num, den = _init_coefficients(target, degrees, version)
    return torch.tensor(num, dtype=torch.float32), torch.tensor(den, dtype=torch.float32)


def _check_config(degrees, version: str, allow_unsafe: bool) -> tuple[int, int]:
    choice("version", version, RATIONAL_VERSIONS)
    if version == "N":
        if not boolean("allow_unsafe", allow_unsafe):
            raise ValueError("version 'N' (Q = 1 + sum b_k x^k) can divide by zero; safe versions are "
                             f"{', '.join(SAFE_VERSIONS)}. Pass allow_unsafe=True to use it anyway.")
        warnings.warn("rational version 'N' has an unsafe denominator: outputs can be Inf/NaN near poles",
                      UserWarning, stacklevel=3)
    m, n = int_pair("degrees", degrees, low=0, high=MAX_DEGREE)
    if (m, n) == (0, 0):
        raise ConfigError(f"degrees={degrees!r}: expected a pair of integers in [0, {MAX_DEGREE}], not (0, 0)")
    return m, n


class Rational(nn.Module):
    """Padé Activation Unit ``F(x) = P(x) / Q(x)`` (Molina et al. 2020; versions in the module docstring).

    Args:
        degrees: ``(m, n)`` numerator / denominator degrees (PAU default ``(5, 4)``), integers in ``[0, 12]``
            (:data:`MAX_DEGREE`). (3, 2), (4, 3) and (5, 4) have shipped inits; other degrees are fitted once on first
            use (a warning gives the expected seconds, up to ~45 s at (10, 10)) and cached under ``$LIT_ACT_CACHE``
            (default ``~/.cache/lit_act``).
        version: ``"A"`` (default, safe PAU), ``"B"``, ``"C"``, ``"D"`` or ``"N"`` (unsafe, needs ``allow_unsafe``).
        init: target activation fitted on [-3, 3] (``leaky_relu`` (0.01, PAU's default), ``relu``, ``gelu``,
            ``silu``/``swish``, ``tanh``, ``sigmoid``, ``identity``).
        sharing: ``"layer"`` (one coefficient set, as in PAU), ``"channel"`` (one per channel) or ``"group"``
            (``num_groups`` sets over contiguous channel groups). The last two need ``num_channels``.
        channel_dim: the channel dimension of the input (``1`` for ``(N, C, ...)``, ``-1`` for ``(..., C)``).
        backend: ``"auto"``, ``"compiled"`` or ``"eager"`` (see :mod:`lit_act.activations.fused`).
    """

    def __init__(self, degrees: tuple[int, int] = (5, 4), version: str = "A", init: str = "leaky_relu",
                 sharing: str = "layer", num_channels: int | None = None, num_groups: int | None = None,
                 channel_dim: int = 1, backend: str = "auto", allow_unsafe: bool = False) -> None:
        super().__init__()
        self.degrees = _check_config(degrees, version, allow_unsafe)
        choice("init", init, sorted(TARGETS))
        self.version, self.init, self.backend = version, init, check_backend(backend)
        if isinstance(channel_dim, bool) or not isinstance(channel_dim, int):
            raise ConfigError(f"channel_dim={channel_dim!r}: expected an integer dimension (1 or -1)")
        num_channels = optional(positive_int, "num_channels", num_channels)
        num_groups = optional(positive_int, "num_groups", num_groups)
        self.sharing, self.channel_dim = sharing, channel_dim
        self.num_channels, self.num_groups = num_channels, self._groups(sharing, num_channels, num_groups)
        num, den = rational_init(init, self.degrees, version)
        if sharing != "layer":
            num, den = num.repeat(self.num_groups, 1), den.repeat(self.num_groups, 1)
        self.numerator = nn.Parameter(num)
        self.denominator = nn.Parameter(den)

    @staticmethod
    def _groups(sharing: str, num_channels: int | None, num_groups: int | None) -> int:
        choice("sharing", sharing, SHARING)
        if sharing == "layer":
            return 1
        if not num_channels or num_channels < 1:
            raise ValueError(f"sharing={sharing!r} needs num_channels (the size of the channel dim)")
        groups = num_channels if sharing == "channel" else num_groups
        if not groups or groups < 1 or num_channels % groups:
            raise ValueError(f"num_groups must be a positive divisor of num_channels={num_channels}, got {groups}")
        return groups

    def coefficients(self) -> tuple[Tensor, Tensor]:
        """``(numerator, denominator)`` as ``(groups, ...)`` tables, with version D's training noise applied."""
        num, den = self.numerator.view(self.num_groups, -1), self.denominator.view(self.num_groups, -1)
        if self.version == "D" and self.training:
            num = num * torch.empty_like(num).uniform_(1 - NOISE, 1 + NOISE)
            den = den * torch.empty_like(den).uniform_(1 - NOISE, 1 + NOISE)
        return num, den

    def _grouped(self, x: Tensor) -> Tensor:
        if self.num_groups == 1:
            return x.reshape(1, 1, -1)
        dim = self.channel_dim % x.dim() if x.dim() else 0
        if x.dim() == 0 or x.shape[dim] != self.num_channels:
            raise ValueError(f"expected {self.num_channels} channels in dim {self.channel_dim} of the input, "
                             f"got shape {tuple(x.shape)}")
        return x.reshape(math.prod(x.shape[:dim]), self.num_groups, -1)

    def forward(self, x: Tensor) -> Tensor:
        check_floating(x, type(self).__name__)
        num, den = self.coefficients()
        return rational(self._grouped(x), num, den, self.version, self.backend).view(x.shape)

    def extra_repr(self) -> str:
        return (f"degrees={self.degrees}, version={self.version!r}, init={self.init!r}, sharing={self.sharing!r}, "
                f"num_groups={self.num_groups}")


def _normal_second_moment(module: nn.Module, points: int = 20001, span: float = 10.0) -> float:
    """``E_{x ~ N(0,1)} [F(x)^2]`` by the trapezoid rule on ``[-span, span]`` (float64), averaged over groups."""
    x = torch.linspace(-span, span, points, dtype=torch.float64)
    density = torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    num, den = (c.detach().double().view(module.num_groups if c.dim() > 1 else 1, -1)
                for c in (module.numerator, module.denominator))
    form = "B" if module.version == "D" else module.version
    y = rational(x.view(1, 1, -1).expand(1, max(num.shape[0], den.shape[0]), -1).contiguous(), num, den, form,
                 "eager")[0]
    return float(torch.trapezoid(y**2 * density, x, dim=-1).mean())


class GroupRational(nn.Module):
    """KAT's Group-Rational activation (GR-KAN, Yang & Wang 2025, Sec. 4): a rational function whose numerator
    is shared by all channels and whose denominator has one coefficient set per channel group.

    Acts on the last dimension (``num_features`` channels split into ``num_groups`` contiguous groups, as KAT's
    ``KAT_Group``). The default version is B, ``Q = 1 + |sum_k b_k x^k|``: the form KAT's init coefficients are
    fitted for (``rational_kat_cu/kat_rational/fit.py``). KAT's CUDA/Triton kernels instead evaluate
    ``1 + sum_k |b_k x^k|`` (A-form), so their "gelu" init is not GELU (max error 1.46 on [-3, 3], see
    ``tests/test_activations_rational.py``); here the evaluated formula is the fitted one.

    :meth:`gain` is KAT's variance-preserving gain ``sqrt(1 / E_{x~N(0,1)}[F(x)^2])`` (KAT's patched
    ``calculate_gain``: gelu ``sqrt(2.3568)``, swish ``sqrt(2.8178)``), to scale the init std of the following
    linear layer like ``nn.init.calculate_gain``.
    """

    def __init__(self, num_features: int, num_groups: int = 8, degrees: tuple[int, int] = (5, 4),
                 init: str = "gelu", version: str = "B", backend: str = "auto", allow_unsafe: bool = False) -> None:
        super().__init__()
        num_features, num_groups = positive_int("num_features", num_features), positive_int("num_groups", num_groups)
        if num_features % num_groups:
            raise ConfigError(f"num_groups={num_groups}: expected a divisor of num_features={num_features}")
        self.degrees = _check_config(degrees, version, allow_unsafe)
        choice("init", init, sorted(TARGETS))
        self.num_features, self.num_groups = num_features, num_groups
        self.version, self.init, self.backend = version, init, check_backend(backend)
        num, den = rational_init(init, self.degrees, version)
        self.numerator = nn.Parameter(num)
        self.denominator = nn.Parameter(den.repeat(num_groups, 1))

    def forward(self, x: Tensor) -> Tensor:
        check_floating(x, "GroupRational")
        if x.dim() == 0 or x.shape[-1] != self.num_features:
            raise ValueError(f"GroupRational expects {self.num_features} features in the last dim, "
                             f"got shape {tuple(x.shape)}")
        num, den = self.numerator.view(1, -1), self.denominator
        if self.version == "D" and self.training:
            num = num * torch.empty_like(num).uniform_(1 - NOISE, 1 + NOISE)
            den = den * torch.empty_like(den).uniform_(1 - NOISE, 1 + NOISE)
        grouped = x.reshape(-1, self.num_groups, self.num_features // self.num_groups)
        return rational(grouped, num, den, self.version, self.backend).view(x.shape)

    def gain(self) -> float:
        """Variance-preserving gain ``sqrt(1 / E_{x~N(0,1)}[F(x)^2])`` of the current coefficients."""
        return 1.0 / math.sqrt(_normal_second_moment(self))

    def extra_repr(self) -> str:
        return (f"num_features={self.num_features}, num_groups={self.num_groups}, degrees={self.degrees}, "
                f"version={self.version!r}, init={self.init!r}")


def pau(**kwargs) -> Rational:
    """PAU with the paper's defaults: ``Rational(degrees=(5, 4), version="A", init="leaky_relu")``."""
    return Rational(**kwargs)


register("rational", Rational)
register("pau", pau)
register("group_rational", GroupRational)
