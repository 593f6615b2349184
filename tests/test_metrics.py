"""decathlon_score: the standard formula."""

import pytest

import fastmdl


def test_decathlon_score_formula():
    # Matching the baseline scores 250 per domain, no error 1000, twice the baseline 0.
    assert fastmdl.decathlon_score([0.2, 0.1], [0.2, 0.1]) == pytest.approx(500)
    assert fastmdl.decathlon_score([0.0], [0.3]) == pytest.approx(1000)
    assert fastmdl.decathlon_score([0.6, 0.9], [0.3, 0.3]) == 0
    e, b = 0.15, 0.25
    assert fastmdl.decathlon_score([e], [b]) == pytest.approx(
        1000 * (2 * b - e) ** 2 / (2 * b) ** 2)


def test_decathlon_score_rejects_bad_input():
    with pytest.raises(ValueError, match="one entry per domain"):
        fastmdl.decathlon_score([0.1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"errors\[0\]"):
        fastmdl.decathlon_score([12.0], [0.1])
    with pytest.raises(ValueError, match=r"baseline_errors\[1\]"):
        fastmdl.decathlon_score([0.1, 0.1], [0.1, -0.1])
