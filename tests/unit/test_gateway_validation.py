"""The gateway's input validation, as pure functions (no servers)."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from services.gateway.service import (
    may_hold_literals,
    parse_json,
    rows_to_array,
    v2_data,
    v2_inputs_to_array,
)
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


def _v2_body(data: object, **extra: object) -> tuple[bytes, object]:
    payload = {"inputs": [{"name": "input-0", "shape": [2, 3], "datatype": "FP64", "data": data}], **extra}
    return orjson.dumps(payload), payload


@pytest.mark.parametrize(
    ("data", "extra", "expected"),
    [
        # The benchmarks' body: "inputs" and "outputs" hold a "u", "label"-like keys an "l", none in data.
        ([0.5, -1.25e-7, 3, 4, 5, 6.0], {"outputs": [{"name": "predict_proba"}]}, False),
        ([[1.5, 2, 3], [4, 5, 6]], {"parameters": {"flag": True, "level": None, "off": False}}, False),
        ([1, 2, 3, 4, 5, True], {}, True),
        ([1, 2, 3, 4, 5, False], {"outputs": [{"name": "predict_proba"}]}, True),
        ([1, 2, 3, 4, 5, None], {}, True),
        ([[1, 2, 3], [4, False, 6]], {}, True),
        ([1, 2, 3, 4, 5, "u"], {}, True),
        ([1, 2, 3, 4, 5, "abc"], {}, False),  # no literal: numpy's inference then refuses the string
    ],
)
def test_may_hold_literals_counts_the_letters_the_rest_of_the_body_explains(
    data: list[object], extra: dict[str, object], expected: bool
) -> None:
    body, payload = _v2_body(data, **extra)
    assert may_hold_literals(body, payload, v2_data(payload)) is expected


def test_may_hold_literals_does_not_judge_escapes_duplicate_keys_or_missing_data() -> None:
    # An escaped "l" in a key would hide the "l" of a false among the numbers: bodies with escapes
    # are always checked value by value.
    body = (
        b'{"inputs": [{"name": "x", "shape": [2, 3], "datatype": "FP64", "\\u006c": 1,'
        b' "data": [1, 2, 3, 4, 5, false]}]}'
    )
    payload = orjson.loads(body)
    assert may_hold_literals(body, payload, v2_data(payload))
    body = (
        b'{"inputs": [{"name": "x\\u0020", "shape": [2, 3], "datatype": "FP64", "data": [1, 2, 3, 4, 5, 6]}]}'
    )
    payload = orjson.loads(body)
    assert may_hold_literals(body, payload, v2_data(payload))  # not judged, though it holds no literal
    # A repeated key: the body holds a true the parsed payload no longer shows.
    body = (
        b'{"inputs": [{"data": [true]}],'
        b' "inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP64", "data": [1]}]}'
    )
    payload = orjson.loads(body)
    assert may_hold_literals(body, payload, v2_data(payload))
    assert may_hold_literals(b'{"inputs": 3}', {"inputs": 3}, None)
    v1 = b'{"instances": [[1, 2.5, 3]], "parameters": {"x": null}}'
    assert not may_hold_literals(v1, orjson.loads(v1), orjson.loads(v1)["instances"])


def test_may_hold_literals_never_misses_a_literal_among_random_numbers() -> None:
    """Seeded random bodies: whenever the check answers False, the data holds no true, false or null."""
    rng = np.random.default_rng(11)
    keys = ["outputs", "label", "url", "null", "value"]
    answered_false = 0
    for _ in range(2000):
        data: list[object] = rng.normal(size=int(rng.integers(1, 30))).tolist()
        for _ in range(int(rng.integers(0, 3))):
            data[int(rng.integers(0, len(data)))] = [True, False, None, "lu", 7][int(rng.integers(0, 5))]
        extra = {str(rng.choice(keys)): [True, None, "ul", 1.5][int(rng.integers(0, 4))]}
        body, payload = _v2_body(data, **extra)
        holds_literal = any(value is None or isinstance(value, bool) for value in data)
        if not may_hold_literals(body, payload, v2_data(payload)):
            answered_false += 1
            assert not holds_literal, body
        elif not holds_literal and not any(isinstance(value, str) for value in data):
            raise AssertionError(f"a body with no literal among its numbers was not trusted: {body!r}")
    assert answered_false > 200  # the fast answer is actually given


@pytest.mark.parametrize("literal", [True, False, None])
def test_may_hold_literals_on_large_bodies(literal: object) -> None:
    """Bodies from 16 KB on are counted with numpy: the same answers as for small ones."""
    data: list[object] = np.random.default_rng(3).normal(size=6400).tolist()
    body, payload = _v2_body(data, outputs=[{"name": "predict_proba"}])
    assert len(body) > 16384
    assert not may_hold_literals(body, payload, v2_data(payload))
    data[4321] = literal
    body, payload = _v2_body(data)
    assert may_hold_literals(body, payload, v2_data(payload))
    data[4321] = 0.5
    body = orjson.dumps(payload).replace(b'"input-0"', b'"input\\u002d0"')
    parsed = orjson.loads(body)
    assert may_hold_literals(body, parsed, v2_data(parsed))  # an escape: not judged
