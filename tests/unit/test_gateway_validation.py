"""The gateway's input validation, as pure functions (no servers)."""

from __future__ import annotations

import numpy as np
import pytest

from services.gateway.service import parse_json, rows_to_array, v2_inputs_to_array
from shared.http import ApiError
from shared.schemas import DeployedModel

MODEL = DeployedModel(name="m", version=1, n_features=3, classes=["a", "b"], sha256="0" * 64)


@pytest.mark.parametrize("may_hold_booleans", [True, False])
@pytest.mark.parametrize(
    "instances",
    [
        [[1, 2.5, -3], [0, 0, 0]],
        [[1, 2, 3]],
        [[0.1, 1e-300, -1e300]],
        [[2**63, 2**64 + 1, 2**70]],  # unsigned, and beyond 64 bits (numpy infers uint64, object)
    ],
)
def test_valid_rows_become_float64(instances: list[list[float]], may_hold_booleans: bool) -> None:
    array = rows_to_array(instances, MODEL, max_rows=10, may_hold_booleans=may_hold_booleans)
    assert array.dtype == np.float64
    assert array.shape == (len(instances), 3)
    assert array.tolist() == [[float(value) for value in row] for row in instances]


INVALID_ROWS = [
    ([], 422, "empty"),
    ([[1, 2]], 422, "expects 3"),
    ([[1, 2, 3], [1, 2, 3, 4]], 422, "row 1 has 4"),
    ([[1, 2, 3], [1, 2]], 422, "row 1 has 2"),
    ([[1, 2, "3"]], 422, "not a number"),
    ([[1, 2, None]], 422, "not a number"),
    ([[1, 2, {"x": 1}]], 422, "not a number"),
    ([[1, 2, [3]]], 422, "not a number"),
    ([[[1], [2], [3]]], 422, "not a number"),
    ([[1, 2, float("nan")]], 422, "NaN"),
    ([[1, 2, 3], [1, 2, float("inf")]], 422, "row 1"),
    ([[1, 2, 3]] * 11, 413, "limit of 10 rows"),
    ({"a": 1}, 422, "list of rows"),
    ([1, 2, 3], 422, "row 0 is not a list"),
]


@pytest.mark.parametrize("may_hold_booleans", [True, False])
@pytest.mark.parametrize(("instances", "status", "fragment"), INVALID_ROWS)
def test_invalid_rows(instances: object, status: int, fragment: str, may_hold_booleans: bool) -> None:
    """The same refusal, with the same message, whether or not numpy's inference could be trusted."""
    with pytest.raises(ApiError) as caught:
        rows_to_array(instances, MODEL, max_rows=10, may_hold_booleans=may_hold_booleans)
    assert caught.value.status_code == status
    assert fragment in caught.value.message


@pytest.mark.parametrize("instances", [[[1, 2, False]], [[1.5, True, 2]], [[True, False, True]]])
def test_booleans_are_refused(instances: object) -> None:
    with pytest.raises(ApiError) as caught:
        rows_to_array(instances, MODEL, max_rows=10)
    assert caught.value.status_code == 422
    assert "not a number" in caught.value.message


@pytest.mark.parametrize("may_hold_booleans", [True, False])
def test_v2_flat_and_nested_data(may_hold_booleans: bool) -> None:
    tensor = {"name": "x", "shape": [2, 3], "datatype": "FP64"}
    flat = v2_inputs_to_array(
        {"inputs": [{**tensor, "data": [1, 2, 3, 4, 5, 6]}]}, MODEL, 10, may_hold_booleans
    )
    nested = v2_inputs_to_array(
        {"inputs": [{**tensor, "data": [[1, 2, 3], [4, 5, 6]]}]}, MODEL, 10, may_hold_booleans
    )
    np.testing.assert_array_equal(flat, nested)
    np.testing.assert_array_equal(flat, [[1, 2, 3], [4, 5, 6]])


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
@pytest.mark.parametrize(
    "data",
    [
        [0.1, -2.5e38, 3.4e38, 1e-45, 2**24 + 1, 7],
        [2**53 + 1, 2**60 + 3, 2**63 + 2**40 + 1, 2**64 + 5, 1, 2],  # ints rounded as Python rounds them
        [[1, 2.5, 3], [4, 5, 6.25]],
    ],
)
def test_v2_both_checks_give_the_same_values(datatype: str, data: list[object]) -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": datatype, "data": data}]}
    closer = v2_inputs_to_array(body, MODEL, 10, may_hold_booleans=True)
    inferred = v2_inputs_to_array(body, MODEL, 10, may_hold_booleans=False)
    assert closer.tobytes() == inferred.tobytes()


@pytest.mark.parametrize("may_hold_booleans", [True, False])
@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ([1, 2, 3, 4, 5, "6"], "not a number"),
        ([1, 2, 3, 4, 5, None], "not a number"),
        ([1, 2, 3, 4, 5, {"v": 6}], "not a number"),
        ([[1, 2, 3], [4, 5]], "ragged"),
        ([1, 2, 3, 4, 5], "holds 5 values"),
        ([[1, 2, 3], [4, 5, 6], [7, 8, 9]], "holds 9 values"),
        ([1, 2, 3, 4, 5, float("inf")], "NaN or an infinite"),
        ([[1, 2, 3], [4, 5, float("nan")]], "NaN or an infinite"),
    ],
)
def test_v2_invalid_data(data: list[object], fragment: str, may_hold_booleans: bool) -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP64", "data": data}]}
    with pytest.raises(ApiError) as caught:
        v2_inputs_to_array(body, MODEL, 10, may_hold_booleans=may_hold_booleans)
    assert caught.value.status_code == 400
    assert fragment in caught.value.message


def test_v2_booleans_are_refused() -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP64", "data": [1.5, 2, 3, 4, 5, True]}]}
    with pytest.raises(ApiError, match="not a number"):
        v2_inputs_to_array(body, MODEL, 10)


def test_v2_fp32_rounds_to_float32() -> None:
    body = {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.1, 0.2, 0.3]}]}
    array = v2_inputs_to_array(body, MODEL, 10)
    np.testing.assert_array_equal(array, np.array([[0.1, 0.2, 0.3]], dtype=np.float32).astype(np.float64))


def test_parse_json_refuses_nan_and_garbage() -> None:
    with pytest.raises(ApiError, match="not valid JSON"):
        parse_json(b'{"instances": [[NaN]]}')
    with pytest.raises(ApiError, match="empty request body"):
        parse_json(b"")
    assert parse_json(b'{"instances": [[1]]}') == {"instances": [[1]]}
