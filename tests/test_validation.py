"""The shared argument checks: TypeError for a wrong type, ValueError for a wrong value, one format."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lightning_forget.validation import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_int_sequence,
    check_str,
    check_type,
    message,
)


def test_message_format_names_argument_value_type_and_fix() -> None:
    text = message("buffer_size", "an int >= 1", 0, "pass the number of samples")
    assert text == "`buffer_size` must be an int >= 1, got 0 (int). Fix: pass the number of samples."


@pytest.mark.parametrize("value", [True, 2.0, "3", None, [1]])
def test_check_int_wrong_type(value: object) -> None:
    with pytest.raises(TypeError, match="`size` must be an int"):
        check_int("size", value, min=1)


def test_check_int_range_and_return() -> None:
    assert check_int("size", 3, min=1) == 3
    assert check_int("size", np.int64(4), min=1) == 4 and type(check_int("size", np.int64(4))) is int
    assert check_int("size", None, allow_none=True) is None
    with pytest.raises(ValueError, match=r"`size` must be an int >= 1, got 0 \(int\)"):
        check_int("size", 0, min=1)
    with pytest.raises(ValueError, match="<= 5"):
        check_int("size", 6, max=5)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_check_float_refuses_non_finite(value: float) -> None:
    with pytest.raises(ValueError, match="`alpha` must be a finite float"):
        check_float("alpha", value, min=0.0)


def test_check_float_bounds_and_types() -> None:
    assert check_float("alpha", 1) == 1.0 and isinstance(check_float("alpha", 1), float)
    assert check_float("alpha", math.inf, finite=False) == math.inf
    with pytest.raises(TypeError, match="`alpha` must be a float"):
        check_float("alpha", True)
    with pytest.raises(TypeError, match="`alpha`"):
        check_float("alpha", "0.1")
    with pytest.raises(ValueError, match="> 0"):
        check_float("alpha", 0.0, min=0.0, min_inclusive=False)
    with pytest.raises(ValueError, match="<= 1"):
        check_float("alpha", 1.5, min=0.0, max=1.0)
    assert check_float("alpha", 1.0, min=0.0, max=1.0) == 1.0


def test_check_bool_str_choice_type() -> None:
    assert check_bool("report", False) is False
    with pytest.raises(TypeError, match="`report` must be a bool"):
        check_bool("report", 1)
    assert check_str("key", "a") == "a"
    with pytest.raises(ValueError, match="non-empty"):
        check_str("key", "")
    with pytest.raises(TypeError, match="`key` must be a str"):
        check_str("key", 3)
    assert check_choice("buffer", "reservoir", ("reservoir", "class_balanced")) == "reservoir"
    with pytest.raises(ValueError, match="`buffer` must be one of 'reservoir', 'class_balanced', got 'fifo'"):
        check_choice("buffer", "fifo", ("reservoir", "class_balanced"))
    with pytest.raises(ValueError, match="`buffer`"):
        check_choice("buffer", ["unhashable"], {"reservoir"})
    with pytest.raises(TypeError, match="`log_dir` must be a str or None"):
        check_type("log_dir", 3, str, allow_none=True)


def test_check_int_sequence() -> None:
    assert check_int_sequence("hidden_sizes", (4, 5), min=1) == [4, 5]
    with pytest.raises(ValueError, match=r"item 1 is 0"):
        check_int_sequence("hidden_sizes", [4, 0], min=1)
    with pytest.raises(ValueError, match="non-empty"):
        check_int_sequence("input_shape", [])
    with pytest.raises(TypeError, match="item 0 is not"):
        check_int_sequence("input_shape", [1.5])
    with pytest.raises(TypeError, match="a list of ints"):
        check_int_sequence("input_shape", "28")
