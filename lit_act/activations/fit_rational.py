"""Fit rational-activation initialisations and regenerate the shipped coefficient table.

PAU (Molina et al., "Padé Activation Units", ICLR 2020) initialises ``F = P/Q`` by least squares on ``[-3, 3]``
against a classic activation; ml-research/rational_activations ships such a table for (5, 4) and the versions
A/B/C (D uses B's entries). This module fits any ``(m, n)`` and version, for the targets
:data:`TARGETS`, and records each entry's max abs error on the fitting grid. Method: a linearised Padé solve
(``P(x) - f(x) (Q(x) - 1) = f(x)`` is linear in the coefficients) gives the starting point, then
``scipy.optimize.least_squares`` (TRF) minimises the squared error of the true version formula on 2001 points;
version A optimises ``|b_k|`` directly with ``b_k >= 0`` bounds.

Regenerate the table (written next to this file)::

    python -m lit_act.activations.fit_rational                       # default degrees, versions A B C
    python -m lit_act.activations.fit_rational --degrees 5,4 7,6 --versions A B --output my_table.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.optimize import least_squares
from scipy.special import erf

TABLE_PATH = Path(__file__).with_name("rational_init.json")
FIT_RANGE = (-3.0, 3.0)
FIT_POINTS = 2001
DEFAULT_DEGREES = ((3, 2), (4, 3), (5, 4))
DEFAULT_VERSIONS = ("A", "B", "C")
FITTED_VERSIONS = ("A", "B", "C", "N")  # D is evaluated (and initialised) as B

TARGETS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.01 * x),
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + erf(x / np.sqrt(2.0))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "swish": lambda x: x / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "identity": lambda x: np.asarray(x, dtype=float),
}


def denominator_size(n: int, version: str) -> int:
    """Number of denominator coefficients: ``n + 1`` (powers ``0..n``) for version C, else ``n`` (``1..n``)."""
    return n + 1 if version == "C" else n


def rational_numpy(x: np.ndarray, numerator: np.ndarray, denominator: np.ndarray, version: str) -> np.ndarray:
    """The PAU formula of ``version`` written plainly (float64, used for fitting and reporting)."""
    p = np.polynomial.polynomial.polyval(x, numerator)
    if version == "A":
        q = 1.0 + sum(abs(b) * np.abs(x) ** (k + 1) for k, b in enumerate(denominator))
    elif version in ("B", "D"):
        q = 1.0 + np.abs(sum(b * x ** (k + 1) for k, b in enumerate(denominator)))
    elif version == "C":
        q = 0.1 + np.abs(np.polynomial.polynomial.polyval(x, denominator))
    elif version == "N":
        q = 1.0 + sum(b * x ** (k + 1) for k, b in enumerate(denominator))
    else:
        raise ValueError(f"unknown rational version {version!r}; valid: A, B, C, D, N")
    return p / q


def _check(target: str, degrees: tuple[int, int], version: str) -> None:
    if target not in TARGETS:
        raise ValueError(f"unknown init target {target!r}; valid: {', '.join(sorted(TARGETS))}")
    if version not in FITTED_VERSIONS:
        raise ValueError(f"cannot fit version {version!r}; valid: {', '.join(FITTED_VERSIONS)} (D uses B)")
    m, n = degrees
    if m < 0 or n < 0 or (m, n) == (0, 0):
        raise ValueError(f"degrees must be non-negative and not (0, 0), got {degrees}")


def _linearised_start(x: np.ndarray, f: np.ndarray, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    cols = [x**j for j in range(m + 1)] + [-f * x**k for k in range(1, n + 1)]
    sol = np.linalg.lstsq(np.stack(cols, 1), f, rcond=None)[0]
    return sol[: m + 1], sol[m + 1 :]


def _starts(x: np.ndarray, f: np.ndarray, m: int, n: int, version: str) -> list[tuple[np.ndarray, np.ndarray]]:
    a_lin, b_lin = _linearised_start(x, f, m, n)
    a_poly = np.polynomial.polynomial.polyfit(x, f, m)
    if version == "A":
        return [(a_lin, np.abs(b_lin)), (a_poly, np.zeros(n))]
    if version == "C":
        return [(a_lin, np.concatenate([[0.9], b_lin])), (a_poly, np.concatenate([[0.9], np.zeros(n)]))]
    return [(a_lin, b_lin), (a_poly, np.zeros(n))]


def fit_rational(target: str, degrees: tuple[int, int] = (5, 4), version: str = "A",
                 fit_range: tuple[float, float] = FIT_RANGE, num_points: int = FIT_POINTS) -> dict:
    """Least-squares fit of ``version``'s ``P/Q`` of ``degrees`` to ``target`` on ``fit_range``.

    Returns ``{"numerator": [...], "denominator": [...], "max_error": float}`` (ascending powers; the denominator
    holds powers ``1..n``, or ``0..n`` for version C; max abs error on the fitting grid).
    """
    version = "B" if version == "D" else version
    _check(target, degrees, version)
    m, n = degrees
    x = np.linspace(*fit_range, num_points)
    f = TARGETS[target](x)
    size = denominator_size(n, version)

    def residual(theta: np.ndarray) -> np.ndarray:
        return rational_numpy(x, theta[: m + 1], theta[m + 1 :], version) - f

    lower = np.full(m + 1 + size, -np.inf)
    if version == "A":
        lower[m + 1 :] = 0.0
    best = None
    for a0, b0 in _starts(x, f, m, n, version):
        theta0 = np.concatenate([a0, b0])
        theta0 = np.maximum(theta0, lower + 1e-12 * np.isfinite(lower))
        sol = least_squares(residual, theta0, bounds=(lower, np.inf), method="trf", xtol=1e-10, ftol=1e-10,
                            gtol=1e-10, max_nfev=300)
        err = float(np.max(np.abs(residual(sol.x))))
        if np.isfinite(err) and (best is None or err < best[1]):
            best = (sol.x, err)
    theta, err = best
    return {"numerator": theta[: m + 1].tolist(), "denominator": theta[m + 1 :].tolist(), "max_error": err}


def table_key(version: str, degrees: tuple[int, int], target: str) -> str:
    return f"{version}/{degrees[0]},{degrees[1]}/{target}"


def build_table(degrees: tuple[tuple[int, int], ...] = DEFAULT_DEGREES,
                versions: tuple[str, ...] = DEFAULT_VERSIONS, targets: tuple[str, ...] | None = None) -> dict:
    targets = tuple(TARGETS) if targets is None else targets
    entries = {}
    for version in versions:
        for deg in degrees:
            for target in targets:
                entries[table_key(version, deg, target)] = fit_rational(target, deg, version)
    return {"fit_range": list(FIT_RANGE), "fit_points": FIT_POINTS,
            "generated_by": "python -m lit_act.activations.fit_rational", "entries": entries}


def _parse_degrees(text: str) -> tuple[int, int]:
    m, n = (int(v) for v in text.split(","))
    return m, n


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--degrees", nargs="+", type=_parse_degrees, default=list(DEFAULT_DEGREES),
                        help="numerator,denominator degree pairs, e.g. 5,4 7,6")
    parser.add_argument("--versions", nargs="+", default=list(DEFAULT_VERSIONS), choices=FITTED_VERSIONS)
    parser.add_argument("--targets", nargs="+", default=None, choices=sorted(TARGETS))
    parser.add_argument("--output", type=Path, default=TABLE_PATH)
    args = parser.parse_args(argv)
    table = build_table(tuple(args.degrees), tuple(args.versions), None if args.targets is None else tuple(args.targets))
    args.output.write_text(json.dumps(table, indent=1) + "\n")
    worst = max(table["entries"].items(), key=lambda kv: kv[1]["max_error"])
    print(f"wrote {len(table['entries'])} entries to {args.output}; worst max error {worst[1]['max_error']:.4f} "
          f"({worst[0]})")


if __name__ == "__main__":
    main()
