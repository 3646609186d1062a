"""API keys (random, stored as SHA-256) and constant-time token checks."""

from __future__ import annotations

import hashlib
import hmac
import secrets

API_KEY_PREFIX = "mp_"


def generate_api_key() -> str:
    """A new client API key with 256 bits of randomness."""
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(api_key: str) -> str:
    """The stored form of an API key: keys are random, so an unsalted SHA-256 is not guessable."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


def display_prefix(api_key: str) -> str:
    """The first characters of a key, safe to show so an operator can tell keys apart."""
    return api_key[: len(API_KEY_PREFIX) + 6]


def tokens_match(presented: str, expected: str) -> bool:
    """Compare tokens without leaking their contents through timing."""
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
