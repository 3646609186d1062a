"""Keyed fingerprints embedded in the class probabilities a prediction API returns.

A fingerprint scheme nudges the probability of the runner-up class by a pseudo-random amount that only
the holder of the key can predict. A model trained on the API's answers inherits the nudges, which an
auditor later detects by recomputing them from the stored query rows and correlating them with the
suspect model's outputs. The returned top-1 label is never changed.

Canonical serialisation of an input row
---------------------------------------
The HMAC message for a row of F features is, byte for byte::

    b"modelprint.v1\\x00"          14-byte ASCII domain tag, NUL-terminated
    F                              4 bytes, unsigned integer, little-endian ("<I")
    x_0, x_1, ..., x_{F-1}         F * 8 bytes, IEEE-754 binary64, little-endian ("<f8")

Rows are float64 (float32 inputs are widened to float64 first, which is exact). Negative zero is
replaced by +0.0 before serialisation, so -0.0 and 0.0 produce the same message. No other value is
rewritten (NaN payloads in particular are serialised as they are).

Base signal (Algorithm 1 of "Cryptographic Fingerprinting for Medical AI")
--------------------------------------------------------------------------
For each row::

    digest          = HMAC-SHA256(key, message)
    fingerprint_int = int(digest.hex()[:8], 16)      # first 4 bytes, big-endian
    base            = (fingerprint_int mod 10**6) / 250000 - 2.0      # in [-2, 2)

Scheme "hmac-second-class"
--------------------------
With ``top`` the argmax of the row and ``second`` the argmax once ``top`` is excluded (first index on
ties, as numpy does), ``logits = log(p + 1e-8)`` and::

    perturbation   = min(alpha * base, (logits[top] - logits[second]) - MARGIN)
    logits[second] += perturbation
    returned       = softmax(logits)

The ``min`` is this module's correction to the paper, whose unbounded step can lift the runner-up above
the top class and so change the label a client sees.

Scheme "hmac-all-classes" (modelprint's default)
------------------------------------------------
The paper's signal lives in one log-ratio per row, and its step acts on the log of a runner-up probability
that is often tiny, so a surrogate that generalises well (a distilled MLP that has seen 1,500 answers)
keeps too little of it to be told apart reliably (z of 3-6 over keys). This scheme moves *every* class's
logit by its own keyed step of +alpha or -alpha, from the same one HMAC per row. For C classes, the row's
message (the canonical message above) gives ``ceil(C / 256)`` digests: block 0 is
``HMAC-SHA256(key, message)``, block b > 0 is ``HMAC-SHA256(key, message + b.to_bytes(4, "little"))``.
Bit c of the concatenated digests (most significant bit of byte 0 first) gives the class's sign::

    signal[c]      = +1.0 if bit c is set else -1.0
    logits         = log(p + 1e-8)
    logits'        = logits + lambda * alpha * signal     # lambda in [0, 1] per row
    returned       = softmax(logits')

``lambda`` is 1 unless the shift would let some class reach the top class; then it is the largest value
(found in closed form, minus a safety margin) that keeps the top class strictly on top, so the label never
changes. The shift applied to each class's logit is returned as ``logit_shift`` for detection.
"""

from __future__ import annotations

import hmac
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np

DOMAIN_TAG: Final = b"modelprint.v1\x00"
DEFAULT_ALPHA: Final = 0.08
# Per-class logit step of "hmac-all-classes" (see the README's fingerprint section for how it was chosen).
DEFAULT_ALL_CLASSES_ALPHA: Final = 0.2
# Keeps log(0) finite; part of the published formula, so changing it changes every fingerprint.
LOG_EPSILON: Final = 1e-8
# Softmax is monotone in each logit, so a strict gap between the runner-up's and the top class's logit
# gives a strict order of their float64 probabilities as long as the gap survives rounding. Logits lie
# within about [-18.5, 0] here, where a float64 ulp is below 4e-15; a 1e-6 gap is orders of magnitude
# above the rounding of the add, the max-subtraction, exp and the normalising division, yet far below
# the fingerprint's own scale (alpha * 2), so it only bites on near-ties.
MARGIN: Final = 1e-6

_HEADER_STRUCT: Final = struct.Struct("<I")
_BASE_MODULUS: Final = 10**6
_BASE_SCALE: Final = 250_000.0
_BASE_OFFSET: Final = 2.0


