"""Qualifier rules and the alias draw, without servers."""

from __future__ import annotations

import pytest

from shared.errors import InvalidArgument
from shared.qualifiers import MAIN_VERSION_DRAW, check_qualifier, pick_version


@pytest.mark.parametrize(("given", "expected"), [(None, "LATEST"), ("", "LATEST"), ("LATEST", "LATEST"),
                                                 ("1", "1"), ("42", "42"), ("prod", "prod"), ("_x-1", "_x-1")])
def test_qualifiers_accepted(given: str | None, expected: str) -> None:
    assert check_qualifier(given) == expected


@pytest.mark.parametrize("given", ["0", "01", "a.b", "a b", "-x", "x" * 129, "é"])
def test_qualifiers_refused(given: str) -> None:
    with pytest.raises(InvalidArgument):
        check_qualifier(given)


def test_the_draw_splits_by_weight() -> None:
    weights = {"2": 0.25}
    assert pick_version("1", weights, 0.0) == "2"
    assert pick_version("1", weights, 0.2499) == "2"
    assert pick_version("1", weights, 0.25) == "1"
    assert pick_version("1", weights, 0.99) == "1"
    assert pick_version("1", {}, 0.0) == "1"
    # GetFunction's draw always lands on the alias's own version, whatever the weight.
    assert pick_version("1", {"2": 1.0}, MAIN_VERSION_DRAW) == "1"
    assert pick_version("1", {"2": 1.0}, 0.999) == "2"
