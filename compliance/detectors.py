"""Post-generation detectors and the policy that combines them — plain functions, no Kafka.

Every detector takes a clip as ``np.ndarray`` of shape (F, H, W, 3), dtype uint8, RGB, and returns a
``DetectorResult(name, score, evidence)``: ``score`` in [0, 1] (higher = more concerning), ``evidence`` a small
JSON-serialisable dict that says why. Built-ins are cheap heuristics (see each class for what they can and cannot
catch); model-backed detectors plug into the same interface from a local model directory.

``assess(frames, policy)`` runs the detectors a versioned TOML policy enables and turns their scores into an
``Assessment`` (ALLOW / REVIEW / BLOCK). How scores combine is described at ``DetectionPolicy``.
"""
from __future__ import annotations

import functools
import math
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np
from scipy import ndimage

DEFAULT_POLICY_PATH = Path(__file__).with_name("detection_policy.toml")

# BT.601 luma weights: the same ones cv2 and most video codecs use for "grey".
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------------
# Interface and shared helpers


@dataclass(frozen=True)
class DetectorResult:
    name: str
    score: float  # in [0, 1]; higher = more concerning
    evidence: dict[str, Any] = field(default_factory=dict)  # small and JSON-serialisable


class Detector(Protocol):
    name: str

    def detect(self, frames: np.ndarray) -> DetectorResult: ...


def check_frames(frames: np.ndarray) -> np.ndarray:
    """The clip as (F, H, W, 3) uint8; a single (H, W, 3) frame is accepted as a one-frame clip."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be (F, H, W, 3) uint8 RGB, got shape {frames.shape} dtype {frames.dtype}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"frames must not be empty, got shape {frames.shape}")
    return frames


def sample_indices(count: int, limit: int) -> np.ndarray:
    """Up to ``limit`` evenly spaced frame indices, first and last included."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(int))


def ramp(value: float, low: float, high: float) -> float:
    """0 at or below ``low``, 1 at or above ``high``, linear between: how raw measurements become scores."""
    if not math.isfinite(value):
        return 0.0
    return float(min(1.0, max(0.0, (value - low) / (high - low))))


def downscale(frame: np.ndarray, max_side: int) -> np.ndarray:
    """Area-averaged downscale so the longer side is at most ``max_side`` (never upscales)."""
    h, w = frame.shape[:2]
    factor = max_side / max(h, w)
    if factor >= 1.0:
        return frame
    size = (max(1, round(w * factor)), max(1, round(h * factor)))  # cv2 wants (width, height)
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def grey(frames: np.ndarray) -> np.ndarray:
    """Luma in grey levels (0..255) as float32, shape (F, H, W)."""
    return frames.astype(np.float32) @ _LUMA


def _r(value: float, digits: int = 4) -> float:
    """Plain float for evidence (numpy scalars are not JSON-serialisable)."""
    return round(float(value), digits)


# ---------------------------------------------------------------------------------------------------------------------
# Faces


@functools.lru_cache(maxsize=1)
def _face_cascade():
    # Loading the XML takes ~0.2 s; one shared instance is enough (detect_multi_scale keeps no state between calls).
    from skimage import data, feature

    return feature.Cascade(data.lbp_frontal_face_cascade_filename())


