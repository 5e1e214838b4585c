"""The input image of an image-to-video job as plain functions: what is accepted, and what the prompt policy makes of
a face in it (compliance/input_image.py, compliance/prompt_safety.py). No Kafka."""
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from skimage import data

from compliance.input_image import (MAX_INPUT_IMAGE_BYTES, InputImageError, InputImageTooLarge, read_input_image)
from compliance.prompt_safety import (PolicyError, combine_decisions, evaluate_input_image, evaluate_prompt,
                                      load_policy)
from tests.samples import face_png, image_file, no_face_png

POLICY_FILE = "compliance/prompt_policy.toml"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width × height pixels but holds a few bytes of them: what a decompression bomb looks like
    to anything that reads only the header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize(("image_format", "media_type"), [("PNG", "image/png"), ("JPEG", "image/jpeg"),
                                                          ("WEBP", "image/webp")])
def test_png_jpeg_and_webp_are_accepted_as_uploaded(image_format, media_type):
    uploaded = image_file(data.chelsea(), image_format)
    image = read_input_image(uploaded)
    assert (image.media_type, image.width, image.height) == (media_type, 451, 300)
    assert image.data == uploaded and image.file_name.startswith("input.")
    assert image.rgb().shape == (300, 451, 3)


def test_a_file_at_exactly_the_byte_limit_is_accepted():
    padded = no_face_png().ljust(MAX_INPUT_IMAGE_BYTES, b"\x00")  # bytes after IEND are not the image's
    assert read_input_image(padded).media_type == "image/png"


def test_what_is_refused_and_why():
    png = no_face_png()
    refused = {
        "text": (b"hello, I am not an image", InputImageError, "not a PNG, JPEG or WebP"),
        "empty": (b"", InputImageError, "empty"),
        "gif": (image_file(data.chelsea(), "GIF"), InputImageError, "not a PNG, JPEG or WebP"),
        "truncated": (png[:len(png) // 2], InputImageError, "cannot be decoded"),
        "one flipped bit": (png[:100] + bytes([png[100] ^ 1]) + png[101:], InputImageError, "cannot be decoded"),
        "over 10 MiB": (png.ljust(MAX_INPUT_IMAGE_BYTES + 1, b"\x00"), InputImageTooLarge, "10 MiB"),
        "4097 wide": (image_file(np.zeros((16, 4097, 3), np.uint8)), InputImageTooLarge, "4097×16 pixels"),
        "bomb": (png_header_only(100_000, 100_000), InputImageTooLarge, "too many pixels"),
        "bomb within PIL's limit": (png_header_only(8192, 8192), InputImageTooLarge, "8192×8192"),
    }
    for name, (uploaded, error, message) in refused.items():
        with pytest.raises(error, match=message):
            read_input_image(uploaded)
    assert InputImageTooLarge.code == "image_too_large" and InputImageError.code == "invalid_image"


def test_a_face_in_the_input_image_goes_to_review_with_its_reason_code():
    decision = evaluate_input_image(read_input_image(face_png()))
    assert (decision.action, decision.reasons) == ("REVIEW", ["INPUT_FACE"])
    assert decision.policy_version == load_policy().version
    assert "INPUT_FACE" in decision.evidence and "512×512" in decision.evidence
    [match] = decision.matches
    assert (match.category, match.rule_id) == ("deepfake", "input_image.face")


@pytest.mark.parametrize("pixels", [data.chelsea(), data.coffee()], ids=["cat", "coffee"])
def test_an_image_without_a_human_face_is_allowed(pixels):
    decision = evaluate_input_image(read_input_image(image_file(pixels, "JPEG")))
    assert (decision.action, decision.reasons, decision.evidence) == ("ALLOW", [], "")


def test_a_face_stored_sideways_with_an_exif_rotation_is_still_found():
    sideways = Image.fromarray(np.rot90(data.astronaut()).copy())  # shown upright after a 270° turn
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    uploaded = image_file(np.asarray(sideways), "JPEG", exif=exif.tobytes())
    assert evaluate_input_image(read_input_image(uploaded)).reasons == ["INPUT_FACE"]


def test_the_versioned_policy_may_block_faces_instead(tmp_path):
    text = open(POLICY_FILE, encoding="utf-8").read()
    strict = tmp_path / "strict.toml"
    strict.write_text(text.replace('face_action = "REVIEW"', 'face_action = "BLOCK"')
                      .replace('version = "', 'version = "strict-', 1))
    policy = load_policy(strict)
    decision = evaluate_input_image(read_input_image(face_png()), policy=policy)
    assert (decision.action, decision.reasons, decision.policy_version) == ("BLOCK", ["INPUT_FACE"],
                                                                            policy.version)
    broken = tmp_path / "broken.toml"
    broken.write_text(text.replace('face_action = "REVIEW"', 'face_action = "ALLOW"'))
    with pytest.raises(PolicyError, match="face_action"):
        load_policy(broken)


def test_the_prompt_and_the_image_decide_together_and_the_most_severe_wins():
    face = evaluate_input_image(read_input_image(face_png()))
    harmless = combine_decisions(evaluate_prompt("an astronaut waving"), face)
    assert (harmless.action, harmless.reasons) == ("REVIEW", ["INPUT_FACE"])
    blocked = combine_decisions(evaluate_prompt("Abraham Lincoln giving a speech"), face)
    assert (blocked.action, blocked.reasons) == ("BLOCK", ["INPUT_FACE", "REAL_PERSON"])
    assert blocked.matches[0].action == "BLOCK" and "INPUT_FACE" in blocked.evidence
