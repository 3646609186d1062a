"""The gateway's simdjson route for prediction bodies gives exactly what the ordinary route gives."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from services.gateway import fastjson, service
from shared.http import ApiError
from shared.schemas import DeployedModel

MODEL = DeployedModel(name="m", version=1, n_features=3, classes=["a", "b"], sha256="0" * 64)


def _ordinary(
    body: bytes, v2: bool, monkeypatch: pytest.MonkeyPatch, max_rows: int = 10
) -> np.ndarray | ApiError:
    with monkeypatch.context() as patch:
        patch.setattr(fastjson, "numbers_payload", lambda body, v2: None)
        return _outcome(body, v2, max_rows)


def _outcome(body: bytes, v2: bool, max_rows: int = 10) -> np.ndarray | ApiError:
    try:
        return service.request_rows(body, MODEL, max_rows, v2)
    except ApiError as exc:
        return exc


def _assert_same(
    body: bytes, v2: bool, monkeypatch: pytest.MonkeyPatch, max_rows: int = 10
) -> np.ndarray | ApiError:
    """Both routes give the same rows bit for bit, or the same error; returns the fast outcome."""
    fast, ordinary = _outcome(body, v2, max_rows), _ordinary(body, v2, monkeypatch, max_rows)
    if isinstance(ordinary, ApiError):
        assert isinstance(fast, ApiError), body
        assert (fast.status_code, fast.message) == (ordinary.status_code, ordinary.message), body
    else:
        assert isinstance(fast, np.ndarray), (body, fast)
        assert fast.dtype == np.float64
        assert fast.shape == ordinary.shape
        assert fast.tobytes() == ordinary.tobytes(), body
    return fast


def _v2(data: object, shape: object = (2, 3), datatype: str = "FP64", **extra: object) -> bytes:
    tensor = {"name": "input-0", "shape": list(shape) if isinstance(shape, tuple) else shape}
    return orjson.dumps({"inputs": [{**tensor, "datatype": datatype, "data": data}], **extra})


TAKEN = [
    (_v2([1, 2.5, -3, 0, 1e-300, -1e300], outputs=[{"name": "predict_proba"}]), True),
    (_v2([[1, 2, 3], [4, 5, 6.25]]), True),
    (_v2([0.1, -2.5e38, 3.4e38, 1e-45, 2**24 + 1, 7], datatype="FP32"), True),
    (_v2([2**53 + 1, 2**60 + 3, 2**63 + 2**40 + 1, 2**64 - 1, 1, 2]), True),
    (_v2([1, 2, 3, 4, 5, 6], parameters={"note": "[a] [b", "flag": True, "list": [[1], []]}), True),
    (b' { "inputs" : [ { "data" : [ 1 , 2 , 3 ] , "shape" : [1, 3], "datatype" : "FP64" } ] } ', True),
    (orjson.dumps({"instances": [[1, 2.5, -3], [0, 0, 0]]}), False),
    (orjson.dumps({"instances": [[1, 2, 3]], "parameters": {"x": None, "y": "[["}}), False),
]


@pytest.mark.parametrize(("body", "v2"), TAKEN)
def test_well_formed_bodies_take_the_route_with_the_same_rows(
    body: bytes, v2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert fastjson.numbers_payload(body, v2) is not None
    assert isinstance(_assert_same(body, v2, monkeypatch), np.ndarray)


LEFT = [
    (_v2([1, 2, 3, 4, 5, True]), True),  # a literal among the numbers
    (_v2([1, 2, 3, 4, 5, None]), True),
    (_v2([1, 2, 3, 4, 5, "6"]), True),
    (_v2([1, 2, 3, 4, 5, {"v": 6}]), True),
    (_v2([1, 2, [3], 4, 5, 6]), True),  # a one-number array hidden among flat numbers
    (_v2([1, [2, 3], 4, 5, 6]), True),
    (_v2([[1, 2, 3], [4, 5]]), True),  # ragged rows
    (_v2([[1, [2, 3]], [4, 5, 6]]), True),
    (_v2([[1, 2, 3], [4, 5, [6]]]), True),  # rows of equal length hiding an array
    (_v2([[[1, 2, 3]], [[4, 5, 6]]]), True),
    (_v2([[1, 2, [3, 4, 5]], 6]), True),  # as many arrays as rows, as many numbers as the shape needs
    (orjson.dumps({"instances": [[1, 2, [3, 4, 5]], 6]}), False),
    (_v2([[], []]), True),
    (_v2([]), True),
    (_v2([1, 2, 3, 4, 5, 6]).replace(b'"input-0"', b'"input\\u002d0"'), True),  # an escape
    (_v2([1, 2, 3, 4, 5, 6]).replace(b"6]", b"1e999]"), True),  # out of float64's range
    (_v2([1, 2, 3, 4, 5, 6]).replace(b"6]", b"18446744073709551616]"), True),  # beyond 64 bits
    (_v2([1, 2, 3, 4, 5, 6]).replace(b"6]", b"NaN]"), True),  # not JSON
    (b'{"inputs": [{"data": [true]}], "inputs": [{"name": "x", "shape": [1, 3], "data": [1, 2, 3]}]}', True),
    (b'{"inputs": [{"shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3], "data": [4, 5, 6]}]}', True),
    (b'{"inputs": [{"shape": [1, 3], "datatype": "FP64"}]}', True),  # no data
    (b'{"inputs": [{"data": [1]}, {"data": [2]}]}', True),  # two inputs
    (b'{"inputs": {"data": [1]}}', True),
    (b'{"inputs": ["data"]}', True),
    (b'{"inputs": [{"data": 1}]}', True),
    (b"[1, 2, 3]", True),
    (b"", True),
    (orjson.dumps({"instances": [1, 2, 3]}), False),  # v1 rows must be lists
    (orjson.dumps({"instances": [[1, 2, 3], [4, 5, False]]}), False),
    (orjson.dumps({"instances": [[1, 2, 3], [4, 5]]}), False),
    (orjson.dumps({"instances": []}), False),
    (orjson.dumps({"rows": [[1, 2, 3]]}), False),
]


@pytest.mark.parametrize(("body", "v2"), LEFT)
def test_other_bodies_are_left_to_the_ordinary_route(
    body: bytes, v2: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert fastjson.numbers_payload(body, v2) is None
    _assert_same(body, v2, monkeypatch)


@pytest.mark.parametrize(
    ("body", "v2", "status", "fragment"),
    [
        (_v2([1, 2, 3, 4, 5, 6, 7, 8, 9], shape=(3, 3)), True, 413, "limit of 2 rows"),
        (_v2([1, 2, 3, 4, 5]), True, 400, "holds 5 values"),
        (_v2([[1, 2, 3], [4, 5, 6], [7, 8, 9]]), True, 400, "holds 9 values"),
        (_v2([1, 2, 3, 4], shape=(2, 2)), True, 400, "expects 3"),
        (_v2([1, 2, 3, 4, 5, 6], datatype="INT8"), True, 400, "FP32 or FP64"),
        (_v2([1, 2, 3, 4, 5, 6], shape=[2, "3"]), True, 400, "non-negative integers"),
        (_v2([1, 2, 3, 4, 5, 3.5e38], datatype="FP32"), True, 400, "NaN or an infinite"),
        (orjson.dumps({"instances": [[1, 2], [3, 4]]}), False, 422, "row 0 has 2 features"),
        (orjson.dumps({"instances": [[1, 2, 3]] * 3}), False, 413, "limit of 2 rows"),
    ],
)
def test_errors_are_the_ordinary_ones(
    body: bytes, v2: bool, status: int, fragment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bodies the route reads but the request checks refuse: the same status and message."""
    assert fastjson.numbers_payload(body, v2) is not None
    fast = _outcome(body, v2, max_rows=2)
    assert isinstance(fast, ApiError)
    assert fast.status_code == status
    assert fragment in fast.message
    with monkeypatch.context() as patch:
        patch.setattr(fastjson, "numbers_payload", lambda body, v2: None)
        ordinary = _outcome(body, v2, max_rows=2)
    assert isinstance(ordinary, ApiError)
    assert (ordinary.status_code, ordinary.message) == (fast.status_code, fast.message)


