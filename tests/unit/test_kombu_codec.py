"""The base64 body codec of the stack's kombu transport (shared/kombu_redis.py) against kombu's own."""

from __future__ import annotations

import base64
import binascii

import numpy as np
import pytest
from kombu.transport.virtual.base import Base64 as StockBase64

from shared.kombu_redis import Base64, Channel

SIZES = [0, 1, 2, 3, 4, 57, 58, 1000, 80 * 80 * 8, 5 * 80 * 80 * 8 + 7]


def _payloads() -> list[bytes]:
    rng = np.random.default_rng(20261207)
    return [rng.integers(0, 256, size=size, dtype=np.uint8).tobytes() for size in SIZES]


def test_encoding_gives_the_stock_codecs_text_for_bytes_and_for_str() -> None:
    ours, stock = Base64(), StockBase64()
    for payload in _payloads():
        assert ours.encode(payload) == stock.encode(payload)
    text = "prédiction ✓ " * 100  # kombu passes str bodies as UTF-8
    assert ours.encode(text) == stock.encode(text)


def test_decoding_gives_the_stock_codecs_bytes_for_strict_and_lenient_text() -> None:
    ours, stock = Base64(), StockBase64()
    for payload in _payloads():
        strict = base64.b64encode(payload).decode("ascii")
        assert ours.decode(strict) == stock.decode(strict) == payload
        assert ours.decode(strict.encode("ascii")) == payload
        # Line breaks every 76 characters (MIME style, `base64.encodebytes`): outside the alphabet, so
        # the strict decoder refuses them and the stock decoder, which skips them, takes over.
        wrapped = base64.encodebytes(payload).decode("ascii")
        assert ours.decode(wrapped) == stock.decode(wrapped) == payload


@pytest.mark.parametrize("text", ["abc", "a", "ab=c", "=" * 4 + "abcd"])
def test_malformed_text_is_refused_or_read_as_the_stock_codec_reads_it(text: str) -> None:
    ours, stock = Base64(), StockBase64()
    try:
        expected = stock.decode(text)
    except binascii.Error:
        with pytest.raises(binascii.Error):
            ours.decode(text)
    else:
        assert ours.decode(text) == expected


def test_the_transports_channel_uses_the_codec_for_message_bodies() -> None:
    assert isinstance(Channel.codecs["base64"], Base64)
    payload = _payloads()[-1]
    channel = Channel.__new__(Channel)  # encode_body and decode_body need no connection
    body, encoding = channel.encode_body(payload, "base64")
    assert encoding == "base64"
    assert body == StockBase64().encode(payload)
    assert channel.decode_body(body, "base64") == payload