@dataclass(frozen=True)
class FingerprintResult:
    """Probabilities to return to the client and the log-space perturbation applied to each row."""

    probabilities: np.ndarray
    # Per row, how far the runner-up-vs-top log-ratio was moved (the paper's statistic).
    perturbation: np.ndarray
    # (rows, classes): what was added to each class's log(p + 1e-8) (the runner-up column only for the
    # paper's scheme). Scans correlate a suspect's log-probabilities with it.
    logit_shift: np.ndarray


class FingerprintScheme(Protocol):
    """A way of marking returned probabilities; `apply` on clean probabilities is also the recomputation."""

    name: str

    def apply(self, probabilities: np.ndarray, inputs: np.ndarray, key: bytes) -> FingerprintResult:
        """Return fingerprinted probabilities for a batch and the perturbation applied to each row."""
        ...


def canonical_messages(inputs: np.ndarray) -> list[bytes]:
    """Serialise each row of an (N, F) array into its HMAC message (format in the module docstring)."""
    if inputs.ndim != 2:
        raise ValueError(f"inputs must be a 2-D (rows, features) array, got shape {inputs.shape}")
    # Adding 0.0 turns -0.0 into +0.0 (IEEE round-to-nearest) and leaves every other value unchanged.
    # The outer conversion pins little-endian bytes even on a big-endian host, where `+` yields native order.
    canonical_rows = np.ascontiguousarray(np.asarray(inputs, dtype=np.float64) + 0.0, dtype="<f8")
    n_rows, n_features = canonical_rows.shape
    header = DOMAIN_TAG + _HEADER_STRUCT.pack(n_features)
    row_bytes_length = n_features * 8
    all_row_bytes = canonical_rows.tobytes()
    return [
        header + all_row_bytes[row * row_bytes_length : (row + 1) * row_bytes_length] for row in range(n_rows)
    ]


def canonical_row_bytes(row: np.ndarray) -> bytes:
    """Serialise one 1-D feature row into its HMAC message (format in the module docstring)."""
    if row.ndim != 1:
        raise ValueError(f"row must be a 1-D feature vector, got shape {row.shape}")
    return canonical_messages(row.reshape(1, -1))[0]


def hmac_base(inputs: np.ndarray, key: bytes) -> np.ndarray:
    """Per-row base signal in [-2, 2) from HMAC-SHA256 of the canonical row (paper's Algorithm 1)."""
    # An empty key is valid for HMAC but would let anyone recompute, and so strip, the fingerprint.
    if len(key) == 0:
        raise ValueError("fingerprint key must not be empty")
    digest_prefixes = b"".join(
        hmac.digest(key, message, "sha256")[:4] for message in canonical_messages(inputs)
    )
    # The first 8 hex characters of the digest are its first 4 bytes read big-endian.
    fingerprint_ints = np.frombuffer(digest_prefixes, dtype=">u4").astype(np.int64)
    # Residues are below 10**6, hence exact in float64: the division rounds exactly like the paper's Python.
    return (fingerprint_ints % _BASE_MODULUS) / _BASE_SCALE - _BASE_OFFSET


def _top_and_second(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column of the largest and of the runner-up probability per row, first index on ties."""
    top = np.argmax(probabilities, axis=1)
    without_top = probabilities.copy()
    np.put_along_axis(without_top, top[:, None], -np.inf, axis=1)
    return top, np.argmax(without_top, axis=1)


def _validated_probabilities(probabilities: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """Check shapes and values of a batch and return the probabilities as float64."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise ValueError(
            f"probabilities must be a 2-D (rows, classes) array with at least 2 classes, "
            f"got shape {probabilities.shape}"
        )
    if inputs.ndim != 2:
        raise ValueError(f"inputs must be a 2-D (rows, features) array, got shape {inputs.shape}")
    if probabilities.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"probabilities and inputs must have the same number of rows, "
            f"got {probabilities.shape[0]} and {inputs.shape[0]}"
        )
    # A NaN or negative value would turn into NaN logits and be served to the client unnoticed.
    if not np.all(np.isfinite(probabilities)) or np.any(probabilities < 0.0):
        raise ValueError("probabilities must be finite and non-negative")
    return probabilities


