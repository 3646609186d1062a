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

Scheme "fast-all-classes"
-------------------------
The step and shrink of "hmac-all-classes" (same alpha, same ``lambda``, same ``logit_shift``), with the
class signs from a keyed hash that numpy evaluates for a whole batch at once instead of one HMAC per row
in Python. Once per key, feature count F and class count C (cached), the key is expanded with
HMAC-SHA256 in counter mode::

    prefix = b"modelprint.fast-all-classes.v1\x00" + F ("<I")
    stream = HMAC-SHA256(key, prefix + (0).to_bytes(4, "little"))
           + HMAC-SHA256(key, prefix + (1).to_bytes(4, "little")) + ...   # 32 * F + 32 bytes used
    P      = 4 * F                                    # 16-bit pieces per row
    b      = min(32, 37 - ceil(log2(P)))              # weight bits: 28 for F = 80; F <= 2**19
    w0[i]  = word[i] mod 2**b,  w1[i] = word[P + i] mod 2**b     # word = stream as "<u4", i < P
    m0, m1, m2, k = the "<u8" words at bytes 8P .. 8P + 32; m0, m1, m2 are made odd (| 1)

For each row, with s[0..P-1] the F * 8 feature bytes of the row's canonical message (float64, -0.0 as
+0.0, little-endian; see above) read as little-endian uint16::

    A          = sum_i w0[i] * s[i],   B = sum_i w1[i] * s[i]   # exact, below P * 2**(16 + b) <= 2**53
    h          = (A * m0 + B * m1) mod 2**64
    z[c]       = fmix64((h + k + c * m2) mod 2**64)               # c = 0 .. C-1
    signal[c]  = +1.0 if z[c] >= 2**63 else -1.0

where fmix64 is MurmurHash3's finaliser (``z ^= z >> 33; z *= 0xff51afd7ed558ccd; z ^= z >> 33;
z *= 0xc4ceb9fe1a85ec53; z ^= z >> 33``, products modulo 2**64). The projections are float64 matrix
products of integers whose every partial sum stays below 2**53, so they are exact whatever the BLAS,
its summation order or the batch: a row's signal depends on that row's bytes alone.

