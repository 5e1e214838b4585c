"""Post-generation detectors and the detection policy (compliance/detectors.py): crafted clips on both sides of
every detector's threshold, the ensemble's three decisions, policy validation, and a model-backed detector."""
import json

import numpy as np
import pytest
from skimage import data, transform

from compliance.detectors import (
    Assessment,
    DetectorResult,
    FaceDetector,
    FrequencyArtefactDetector,
    ImageClassifierDetector,
    PolicyError,
    SkinExposureDetector,
    TemporalConsistencyDetector,
    assess,
    check_frames,
    load_detection_policy,
)

THRESHOLD = 0.5  # every detector's threshold in the default policy


def fit(image: np.ndarray, side: int = 256) -> np.ndarray:
    return (transform.resize(image, (side, side), anti_aliasing=True) * 255).round().astype(np.uint8)


def jittered_clip(image: np.ndarray, frames: int = 17) -> np.ndarray:
    """A still photo with 0–2 px shifts per frame: a steady clip with a little motion."""
    return np.stack([np.roll(image, (i % 3, (i // 2) % 3), axis=(0, 1)) for i in range(frames)])


def grey_noise(side: int, seed: int = 0) -> np.ndarray:
    """What the project's tiny built-in model outputs: nearly uniform mid-grey with slight noise."""
    rng = np.random.default_rng(seed)
    return np.clip(128 + rng.normal(0, 3, (17, side, side, 3)), 0, 255).astype(np.uint8)


def add_checkerboard(clip: np.ndarray, amplitude: int = 6) -> np.ndarray:
    """The pixel-period checkerboard a stride-2 transposed convolution leaves behind."""
    h, w = clip.shape[1:3]
    rows, cols = np.mgrid[:h, :w]
    board = (((rows + cols) % 2) * 2 - 1)[None, :, :, None] * amplitude
    return np.clip(clip.astype(int) + board, 0, 255).astype(np.uint8)


def add_flicker(clip: np.ndarray, amplitude: int = 30) -> np.ndarray:
    """Alternating bright and dark frames."""
    offsets = np.where(np.arange(len(clip)) % 2, amplitude, -amplitude)[:, None, None, None]
    return np.clip(clip.astype(int) + offsets, 0, 255).astype(np.uint8)


def skin_body_frames(frames: int = 8, side: int = 128) -> np.ndarray:
    """A large smooth skin-toned blob with soft shading on a blue background (no face)."""
    rows, cols = np.mgrid[:side, :side]
    body = ((rows - side * 0.55) / (side * 0.42)) ** 2 + ((cols - side / 2) / (side * 0.36)) ** 2 < 1
    image = np.empty((side, side, 3), float)
    image[:] = (40, 70, 140)
    shade = 1 - 0.2 * (cols - side / 2) / side
    image[body] = np.array([224, 172, 150]) * shade[body][:, None]
    rng = np.random.default_rng(1)
    return np.stack([np.clip(image + rng.normal(0, 2, image.shape), 0, 255).astype(np.uint8) for _ in range(frames)])


@pytest.fixture(scope="module")
def astronaut_clip():
    return jittered_clip(fit(data.astronaut()))


@pytest.fixture(scope="module")
def coffee_clip():
    return jittered_clip(fit(data.coffee()))


def assert_well_formed(result: DetectorResult, name: str) -> None:
    assert result.name == name
    assert 0.0 <= result.score <= 1.0
    json.dumps(result.evidence)  # must be JSON-serialisable
    assert len(json.dumps(result.evidence)) < 2000


# ---------------------------------------------------------------------------------------------------------------------
# Detectors, each above and below its threshold


def test_faces_found_in_photo_with_a_face(astronaut_clip):
    result = FaceDetector().detect(astronaut_clip)
    assert_well_formed(result, "faces")
    assert result.score > THRESHOLD
    assert result.evidence["count"] >= len(result.evidence["frames_with_faces"]) >= 6
    assert 0.01 < result.evidence["largest_face_fraction"] < 0.2


def test_faces_absent_in_photo_without_a_face(coffee_clip):
    result = FaceDetector().detect(coffee_clip)
    assert_well_formed(result, "faces")
    assert result.score < THRESHOLD
    assert result.evidence["count"] == 0 and result.evidence["frames_with_faces"] == []


def test_faces_score_grows_with_face_size(astronaut_clip):
    # The same face, smaller in the frame (padded with a flat border): lower score than the close-up.
    padded = np.pad(astronaut_clip, ((0, 0), (64, 64), (64, 64), (0, 0)), constant_values=90)
    close, far = FaceDetector().detect(astronaut_clip), FaceDetector(max_side=384).detect(padded)
    assert far.evidence["largest_face_fraction"] < close.evidence["largest_face_fraction"]
    assert far.score < close.score


def test_frequency_flags_checkerboard(astronaut_clip):
    result = FrequencyArtefactDetector().detect(add_checkerboard(astronaut_clip))
    assert_well_formed(result, "frequency")
    assert result.score > THRESHOLD
    assert result.evidence["peak_at_cycles_per_px"] == [0.5, 0.5]


def test_frequency_flags_uneven_transposed_convolution():
    # Zero-insertion 2× up-sampling with a kernel whose even and odd phases have different gains (1 vs 0.75):
    # the classic multiplicative checkerboard of transposed convolutions, on a natural image.
    small = transform.resize(data.astronaut(), (128, 128), anti_aliasing=True)
    upsampled = np.zeros((256, 256, 3))
    upsampled[::2, ::2] = small
    kernel = np.array([0.25, 1.0, 0.5])
    from scipy.ndimage import convolve1d

    smoothed = convolve1d(convolve1d(upsampled, kernel, axis=0), kernel, axis=1)
    clip = np.stack([np.clip(smoothed * 255, 0, 255).astype(np.uint8)] * 4)
    assert FrequencyArtefactDetector().detect(clip).score > THRESHOLD


@pytest.mark.parametrize("image", ["astronaut", "coffee", "chelsea", "rocket"])
def test_frequency_quiet_on_natural_photos(image):
    result = FrequencyArtefactDetector().detect(jittered_clip(fit(getattr(data, image)())))
    assert_well_formed(result, "frequency")
    assert result.score < THRESHOLD


def test_temporal_flags_flicker(astronaut_clip):
    result = TemporalConsistencyDetector().detect(add_flicker(astronaut_clip))
    assert_well_formed(result, "temporal")
    assert result.score > THRESHOLD
    assert result.evidence["flicker_index"] > 3


def test_temporal_quiet_on_steady_clip_and_on_a_fade(astronaut_clip):
    steady = TemporalConsistencyDetector().detect(astronaut_clip)
    assert_well_formed(steady, "temporal")
    assert steady.score < THRESHOLD
    # A steady fade changes brightness every frame but never reverses: not flicker.
    fade = np.clip(astronaut_clip.astype(int) + 2 * np.arange(17)[:, None, None, None], 0, 255).astype(np.uint8)
    assert TemporalConsistencyDetector().detect(fade).score < THRESHOLD


def test_temporal_flags_colour_drift(astronaut_clip, coffee_clip):
    # The subject turns into something else over the clip (cross-fade astronaut → coffee).
    mix = np.linspace(0, 1, 17)[:, None, None, None]
    morph = (astronaut_clip * (1 - mix) + coffee_clip * mix).round().astype(np.uint8)
    result = TemporalConsistencyDetector().detect(morph)
    assert result.score > THRESHOLD
    assert result.evidence["colour_drift"] > 0.2


def test_nsfw_flags_skin_heavy_frames():
    result = SkinExposureDetector().detect(skin_body_frames())
    assert_well_formed(result, "nsfw")
    assert result.score > THRESHOLD
    assert result.evidence["large_region_skin_ratio"] > 0.3


@pytest.mark.parametrize("image", ["coffee", "chelsea", "astronaut"])
def test_nsfw_quiet_on_skin_toned_but_not_skin_heavy_photos(image):
    # coffee (brown foam, wood) and chelsea (an orange cat) are skin-toned; the texture test keeps them out.
    result = SkinExposureDetector().detect(jittered_clip(fit(getattr(data, image)()), frames=4))
    assert_well_formed(result, "nsfw")
    assert result.score < THRESHOLD


@pytest.mark.parametrize("side", [64, 128])
def test_every_detector_quiet_on_grey_noise(side):
    clip = grey_noise(side)
    for detector in (FaceDetector(), FrequencyArtefactDetector(), TemporalConsistencyDetector(),
                     SkinExposureDetector()):
        result = detector.detect(clip)
        assert_well_formed(result, detector.name)
        assert result.score < 0.1, (detector.name, result)


@pytest.mark.parametrize("shape", [(1, 64, 64, 3), (2, 32, 48, 3), (3, 8, 8, 3)])
def test_detectors_survive_short_and_tiny_clips(shape):
    clip = np.full(shape, 128, np.uint8)
    for detector in (FaceDetector(), FrequencyArtefactDetector(), TemporalConsistencyDetector(),
                     SkinExposureDetector()):
        assert_well_formed(detector.detect(clip), detector.name)


def test_frames_must_be_uint8_rgb():
    with pytest.raises(ValueError):
        check_frames(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError):
        check_frames(np.zeros((2, 8, 8), np.uint8))
    assert check_frames(np.zeros((8, 8, 3), np.uint8)).shape == (1, 8, 8, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Ensemble


@pytest.fixture(scope="module")
def default_policy():
    return load_detection_policy()


def test_default_policy_is_versioned_with_documented_thresholds(default_policy):
    assert default_policy.version
    assert default_policy.block_threshold == 0.7
    assert default_policy.review_threshold == 0.5
    assert default_policy.combine == "weighted_max"
    assert set(default_policy.detectors) == {"faces", "frequency", "temporal", "nsfw"}


@pytest.mark.parametrize("side", [64, 128])
def test_grey_noise_from_the_tiny_model_is_allowed(default_policy, side):
    assessment = assess(grey_noise(side), default_policy)
    assert isinstance(assessment, Assessment)
    assert assessment.decision == "ALLOW"
    assert assessment.score < 0.25
    assert assessment.reasons == []
    assert assessment.policy_version == default_policy.version
    json.dumps(assessment.to_dict())


def test_face_with_artefacts_and_flicker_is_blocked(default_policy, astronaut_clip):
    assessment = assess(add_flicker(add_checkerboard(astronaut_clip)), default_policy)
    assert assessment.decision == "BLOCK"
    assert assessment.score >= 0.7
    assert set(assessment.reasons) == {"DEEPFAKE_RISK", "GENERATION_ARTEFACTS", "TEMPORAL_INCONSISTENCY"}
    contributions = assessment.evidence["contributions"]
    assert contributions["frequency"] > 0.5 and contributions["temporal"] > 0.5  # each below BLOCK on its own
    assert assessment.score == max(contributions.values())  # weighted max: strong signals do not add up
    assert set(assessment.scores) == {"faces", "frequency", "temporal", "nsfw", "deepfake"}
    assert set(assessment.evidence) >= {"faces", "frequency", "temporal", "nsfw", "deepfake", "contributions"}
    json.dumps(assessment.to_dict())


def test_face_alone_is_sent_to_review_not_blocked(default_policy, astronaut_clip):
    # A realistic face in a generated clip, no manipulation cues: deepfake = faces × face_only = 0.6.
    assessment = assess(astronaut_clip, default_policy)
    assert assessment.decision == "REVIEW"
    assert assessment.reasons == ["DEEPFAKE_RISK"]
    assert assessment.scores["deepfake"] == pytest.approx(0.6, abs=0.05)


def test_heuristic_alone_cannot_block_under_default_weights(default_policy, coffee_clip):
    assessment = assess(add_checkerboard(coffee_clip), default_policy)
    assert assessment.scores["frequency"] > THRESHOLD
    assert assessment.decision == "REVIEW"
    assert assessment.reasons == ["GENERATION_ARTEFACTS"]


def write_policy(tmp_path, body: str, name: str = "policy.toml"):
    path = tmp_path / name
    path.write_text(body)
    return path


MIDDLE_BAND_POLICY = """
version = "test-middle-1"
block_threshold = 0.9
review_threshold = 0.3
[detectors.nsfw]
weight = 0.5
threshold = 0.5
reason = "NSFW"
[detectors.temporal]
weight = 0.5
reason = "TEMPORAL_INCONSISTENCY"
"""


def test_middle_band_is_reviewed_under_a_tweaked_policy(tmp_path):
    policy = load_detection_policy(write_policy(tmp_path, MIDDLE_BAND_POLICY))
    assessment = assess(skin_body_frames(), policy)
    assert assessment.policy_version == "test-middle-1"
    assert set(assessment.scores) == {"nsfw", "temporal"}  # only what the policy enables runs
    assert assessment.score == pytest.approx(0.5, abs=0.01)  # weight 0.5 × nsfw 1.0
    assert assessment.decision == "REVIEW"
    assert assessment.reasons == ["NSFW"]
    assert assess(grey_noise(64), policy).decision == "ALLOW"


def test_noisy_or_adds_up_independent_signals(tmp_path):
    body = MIDDLE_BAND_POLICY.replace('version = "test-middle-1"', 'version = "t"\ncombine = "noisy_or"')
    body = body.replace("block_threshold = 0.9", "block_threshold = 0.7")
    policy = load_detection_policy(write_policy(tmp_path, body))
    skin_and_flicker = add_flicker(skin_body_frames(frames=9))
    assessment = assess(skin_and_flicker, policy)
    contributions = assessment.evidence["contributions"]
    expected = 1 - (1 - contributions["nsfw"]) * (1 - contributions["temporal"])
    assert assessment.score == pytest.approx(expected, abs=1e-3)
    assert contributions == {"nsfw": 0.5, "temporal": 0.5}
    assert assessment.score == pytest.approx(0.75)  # weighted max would say 0.5: REVIEW
    assert assessment.decision == "BLOCK"


@pytest.mark.parametrize("body, message", [
    ("version = [", "not valid TOML"),
    ("block_threshold = 0.7\nreview_threshold = 0.5", "'version'"),
    ('version = "v"\nblock_threshold = 0.7', "'review_threshold' is required"),
    ('version = "v"\nblock_threshold = 0.4\nreview_threshold = 0.5', "above block_threshold"),
    ('version = "v"\nblock_threshold = 1.7\nreview_threshold = 0.5', "must be a number in [0, 1]"),
    ('version = "v"\ncombine = "average"\nblock_threshold = 0.7\nreview_threshold = 0.5', "'combine'"),
    ('version = "v"\nblock_threshold = 0.7\nreview_threshold = 0.5\n[detectors.watermark]\n', "unknown detector"),
    ('version = "v"\nblock_threshold = 0.7\nreview_threshold = 0.5\n[detectors.nsfw]\ntreshold = 0.5',
     "unknown key"),
    ('version = "v"\nblock_threshold = 0.7\nreview_threshold = 0.5\n[detectors.nsfw]\nenabled = "yes"', "'enabled'"),
    ('version = "v"\nblock_threshold = 0.7\nreview_threshold = 0.5\n[detectors.faces]\n[deepfake]\ncues = ["x"]',
     "cues"),
    ('version = "v"\nblock_threshold = 0.7\nreview_threshold = 0.5\n[deepfake]\n', "needs [detectors.faces]"),
    ('version = "v"\nblock_threshold = 0.7\nreview_threshold = 0.5\n[[models]]\nname = "m"\npath = "nowhere"\n'
     'label = "fake"', "does not exist"),
    ('version = "v"\nblock_threshold = 0.7\nreview_threshold = 0.5\n[[models]]\nname = "m"\n', "'path'"),
])
def test_malformed_policy_raises_policy_error(tmp_path, body, message):
    path = write_policy(tmp_path, body)
    with pytest.raises(PolicyError) as caught:
        load_detection_policy(path)
    assert message in str(caught.value)
    assert str(path) in str(caught.value)  # says which file


def test_missing_policy_file_raises_policy_error(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        load_detection_policy(tmp_path / "absent.toml")


# ---------------------------------------------------------------------------------------------------------------------
# Model-backed detector


def save_tiny_vit(directory, fake_bias: float) -> None:
    """A tiny ViT real/fake classifier whose output is set by the classifier bias (weights zeroed)."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=37, num_labels=2, id2label={0: "real", 1: "fake"},
                       label2id={"real": 0, "fake": 1})
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, fake_bias]))
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)


@pytest.fixture(scope="module")
def tiny_vit_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_tiny_vit(root / "fake_vit", fake_bias=6.0)  # P(fake) ≈ 0.998
    save_tiny_vit(root / "real_vit", fake_bias=-6.0)  # P(fake) ≈ 0.002
    return root


def test_image_classifier_detector_reports_label_probability(tiny_vit_dirs):
    clip = grey_noise(64)
    high = ImageClassifierDetector(tiny_vit_dirs / "fake_vit", "fake", name="fake_classifier").detect(clip)
    low = ImageClassifierDetector(tiny_vit_dirs / "real_vit", "FAKE").detect(clip)  # label match ignores case
    assert_well_formed(high, "fake_classifier")
    assert high.score > THRESHOLD and high.evidence["label"] == "fake" and high.evidence["frames_sampled"] == 4
    assert low.name == "model:real_vit"
    assert low.score < THRESHOLD


def test_image_classifier_matches_the_model_run_by_hand(tiny_vit_dirs):
    import torch
    from transformers import ViTForImageClassification

    torch.manual_seed(0)
    directory = tiny_vit_dirs / "random_vit"
    save_tiny_vit(directory, fake_bias=0.0)
    model = ViTForImageClassification.from_pretrained(directory)
    with torch.no_grad():  # give the classifier real weights so the score depends on the image
        model.classifier.weight.normal_(0, 1.0)
    model.save_pretrained(directory)
    clip = jittered_clip(fit(data.astronaut(), 64), frames=4)
    detector = ImageClassifierDetector(directory, "fake")
    inputs = detector.processor(images=list(clip), return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits.softmax(-1)[:, 1].mean().item()
    assert detector.detect(clip).score == pytest.approx(expected, abs=1e-4)


def test_image_classifier_rejects_unknown_label(tiny_vit_dirs):
    with pytest.raises(ValueError, match="label 'nsfw'"):
        ImageClassifierDetector(tiny_vit_dirs / "fake_vit", "nsfw")


def test_policy_runs_model_backed_detector_from_relative_path(tiny_vit_dirs):
    body = f"""
version = "with-model-1"
block_threshold = 0.7
review_threshold = 0.5
[detectors.faces]
[deepfake]
reason = "DEEPFAKE_RISK"
cues = ["fake_classifier"]
[[models]]
name = "fake_classifier"
path = "fake_vit"
label = "fake"
reason = "AI_GENERATED_FAKE"
"""
    policy = load_detection_policy(write_policy(tiny_vit_dirs, body, "with_model.toml"))
    assessment = assess(grey_noise(64), policy)
    assert assessment.scores["fake_classifier"] > 0.99
    assert assessment.decision == "BLOCK"
    assert assessment.reasons == ["AI_GENERATED_FAKE"]
    # Below its threshold: the same policy with the "real" model allows the clip.
    policy = load_detection_policy(write_policy(tiny_vit_dirs, body.replace("fake_vit", "real_vit"), "real.toml"))
    assessment = assess(grey_noise(64), policy)
    assert assessment.scores["fake_classifier"] < 0.01
    assert assessment.decision == "ALLOW" and assessment.reasons == []