class FaceDetector:
    """Frontal-face presence and size with scikit-image's LBP cascade.

    Score = presence × (0.3 + 0.7 × size), where presence is the share of sampled frames with a face and size ramps
    from 0 to 1 as the largest face grows to ``large_face_fraction`` of the frame area. A large face in every frame
    scores 1; a small face scores at most 0.3 + a little; a face in one frame out of eight stays near 0.1.

    Frames are downscaled to ``max_side`` first: deepfake policy cares about large faces, and the cascade's cost
    grows with pixel count (~25 ms per frame at 192 px, ~60 ms at 256 px). Faces smaller than ``min_size`` pixels
    at that scale are
    not looked for (24 px at 192 = 1.6 % of a square frame's area), so on 64×64 clips only a face filling a good
    part of the frame can be found. ``min_neighbours=4`` keeps animal faces (skimage's cat) from passing as faces.
    Cannot: tell a real face from a generated one, see profile or heavily occluded faces, or see cartoon faces.
    """

    name = "faces"

    def __init__(self, max_frames: int = 8, max_side: int = 192, scale_factor: float = 1.25, step_ratio: float = 1.0,
                 min_size: int = 24, min_neighbours: int = 4, large_face_fraction: float = 0.03):
        self.max_frames = max_frames
        self.max_side = max_side
        self.scale_factor = scale_factor
        self.step_ratio = step_ratio
        self.min_size = min_size
        self.min_neighbours = min_neighbours
        self.large_face_fraction = large_face_fraction

    def detect(self, frames: np.ndarray) -> DetectorResult:
        frames = check_frames(frames)
        indices = sample_indices(len(frames), self.max_frames)
        count, frames_with_faces, largest_per_frame = 0, [], []
        for index in indices:
            image = grey(downscale(frames[index], self.max_side)[None])[0] / 255.0
            h, w = image.shape
            if min(h, w) < self.min_size:  # too small to hold a face the cascade can see
                continue
            found = _face_cascade().detect_multi_scale(
                image, scale_factor=self.scale_factor, step_ratio=self.step_ratio,
                min_size=(self.min_size, self.min_size), max_size=(h, w), min_neighbor_number=self.min_neighbours)
            if found:
                count += len(found)
                frames_with_faces.append(int(index))
                largest_per_frame.append(max(box["width"] * box["height"] for box in found) / (h * w))
        presence = len(frames_with_faces) / len(indices)
        # Median over the frames with a face, so one oversized false detection does not set the size.
        largest = float(np.median(largest_per_frame)) if largest_per_frame else 0.0
        score = presence * (0.3 + 0.7 * ramp(largest, 0.0, self.large_face_fraction))
        return DetectorResult(self.name, _r(score), {
            "count": count,
            "largest_face_fraction": _r(largest),
            "frames_with_faces": frames_with_faces,
            "frames_sampled": len(indices),
        })


# ---------------------------------------------------------------------------------------------------------------------
# Frequency-domain generation artefacts


