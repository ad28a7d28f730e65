"""PAU / rational inits for degrees without a shipped entry: announced with the expected time, fitted once, cached
under $LIT_ACT_CACHE, and refused above the documented degree limit."""

import json

import numpy as np
import pytest
import torch

from lit_act.activations import Rational, rational
from lit_act.activations.fit_rational import TARGETS, rational_numpy


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIT_ACT_CACHE", str(tmp_path))
    rational._init_coefficients.cache_clear()
    yield tmp_path / "rational_init"
    rational._init_coefficients.cache_clear()


def test_unshipped_degrees_are_announced_fitted_and_cached(cache, monkeypatch):
    with pytest.warns(UserWarning, match=r"degrees=\(2, 1\).*not shipped: fitting it now \(up to about 11 s"):
        first = Rational(degrees=(2, 1), init="gelu")
    files = list(cache.glob("*.json"))
    assert [f.name for f in files] == ["A_2-1_gelu.json"]
    entry = json.loads(files[0].read_text())
    # the cached coefficients are a real fit: max error on [-3, 3] as recorded, and the module's own coefficients
    x = np.linspace(-3, 3, 2001)
    err = np.abs(rational_numpy(x, np.array(entry["numerator"]), np.array(entry["denominator"]), "A")
                 - TARGETS["gelu"](x)).max()
    assert err == pytest.approx(entry["max_error"], rel=1e-9) and err < 0.3
    assert torch.allclose(first.numerator, torch.tensor(entry["numerator"], dtype=torch.float32))

    # a new process (cleared memo) reads the cache instead of fitting again
    rational._init_coefficients.cache_clear()
    monkeypatch.setattr(rational, "fit_rational", lambda *a, **k: pytest.fail("fitted again despite the cache"))
    second = Rational(degrees=(2, 1), init="gelu")
    assert torch.equal(first.numerator, second.numerator) and torch.equal(first.denominator, second.denominator)


def test_shipped_degrees_need_no_fit(cache, monkeypatch):
    monkeypatch.setattr(rational, "fit_rational", lambda *a, **k: pytest.fail("shipped entry was refitted"))
    Rational(degrees=(5, 4), version="B", init="silu")
    assert not cache.exists()


@pytest.mark.parametrize("degrees", [(13, 2), (40, 40), (2, 13)])
def test_degrees_above_the_limit_are_refused(cache, degrees):
    with pytest.raises(ValueError, match=rf"^degrees=\({degrees[0]}, {degrees[1]}\): expected a pair of integers "
                                         r">= 0 and <= 12"):
        Rational(degrees=degrees)
    assert rational.MAX_DEGREE == 12


def test_expected_seconds_grow_with_the_degrees():
    assert rational.expected_fit_seconds((10, 10)) >= 35  # the measurement of the (10, 10) fit
    assert rational.expected_fit_seconds((12, 12)) < 60  # the largest allowed degrees: under a minute