Security: the weights and constants come from the key through HMAC-SHA256, so without the key the signs
cannot be computed, and any change to any input bit (one ulp of one feature) gives unrelated signs, as
with HMAC. But the hash is not a cryptographic PRF: its first stage is linear in the input's 16-bit
pieces and fmix64 is a public, invertible, non-cryptographic mixer, studied for hash-table quality, not
against an adversary. Nothing is claimed about an adversary who queries adaptively at scale and studies
the returned probabilities to learn the key or to predict and strip the signs. Prefer the HMAC schemes
when the evidence must rest on a standard cryptographic assumption, when such an adversary is in scope,
or when the model is expensive enough that one HMAC per row does not matter; choose this one for small,
latency-bound models.
"""

from __future__ import annotations

import hmac
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
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


def _canonical_rows(inputs: np.ndarray) -> np.ndarray:
    """The rows as the canonical serialisation writes them: contiguous little-endian float64, no -0.0."""
    if inputs.ndim != 2:
        raise ValueError(f"inputs must be a 2-D (rows, features) array, got shape {inputs.shape}")
    # Adding 0.0 turns -0.0 into +0.0 (IEEE round-to-nearest) and leaves every other value unchanged.
    # The outer conversion pins little-endian bytes even on a big-endian host, where `+` yields native order.
    return np.ascontiguousarray(np.asarray(inputs, dtype=np.float64) + 0.0, dtype="<f8")


def _check_key(key: bytes) -> None:
    # An empty key is valid for HMAC but would let anyone recompute, and so strip, the fingerprint.
    if len(key) == 0:
        raise ValueError("fingerprint key must not be empty")


def _check_key_and_classes(key: bytes, n_classes: int) -> None:
    _check_key(key)
    if n_classes < 1:
        raise ValueError(f"n_classes must be positive, got {n_classes}")


def canonical_messages(inputs: np.ndarray) -> list[bytes]:
    """Serialise each row of an (N, F) array into its HMAC message (format in the module docstring)."""
    canonical_rows = _canonical_rows(inputs)
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
    _check_key(key)
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
    # A NaN or negative value would turn into NaN logits and be served to the client unnoticed. min and
    # max propagate NaN, and NaN fails both comparisons.
    if probabilities.size and not (probabilities.min() >= 0.0 and probabilities.max() < np.inf):
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
    _check_key_and_classes(key, n_classes)
    messages = canonical_messages(inputs)
    blocks = -(-n_classes // _SIGNALS_PER_DIGEST)
    suffixes = [b""] + [block.to_bytes(4, "little") for block in range(1, blocks)]
    digests = b"".join(
        hmac.digest(key, message + suffix, "sha256") for message in messages for suffix in suffixes
    )
    # Bit c of a row's digest stream, most significant bit of byte 0 first.
    bits = np.unpackbits(np.frombuffer(digests, dtype=np.uint8).reshape(len(messages), -1), axis=1)
    return bits[:, :n_classes].astype(np.float64) * 2.0 - 1.0


def _apply_class_signs(probabilities: np.ndarray, positive: np.ndarray, alpha: float) -> FingerprintResult:
    """Move every class's logit by +alpha (where `positive`) or -alpha, shrunk per row to keep the label.

    The step and shrink of the all-classes schemes (module docstring), shared by both. `probabilities`
    must be validated float64 (rows, classes); `positive` holds the keyed signs class-major, as a
    (classes, rows) boolean array. The work runs class-major because numpy reduces over a short
    contiguous axis (4 classes) several times slower than across rows. It reproduces bit for bit the
    row-major formulation: only a class of sign +1 gains on a top class of sign -1, by exactly
    alpha - -alpha; min_c(room_c / g) == min_c(room_c) / g and min_c(top - logit_c) == top - max_c(logit_c)
    in IEEE arithmetic (both operations are monotone); and below 8 classes numpy's row sum adds the
    classes in order, as the class-major sum does (from 8 on its pairwise order is kept by summing rows).
    """
    n_rows, n_classes = probabilities.shape
    rows = np.arange(n_rows)
    top, second = _top_and_second(probabilities)
    logits = np.add(probabilities.T, LOG_EPSILON, order="C")
    np.log(logits, out=logits)
    shift = np.where(positive, alpha, -alpha)
    if alpha > 0.0:
        gaining = positive & ~positive[top, rows]
        highest_gaining = np.where(gaining, logits, -np.inf).max(axis=0)
        # Class c stays below the top class after a step lambda * shift while
        # lambda * 2 * alpha < (logit_top - logit_c) - MARGIN for every gaining class c.
        limit = ((logits[top, rows] - highest_gaining) - MARGIN) / (alpha - -alpha)
        logit_shift = np.minimum(np.maximum(limit, 0.0), 1.0) * shift
    else:
        logit_shift = shift
    exponentials = logits + logit_shift
    exponentials -= exponentials.max(axis=0)
    np.exp(exponentials, out=exponentials)
    if n_classes < 8:
        totals = exponentials.sum(axis=0)
    else:
        totals = np.ascontiguousarray(exponentials.T).sum(axis=1)
    fingerprinted = np.divide(exponentials.T, totals[:, None], order="C")
    # argmax equals top on every row exactly when no class outranks the top class (first index on ties).
    if np.any(fingerprinted.argmax(axis=1) != top):
        fingerprinted = _keep_top_on_top(fingerprinted, top)
    return FingerprintResult(
        probabilities=fingerprinted,
        perturbation=logit_shift[second, rows] - logit_shift[top, rows],
        logit_shift=logit_shift.T,
    )


class _AllClassesScheme(_StrengthScheme):
    """A keyed +-alpha step on every class's logit; subclasses say where the signs come from."""

    def __init__(self, alpha: float = DEFAULT_ALL_CLASSES_ALPHA) -> None:
        super().__init__(alpha)

    def _positive_signs(self, inputs: np.ndarray, n_classes: int, key: bytes) -> np.ndarray:
        """(classes, rows) booleans, True where the class's keyed sign is +1."""
        raise NotImplementedError

    def apply(self, probabilities: np.ndarray, inputs: np.ndarray, key: bytes) -> FingerprintResult:
        """Add alpha * signal to every logit, shrunk per row so the top class stays MARGIN above the rest."""
        probabilities = _validated_probabilities(probabilities, inputs)
        positive = self._positive_signs(inputs, probabilities.shape[1], key)
        return _apply_class_signs(probabilities, positive, self.alpha)


class HmacAllClassesScheme(_AllClassesScheme):
    """Keyed HMAC step on every class's logit, scaled down per row where needed so the label never changes."""

    name: str = "hmac-all-classes"

    def _positive_signs(self, inputs: np.ndarray, n_classes: int, key: bytes) -> np.ndarray:
        positive: np.ndarray = (hmac_class_signs(inputs, n_classes, key) > 0.0).T
        return positive