class FrequencyArtefactDetector:
    """Periodic spectral peaks and high-frequency energy excess, the fingerprints of up-sampling layers.

    The grey frames (centre-cropped to ``max_side``, never resized: resizing would erase exactly what we look for)
    are Hann-windowed and their power spectra averaged. Two measurements:

    * peak strength: at every frequency (k/``grid``, l/``grid``) cycles/pixel with radius ≥ 1/8 — where the
      checkerboard of a stride-2/4/8 transposed convolution or a VAE's 8× decoder puts its energy — the spectrum's
      local maximum over its neighbourhood (ring and the same row/column, so natural spectra that are strong along
      the axes are not peaks), as log10 ratio. An 8-bit quantisation floor is added to both so that near-empty
      spectra (flat or synthetic frames) do not produce huge ratios of tiny numbers. Natural photos stay below ~1;
      a checkerboard of amplitude 4 grey levels reaches ~3.5.
    * high-frequency excess: a power law fitted to the azimuthally averaged spectrum between 0.03 and 0.25
      cycles/pixel, extrapolated to 0.3–0.5; the mean log10 excess of the measured spectrum over it. White noise
      and natural photos stay near 0; a strong high-frequency grid pushes it up.

    Score = max(ramp(peak, 1, 3), ramp(excess, 0.75, 2)). ``hf_ratio`` (share of energy above 0.25 cycles/pixel)
    is reported, not scored: it is large both for noise and for sharp real footage.
    Cannot: see artefacts of models without up-sampling grids, and periodic real textures (fabric, fences, JPEG
    8-px blocks of a re-encoded source) can raise the peak measure.
    """

    name = "frequency"

    def __init__(self, max_frames: int = 8, max_side: int = 256, grid: int = 8):
        self.max_frames = max_frames
        self.max_side = max_side
        self.grid = grid

    def detect(self, frames: np.ndarray) -> DetectorResult:
        frames = check_frames(frames)
        h, w = frames.shape[1:3]
        if min(h, w) < 16:
            return DetectorResult(self.name, 0.0, {"skipped": "frames smaller than 16 px"})
        ch, cw = min(h, self.max_side), min(w, self.max_side)
        top, left = (h - ch) // 2, (w - cw) // 2
        luma = grey(frames[sample_indices(len(frames), self.max_frames), top:top + ch, left:left + cw])
        luma -= luma.mean(axis=(1, 2), keepdims=True)
        window = np.outer(np.hanning(ch), np.hanning(cw)).astype(np.float32)
        power = np.fft.fftshift((np.abs(np.fft.fft2(luma * window)) ** 2).mean(axis=0))
        # Power of uniform quantisation noise (variance 1/12) after the same window: the floor of any 8-bit image.
        floor = float((window ** 2).sum() / 12.0)

        peak, at = self._peak_strength(power, floor)
        hf_ratio, excess = self._radial_measures(power)
        score = max(ramp(peak, 1.0, 3.0), ramp(excess, 0.75, 2.0))
        return DetectorResult(self.name, _r(score), {
            "peak_strength_log10": _r(peak, 3),
            "peak_at_cycles_per_px": [_r(at[0], 3), _r(at[1], 3)],
            "hf_ratio": _r(hf_ratio),
            "hf_excess_log10": _r(excess, 3),
        })

    def _peak_strength(self, power: np.ndarray, floor: float) -> tuple[float, tuple[float, float]]:
        h, w = power.shape
        near = np.arange(-1, 2)
        ring = np.arange(-6, 7)
        beside = np.r_[np.arange(-6, -2), np.arange(3, 7)]
        best, at = 0.0, (0.0, 0.0)
        half = self.grid // 2
        # Half the plane is enough: the spectrum of a real image is point-symmetric.
        for ky in range(0, half + 1):
            for kx in range(-half + 1, half + 1):
                fy, fx = ky / self.grid, kx / self.grid
                if (ky == 0 and kx <= 0) or math.hypot(fy, fx) < 0.124:
                    continue
                cy, cx = round(h / 2 + fy * h) % h, round(w / 2 + fx * w) % w
                peak = power[np.ix_((cy + near) % h, (cx + near) % w)].max()
                around = power[np.ix_((cy + ring) % h, (cx + ring) % w)].copy()
                around[4:9, 4:9] = np.nan  # leave out the peak itself and its leakage
                background = max(np.nanmedian(around), np.median(power[cy, (cx + beside) % w]),
                                 np.median(power[(cy + beside) % h, cx]))
                strength = math.log10((peak + floor) / (background + floor))
                if strength > best:
                    best, at = strength, (fy, fx)
        return best, at

    @staticmethod
    def _radial_measures(power: np.ndarray) -> tuple[float, float]:
        h, w = power.shape
        fy = np.fft.fftshift(np.fft.fftfreq(h))[:, None]
        fx = np.fft.fftshift(np.fft.fftfreq(w))[None, :]
        radius = np.hypot(fy, fx)
        band = (radius > 0.02) & (radius <= 0.5)
        total = power[band].sum()
        if total <= 0:
            return 0.0, 0.0
        hf_ratio = power[(radius > 0.25) & (radius <= 0.5)].sum() / total

        bins = max(8, min(32, min(h, w) // 4))
        edges = np.linspace(0.0, 0.5, bins + 1)
        which = np.digitize(radius, edges) - 1
        sums = np.bincount(which[band], weights=power[band], minlength=bins)[:bins]
        counts = np.bincount(which[band], minlength=bins)[:bins]
        centres = (edges[:-1] + edges[1:]) / 2
        usable = counts > 0
        profile = np.log10(sums[usable] / counts[usable] + 1e-9)
        centres = centres[usable]
        fit = (centres > 0.03) & (centres < 0.25)
        tail = centres > 0.3
        if fit.sum() < 3 or not tail.any():
            return float(hf_ratio), 0.0
        slope, intercept = np.polyfit(np.log10(centres[fit]), profile[fit], 1)
        excess = np.mean(profile[tail] - (intercept + slope * np.log10(centres[tail])))
        return float(hf_ratio), float(excess)


# ---------------------------------------------------------------------------------------------------------------------
# Temporal consistency


class TemporalConsistencyDetector:
    """Flicker and colour drift across the clip.

    * flicker: the second difference of mean luminance (a brightness reversal; a steady fade scores nothing)
      relative to 1 + the motion around it. Motion is measured on contrast-normalised frames, so a global gain or
      offset change counts as flicker, not motion. Score ramps from index 0.5 to 3 grey levels per unit motion.
    * drift: Hellinger distance between the joint RGB histograms (8 bins/channel) of the first and last quarter of
      the clip — a subject whose colours change (identity / scene drift). Ramps from 0.2 to 0.6.

    Score = max of both. Frames are downscaled to ``max_side`` (temporal cues are coarse).
    Cannot: notice identity change that keeps the colours (a face swapped for a similar-looking one), shape
    morphing, or a single flash (the mean over the clip dilutes it); intended cuts look like drift.
    """

    name = "temporal"

    def __init__(self, max_side: int = 128, max_frames: int = 64):
        self.max_side = max_side
        self.max_frames = max_frames

    def detect(self, frames: np.ndarray) -> DetectorResult:
        frames = check_frames(frames)
        frames = frames[sample_indices(len(frames), self.max_frames)]
        if len(frames) < 3:
            return DetectorResult(self.name, 0.0, {"frames": len(frames), "skipped": "needs at least 3 frames"})
        small = np.stack([downscale(frame, self.max_side) for frame in frames])
        flicker_index, max_jump, motion = self._flicker(grey(small))
        drift, max_step = self._drift(small)
        score = max(ramp(flicker_index, 0.5, 3.0), ramp(drift, 0.2, 0.6))
        return DetectorResult(self.name, _r(score), {
            "flicker_index": _r(flicker_index, 3),
            "max_luma_jump": _r(max_jump, 2),
            "mean_motion": _r(motion, 3),
            "colour_drift": _r(drift),
            "max_step_colour_change": _r(max_step),
        })

    @staticmethod
    def _flicker(luma: np.ndarray) -> tuple[float, float, float]:
        means = luma.mean(axis=(1, 2))
        spreads = luma.std(axis=(1, 2))
        normalised = (luma - means[:, None, None]) / (spreads[:, None, None] + 1e-3)
        # Motion in grey levels, with gain and offset taken out: mean |Δ| of the normalised frames × typical spread.
        motion = np.abs(np.diff(normalised, axis=0)).mean(axis=(1, 2)) * (spreads.mean() + 1e-3)
        reversal = np.abs(means[2:] - 2 * means[1:-1] + means[:-2]) / 2
        motion_around = (motion[1:] + motion[:-1]) / 2
        index = float(np.mean(reversal / (1.0 + motion_around)))
        return index, float(np.abs(np.diff(means)).max()), float(motion.mean())

    @staticmethod
    def _drift(frames: np.ndarray) -> tuple[float, float]:
        bins = (frames >> 5).astype(np.int32)  # 8 bins per channel
        codes = (bins[..., 0] * 64 + bins[..., 1] * 8 + bins[..., 2]).reshape(len(frames), -1)
        hists = np.stack([np.bincount(code, minlength=512) for code in codes]).astype(np.float64)
        hists /= hists.sum(axis=1, keepdims=True)

        def hellinger(p: np.ndarray, q: np.ndarray) -> float:
            return math.sqrt(max(0.0, 1.0 - float(np.sqrt(p * q).sum())))

        quarter = max(1, len(frames) // 4)
        drift = hellinger(hists[:quarter].mean(axis=0), hists[-quarter:].mean(axis=0))
        max_step = max(hellinger(hists[i], hists[i + 1]) for i in range(len(hists) - 1))
        return drift, max_step


# ---------------------------------------------------------------------------------------------------------------------
# Skin exposure ("nsfw" heuristic)


class SkinExposureDetector:
    """Share of the frame covered by large skin-coloured regions — a crude nudity proxy, not a classifier.

    Pixels with Cr in [133, 173], Cb in [77, 127] (Chai & Ngan's YCrCb rule), luma ≥ 40 and a smooth
    neighbourhood (5×5 luma std < ``max_texture``: bare skin is smooth at video resolutions, fur, wood grain and
    coffee foam are not — this alone cut skimage's orange cat from 98 % "skin" to 14 %) count as skin; after a
    3×3 opening, only connected regions of at least ``min_region_fraction`` of the frame count (scattered skin-tone
    pixels are not a body). Per-frame ratio averaged over sampled frames; score ramps 0.12 → 0.40.
    Cannot: tell a bare body from a face close-up, a hand, sand, wood or beige walls (all skin-toned), and misses
    skin outside the rule (strong colour grading, very dark or very pale skin under some lighting) and anything
    explicit that is not mostly skin. Use a model-backed detector for a real NSFW decision.
    """

    name = "nsfw"

    def __init__(self, max_frames: int = 8, max_side: int = 128, min_region_fraction: float = 0.02,
                 max_texture: float = 8.0):
        self.max_frames = max_frames
        self.max_side = max_side
        self.min_region_fraction = min_region_fraction
        self.max_texture = max_texture

    def detect(self, frames: np.ndarray) -> DetectorResult:
        frames = check_frames(frames)
        indices = sample_indices(len(frames), self.max_frames)
        raw, large, largest = [], [], []
        for index in indices:
            frame = downscale(frames[index], self.max_side)
            ycrcb = cv2.cvtColor(frame, cv2.COLOR_RGB2YCrCb)
            y, cr, cb = ycrcb[..., 0], ycrcb[..., 1], ycrcb[..., 2]
            luma = y.astype(np.float32)
            local_mean = cv2.blur(luma, (5, 5))
            local_std = np.sqrt(np.maximum(cv2.blur(luma * luma, (5, 5)) - local_mean ** 2, 0.0))
            skin = (cr >= 133) & (cr <= 173) & (cb >= 77) & (cb <= 127) & (y >= 40) & (local_std < self.max_texture)
            skin = ndimage.binary_opening(skin, structure=np.ones((3, 3), bool))
            labels, count = ndimage.label(skin)
            sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:] / skin.size
            kept = sizes[sizes >= self.min_region_fraction]
            raw.append(skin.mean())
            large.append(kept.sum())
            largest.append(sizes.max() if count else 0.0)
        ratio = float(np.mean(large))
        return DetectorResult(self.name, _r(ramp(ratio, 0.12, 0.40)), {
            "skin_ratio": _r(np.mean(raw)),
            "large_region_skin_ratio": _r(ratio),
            "largest_region_fraction": _r(max(largest)),
            "frames_sampled": len(indices),
        })


# ---------------------------------------------------------------------------------------------------------------------
# Model-backed detectors


class ImageClassifierDetector:
    """Probability of one label from a local Hugging Face image classifier, averaged over sampled frames.

    Loads the image processor (see ``load_image_processor``) + ``AutoModelForImageClassification`` from
    ``model_dir`` with ``local_files_only=True`` (never the hub), once, at construction: a policy naming a broken model fails when the
    detectors are built, not in the middle of a job. Softmax over the model's labels; the label is matched
    case-insensitively against ``config.id2label``.
    """

    def __init__(self, model_dir: str | Path, label: str, name: str | None = None, max_frames: int = 4):
        import torch  # heavy imports only when a model-backed detector is configured
        from transformers import AutoModelForImageClassification

        self.model_dir = Path(model_dir)
        self.name = name or f"model:{self.model_dir.name}"
        self.max_frames = max_frames
        self._torch = torch
        self.processor = load_image_processor(self.model_dir)
        self.model = AutoModelForImageClassification.from_pretrained(self.model_dir, local_files_only=True).eval()
        labels = {str(text).casefold(): int(index) for index, text in self.model.config.id2label.items()}
        if label.casefold() not in labels:
            raise ValueError(f"label {label!r} not in {self.model_dir}: labels are {sorted(labels)}")
        self.label = label
        self.label_index = labels[label.casefold()]

    def detect(self, frames: np.ndarray) -> DetectorResult:
        frames = check_frames(frames)
        indices = sample_indices(len(frames), self.max_frames)
        inputs = self.processor(images=[frames[i] for i in indices], return_tensors="pt")
        with self._torch.inference_mode():
            logits = self.model(**inputs).logits
        probabilities = logits.softmax(dim=-1)[:, self.label_index].double().numpy()
        return DetectorResult(self.name, _r(probabilities.mean()), {
            "label": self.label,
            "mean_probability": _r(probabilities.mean()),
            "max_probability": _r(probabilities.max()),
            "frames_sampled": len(indices),
            "model": self.model_dir.name,
        })


def load_image_processor(model_dir: Path):
    """``AutoImageProcessor`` from a local directory, or — where it cannot be used — the class the directory names.

    In transformers 5 ``AutoImageProcessor`` itself requires torchvision, which this project does not install
    (torch is CPU-pinned and nothing else needs it). Without it, read ``image_processor_type`` from
    ``preprocessor_config.json`` and load that class's PIL variant (``ViTImageProcessorPil``), the same
    preprocessing without torchvision.
    """
    import json

    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    except ImportError:
        config_path = model_dir / "preprocessor_config.json"
        try:
            kind = json.loads(config_path.read_text())["image_processor_type"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"{config_path}: cannot tell which image processor to load: {error}") from error
        kind = kind.removesuffix("Fast")
        for candidate in (kind + "Pil", kind):
            try:
                processor_class = getattr(transformers, candidate)
                return processor_class.from_pretrained(model_dir, local_files_only=True)
            except (AttributeError, ImportError):
                continue
        raise


BUILTIN_DETECTORS: dict[str, type] = {
    FaceDetector.name: FaceDetector,
    FrequencyArtefactDetector.name: FrequencyArtefactDetector,
    TemporalConsistencyDetector.name: TemporalConsistencyDetector,
    SkinExposureDetector.name: SkinExposureDetector,
}


# ---------------------------------------------------------------------------------------------------------------------
# Policy


class PolicyError(ValueError):
    """The detection policy file is missing, not TOML, or does not describe a valid policy."""


@dataclass(frozen=True)
class SignalRule:
    """How one detector's (or the deepfake composite's) score counts towards the decision."""

    enabled: bool = True
    weight: float = 1.0  # contribution = weight × score
    threshold: float = 0.5  # raw score at or above which ``reason`` is reported
    reason: str = ""  # empty: informational only (reported, never contributes — faces on their own)
    params: dict[str, Any] = field(default_factory=dict)  # keyword arguments for the detector


@dataclass(frozen=True)
class ModelRule:
    name: str
    path: Path
    label: str
    rule: SignalRule
    max_frames: int = 4


@dataclass(frozen=True)
class DeepfakeRule:
    """deepfake = faces × (face_only + (1 − face_only) × max(cue scores)).

    A generated clip with a large realistic face is what deepfake policy cares about even without visible
    manipulation, so it alone reaches ``face_only`` (0.6 by default: REVIEW); manipulation cues (artefacts,
    temporal inconsistency, a fake-classifier model) on top of it push it to BLOCK. Without a face it is 0.
    """

    rule: SignalRule
    face_only: float = 0.6
    cues: tuple[str, ...] = ("frequency", "temporal")


@dataclass
class DetectionPolicy:
    """A versioned, loaded ``detection_policy.toml``.

    Combination (``combine``): each contributing signal gives weight × score; the clip's score is
      * ``weighted_max`` (default): the largest contribution. One strong signal is enough to act on, and weak ones
        do not add up — the heuristics' errors are correlated (noise drives both frequency and temporal scores),
        so summing them would turn several "probably fine" into "bad".
      * ``noisy_or``: 1 − Π(1 − contribution), for policies whose detectors are independent models.
    Decision: BLOCK if score ≥ block_threshold, REVIEW if ≥ review_threshold, else ALLOW. Reasons list every
    signal whose raw score reached its own threshold, whatever the decision (a discounted signal can be noted under
    an ALLOW).
    """

    version: str
    combine: str
    block_threshold: float
    review_threshold: float
    detectors: dict[str, SignalRule]
    deepfake: DeepfakeRule | None
    models: list[ModelRule]
    source: str = ""
    _built: dict[str, Detector] | None = field(default=None, init=False, repr=False, compare=False)

    def build_detectors(self) -> dict[str, Detector]:
        """The enabled detectors, built once per policy (model-backed ones load their weights here)."""
        if self._built is None:
            built: dict[str, Detector] = {}
            for name, rule in self.detectors.items():
                if rule.enabled:
                    built[name] = BUILTIN_DETECTORS[name](**rule.params)
            for model in self.models:
                if model.rule.enabled:
                    built[model.name] = ImageClassifierDetector(model.path, model.label, name=model.name,
                                                                max_frames=model.max_frames)
            self._built = built
        return self._built

    def rules(self) -> dict[str, SignalRule]:
        return {**self.detectors, **{model.name: model.rule for model in self.models}}


_TOP_KEYS = {"version", "combine", "block_threshold", "review_threshold", "detectors", "deepfake", "models"}
_RULE_KEYS = {"enabled", "weight", "threshold", "reason", "params"}
COMBINE_RULES = ("weighted_max", "noisy_or")


def load_detection_policy(path: str | Path | None = None) -> DetectionPolicy:
    """Read and validate a detection policy; ``None`` loads the packaged default. Raises ``PolicyError``."""
    path = Path(path) if path is not None else DEFAULT_POLICY_PATH
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except OSError as error:
        raise PolicyError(f"{path}: cannot read detection policy: {error}") from error
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(f"{path}: not valid TOML: {error}") from error
    try:
        return _parse_policy(raw, path)
    except PolicyError as error:
        raise PolicyError(f"{path}: {error}") from None


def _parse_policy(raw: dict, path: Path) -> DetectionPolicy:
    _no_unknown_keys(raw, _TOP_KEYS, "top level")
    version = raw.get("version")
    if not isinstance(version, str) or not version.strip():
        raise PolicyError("'version' must be a non-empty string")
    combine = raw.get("combine", "weighted_max")
    if combine not in COMBINE_RULES:
        raise PolicyError(f"'combine' must be one of {COMBINE_RULES}, got {combine!r}")
    block = _fraction(raw, "block_threshold", None, "top level")
    review = _fraction(raw, "review_threshold", None, "top level")
    if review > block:
        raise PolicyError(f"review_threshold {review} is above block_threshold {block}")

    tables = raw.get("detectors", {})
    if not isinstance(tables, dict):
        raise PolicyError("[detectors] must be a table")
    detectors = {}
    for name, table in tables.items():
        if name not in BUILTIN_DETECTORS:
            raise PolicyError(f"unknown detector [detectors.{name}]; built-ins are {sorted(BUILTIN_DETECTORS)}")
        detectors[name] = _signal_rule(table, f"[detectors.{name}]")

    models = []
    entries = raw.get("models", [])
    if not isinstance(entries, list):
        raise PolicyError("models must be an array of tables ([[models]])")
    for position, table in enumerate(entries):
        where = f"[[models]] #{position + 1}"
        if not isinstance(table, dict):
            raise PolicyError(f"{where} must be a table")
        _no_unknown_keys(table, _RULE_KEYS - {"params"} | {"name", "path", "label", "max_frames"}, where)
        for key in ("name", "path", "label"):
            if not isinstance(table.get(key), str) or not table[key]:
                raise PolicyError(f"{where}: '{key}' must be a non-empty string")
        if table["name"] in BUILTIN_DETECTORS or table["name"] in {model.name for model in models}:
            raise PolicyError(f"{where}: name {table['name']!r} is already taken")
        model_path = Path(table["path"])
        if not model_path.is_absolute():
            model_path = path.parent / model_path  # relative to the policy file, not the working directory
        if not model_path.is_dir():
            raise PolicyError(f"{where}: model directory {model_path} does not exist")
        max_frames = table.get("max_frames", 4)
        if not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames < 1:
            raise PolicyError(f"{where}: 'max_frames' must be a positive integer")
        rule = _signal_rule({k: v for k, v in table.items() if k in _RULE_KEYS}, where)
        models.append(ModelRule(table["name"], model_path, table["label"], rule, max_frames))

    deepfake = None
    if "deepfake" in raw:
        table = raw["deepfake"]
        if not isinstance(table, dict):
            raise PolicyError("[deepfake] must be a table")
        _no_unknown_keys(table, _RULE_KEYS - {"params"} | {"face_only", "cues"}, "[deepfake]")
        rule = _signal_rule({k: v for k, v in table.items() if k in _RULE_KEYS}, "[deepfake]")
        face_only = _fraction(table, "face_only", 0.6, "[deepfake]")
        if rule.enabled and "faces" not in detectors:
            raise PolicyError("[deepfake] needs [detectors.faces]")
        known = set(detectors) | {model.name for model in models}
        cues = table.get("cues", [cue for cue in ("frequency", "temporal") if cue in known])
        if not isinstance(cues, list) or not all(isinstance(cue, str) and cue in known for cue in cues):
            raise PolicyError(f"[deepfake] cues must list configured detectors or models ({sorted(known)})")
        deepfake = DeepfakeRule(rule, face_only, tuple(cues))

    return DetectionPolicy(version.strip(), combine, block, review, detectors, deepfake, models, source=str(path))


def _signal_rule(table: Any, where: str) -> SignalRule:
    if not isinstance(table, dict):
        raise PolicyError(f"{where} must be a table")
    _no_unknown_keys(table, _RULE_KEYS, where)
    enabled = table.get("enabled", True)
    if not isinstance(enabled, bool):
        raise PolicyError(f"{where}: 'enabled' must be true or false")
    reason = table.get("reason", "")
    if not isinstance(reason, str):
        raise PolicyError(f"{where}: 'reason' must be a string")
    params = table.get("params", {})
    if not isinstance(params, dict):
        raise PolicyError(f"{where}: 'params' must be a table")
    return SignalRule(enabled, _fraction(table, "weight", 1.0, where), _fraction(table, "threshold", 0.5, where),
                      reason, dict(params))


def _fraction(table: dict, key: str, default: float | None, where: str) -> float:
    value = table.get(key, default)
    if value is None:
        raise PolicyError(f"{where}: '{key}' is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise PolicyError(f"{where}: '{key}' must be a number in [0, 1], got {value!r}")
    return float(value)


def _no_unknown_keys(table: dict, allowed: set[str], where: str) -> None:
    unknown = set(table) - allowed
    if unknown:  # a typo ("treshold") would otherwise silently fall back to a default
        raise PolicyError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


# ---------------------------------------------------------------------------------------------------------------------
# Assessment


@dataclass
class Assessment:
    decision: str  # ALLOW | REVIEW | BLOCK
    score: float
    scores: dict[str, float]  # every enabled detector's raw score, plus "deepfake" when configured
    reasons: list[str]
    evidence: dict[str, Any]  # per detector, plus "contributions" and "timing_ms"
    policy_version: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def assess(frames: np.ndarray, policy: DetectionPolicy | None = None) -> Assessment:
    """Run the policy's detectors on the clip and decide ALLOW / REVIEW / BLOCK (see ``DetectionPolicy``)."""
    frames = check_frames(frames)
    policy = policy if policy is not None else load_detection_policy()
    rules = policy.rules()
    scores: dict[str, float] = {}
    evidence: dict[str, Any] = {}
    timing: dict[str, float] = {}
    for name, detector in policy.build_detectors().items():
        started = time.perf_counter()
        result = detector.detect(frames)
        timing[name] = round((time.perf_counter() - started) * 1000, 1)
        scores[name], evidence[name] = result.score, result.evidence

    signals: dict[str, tuple[float, SignalRule]] = {
        name: (score, rules[name]) for name, score in scores.items() if rules[name].reason}
    deepfake = policy.deepfake
    if deepfake is not None and deepfake.rule.enabled and "faces" in scores:
        cue = max((scores[name] for name in deepfake.cues if name in scores), default=0.0)
        score = _r(scores["faces"] * (deepfake.face_only + (1.0 - deepfake.face_only) * cue))
        scores["deepfake"] = score
        evidence["deepfake"] = {"faces": scores["faces"], "strongest_cue": cue, "face_only": deepfake.face_only}
        signals["deepfake"] = (score, deepfake.rule)

    contributions = {name: _r(rule.weight * score) for name, (score, rule) in signals.items()}
    if policy.combine == "noisy_or":
        overall = 1.0 - math.prod(1.0 - value for value in contributions.values())
    else:
        overall = max(contributions.values(), default=0.0)
    overall = _r(overall)
    reasons = sorted({rule.reason for score, rule in signals.values() if score >= rule.threshold})
    if overall >= policy.block_threshold:
        decision = "BLOCK"
    elif overall >= policy.review_threshold:
        decision = "REVIEW"
    else:
        decision = "ALLOW"
    evidence["contributions"] = contributions
    evidence["timing_ms"] = timing
    return Assessment(decision, overall, scores, reasons, evidence, policy.version)