def test_random_numbers_are_read_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded random doubles across float64's range, and decimal texts longer than any double's, read
    through both routes: the same bits (both parsers round correctly)."""
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**64, size=3000, dtype=np.uint64).view(np.float64)
    doubles = bits[np.isfinite(bits)]
    for start in range(0, doubles.size - 3, 300):
        chunk = doubles[start : start + 300]
        chunk = chunk[: chunk.size // 3 * 3]
        body = _v2(chunk.tolist(), shape=(chunk.size // 3, 3))
        assert fastjson.numbers_payload(body, True) is not None
        assert isinstance(_assert_same(body, True, monkeypatch, max_rows=1000), np.ndarray)
    texts = []
    for _ in range(300):
        digits = "".join(str(d) for d in rng.integers(0, 10, size=int(rng.integers(1, 40))))
        sign = "-" if rng.random() < 0.5 else ""
        texts.append(f"{sign}0.{digits}e{int(rng.integers(-330, 300))}")
    body = b'{"inputs": [{"name": "x", "shape": [100, 3], "datatype": "FP64", "data": [%s]}]}' % (
        ", ".join(texts).encode()
    )
    fast = _assert_same(body, True, monkeypatch, max_rows=1000)
    assert isinstance(fast, np.ndarray)
    assert fast.shape == (100, 3)


def test_random_shapes_never_pass_a_malformed_body(monkeypatch: pytest.MonkeyPatch) -> None:
    """Seeded random nestings of numbers: whatever the route accepts, the ordinary route accepts with
    the same rows; and every well-formed one is accepted."""
    rng = np.random.default_rng(17)
    accepted = 0

    def value(depth: int) -> Any:
        if depth < 2 and rng.random() < 0.08:
            return [value(depth + 1) for _ in range(int(rng.integers(0, 3)))]
        return float(rng.normal())

    for _ in range(600):
        well_formed = rng.random() < 0.4
        if well_formed:
            rows = int(rng.integers(1, 4))
            data: Any = rng.normal(size=(rows, 3)).tolist()
            if rng.random() < 0.5:
                data = [number for row in data for number in row]
        else:
            data = [value(0) for _ in range(int(rng.integers(1, 10)))]
        v2 = rng.random() < 0.7
        body = _v2(data, shape=(max(1, len(data) // 3), 3)) if v2 else orjson.dumps({"instances": data})
        if v2 and not well_formed:
            flat_count = orjson.dumps(data).count(b",") + 1
            body = _v2(data, shape=(max(1, flat_count // 3), 3))
        fast = fastjson.numbers_payload(body, v2)
        outcome = _assert_same(body, v2, monkeypatch)
        if fast is not None:
            accepted += 1
        elif well_formed and (v2 or isinstance(data[0], list)):
            raise AssertionError(f"a well-formed body was left to the ordinary route: {body!r}")
        if fast is not None and not isinstance(outcome, ApiError):
            assert outcome.shape[1] == 3
    assert accepted > 150


def test_a_parser_still_referenced_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """simdjson refuses to reuse a parser while a document of it is alive; should one leak, that
    body goes the ordinary way and the next gets a fresh parser."""
    body = _v2([1, 2, 3, 4, 5, 6])
    leaked = fastjson._parser().parse(body)
    assert fastjson.numbers_payload(body, True) is None
    _assert_same(body, True, monkeypatch)
    assert fastjson.numbers_payload(body, True) is not None
    del leaked
