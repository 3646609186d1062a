"""Synthetic ECG generator, reference model training and safe (pickle-free) persistence."""

from __future__ import annotations

import functools
import hashlib
import itertools
import warnings
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from scipy.signal import find_peaks
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from modelprint.training import (
    TrainedModel,
    UntrustedModelError,
    load_model_file,
    save_model,
    save_reference_data,
    train_breast_cancer_model,
    train_ecg_model,
)
from shared.ecg import ECG_CLASSES, WINDOW_SECONDS, generate_ecg

N_STEPS = 80
DT = WINDOW_SECONDS / N_STEPS
T = np.arange(N_STEPS) * DT


@pytest.fixture(scope="module")
def ecg() -> tuple[np.ndarray, np.ndarray]:
    return generate_ecg()


@pytest.fixture(scope="module")
def ecg_model() -> TrainedModel:
    return train_ecg_model()


@pytest.fixture(scope="module")
def cancer_model() -> TrainedModel:
    return train_breast_cancer_model()


def _class_mean(X: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(X[y == name].mean(axis=0))


def _segment(wave: np.ndarray, start: float, stop: float) -> float:
    return float(wave[(start <= T) & (T < stop)].mean())


def _autocorr_rr(x: np.ndarray) -> float:
    """Beat period from the strongest autocorrelation peak past 0.2 s; polarity-independent."""
    x = x - x.mean()
    ac = np.correlate(x, x, "full")[len(x) - 1 :]
    peaks, _ = find_peaks(ac)
    peaks = peaks[peaks * DT >= 0.2]
    return float(peaks[np.argmax(ac[peaks])] * DT) if len(peaks) else float("nan")


def _rr_irregularity(x: np.ndarray) -> float:
    """Coefficient of variation of R-R intervals (NaN with fewer than three detected beats)."""
    x = x - np.median(x)
    peaks, _ = find_peaks(x, prominence=0.5 * np.ptp(x), distance=5)
    rr = np.diff(peaks)
    return float(rr.std() / rr.mean()) if len(rr) >= 2 else float("nan")


# --- generator ---------------------------------------------------------------------------------


def test_shapes_dtypes_and_finite(ecg: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = ecg
    assert X.shape == (1200, N_STEPS)
    assert X.dtype == np.float64
    assert y.shape == (1200,)
    assert y.dtype.kind == "U"
    assert np.isfinite(X).all()
    assert set(np.unique(y)) == set(ECG_CLASSES)


def test_classes_are_balanced(ecg: tuple[np.ndarray, np.ndarray]) -> None:
    _, y = ecg
    assert {name: int((y == name).sum()) for name in ECG_CLASSES} == dict.fromkeys(ECG_CLASSES, 300)


def test_remainder_is_distributed_over_classes() -> None:
    _, y = generate_ecg(n_samples=102, seed=0)
    counts = sorted(int((y == name).sum()) for name in ECG_CLASSES)
    assert counts == [25, 25, 26, 26]


def test_rows_are_shuffled(ecg: tuple[np.ndarray, np.ndarray]) -> None:
    _, y = ecg
    # Unshuffled rows would come in four runs, one per class.
    assert int((y[1:] != y[:-1]).sum()) > 100


def test_deterministic_for_a_seed_and_different_for_another() -> None:
    X1, y1 = generate_ecg(n_samples=200, seed=42)
    X2, y2 = generate_ecg(n_samples=200, seed=42)
    X3, _ = generate_ecg(n_samples=200, seed=43)
    np.testing.assert_array_equal(X1, X2)
    np.testing.assert_array_equal(y1, y2)
    assert not np.allclose(X1, X3)


def test_values_are_in_a_sane_range(ecg: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = ecg
    assert np.abs(X).max() < 5.0
    per_window_std = X.std(axis=1)
    assert per_window_std.min() > 0.03
    assert per_window_std.max() < 2.0


def test_class_mean_waveforms_differ(ecg: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = ecg
    for a, b in itertools.combinations(ECG_CLASSES, 2):
        A, B = X[y == a], X[y == b]
        # Welch t-statistic per time step: with identical classes the largest of 80 would be ~3.
        se = np.sqrt(A.var(axis=0, ddof=1) / len(A) + B.var(axis=0, ddof=1) / len(B))
        t_max = float(np.max(np.abs(A.mean(axis=0) - B.mean(axis=0)) / se))
        assert t_max > 5.0, f"{a} and {b} mean waveforms are too alike (max |t| {t_max:.1f})"


def test_ventricular_tachycardia_is_fast(ecg: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = ecg
    rr = {name: np.nanmedian([_autocorr_rr(x) for x in X[y == name]]) for name in ECG_CLASSES}
    assert rr["ventricular_tachycardia"] < 0.45  # > ~130 bpm
    assert rr["normal_sinus_rhythm"] > 0.6  # < 100 bpm
    assert rr["myocardial_infarction"] > 0.6


def test_atrial_fibrillation_is_irregular(ecg: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = ecg
    cv = {name: np.nanmedian([_rr_irregularity(x) for x in X[y == name]]) for name in ECG_CLASSES}
    assert cv["atrial_fibrillation"] > 0.15
    assert cv["atrial_fibrillation"] > 3 * cv["normal_sinus_rhythm"]


def test_p_wave_and_st_elevation(ecg: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = ecg
    means = {name: _class_mean(X, y, name) for name in ECG_CLASSES}
    # Windows are R-aligned (first R near 0.3 s), so the P wave sits near 0.14 s and the ST segment
    # near 0.4-0.5 s; the first 0.06 s is the TP baseline.
    p_wave = {name: _segment(m, 0.12, 0.16) - _segment(m, 0.0, 0.06) for name, m in means.items()}
    st = {name: _segment(m, 0.40, 0.50) - _segment(m, 0.0, 0.06) for name, m in means.items()}
    assert p_wave["normal_sinus_rhythm"] > 0.05
    assert p_wave["myocardial_infarction"] > 0.05
    assert abs(p_wave["atrial_fibrillation"]) < 0.05
    assert st["myocardial_infarction"] > st["normal_sinus_rhythm"] + 0.2


def test_generator_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="n_samples"):
        generate_ecg(n_samples=3)
    with pytest.raises(ValueError, match="n_steps"):
        generate_ecg(n_steps=1)


# --- training ----------------------------------------------------------------------------------


def test_ecg_model_accuracy_and_labels(ecg_model: TrainedModel) -> None:
    print(f"ECG MLP test accuracy: {ecg_model.test_accuracy:.4f}")
    assert ecg_model.name == "ecg-mlp"
    assert ecg_model.test_accuracy >= 0.90
    assert ecg_model.X_train.shape == (900, N_STEPS)
    assert ecg_model.X_test.shape == (300, N_STEPS)
    predictions = ecg_model.estimator.predict(ecg_model.X_test)
    assert set(predictions) <= set(ECG_CLASSES)
    assert float(np.mean(predictions == ecg_model.y_test)) == pytest.approx(ecg_model.test_accuracy)
    # Stratified: every class keeps its quarter of the test set.
    assert {name: int((ecg_model.y_test == name).sum()) for name in ECG_CLASSES} == dict.fromkeys(
        ECG_CLASSES, 75
    )


def test_ecg_model_is_reproducible(ecg_model: TrainedModel) -> None:
    again = train_ecg_model()
    assert again.test_accuracy == ecg_model.test_accuracy
    np.testing.assert_array_equal(
        again.estimator.predict_proba(ecg_model.X_test), ecg_model.estimator.predict_proba(ecg_model.X_test)
    )


def test_breast_cancer_model(cancer_model: TrainedModel) -> None:
    print(f"breast-cancer MLP test accuracy: {cancer_model.test_accuracy:.4f}")
    assert cancer_model.name == "breast-cancer-mlp"
    assert cancer_model.test_accuracy >= 0.93
    assert set(cancer_model.estimator.classes_) == {"malignant", "benign"}
    assert cancer_model.X_train.shape[1] == 30


def test_trained_model_is_frozen(cancer_model: TrainedModel) -> None:
    with pytest.raises(AttributeError):
        cancer_model.name = "other"  # type: ignore[misc]


# --- persistence -------------------------------------------------------------------------------


def test_skops_roundtrip_preserves_predictions(ecg_model: TrainedModel, tmp_path: Path) -> None:
    path = tmp_path / "ecg.skops"
    digest = save_model(ecg_model.estimator, path)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    expected = ecg_model.estimator.predict_proba(ecg_model.X_test)
    for source in (path, str(path), path.read_bytes()):
        loaded = load_model_file(source)
        np.testing.assert_array_equal(loaded.predict_proba(ecg_model.X_test), expected)
        assert list(loaded.classes_) == list(ecg_model.estimator.classes_)


def test_breast_cancer_roundtrip(cancer_model: TrainedModel, tmp_path: Path) -> None:
    path = tmp_path / "bc.skops"
    save_model(cancer_model.estimator, path)
    loaded = load_model_file(path)
    np.testing.assert_array_equal(
        loaded.predict_proba(cancer_model.X_test), cancer_model.estimator.predict_proba(cancer_model.X_test)
    )


def test_save_model_strips_the_optimizer_from_a_copy(tmp_path: Path) -> None:
    X, y = generate_ecg(n_samples=120, seed=1)
    mlp = MLPClassifier(hidden_layer_sizes=(8,), max_iter=50, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=ConvergenceWarning)
        mlp.fit(X, y)
    # A plain skops dump keeps sklearn's AdamOptimizer, which skops does not trust by default; the
    # loader allows exactly that reviewed optimizer type, so operators' own MLP files deploy.
    raw = tmp_path / "raw.skops"
    sio.dump(mlp, raw)
    assert "AdamOptimizer" in " ".join(sio.get_untrusted_types(file=raw))
    np.testing.assert_array_equal(load_model_file(raw).predict_proba(X), mlp.predict_proba(X))
    clean = tmp_path / "clean.skops"
    save_model(mlp, clean)
    np.testing.assert_array_equal(load_model_file(clean).predict_proba(X), mlp.predict_proba(X))
    assert not sio.get_untrusted_types(file=clean)
    assert hasattr(mlp, "_optimizer"), "save_model must not modify the caller's estimator"


class _Payload:
    """Stands in for an attacker-controlled type: skops will not trust it by default."""

    def __init__(self) -> None:
        self.value = 1


@pytest.mark.parametrize(
    ("obj", "expected_type"),
    [
        (_Payload(), "_Payload"),
        (functools.partial(int, "7"), "functools.partial"),
    ],
    ids=["custom-class", "partial"],
)
def test_load_refuses_untrusted_types(obj: object, expected_type: str, tmp_path: Path) -> None:
    path = tmp_path / "evil.skops"
    sio.dump(obj, path)
    with pytest.raises(UntrustedModelError, match=expected_type) as excinfo:
        load_model_file(path)
    assert "only scikit-learn/numpy types are accepted" in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    with pytest.raises(UntrustedModelError):
        load_model_file(path.read_bytes())


def test_load_refuses_empty_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        load_model_file(b"")


def test_reference_data_npz_needs_no_pickle(ecg_model: TrainedModel, tmp_path: Path) -> None:
    path = tmp_path / "reference.npz"
    save_reference_data(ecg_model.X_test, ecg_model.y_test.astype(object), path)
    with np.load(path, allow_pickle=False) as data:
        assert set(data.files) == {"X", "y"}
        assert data["X"].dtype == np.float64
        assert data["y"].dtype.kind == "U"
        np.testing.assert_array_equal(data["X"], ecg_model.X_test)
        np.testing.assert_array_equal(data["y"], ecg_model.y_test)


def test_reference_data_keeps_the_exact_path(tmp_path: Path) -> None:
    path = tmp_path / "reference.data"
    save_reference_data(np.zeros((2, 3)), np.array(["a", "b"]), path)
    assert path.exists()
    with np.load(path, allow_pickle=False) as data:
        assert data["X"].shape == (2, 3)


def test_reference_data_rejects_mismatched_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected X"):
        save_reference_data(np.zeros((3, 2)), np.array(["a", "b"]), tmp_path / "bad.npz")
