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
class signs from a keyed hash that a compiled loop evaluates in a few nanoseconds per row instead of one
HMAC per row. Once per key, feature count F and class count C (cached), the key is expanded with
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
z *= 0xc4ceb9fe1a85ec53; z ^= z >> 33``, products modulo 2**64). The projections are sums of integer
products whose every partial sum stays below 2**53, so they are exact in 64-bit integers (and would be in
float64) whatever the summation order or the batch: a row's signal depends on that row's bytes alone.

Security: the weights and constants come from the key through HMAC-SHA256, so without the key the signs
cannot be computed, and any change to any input bit (one ulp of one feature) gives unrelated signs, as
with HMAC. But the hash is not a cryptographic PRF: its first stage is linear in the input's 16-bit
pieces and fmix64 is a public, invertible, non-cryptographic mixer, studied for hash-table quality, not
against an adversary. Nothing is claimed about an adversary who queries adaptively at scale and studies
the returned probabilities to learn the key or to predict and strip the signs. Prefer the HMAC schemes
when the evidence must rest on a standard cryptographic assumption, when such an adversary is in scope,
or when the model is expensive enough that one HMAC per row does not matter; choose this one for small,
latency-bound models.

Implementation
--------------
The per-row steps run in compiled loops (numba, `shared/fingerprint_kernels.py`), one pass over the
batch, because the numpy formulation's fixed cost of some fifty array calls outweighed the arithmetic at
the batch sizes an API sees. They evaluate ``softmax(logits')`` as ``(p + 1e-8) * exp(shift)`` normalised
(one exp per row, no log per class), so a returned probability can differ from a literal evaluation of
the formulas above by a few ulps; the keyed signs, the base signal, ``lambda``'s clamping, ``logit_shift``
and the labels do not. The HMACs are standard HMAC-SHA256 (RFC 2104), computed from SHA-256 states of
the key's pad blocks and the message header that are prepared once (`row_digests`), byte for byte what
`hmac.digest` returns.
"""

from __future__ import annotations

import hashlib
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


_SHA256_BLOCK_BYTES: Final = 64
_INNER_PAD: Final = bytes(0x36 for _ in range(_SHA256_BLOCK_BYTES))
_OUTER_PAD: Final = bytes(0x5C for _ in range(_SHA256_BLOCK_BYTES))


@lru_cache(maxsize=16)
def _hmac_sha256_states(key: bytes) -> tuple[hashlib._Hash, hashlib._Hash]:
    """SHA-256 states after the key's inner and outer pad block (RFC 2104), computed once per key."""
    block_key = hashlib.sha256(key).digest() if len(key) > _SHA256_BLOCK_BYTES else key
    block_key = block_key.ljust(_SHA256_BLOCK_BYTES, b"\0")
    inner = hashlib.sha256(bytes(k ^ pad for k, pad in zip(block_key, _INNER_PAD, strict=True)))
    outer = hashlib.sha256(bytes(k ^ pad for k, pad in zip(block_key, _OUTER_PAD, strict=True)))
    return inner, outer


def row_digests(inputs: np.ndarray, key: bytes, suffixes: tuple[bytes, ...] = (b"",)) -> bytes:
    """HMAC-SHA256(key, message + suffix) for each row's canonical message and each suffix, concatenated.

    Byte for byte what `hmac.digest` gives, about twice as fast: the key's pad blocks and the shared
    message header are hashed once per batch, and each row's bytes are hashed from the batch buffer
    without building its message.
    """
    _check_key(key)
    canonical_rows = _canonical_rows(inputs)
    n_rows, n_features = canonical_rows.shape
    inner, outer = _hmac_sha256_states(key)
    header_state = inner.copy()
    header_state.update(DOMAIN_TAG + _HEADER_STRUCT.pack(n_features))
    row_length = n_features * 8
    buffer = canonical_rows.reshape(-1).view(np.uint8).data
    digests: list[bytes] = []
    for start in range(0, n_rows * row_length, row_length):
        row_state = header_state.copy()
        row_state.update(buffer[start : start + row_length])
        for suffix in suffixes:
            message_state = row_state
            if suffix:
                message_state = row_state.copy()
                message_state.update(suffix)
            outer_state = outer.copy()
            outer_state.update(message_state.digest())
            digests.append(outer_state.digest())
    return b"".join(digests)


def hmac_base(inputs: np.ndarray, key: bytes) -> np.ndarray:
    """Per-row base signal in [-2, 2) from HMAC-SHA256 of the canonical row (paper's Algorithm 1)."""
    digests = np.frombuffer(row_digests(inputs, key), dtype=np.uint8).reshape(inputs.shape[0], 32)
    # The first 8 hex characters of the digest are its first 4 bytes read big-endian.
    fingerprint_ints = np.ascontiguousarray(digests[:, :4]).view(">u4")[:, 0].astype(np.int64)
    # Residues are below 10**6, hence exact in float64: the division rounds exactly like the paper's Python.
    return (fingerprint_ints % _BASE_MODULUS) / _BASE_SCALE - _BASE_OFFSET


def _top_and_second(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column of the largest and of the runner-up probability per row, first index on ties."""
    top = np.argmax(probabilities, axis=1)
    without_top = probabilities.copy()
    np.put_along_axis(without_top, top[:, None], -np.inf, axis=1)
    return top, np.argmax(without_top, axis=1)


def _checked_shapes(probabilities: np.ndarray, inputs: np.ndarray) -> np.ndarray:
    """Check the shapes of a batch; return the probabilities as C-contiguous float64 (values unchecked)."""
    probabilities = np.ascontiguousarray(probabilities, dtype=np.float64)
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
    return probabilities


_INVALID_PROBABILITIES: Final = "probabilities must be finite and non-negative"


def _kernel_result(output: tuple[bool, np.ndarray, np.ndarray, np.ndarray]) -> FingerprintResult:
    """A kernel's (valid, probabilities, logit shift, perturbation) as a result, or the value error."""
    valid, probabilities, logit_shift, perturbation = output
    # A NaN or negative value would turn into NaN logits and be served to the client unnoticed.
    if not valid:
        raise ValueError(_INVALID_PROBABILITIES)
    return FingerprintResult(probabilities=probabilities, perturbation=perturbation, logit_shift=logit_shift)


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
        from shared import fingerprint_kernels

        probabilities = _checked_shapes(probabilities, inputs)
        base = hmac_base(inputs, key)
        return _kernel_result(
            fingerprint_kernels.second_class_step(probabilities, base, self.alpha, LOG_EPSILON, MARGIN)
        )


_SIGNALS_PER_DIGEST: Final = 256  # one sign per bit of an HMAC-SHA256 digest


def _hmac_positive_signs(inputs: np.ndarray, n_classes: int, key: bytes) -> np.ndarray:
    """(rows, classes) booleans, True where bit c of the row's digest stream is set (module docstring)."""
    _check_key_and_classes(key, n_classes)
    blocks = -(-n_classes // _SIGNALS_PER_DIGEST)
    suffixes = (b"",) + tuple(block.to_bytes(4, "little") for block in range(1, blocks))
    digests = np.frombuffer(row_digests(inputs, key, suffixes), dtype=np.uint8)
    # Bit c of a row's digest stream, most significant bit of byte 0 first.
    bits = np.unpackbits(digests.reshape(inputs.shape[0], 32 * blocks), axis=1, count=n_classes)
    return bits.view(np.bool_)


def hmac_class_signs(inputs: np.ndarray, n_classes: int, key: bytes) -> np.ndarray:
    """Per-row, per-class keyed signs (+1.0 or -1.0) from HMAC-SHA256 of the canonical row (see above)."""
    return np.where(_hmac_positive_signs(inputs, n_classes, key), 1.0, -1.0)


class _AllClassesScheme(_StrengthScheme):
    """A keyed +-alpha step on every class's logit; subclasses say where the signs come from."""

    def __init__(self, alpha: float = DEFAULT_ALL_CLASSES_ALPHA) -> None:
        super().__init__(alpha)

    def _positive_signs(self, inputs: np.ndarray, n_classes: int, key: bytes) -> np.ndarray:
        """(rows, classes) booleans, True where the class's keyed sign is +1."""
        raise NotImplementedError

    def apply(self, probabilities: np.ndarray, inputs: np.ndarray, key: bytes) -> FingerprintResult:
        """Add alpha * signal to every logit, shrunk per row so the top class stays MARGIN above the rest."""
        from shared import fingerprint_kernels

        probabilities = _checked_shapes(probabilities, inputs)
        positive = self._positive_signs(inputs, probabilities.shape[1], key)
        return _kernel_result(
            fingerprint_kernels.all_classes_step(probabilities, positive, self.alpha, LOG_EPSILON, MARGIN)
        )


class HmacAllClassesScheme(_AllClassesScheme):
    """Keyed HMAC step on every class's logit, scaled down per row where needed so the label never changes."""

    name: str = "hmac-all-classes"

    def _positive_signs(self, inputs: np.ndarray, n_classes: int, key: bytes) -> np.ndarray:
        return _hmac_positive_signs(inputs, n_classes, key)


_FAST_HASH_TAG: Final = b"modelprint.fast-all-classes.v1\x00"
# Each float64 feature is read as four 16-bit pieces; the projections must stay exact in float64.
_PIECES_PER_FEATURE: Final = 4
_PIECE_BITS: Final = 16
_FLOAT64_EXACT_BITS: Final = 53
_MAX_WEIGHT_BITS: Final = 32
_MIN_WEIGHT_BITS: Final = 16


@dataclass(frozen=True)
class _FastHashParameters:
    """What `fast_class_signs` derives from a key for one feature and class count (module docstring)."""

    weights: np.ndarray  # (2, 4 * F) uint64 w0 and w1, below 2 ** weight_bits
    multipliers: np.ndarray  # (2,) uint64 m0 and m1, odd
    class_offsets: np.ndarray  # (C,) uint64, k + c * m2 modulo 2**64


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
        weights=words.reshape(2, n_pieces).astype(np.uint64),
        multipliers=np.array([m0 | 1, m1 | 1], dtype=np.uint64),
        class_offsets=np.array(class_offsets, dtype=np.uint64),
    )


def _fast_hash_operands(
    inputs: np.ndarray, n_classes: int, key: bytes
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The rows (little-endian float64), their 16-bit pieces and the key's hash parameters, for a kernel."""
    _check_key_and_classes(key, n_classes)
    if inputs.ndim != 2:
        raise ValueError(f"inputs must be a 2-D (rows, features) array, got shape {inputs.shape}")
    # The kernel reads -0.0 as +0.0 itself, so the rows need no canonicalising copy.
    rows = np.ascontiguousarray(inputs, dtype="<f8")
    parameters = _fast_hash_parameters(key, rows.shape[1], n_classes)
    return rows, rows.view("<u2"), parameters.weights, parameters.multipliers, parameters.class_offsets


def fast_class_signs(inputs: np.ndarray, n_classes: int, key: bytes) -> np.ndarray:
    """Keyed class signs from the vectorised hash (module docstring): (rows, classes) booleans.

    True stands for +1, False for -1.
    """
    from shared import fingerprint_kernels

    positive: np.ndarray = fingerprint_kernels.fast_signs(*_fast_hash_operands(inputs, n_classes, key))
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
        probabilities = _checked_shapes(probabilities, inputs)
        if probabilities.size and not (probabilities.min() >= 0.0 and probabilities.max() < np.inf):
            raise ValueError(_INVALID_PROBABILITIES)
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
