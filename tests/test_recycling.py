"""§5.2's split refuses a fraction outside (0, 1) with the argument's name; the cases moved out of chapters/52_recycling."""
import pytest
import torch

from kdbook.experiments.recycling import check_fraction, recycling_params, recycling_split

LABELS = torch.arange(1000) % 10


@pytest.mark.parametrize("bad,message", [
    (0, "fraction must be in (0, 1), got 0"), (1, "fraction must be in (0, 1), got 1"),
    (1.5, "fraction must be in (0, 1), got 1.5"), (-0.1, "fraction must be in (0, 1), got -0.1"),
    (float("nan"), "fraction must be a finite number in (0, 1), got nan"), (True, "fraction must be a real number in (0, 1), got True (bool)"),
    ("half", "fraction must be a real number in (0, 1), got 'half' (str)"),
])
def test_bad_fractions_are_refused(bad, message):
    with pytest.raises(ValueError) as e:
        recycling_split(LABELS, 0, bad)
    assert message in str(e.value) and "the paper: 0.5" in str(e.value), str(e.value)


def test_fraction_is_returned_as_float():
    assert check_fraction(0.5) == 0.5 and isinstance(check_fraction(1 / 3), float)


def test_bad_labels_and_sets_are_refused():
    with pytest.raises(ValueError, match="labels must have 1 dimension"):
        recycling_split(LABELS.reshape(100, 10), 0)
    with pytest.raises(ValueError, match="number of labels must be an integer >= 2, got 1"):
        recycling_split(torch.tensor([3]), 0)
    with pytest.raises(ValueError, match="unknown distillation set 'D2'"):
        recycling_params("D2", [], None, None, None, 4.0, {})
