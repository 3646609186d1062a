"""Prediction bodies parsed by simdjson, their numbers copied straight into a float64 array.

The ordinary route (`service.parse_json`, then numpy) makes orjson build a Python float per number
and numpy read them back: 0.28-0.38 ms for an 80x80 Open Inference Protocol body in process, the
gateway's largest cost under batch-80 load (py-spy, README). simdjson's parser (PyPI `pysimdjson`)
copies a homogeneous array of numbers into a buffer without making a Python object per number:
0.11-0.13 ms for the whole body.

This route answers only when its answer is certain to equal the ordinary route's; on anything
else it answers None and the caller parses the body the ordinary way, which also names the
problem in its error. It answers None for:

- bodies holding a backslash (an escape could spell a bracket the text does not show), invalid
  JSON, numbers out of float64's range or integers beyond 64 bits (the ordinary route refuses or
  converts them with its own messages);
- a literal, string or object among the numbers (simdjson refuses to copy such an array);
- an object holding the same key twice at the levels read here (simdjson reads the first, orjson
  the last);
- numbers that are not exactly a flat list (Open Inference Protocol) or a list of equal-length
  rows. simdjson flattens nested arrays as it copies them, so the shape is checked apart: every row's
  length, and the count of `[` in the body, which must equal that of the rest of the payload plus
  the rows, so no array hides deeper inside the numbers.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import orjson
import simdjson

_local = threading.local()


def numbers_payload(body: bytes, v2: bool) -> dict[str, Any] | None:
    """The parsed body with its numbers as a float64 array, or None (parse it the ordinary way).

    v2: an Open Inference Protocol body with one input; its `data` becomes a flat array, or a 2-D
    array when sent as rows. v1: `instances` becomes a 2-D array. Everything else in the body is plain
    Python, as orjson would give it.
    """
    if b"\\" in body:
        return None
    try:
        document = _parser().parse(body)
    except ValueError:  # invalid JSON, a number out of range
        return None
    except RuntimeError:
        # An integer beyond 64 bits, or a document of this parser still referenced (which would
        # refuse every later body): a fresh parser for the next body either way.
        _local.parser = None
        return None
    try:
        return _payload(document, body, v2)
    except (TypeError, ValueError, RuntimeError):
        return None
    finally:
        del document  # simdjson refuses to reuse a parser while a document of it is referenced


def _parser() -> simdjson.Parser:
    """This thread's parser: reused, since setting one up for a 128 KB body costs about 0.2 ms."""
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = simdjson.Parser()
    return parser


def _payload(document: Any, body: bytes, v2: bool) -> dict[str, Any] | None:
    if not isinstance(document, simdjson.Object):
        return None
    key = "inputs" if v2 else "instances"
    payload = _plain_except(document, key)
    if payload is None:
        return None
    if v2:
        inputs = document[key]
        if not isinstance(inputs, simdjson.Array) or len(inputs) != 1:
            return None
        tensor = inputs[0]
        if not isinstance(tensor, simdjson.Object):
            return None
        holder = _plain_except(tensor, "data")
        if holder is None:
            return None
        payload[key] = [holder]
        key, numbers = "data", tensor["data"]
    else:
        holder, numbers = payload, document[key]
    if not isinstance(numbers, simdjson.Array):
        return None
    converted = _numbers(numbers, rows_only=not v2)
    if converted is None:
        return None
    array, row_arrays = converted
    holder[key] = []
    if _count_brackets(body) != _count_brackets(orjson.dumps(payload)) + row_arrays:
        return None
    holder[key] = array
    return payload


def _plain_except(obj: simdjson.Object, skipped: str) -> dict[str, Any] | None:
    """The object as a dict without `skipped` (None: a repeated key, or `skipped` missing)."""
    keys = list(obj.keys())
    if len(set(keys)) != len(keys) or skipped not in keys:
        return None
    return {key: _plain(obj[key]) for key in keys if key != skipped}


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def _numbers(values: simdjson.Array, rows_only: bool) -> tuple[np.ndarray, int] | None:
    """The numbers as float64 (2-D when sent as rows) and how many row arrays they were sent in."""
    count = len(values)
    if count == 0:
        return None
    first = values[0]
    if isinstance(first, simdjson.Array):
        width = len(first)
        if width == 0 or not all(isinstance(row, simdjson.Array) and len(row) == width for row in values):
            return None
        flat = np.frombuffer(values.as_buffer(of_type="d"), dtype=np.float64)
        return flat.reshape(count, width), count
    if rows_only:
        return None
    flat = np.frombuffer(values.as_buffer(of_type="d"), dtype=np.float64)
    return (flat, 0) if flat.size == count else None


def _count_brackets(text: bytes) -> int:
    # bytes.replace finds them with memchr: 3 µs for 128 KB, against 55 for bytes.count.
    return len(text) - len(text.replace(b"[", b""))
