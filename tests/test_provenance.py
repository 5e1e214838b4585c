"""C2PA signing and verification of generated videos (compliance/provenance.py), on a real H.264 MP4."""
import hashlib
import multiprocessing
import stat
import struct
from dataclasses import replace

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID

from compliance.provenance import (
    ACTIONS_LABEL,
    GENERATION_LABEL,
    TRAINED_ALGORITHMIC_MEDIA,
    TRAINING_MINING_LABEL,
    DevCertificateAuthority,
    GenerationClaims,
    InputIngredient,
    ecdsa_signature_to_raw,
    ensure_dev_chain,
    load_signing_material,
    make_signer,
    prompt_sha256,
    sign_video,
    verify_video,
)
from consumers.verify import VerifyReport
from gpu_agents.video import encode_mp4, read_mp4
from tests.samples import no_face_png

MODEL = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
CLAIMS = GenerationClaims(job_id="job-42", prompt_sha256=prompt_sha256("a red fox in the snow"), seed=1234,
                          steps=30, model=MODEL, width=64, height=64, frames=9, watermark_payload_hex="00ff17")


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("c2pa")


@pytest.fixture(scope="module")
def material(dev_dir):
    return ensure_dev_chain(dev_dir)


@pytest.fixture(scope="module")
def video():
    return encode_mp4(np.random.default_rng(0).integers(0, 255, (9, 64, 64, 3), dtype=np.uint8), 8)


@pytest.fixture(scope="module")
def signed(material, video):
    with make_signer(material) as signer:
        return sign_video(video, signer=signer, claims=CLAIMS)


def top_level_boxes(data: bytes) -> dict[str, tuple[int, int]]:
    """ISO BMFF top-level boxes: type -> (payload start, payload end). Written here, independent of the code tested."""
    boxes, offset = {}, 0
    while offset < len(data):
        size, box_type = struct.unpack(">I4s", data[offset:offset + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[offset + 8:offset + 16])[0], 16
        elif size == 0:
            size = len(data) - offset
        assert size >= header, f"corrupt box at {offset}"
        boxes.setdefault(box_type.decode("latin-1"), (offset + header, offset + size))
        offset += size
    return boxes


def test_signed_video_is_trusted_with_the_dev_root(signed, material):
    report = verify_video(signed.data, trust_anchors_pem=material.root_pem)
    assert report.validation_state == "Trusted", report.validation_errors
    assert report.trusted
    assert report.validation_errors == []
    assert report.manifest_label == signed.manifest_label
    assert signed.manifest_label.startswith("urn:c2pa:")
    assert report.claim_generator.startswith("vidgen/")


def test_manifest_carries_the_generation_claims(signed, material, video):
    assertions = verify_video(signed.data, trust_anchors_pem=material.root_pem).assertions

    (created,) = assertions[ACTIONS_LABEL]["actions"]
    assert created["action"] == "c2pa.created"
    assert created["digitalSourceType"] == TRAINED_ALGORITHMIC_MEDIA
    assert created["softwareAgent"]["name"] == "vidgen"
    assert created["softwareAgent"]["io.vidgen.model"] == MODEL

    generation = assertions[GENERATION_LABEL]
    assert generation == {"job_id": "job-42", "prompt_sha256": prompt_sha256("a red fox in the snow"), "seed": 1234,
                          "steps": 30, "model": MODEL, "width": 64, "height": 64, "frames": 9,
                          "watermark_payload_hex": "00ff17"}

    entries = assertions[TRAINING_MINING_LABEL]["entries"]
    assert set(entries) == {"cawg.data_mining", "cawg.ai_inference", "cawg.ai_generative_training",
                            "cawg.ai_training"}
    assert all(entry["use"] == "notAllowed" for entry in entries.values())

    # Auto-thumbnail off: no thumbnail in the manifest, and the manifest adds kilobytes, not hundreds of them.
    assert "thumbnail" not in signed.manifest_json
    assert len(signed.data) - len(video) < 20_000


def test_the_input_image_of_an_image_to_video_job_is_an_ingredient_with_its_hash(material, video, tmp_path):
    image = no_face_png()
    claims = replace(CLAIMS, inputs=(InputIngredient(image, "image/png", "input.png"),))
    with make_signer(material) as signer:
        signed = sign_video(video, signer=signer, claims=claims)
    report = verify_video(signed.data, trust_anchors_pem=material.root_pem)
    assert report.trusted, report.validation_errors
    assert report.ingredients == [{"title": "input.png", "format": "image/png", "relationship": "inputTo",
                                   "sha256": hashlib.sha256(image).hexdigest(), "bytes": len(image)}]
    (created,) = report.assertions[ACTIONS_LABEL]["actions"]
    [link] = created["parameters"]["ingredients"]  # the creation names its input: a hashed link to the ingredient
    assert "c2pa.ingredient" in link["url"] and link["hash"]
    assert "inputs" not in report.assertions[GENERATION_LABEL]
    assert "thumbnail" not in signed.manifest_json
    rendered = VerifyReport("v.mp4", report, "dev root", None, watermark_error="not read").render()
    assert f"ingredient input.png (image/png, inputTo), sha256 {hashlib.sha256(image).hexdigest()}" in rendered
    assert verify_video(video, trust_anchors_pem=material.root_pem).ingredients == []  # unsigned: none


def test_one_flipped_byte_in_the_media_data_is_invalid(signed, material):
    boxes = top_level_boxes(signed.data)
    mdat_start, mdat_end = boxes["mdat"]
    manifest_start, manifest_end = boxes["uuid"]  # c2pa's manifest store box
    flip_at = (mdat_start + mdat_end) // 2
    assert not manifest_start <= flip_at < manifest_end
    tampered = bytearray(signed.data)
    tampered[flip_at] ^= 0x01

    report = verify_video(bytes(tampered), trust_anchors_pem=material.root_pem)
    assert report.validation_state == "Invalid"
    assert "assertion.bmffHash.mismatch" in report.validation_errors


def test_unsigned_video_is_reported_unsigned_without_raising(video, material):
    report = verify_video(video, trust_anchors_pem=material.root_pem)
    assert report.validation_state == "Unsigned"
    assert report.manifest_label is None and report.assertions == {}


def test_without_the_dev_root_the_video_is_valid_but_not_trusted(signed, tmp_path):
    no_anchor = verify_video(signed.data, trust_anchors_pem=None)
    assert no_anchor.validation_state == "Valid"
    assert "signingCredential.untrusted" in no_anchor.validation_errors

    other_root = ensure_dev_chain(tmp_path / "other").root_pem
    assert verify_video(signed.data, trust_anchors_pem=other_root).validation_state == "Valid"


def test_dev_chain_is_created_once_and_reused(dev_dir, material):
    files = {name: dev_dir / name for name in (DevCertificateAuthority.ROOT_FILE, DevCertificateAuthority.CHAIN_FILE,
                                                 DevCertificateAuthority.KEY_FILE)}
    before = {name: (path.stat().st_ino, path.stat().st_mtime_ns) for name, path in files.items()}
    again = ensure_dev_chain(dev_dir)
    assert again == material
    assert {name: (path.stat().st_ino, path.stat().st_mtime_ns) for name, path in files.items()} == before
    assert stat.S_IMODE(files[DevCertificateAuthority.KEY_FILE].stat().st_mode) == 0o600


def test_dev_chain_has_the_extensions_c2pa_requires(material):
    signer_cert, intermediate = x509.load_pem_x509_certificates(material.chain_pem.encode())
    root = x509.load_pem_x509_certificate(material.root_pem.encode())
    assert signer_cert.issuer == intermediate.subject and intermediate.issuer == root.subject
    extensions = signer_cert.extensions
    assert extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert extensions.get_extension_for_class(x509.KeyUsage).value.digital_signature
    assert list(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.EMAIL_PROTECTION]
    extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    signing_key = serialization.load_pem_private_key(material.key_pem.encode(), password=None)
    assert signing_key.public_key() == signer_cert.public_key()
    assert isinstance(signing_key.curve, ec.SECP256R1)


def _dev_chain_pems(directory):
    material = ensure_dev_chain(directory)
    return material.chain_pem, material.key_pem, material.root_pem


def test_concurrent_processes_get_one_dev_chain(tmp_path):
    directory = tmp_path / "shared"
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_dev_chain_pems, [directory] * 3)
    assert len(set(results)) == 1
    assert results[0] == _dev_chain_pems(directory)
    assert not list(directory.glob("*.tmp"))