def second_vs_top_log_ratio(probabilities: np.ndarray) -> np.ndarray:
    """Per row, log(p[second] + 1e-8) - log(p[top] + 1e-8), the statistic the fingerprint shifts."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[1] < 2:
        raise ValueError(
            f"probabilities must be a 2-D (rows, classes) array with at least 2 classes, "
            f"got shape {probabilities.shape}"
        )
    top, second = _top_and_second(probabilities)
    top_probability = np.take_along_axis(probabilities, top[:, None], axis=1)[:, 0]
    second_probability = np.take_along_axis(probabilities, second[:, None], axis=1)[:, 0]
    return np.log(second_probability + LOG_EPSILON) - np.log(top_probability + LOG_EPSILON)


class _StrengthScheme:
    """A scheme with a log-space step size alpha (finite, non-negative)."""

    def __init__(self, alpha: float) -> None:
        if not math.isfinite(alpha) or alpha < 0.0:
            raise ValueError(f"alpha must be a finite non-negative number, got {alpha!r}")
        self.alpha = float(alpha)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha!r})"


class HmacSecondClassScheme(_StrengthScheme):
    """Paper's HMAC fingerprint on the runner-up class, bounded so the top-1 label never changes."""

    name: str = "hmac-second-class"

    def __init__(self, alpha: float = DEFAULT_ALPHA) -> None:
        super().__init__(alpha)

    def apply(self, probabilities: np.ndarray, inputs: np.ndarray, key: bytes) -> FingerprintResult:
        """Perturb the runner-up class's logit by alpha * base, capped MARGIN below the top class's logit."""
        probabilities = _validated_probabilities(probabilities, inputs)
        top, second = _top_and_second(probabilities)
        logits = np.log(probabilities + LOG_EPSILON)
        top_logit = np.take_along_axis(logits, top[:, None], axis=1)[:, 0]
        second_logit = np.take_along_axis(logits, second[:, None], axis=1)[:, 0]

        raw_perturbation = self.alpha * hmac_base(inputs, key)
        perturbation = np.minimum(raw_perturbation, (top_logit - second_logit) - MARGIN)
        np.put_along_axis(logits, second[:, None], (second_logit + perturbation)[:, None], axis=1)

        # The top class's logit is still the row maximum, so it maps to exactly exp(0) = 1.
        exponentials = np.exp(logits - top_logit[:, None])
        fingerprinted = exponentials / exponentials.sum(axis=1, keepdims=True)

        fingerprinted = _keep_top_on_top(fingerprinted, top)
        logit_shift = np.zeros_like(logits)
        np.put_along_axis(logit_shift, second[:, None], perturbation[:, None], axis=1)
        return FingerprintResult(
            probabilities=fingerprinted, perturbation=perturbation, logit_shift=logit_shift
        )


def _keep_top_on_top(fingerprinted: np.ndarray, top: np.ndarray) -> np.ndarray:
    """Push any class that rounding merged with (or lifted above) the top class one ulp below it.

    The perturbed logits keep the top class strictly largest, but rounding in log, exp and the division
    can merge a class that was a few ulps below the top class with it; if that class has the lower index,
    argmax's first-index rule would then pick it. Moving it one ulp down shifts the row sum by a few ulps.
    """
    top_probability = np.take_along_axis(fingerprinted, top[:, None], axis=1)
    class_index = np.arange(fingerprinted.shape[1])[None, :]
    outranks_top = (fingerprinted > top_probability) | (
        (fingerprinted == top_probability) & (class_index < top[:, None])
    )
    result: np.ndarray = np.where(outranks_top, np.nextafter(top_probability, 0.0), fingerprinted)
    return result


_SIGNALS_PER_DIGEST: Final = 256  # one sign per bit of an HMAC-SHA256 digest