_FAST_HASH_TAG: Final = b"modelprint.fast-all-classes.v1\x00"
# Each float64 feature is read as four 16-bit pieces; the projections must stay exact in float64.
_PIECES_PER_FEATURE: Final = 4
_PIECE_BITS: Final = 16
_FLOAT64_EXACT_BITS: Final = 53
_MAX_WEIGHT_BITS: Final = 32
_MIN_WEIGHT_BITS: Final = 16
# MurmurHash3's 64-bit finaliser (fmix64).
_FMIX_SHIFT: Final = np.uint64(33)
_FMIX_MULTIPLIER_1: Final = np.uint64(0xFF51AFD7ED558CCD)
_FMIX_MULTIPLIER_2: Final = np.uint64(0xC4CEB9FE1A85EC53)


@dataclass(frozen=True)
class _FastHashParameters:
    """What `fast_class_signs` derives from a key for one feature and class count (module docstring)."""

    weights: np.ndarray  # (2, 4 * F) float64 w0 and w1, exact integers below 2 ** weight_bits
    multipliers: np.ndarray  # (2, 1) uint64 m0 and m1, odd
    class_offsets: np.ndarray  # (C, 1) uint64, k + c * m2 modulo 2**64


@lru_cache(maxsize=16)
def _fast_hash_parameters(key: bytes, n_features: int, n_classes: int) -> _FastHashParameters:
    """Expand the key into the projection weights and mixing constants (cached: derived once per key)."""
    n_pieces = _PIECES_PER_FEATURE * n_features
    # n_pieces * (2**16 - 1) * (2**b - 1) < 2**53 keeps every partial sum of the projection exact.
    weight_bits = min(_MAX_WEIGHT_BITS, _FLOAT64_EXACT_BITS - _PIECE_BITS - max(0, n_pieces - 1).bit_length())
    if weight_bits < _MIN_WEIGHT_BITS:
        raise ValueError(f"fast-all-classes supports at most 2**19 features, got {n_features}")
    n_bytes = 2 * n_pieces * 4 + 4 * 8
    prefix = _FAST_HASH_TAG + _HEADER_STRUCT.pack(n_features)
    stream = b"".join(
        hmac.digest(key, prefix + _HEADER_STRUCT.pack(block), "sha256") for block in range(-(-n_bytes // 32))
    )
    words = np.frombuffer(stream, dtype="<u4", count=2 * n_pieces) & np.uint32((1 << weight_bits) - 1)
    m0, m1, m2, offset = (
        int(word) for word in np.frombuffer(stream, dtype="<u8", count=4, offset=8 * n_pieces)
    )
    class_offsets = [(offset + c * (m2 | 1)) % (1 << 64) for c in range(n_classes)]
    return _FastHashParameters(
        weights=words.reshape(2, n_pieces).astype(np.float64),
        multipliers=np.array([[m0 | 1], [m1 | 1]], dtype=np.uint64),
        class_offsets=np.array(class_offsets, dtype=np.uint64)[:, None],
    )


def _fmix64(values: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place on a uint64 array (multiplications wrap modulo 2**64)."""
    values ^= values >> _FMIX_SHIFT
    values *= _FMIX_MULTIPLIER_1
    values ^= values >> _FMIX_SHIFT
    values *= _FMIX_MULTIPLIER_2
    values ^= values >> _FMIX_SHIFT
    return values


def fast_class_signs(inputs: np.ndarray, n_classes: int, key: bytes) -> np.ndarray:
    """Keyed class signs from the vectorised hash (module docstring), class-major: (classes, rows) booleans.

    True stands for +1, False for -1.
    """
    _check_key_and_classes(key, n_classes)
    # The canonical row bytes of the HMAC message (widened, -0.0 -> +0.0, little-endian), read as
    # little-endian 16-bit pieces: float64 values below 2**16, so the matrix product is exact.
    canonical_rows = _canonical_rows(inputs)
    parameters = _fast_hash_parameters(key, canonical_rows.shape[1], n_classes)
    pieces = canonical_rows.view("<u2").astype(np.float64)
    projections = (parameters.weights @ pieces.T).astype(np.uint64)
    projections *= parameters.multipliers
    row_hash = projections.sum(axis=0)
    mixed = _fmix64(parameters.class_offsets + row_hash)
    positive: np.ndarray = mixed >= np.uint64(1 << 63)
    return positive


class FastAllClassesScheme(_AllClassesScheme):
    """The all-classes step with a vectorised keyed hash instead of HMAC: fast, keyed, not a PRF."""

    name: str = "fast-all-classes"

    def _positive_signs(self, inputs: np.ndarray, n_classes: int, key: bytes) -> np.ndarray:
        return fast_class_signs(inputs, n_classes, key)


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
    FastAllClassesScheme.name: lambda alpha: FastAllClassesScheme(
        DEFAULT_ALL_CLASSES_ALPHA if alpha is None else alpha
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
