"""The statistics behind the results files' marks and paired-difference tables (scripts/results.py): mean ± sample
std over seeds, and the paired t-test over the seeds two rows share."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scripts.results import mean_std, paired_mark, paired_stats, paired_table


def test_mean_std_and_paired_mark() -> None:
    assert mean_std([1.0, None, 3.0]) == (2.0, pytest.approx(np.sqrt(2)), 2)
    assert mean_std([4.0])[1:] == (0.0, 1)
    assert paired_mark({0: 10.0, 1: 20.0, 2: 30.0}, {0: 9.0, 1: 19.2, 2: 28.9}) == "▲"  # consistently above
    assert paired_mark({0: 10.0, 1: 20.0, 2: 30.0}, {0: 12.0, 1: 17.0, 2: 31.0}) == ""  # within the noise
    assert paired_mark({0: 1.0}, {0: 2.0}) == "?"


def test_paired_stats_pairs_seeds_and_is_the_paired_t_test() -> None:
    ours, base = {0: 3.0, 1: 5.0, 2: 4.0, 3: 9.0}, {0: 1.0, 1: 2.0, 2: 2.0, 4: 0.0}  # seeds 3 and 4 do not pair up
    diff, t, p, n = paired_stats(ours, base)
    assert (n, diff) == (3, pytest.approx(7 / 3))
    assert t == pytest.approx((7 / 3) / (np.std([2, 3, 2], ddof=1) / np.sqrt(3)))
    assert 0 < p < 0.05
    assert math.isnan(paired_stats({0: 1.0}, {0: 2.0})[0])


def test_missing_values_are_left_out_not_propagated() -> None:
    ours = {0: 3.0, 1: math.nan, 2: 4.0, 3: 6.0}
    base = {0: 1.0, 1: 2.0, 2: None, 3: 3.0}
    diff, t, _, n = paired_stats(ours, base)
    assert n == 2 and diff == pytest.approx(2.5) and np.isfinite(t)


def test_differences_without_spread() -> None:
    assert paired_stats({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})[1:] == (0.0, 1.0, 2)
    diff, t, p, _ = paired_stats({0: 200.001, 1: 210.001, 2: 205.001}, {0: 200.0, 1: 210.0, 2: 205.0})
    assert diff == pytest.approx(0.001) and t == math.inf and p == 0.0  # a steady offset is not "no difference"
    assert paired_mark({0: 1.0, 1: 2.0}, {0: 2.0, 1: 3.0}) == "▼"


def test_paired_table_needs_the_baseline_and_another_row() -> None:
    assert paired_table({}, "fedavg") == []
    assert paired_table({("fedprox", ""): []}, "fedavg") == []  # no baseline row: nothing to pair with
