"""tools/compare_tables.py: the largest relative difference of two tables, against values
worked out by hand."""
import sys

import numpy as np
import pandas as pd

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
from compare_tables import compare  # noqa: E402


def test_compare_reports_the_largest_relative_difference_and_text_changes():
    a = pd.DataFrame({"x": [1.0, 200.0, np.nan], "y": [0.0, -4.0, 2.0], "s": ["a", "b", None],
                      "old": [1, 2, 3]})
    b = pd.DataFrame({"x": [1.0, 201.0, np.nan], "y": [0.0, -4.0, 2.5], "s": ["a", "c", None],
                      "new": [1, 2, 3]})
    worst, where, text, only = compare(a, b)
    # x: |200 - 201| / 201 = 0.004975; y: |2 - 2.5| / 2.5 = 0.2
    assert where == "y" and worst == 0.2
    assert text == ["s"] and only == ["old", "new"]
    same = compare(a, a.copy())
    assert same[0] == 0.0 and same[2] == [] and same[3] == []
    gap = compare(a, a.assign(x=[1.0, 200.0, 3.0]))
    assert gap[2] == ["x (empty cells)"]
