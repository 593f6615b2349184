"""Scores for multi-domain results."""

from __future__ import annotations

from typing import Sequence


def decathlon_score(errors: Sequence[float], baseline_errors: Sequence[float]) -> float:
    r"""The Visual Decathlon score (Rebuffi et al., 2017):

    .. math:: S = \sum_d 1000\,\frac{\max(0,\ E^{max}_d - E_d)^2}{(E^{max}_d)^2},
              \qquad E^{max}_d = 2\,E^{base}_d

    with :math:`E_d` the error (a fraction in [0, 1]) on domain d and
    :math:`E^{base}_d` the fine-tuned baseline's. Each domain scores up to 1000
    (at zero error); matching the baseline scores 250."""
    errors, baseline_errors = list(errors), list(baseline_errors)
    if len(errors) != len(baseline_errors) or not errors:
        raise ValueError(f"errors and baseline_errors must have one entry per domain, got "
                         f"{len(errors)} and {len(baseline_errors)}")
    total = 0.0
    for d, (e, b) in enumerate(zip(errors, baseline_errors)):
        for name, v in (("errors", e), ("baseline_errors", b)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(f"{name}[{d}] must be an error rate in [0, 1], got {v!r}")
        e_max = 2 * b
        if e_max == 0:
            # A perfect baseline leaves no room: only a perfect result scores, fully.
            total += 1000.0 if e == 0 else 0.0
            continue
        total += 1000.0 * max(0.0, e_max - e) ** 2 / e_max ** 2
    return total
