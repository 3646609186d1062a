"""Synthetic single-lead ECG windows for four rhythm classes, built from Gaussian P-QRS-T waves.

This reproduces the *setting* of Bhojanam & Mehta ("Cryptographic Fingerprinting for Medical AI"):
1,200 windows x 80 time steps, four classes, noise and baseline drift. The waveforms are our own
model of textbook morphology, not the paper's generator, so accuracies are not directly comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ECG_CLASSES: tuple[str, ...] = (
    "normal_sinus_rhythm",
    "atrial_fibrillation",
    "ventricular_tachycardia",
    "myocardial_infarction",
)

# Each window spans ~2 s so that it holds 2-3 sinus beats (or 5-7 VT beats).
WINDOW_SECONDS = 2.0

# Nuisance levels, as fractions of the patient's nominal R amplitude. They were tuned so that the
# reference MLP reaches ~0.95 test accuracy: learnable, not trivially separable. The acquisition blur
# lowers the recorded R peak to ~0.8 of nominal, so this noise is ~0.05-0.1 of the R peak one sees.
NOISE_SIGMA_RANGE = (0.04, 0.08)
DRIFT_AMPLITUDE_RANGE = (0.03, 0.15)
DRIFT_FREQUENCY_RANGE = (0.15, 0.50)
ARTIFACT_PROBABILITY = 0.15
# Coarse f-waves; finer ones vanish under the white noise at this sampling rate.
AF_FWAVE_AMPLITUDE_RANGE = (0.08, 0.15)
# Where the first R peak falls. Windows are cut around a detected R peak, as in beat-segmented ECG
# datasets, leaving room for its P wave; the spread models detection jitter. A fully random phase
# makes the task much harder for a (shift-sensitive) MLP: ~0.81-0.87 test accuracy instead of ~0.95.
FIRST_R_RANGE = (0.27, 0.33)
# The recorder's anti-aliasing low-pass, as a Gaussian blur of this many samples (standard deviation):
# at 40 Hz an unfiltered QRS would otherwise alias onto a single sample.
ACQUISITION_BLUR_SAMPLES = 0.5


@dataclass
class _Waves:
    """Gaussian wave parameters collected for one window (centres and widths in seconds)."""

    centres: list[np.ndarray] = field(default_factory=list)
    amplitudes: list[np.ndarray] = field(default_factory=list)
    widths: list[np.ndarray] = field(default_factory=list)

    def add(self, centres: np.ndarray, amplitude: np.ndarray | float, width: np.ndarray | float) -> None:
        """Add one wave per beat at the given centres."""
        self.centres.append(centres)
        self.amplitudes.append(np.broadcast_to(np.asarray(amplitude, dtype=np.float64), centres.shape))
        self.widths.append(np.broadcast_to(np.asarray(width, dtype=np.float64), centres.shape))

    def render(self, t: np.ndarray) -> np.ndarray:
        """Sum every wave on the time axis in one broadcast, as seen through the acquisition filter."""
        c = np.concatenate(self.centres)[:, None]
        a = np.concatenate(self.amplitudes)[:, None]
        w = np.concatenate(self.widths)[:, None]
        # A Gaussian convolved with a Gaussian blur stays Gaussian; keeping its area constant lowers
        # narrow peaks (the R wave) more than broad ones, as a real low-pass filter does.
        blur = ACQUISITION_BLUR_SAMPLES * float(t[1] - t[0])
        w_eff = np.sqrt(w**2 + blur**2)
        out: np.ndarray = (a * (w / w_eff) * np.exp(-0.5 * ((t[None, :] - c) / w_eff) ** 2)).sum(axis=0)
        return out


def _beat_times(rng: np.random.Generator, rr_mean: float, rr_jitter: float, duration: float) -> np.ndarray:
    """R-peak times covering the window, plus the beats either side whose T or P wave spills in.

    ``rr_jitter`` is the relative standard deviation of successive RR intervals.
    """
    n = int(np.ceil((duration + 1.0) / (rr_mean * 0.5))) + 2
    rr = rr_mean * (1.0 + rr_jitter * rng.standard_normal(n))
    # Physiological floor: keeps extreme AF draws from stacking beats on top of each other.
    rr = np.maximum(rr, 0.6 * rr_mean)
    first = rng.uniform(*FIRST_R_RANGE)
    after = first + np.concatenate(([0.0], np.cumsum(rr[1:])))
    times = np.concatenate(([first - rr[0]], after))
    return times[times < duration + 0.5]


def _sinus_beats(
    rng: np.random.Generator, waves: _Waves, r: np.ndarray, rr: float, width_scale: float
) -> None:
    """Textbook P-QRS-T complex for a beat at each time in ``r`` (amplitudes relative to R=1)."""
    # QT shortens with heart rate (Bazett-like square-root scaling).
    qt_scale = float(np.sqrt(rr / 0.8))
    waves.add(r - rng.uniform(0.14, 0.18), rng.uniform(0.12, 0.22), 0.028 * width_scale)  # P
    waves.add(r - 0.035 * width_scale, -rng.uniform(0.05, 0.15), 0.012 * width_scale)  # Q
    waves.add(r, 1.0, 0.018 * width_scale)  # R
    waves.add(r + 0.037 * width_scale, -rng.uniform(0.15, 0.30), 0.012 * width_scale)  # S
    waves.add(r + 0.27 * qt_scale, rng.uniform(0.25, 0.45), 0.050 * width_scale * qt_scale)  # T


def _normal_sinus(
    rng: np.random.Generator, t: np.ndarray, hr_offset: float, width_scale: float
) -> np.ndarray:
    """Regular rhythm at 55-90 bpm with P waves, narrow QRS and upright T."""
    rr = 60.0 / float(np.clip(rng.uniform(55.0, 90.0) + hr_offset, 50.0, 100.0))
    waves = _Waves()
    _sinus_beats(rng, waves, _beat_times(rng, rr, rng.uniform(0.01, 0.04), t[-1]), rr, width_scale)
    return waves.render(t)


def _atrial_fibrillation(
    rng: np.random.Generator, t: np.ndarray, hr_offset: float, width_scale: float
) -> np.ndarray:
    """Irregularly irregular narrow QRS at 95-150 bpm, no P wave, fibrillatory f-waves on the baseline."""
    rr = 60.0 / float(np.clip(rng.uniform(95.0, 150.0) + hr_offset, 85.0, 160.0))
    r = _beat_times(rng, rr, rng.uniform(0.20, 0.35), t[-1])
    waves = _Waves()
    waves.add(r - 0.035 * width_scale, -rng.uniform(0.05, 0.15), 0.012 * width_scale)  # Q
    waves.add(r, 1.0, 0.018 * width_scale)  # R
    waves.add(r + 0.037 * width_scale, -rng.uniform(0.15, 0.30), 0.012 * width_scale)  # S
    waves.add(r + 0.24, rng.uniform(0.10, 0.30), 0.050 * width_scale)  # T (often flattened in AF)
    # f-waves: a few incoherent 4-8 Hz components, so the baseline never settles between beats.
    n_components = 3
    freqs = rng.uniform(4.0, 8.0, n_components)
    phases = rng.uniform(0.0, 2.0 * np.pi, n_components)
    amps = rng.uniform(*AF_FWAVE_AMPLITUDE_RANGE, n_components)
    fwaves = (amps[:, None] * np.sin(2.0 * np.pi * freqs[:, None] * t[None, :] + phases[:, None])).sum(axis=0)
    out: np.ndarray = waves.render(t) + fwaves
    return out


def _ventricular_tachycardia(
    rng: np.random.Generator, t: np.ndarray, hr_offset: float, width_scale: float
) -> np.ndarray:
    """Fast (150-220 bpm) wide, bizarre QRS without P waves, T wave opposite to the QRS."""
    rr = 60.0 / float(np.clip(rng.uniform(150.0, 220.0) + 0.5 * hr_offset, 140.0, 230.0))
    r = _beat_times(rng, rr, rng.uniform(0.01, 0.04), t[-1])
    polarity = rng.choice([-1.0, 1.0])
    amp = polarity * rng.uniform(1.1, 1.8)
    width = rng.uniform(0.035, 0.055) * width_scale
    waves = _Waves()
    waves.add(r, amp, width)  # broad monomorphic QRS
    # A notch of the opposite sign on one flank makes the complex look "bizarre" rather than sinusoidal.
    waves.add(r + rng.choice([-1.0, 1.0]) * 1.6 * width, -0.35 * amp, 0.6 * width)
    waves.add(r + 0.16 * float(np.sqrt(rr / 0.35)), -0.35 * amp, 0.045 * width_scale)  # discordant T
    return waves.render(t)


def _myocardial_infarction(
    rng: np.random.Generator, t: np.ndarray, hr_offset: float, width_scale: float
) -> np.ndarray:
    """Sinus rhythm with ST elevation and/or a pathological Q wave; T inverted in some patients."""
    rr = 60.0 / float(np.clip(rng.uniform(60.0, 100.0) + hr_offset, 50.0, 115.0))
    r = _beat_times(rng, rr, rng.uniform(0.01, 0.04), t[-1])
    qt_scale = float(np.sqrt(rr / 0.8))
    # Acute MI (ST elevation, sometimes with early Q waves) or evolved MI (Q waves with T inversion):
    # every MI window shows at least one infarct sign.
    st_elevation = rng.random() < 0.75
    deep_q = (not st_elevation) or rng.random() < 0.5
    t_inverted = (not st_elevation) or rng.random() < 0.2
    waves = _Waves()
    waves.add(r - rng.uniform(0.14, 0.18), rng.uniform(0.12, 0.22), 0.028 * width_scale)  # P
    q_amp = -rng.uniform(0.30, 0.50) if deep_q else -rng.uniform(0.05, 0.15)
    q_width = (0.018 if deep_q else 0.010) * width_scale
    waves.add(r - 0.035 * width_scale, q_amp, q_width)  # Q (pathological: deep and wide)
    waves.add(r, rng.uniform(0.7, 1.0) if deep_q else 1.0, 0.018 * width_scale)  # R (loss of R in Q-wave MI)
    waves.add(r + 0.037 * width_scale, -rng.uniform(0.05, 0.15), 0.012 * width_scale)  # S (shallow)
    if st_elevation:
        # A run of overlapping Gaussians from J point to T gives a flat raised plateau (the ST segment).
        st_amp = rng.uniform(0.30, 0.50)
        for offset in np.linspace(0.07, 0.19, 4) * qt_scale:
            waves.add(r + offset, st_amp, 0.03 * width_scale)
    t_amp = -rng.uniform(0.20, 0.40) if t_inverted else rng.uniform(0.25, 0.45)
    waves.add(r + 0.27 * qt_scale, t_amp, 0.055 * width_scale * qt_scale)  # T
    return waves.render(t)


_GENERATORS = (_normal_sinus, _atrial_fibrillation, _ventricular_tachycardia, _myocardial_infarction)


def _artefacts(rng: np.random.Generator, t: np.ndarray, scale: float) -> np.ndarray:
    """Baseline wander, white noise and, occasionally, a burst of muscle (EMG) artefact."""
    drift_freq = rng.uniform(*DRIFT_FREQUENCY_RANGE)
    drift = rng.uniform(*DRIFT_AMPLITUDE_RANGE) * np.sin(
        2.0 * np.pi * drift_freq * t + rng.uniform(0, 2 * np.pi)
    )
    drift += rng.uniform(-0.1, 0.1)  # electrode DC offset
    noise = rng.uniform(*NOISE_SIGMA_RANGE) * rng.standard_normal(t.shape)
    out: np.ndarray = scale * (drift + noise)
    if rng.random() < ARTIFACT_PROBABILITY:
        centre = rng.uniform(t[0], t[-1])
        spread = rng.uniform(0.1, 0.25)
        envelope = np.exp(-0.5 * ((t - centre) / spread) ** 2)
        out += scale * rng.uniform(0.1, 0.3) * envelope * rng.standard_normal(t.shape)
    return out


def generate_ecg(n_samples: int = 1200, n_steps: int = 80, seed: int = 42) -> tuple[np.ndarray, np.ndarray]:
    """Return (X, y): ``n_samples`` shuffled ECG windows of ``n_steps`` samples and their class names."""
    if n_samples < len(ECG_CLASSES):
        raise ValueError(f"n_samples must be at least {len(ECG_CLASSES)}, got {n_samples}")
    if n_steps < 2:
        raise ValueError(f"n_steps must be at least 2, got {n_steps}")
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, WINDOW_SECONDS, n_steps, endpoint=False)
    base, extra = divmod(n_samples, len(ECG_CLASSES))
    labels = np.concatenate(
        [np.full(base + (1 if k < extra else 0), k, dtype=np.int64) for k in range(len(ECG_CLASSES))]
    )
    X = np.empty((n_samples, n_steps), dtype=np.float64)
    for i, k in enumerate(labels):
        # Inter-patient variability: lead gain, resting heart rate, conduction speed (wave widths).
        scale = rng.uniform(0.6, 1.4)
        hr_offset = rng.normal(0.0, 5.0)
        width_scale = rng.uniform(0.85, 1.2)
        X[i] = scale * _GENERATORS[k](rng, t, hr_offset, width_scale) + _artefacts(rng, t, scale)
    order = rng.permutation(n_samples)
    y = np.array([ECG_CLASSES[k] for k in labels[order]])
    return X[order], y


def ecg_feature_names(n_steps: int = 80) -> list[str]:
    """Feature names ``t00``..``tNN`` for the time steps of a window."""
    digits = len(str(max(n_steps - 1, 0)))
    return [f"t{i:0{digits}d}" for i in range(n_steps)]
