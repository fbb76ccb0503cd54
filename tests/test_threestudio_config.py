"""threestudio's C() (integrations/threestudio_config.py) on a table of cases. The expected values are worked by
hand from threestudio's semantics (threestudio/utils/misc.py `C`): a 3-list gets start_step 0; an int end step
counts global steps, a float one counts epochs; 6+ entries are segments chosen by global_step; "exp" interpolates
log-linearly; the fraction is clamped to [0, 1]."""
import math

import pytest

from diffsolve.integrations.threestudio_config import C, weighting

CASES = [
    # value, epoch, global_step, interpolation, expected
    (0.5, 3, 100, "linear", 0.5),                                   # a number is itself
    (7, 0, 0, "linear", 7),
    ([0, 2.0, 8.0, 1000], 0, 500, "linear", 5.0),                   # 4-list, halfway
    ([0, 2.0, 8.0, 1000], 0, 250, "linear", 3.5),
    ([100, 2.0, 8.0, 1100], 0, 50, "linear", 2.0),                  # before start: clamped to start
    ([100, 2.0, 8.0, 1100], 0, 5000, "linear", 8.0),                # after end: clamped to end
    ([2.0, 8.0, 1000], 0, 500, "linear", 5.0),                      # 3-list = [0] + list
    ([0.98, 0.5, 5000], 0, 1000, "linear", 0.98 - 0.48 * 0.2),      # e.g. max_step_percent annealing
    ([0, 2.0, 8.0, 10.0], 5, 999_999, "linear", 5.0),               # float end step: counts epochs (5 of 10)
    ([0, 2.0, 8.0, 10.0], 20, 0, "linear", 8.0),
    ([0, 1.0, 0.5, 100, 0.1, 200], 0, 50, "linear", 0.75),          # segment 1: 1 -> 0.5 over [0, 100]
    ([0, 1.0, 0.5, 100, 0.1, 200], 0, 150, "linear", 0.3),          # segment 2: 0.5 -> 0.1 over [100, 200]
    ([0, 1.0, 0.5, 100, 0.1, 200], 0, 250, "linear", 0.1),
    ([0, 1.0, 0.5, 100, 0.1, 200, 0.0, 400], 0, 300, "linear", 0.05),  # segment 3: 0.1 -> 0 over [200, 400]
    ([0, 1e3, 1e-2, 100], 0, 50, "exp", math.sqrt(1e3 * 1e-2)),     # log-linear midpoint
    ([0, 1e3, 1e-2, 100], 0, 25, "exp", 1e3 ** 0.75 * 1e-2 ** 0.25),
    ([1.0, 0.01, 200], 0, 100, "exp", 0.1),                          # 3-list with exp
]


@pytest.mark.parametrize("value, epoch, step, interpolation, expected", CASES)
def test_c_table(value, epoch, step, interpolation, expected):
    assert C(value, epoch, step, interpolation=interpolation) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_c_bad_input():
    with pytest.raises(ValueError, match="entries"):
        C([0, 1.0, 2.0, 3, 4.0], 0, 0)
    with pytest.raises(ValueError, match="interpolation"):
        C([0, 1.0, 2.0, 3], 0, 0, interpolation="cubic")
    with pytest.raises(ValueError, match="end_step"):
        C([0, 1.0, 2.0, "10"], 0, 0)


def test_weighting_names():
    import torch
    sigma = torch.tensor([0.5, 2.0], dtype=torch.float64)
    abar = 1 / (1 + sigma ** 2)
    torch.testing.assert_close(weighting("sds")(sigma), 1 - abar)
    torch.testing.assert_close(weighting("uniform")(sigma), torch.ones_like(sigma))
    torch.testing.assert_close(weighting("fantasia3d")(sigma), abar.sqrt() * (1 - abar))
    with pytest.raises(ValueError, match="weighting_strategy"):
        weighting("dreamfusion")
