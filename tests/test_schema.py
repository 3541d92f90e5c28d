"""qgraph.schema: user values checked against type hints with ranges."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest

from qgraph.errors import ConfigError
from qgraph.schema import Range, check_value


@pytest.mark.parametrize("value, hint, message", [
    (True, int, "must be an integer, got True"),                 # a bool is not a number here
    (1.5, Annotated[float, Range(0.0, 1.0, lo_open=True)], "must be a number > 0 and <= 1"),
    (float("nan"), float, "must be a finite number"),
    (float("inf"), float | None, "must be a finite number or null|a number or null"),
    ("8", Annotated[int, Range(2, 8)], "must be an integer >= 2 and <= 8, got '8'"),
    ([1, "a"], list[int], "must be a list whose items are each an integer"),
    ({"a": "b"}, dict[str, int], "must be a mapping from a string to an integer"),
    ("c", Literal["a", "b"], "must be one of 'a', 'b'"),
    (-5, Annotated[int, Range(0)] | None, "must be an integer >= 0 or null"),
])
def test_bad_values_name_what_was_expected(value, hint, message):
    with pytest.raises(ConfigError, match=message):
        check_value(value, hint, "p")


@pytest.mark.parametrize("value, hint", [
    (3, float), (None, float | None), (0, Annotated[int, Range(0)]), ([1.0, 2], list[float]),
    ({"a": 1}, dict[str, int]), ("a", Literal["a", "b"]), (1.0, Annotated[float, Range(0.0, 1.0, lo_open=True)]),
])
def test_good_values_pass(value, hint):
    check_value(value, hint, "p")