def hmac_class_signs(inputs: np.ndarray, n_classes: int, key: bytes) -> np.ndarray:
    """Per-row, per-class keyed signs (+1.0 or -1.0) from HMAC-SHA256 of the canonical row (see above)."""
    if len(key) == 0:
        raise ValueError("fingerprint key must not be empty")
    if n_classes < 1:
        raise ValueError(f"n_classes must be positive, got {n_classes}")
    messages = canonical_messages(inputs)
    blocks = -(-n_classes // _SIGNALS_PER_DIGEST)
    suffixes = [b""] + [block.to_bytes(4, "little") for block in range(1, blocks)]
    digests = b"".join(
        hmac.digest(key, message + suffix, "sha256") for message in messages for suffix in suffixes
    )
    # Bit c of a row's digest stream, most significant bit of byte 0 first.
    bits = np.unpackbits(np.frombuffer(digests, dtype=np.uint8).reshape(len(messages), -1), axis=1)
    return bits[:, :n_classes].astype(np.float64) * 2.0 - 1.0


class HmacAllClassesScheme(_StrengthScheme):
    """Keyed HMAC step on every class's logit, scaled down per row where needed so the label never changes."""

    name: str = "hmac-all-classes"

    def __init__(self, alpha: float = DEFAULT_ALL_CLASSES_ALPHA) -> None:
        super().__init__(alpha)

    def apply(self, probabilities: np.ndarray, inputs: np.ndarray, key: bytes) -> FingerprintResult:
        """Add alpha * signal to every logit, shrunk per row so the top class stays MARGIN above the rest."""
        probabilities = _validated_probabilities(probabilities, inputs)
        logits = np.log(probabilities + LOG_EPSILON)
        top, second = _top_and_second(probabilities)
        shift = self.alpha * hmac_class_signs(inputs, probabilities.shape[1], key)
        top_logit = np.take_along_axis(logits, top[:, None], axis=1)
        # Class c stays below the top class after a step lambda * shift while
        # lambda * (shift_c - shift_top) < (logit_top - logit_c) - MARGIN; only classes that gain on the
        # top class (positive difference) limit lambda.
        gain = shift - np.take_along_axis(shift, top[:, None], axis=1)
        room = (top_logit - logits) - MARGIN
        with np.errstate(divide="ignore", invalid="ignore"):
            limits = np.where(gain > 0.0, room / gain, np.inf)
        scale = np.clip(limits.min(axis=1), 0.0, 1.0)
        logit_shift = scale[:, None] * shift
        shifted = logits + logit_shift
        exponentials = np.exp(shifted - shifted.max(axis=1, keepdims=True))
        fingerprinted = _keep_top_on_top(exponentials / exponentials.sum(axis=1, keepdims=True), top)
        return FingerprintResult(
            probabilities=fingerprinted,
            perturbation=(
                np.take_along_axis(logit_shift, second[:, None], axis=1)
                - np.take_along_axis(logit_shift, top[:, None], axis=1)
            )[:, 0],
            logit_shift=logit_shift,
        )


class NoFingerprintScheme:
    """Baseline that returns the probabilities unchanged, for benchmarks."""

    name: str = "none"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def apply(self, probabilities: np.ndarray, inputs: np.ndarray, key: bytes) -> FingerprintResult:
        """Return a float64 copy of the probabilities and a zero perturbation per row."""
        probabilities = _validated_probabilities(probabilities, inputs)
        return FingerprintResult(
            probabilities=probabilities.copy(),
            perturbation=np.zeros(probabilities.shape[0]),
            logit_shift=np.zeros_like(probabilities),
        )


DEFAULT_SCHEME: Final = HmacAllClassesScheme.name

# Each entry builds its scheme from a strength (None: the scheme's own default).
SCHEMES: dict[str, Callable[[float | None], FingerprintScheme]] = {
    HmacAllClassesScheme.name: lambda alpha: HmacAllClassesScheme(
        DEFAULT_ALL_CLASSES_ALPHA if alpha is None else alpha
    ),
    HmacSecondClassScheme.name: lambda alpha: HmacSecondClassScheme(
        DEFAULT_ALPHA if alpha is None else alpha
    ),
    # The baseline has no strength parameter; alpha is accepted so every entry has the same signature.
    NoFingerprintScheme.name: lambda _alpha: NoFingerprintScheme(),
}


def get_scheme(name: str, alpha: float | None = None) -> FingerprintScheme:
    """Build the fingerprint scheme registered under `name` with strength `alpha` (None: its default)."""
    try:
        make_scheme = SCHEMES[name]
    except KeyError:
        raise ValueError(
            f"unknown fingerprint scheme {name!r}; known: {', '.join(sorted(SCHEMES))}"
        ) from None
    return make_scheme(alpha)
