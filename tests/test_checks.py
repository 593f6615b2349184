"""fastmdl._checks: the shared argument checks name the argument, and tell a wrong
type (TypeError) from a value out of range (ValueError)."""

import math

import pytest
import torch

from fastmdl import _checks


@pytest.mark.parametrize("value", [1, 0.5, 1e-9, 3.0])
def test_positive_accepts_finite_numbers_above_zero(value):
    assert _checks.positive(value, "lr") == value


@pytest.mark.parametrize("value", [0, -1, 0.0, math.inf, math.nan, -math.inf])
def test_positive_rejects_values_out_of_range_with_the_name(value):
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0"):
        _checks.positive(value, "lr")


@pytest.mark.parametrize("value", [True, "0.1", None, torch.tensor(0.1)])
def test_positive_rejects_non_numbers_with_the_name(value):
    with pytest.raises(TypeError, match=r"^lr must be a number"):
        _checks.positive(value, "lr")


def test_count_accepts_integers_from_zero_and_returns_an_int():
    assert _checks.count(0, "steps") == 0
    n = _checks.count(torch.tensor(3).item(), "steps")
    assert n == 3 and type(n) is int


@pytest.mark.parametrize("value, error", [(-1, ValueError), (1.0, TypeError), (True, TypeError),
                                          ("2", TypeError)])
def test_count_rejects_with_the_name(value, error):
    with pytest.raises(error, match=r"^steps must be"):
        _checks.count(value, "steps")