def test_callback_signer_is_trusted(material, video):
    signing_key = serialization.load_pem_private_key(material.key_pem.encode(), password=None)
    messages = []

    def kms_sign(message: bytes) -> bytes:  # stands in for a KMS: returns DER, as AWS KMS and PKCS#11 wrappers do
        messages.append(message)
        return signing_key.sign(message, ec.ECDSA(hashes.SHA256()))

    with make_signer(sign_fn=kms_sign, chain_pem=material.chain_pem) as signer:
        signed = sign_video(video, signer=signer, claims=CLAIMS)
    assert len(messages) == 1
    report = verify_video(signed.data, trust_anchors_pem=material.root_pem)
    assert report.validation_state == "Trusted", report.validation_errors


def test_ecdsa_signature_to_raw():
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.sign(b"message", ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert ecdsa_signature_to_raw(der, 32) == raw
    assert ecdsa_signature_to_raw(raw, 32) == raw
    with pytest.raises(ValueError):
        ecdsa_signature_to_raw(b"\x01" * 10, 32)


def test_production_material_from_files_signs(dev_dir, material, video):
    loaded = load_signing_material(dev_dir / DevCertificateAuthority.CHAIN_FILE,
                                   dev_dir / DevCertificateAuthority.KEY_FILE)
    assert loaded.root_pem is None  # a production verifier brings its own anchors
    with make_signer(loaded) as signer:
        first = sign_video(video, signer=signer, claims=CLAIMS)
        second = sign_video(video, signer=signer, claims=CLAIMS)  # one signer, many videos
    assert first.manifest_label != second.manifest_label
    for signed in (first, second):
        assert verify_video(signed.data, trust_anchors_pem=material.root_pem).validation_state == "Trusted"


def test_make_signer_needs_exactly_one_source(material):
    with pytest.raises(ValueError):
        make_signer()
    with pytest.raises(ValueError):
        make_signer(material, sign_fn=lambda message: b"", chain_pem=material.chain_pem)
    with pytest.raises(ValueError):
        make_signer(sign_fn=lambda message: b"")


def test_signed_video_decodes_to_the_same_frames(signed, video):
    assert np.array_equal(read_mp4(signed.data), read_mp4(video))
