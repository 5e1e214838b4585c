"""C2PA content credentials for generated videos: sign an MP4 with a manifest that says how it was made, and verify one.

Plain functions, no Kafka. Built on c2pa-python 0.38 (c2pa-rs 0.91), which embeds the manifest store in a top-level
`uuid` box and hashes the rest of the file (`c2pa.hash.bmff.v3`), so any change to the media data after signing
makes the Reader report "Invalid".

Signing keys come from one of three places:
- development: `ensure_dev_chain(directory)` creates (once) a throwaway root -> intermediate -> signer chain;
- production, key on disk: `load_signing_material(cert_chain_path, key_path)`;
- production, key in a KMS/HSM: `callback_signer(sign_fn, chain_pem)`, where `sign_fn` never exposes the key.
`make_signer(...)` turns either form into the `c2pa.Signer` that `sign_video` takes.

Trust: a Reader only says "Trusted" when the signer's chain ends in one of the trust anchors it is given (the dev
root, or a production root); with a valid signature but no matching anchor it says "Valid".

Inputs: the input image of an image-to-video job is recorded as an ingredient with relationship "inputTo" (C2PA 2.x:
an input to the computational process, such as a generative model, that created the asset; "parentOf" would claim
the video is an edit of the image, "componentOf" that the image is composited into it). The c2pa.created action names
it, and its sha256 and size ride in the ingredient's metadata (``io.vidgen.sha256``, ``io.vidgen.bytes``): C2PA v3
ingredients keep no hash of an unsigned ingredient's bytes of their own. An input that carries its own C2PA manifest
brings it along, so the chain of provenance continues through the video.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import io
import json
import os
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterator

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"

# Assertion labels. c2pa-rs 0.91 stores "c2pa.actions" as "c2pa.actions.v2" (claim version 2); we ask for the v2
# label directly so what we write is what a Reader shows.
ACTIONS_LABEL = "c2pa.actions.v2"
GENERATION_LABEL = "io.vidgen.generation"
# C2PA 2.x moved training/mining preferences out of the core spec into the Creator Assertions Working Group's
# "cawg.training-mining" (the old "c2pa.training-mining" is deprecated); c2pa-rs 0.91 reads and validates both.
TRAINING_MINING_LABEL = "cawg.training-mining"
TRAINING_MINING_USES = ("cawg.data_mining", "cawg.ai_inference", "cawg.ai_generative_training", "cawg.ai_training")
INPUT_RELATIONSHIP = "inputTo"  # see the module docstring
INPUT_SHA256_KEY, INPUT_BYTES_KEY = "io.vidgen.sha256", "io.vidgen.bytes"  # in an input ingredient's metadata

# Without this the SDK renders a JPEG thumbnail of the first frame into the manifest (~250 KB per video).
SIGNING_SETTINGS = {"version": 1, "builder": {"thumbnail": {"enabled": False}}}

UNSIGNED = "Unsigned"  # verify_video's state for a file with no manifest at all

# c2pa's ECDSA algorithms and the byte length of each of r and s in a raw (IEEE P1363) signature.
_ECDSA_COMPONENT_BYTES = {"es256": 32, "es384": 48, "es512": 66}
_SIGNING_ALGS = {
    "es256": c2pa.C2paSigningAlg.ES256,
    "es384": c2pa.C2paSigningAlg.ES384,
    "es512": c2pa.C2paSigningAlg.ES512,
    "ps256": c2pa.C2paSigningAlg.PS256,
    "ps384": c2pa.C2paSigningAlg.PS384,
    "ps512": c2pa.C2paSigningAlg.PS512,
    "ed25519": c2pa.C2paSigningAlg.ED25519,
}


def vidgen_version() -> str:
    try:
        return metadata.version("vidgen")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


def prompt_sha256(prompt: str) -> str:
    """The hex digest the manifest records instead of the prompt itself (prompts can be personal data)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Claims and results
# --------------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class InputIngredient:
    """An input the video was generated from (the image of an image-to-video job), as uploaded."""
    data: bytes
    media_type: str  # image/png, image/jpeg, image/webp
    title: str  # a name for people, e.g. input.png; never the uploader's file name (it can be personal data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class GenerationClaims:
    """What the manifest records about how a video was made: the generation assertion, and the inputs."""
    job_id: str
    prompt_sha256: str
    seed: int
    steps: int
    model: str
    width: int | None = None
    height: int | None = None
    frames: int | None = None
    watermark_payload_hex: str | None = None
    inputs: tuple[InputIngredient, ...] = ()  # ingredients, not part of the generation assertion

    def assertion_data(self) -> dict[str, Any]:
        """The assertion body: every field that is set (unset extras are left out rather than written as null)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "inputs" and getattr(self, f.name) is not None}


@dataclass(frozen=True)
class SignedVideo:
    data: bytes  # the input with the manifest store embedded
    manifest_label: str  # the active manifest's label, "urn:c2pa:<uuid>"
    manifest_json: str  # the manifest store as a Reader reports it


@dataclass
class ProvenanceReport:
    validation_state: str  # "Trusted" | "Valid" | "Invalid" | "Unsigned"
    manifest_label: str | None = None
    assertions: dict[str, Any] = field(default_factory=dict)  # assertion label -> data, active manifest
    validation_errors: list[str] = field(default_factory=list)  # failure codes, e.g. "assertion.bmffHash.mismatch"
    claim_generator: str | None = None  # "name/version" of the first claim_generator_info entry
    manifest_json: str | None = None
    ingredients: list[dict[str, Any]] = field(default_factory=list)  # title, format, relationship, sha256, bytes

    @property
    def trusted(self) -> bool:
        return self.validation_state == "Trusted"


@dataclass(frozen=True)
class SigningMaterial:
    """A certificate chain (end-entity first, then intermediates; not the root) and its end-entity private key."""
    chain_pem: str
    key_pem: str
    alg: str = "es256"
    # The root the chain ends in, for a verifier's trust anchors. Only known for the dev chain: in production the
    # verifier's anchors come from its own trust list, not from the signer.
    root_pem: str | None = None


# --------------------------------------------------------------------------------------------------------------------
# Development certificate authority
# --------------------------------------------------------------------------------------------------------------------

class DevCertificateAuthority:
    """A development chain, root -> intermediate -> signer (EC P-256, ES256), kept in one directory.

    Files: dev-root.pem (the trust anchor to give verifiers), chain.pem (signer + intermediate, what gets embedded),
    signer-key.pem (mode 0600). The root and intermediate private keys are discarded once they have signed: the
    chain never needs to issue another certificate, and a key that was never stored cannot leak.

    The end-entity certificate carries exactly what c2pa-rs's default trust policy requires: CA:FALSE,
    KeyUsage digitalSignature, SubjectKeyIdentifier, AuthorityKeyIdentifier and EKU emailProtection
    (without an EKU, or with codeSigning/serverAuth, or self-signed, verification fails).
    """

    ROOT_FILE = "dev-root.pem"
    CHAIN_FILE = "chain.pem"
    KEY_FILE = "signer-key.pem"
    LOCK_FILE = ".lock"
    ORGANIZATION = "vidgen development (not for production)"
    CA_VALIDITY = dt.timedelta(days=3650)
    SIGNER_VALIDITY = dt.timedelta(days=825)

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def ensure(self) -> SigningMaterial:
        """Load the chain, creating it first if it is missing or its signer certificate has expired.

        Safe against concurrent callers in other processes: creation happens under an exclusive lock file, and each
        file is written to a temporary name and renamed into place, so a reader never sees a half-written file.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._exclusive_lock():
            material = self._load()
            if material is None:
                self._create()
                material = self._load()
            assert material is not None
            return material

    def _load(self) -> SigningMaterial | None:
        paths = [self.directory / name for name in (self.ROOT_FILE, self.CHAIN_FILE, self.KEY_FILE)]
        if not all(path.exists() for path in paths):
            return None
        root_pem, chain_pem, key_pem = (path.read_text() for path in paths)
        signer_cert = x509.load_pem_x509_certificates(chain_pem.encode())[0]
        if signer_cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc):
            return None  # expired: issue a new chain (videos signed under the old root then verify as untrusted)
        return SigningMaterial(chain_pem=chain_pem, key_pem=key_pem, alg="es256", root_pem=root_pem)

    def _create(self) -> None:
        now = dt.datetime.now(dt.timezone.utc)
        root_key, intermediate_key, signer_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
        root = self._certificate("vidgen dev root", root_key, "vidgen dev root", root_key, now,
                                 self.CA_VALIDITY, is_ca=True, path_length=1)
        intermediate = self._certificate("vidgen dev intermediate", intermediate_key, "vidgen dev root", root_key,
                                         now, self.CA_VALIDITY, is_ca=True, path_length=0)
        signer = self._certificate("vidgen dev signer", signer_key, "vidgen dev intermediate", intermediate_key,
                                   now, self.SIGNER_VALIDITY, is_ca=False)
        key_pem = signer_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
        # Key first and root last: _load needs all three, so a crash part-way leaves an incomplete set that the
        # next call replaces wholesale.
        self._write_atomically(self.KEY_FILE, key_pem, mode=0o600)
        self._write_atomically(self.CHAIN_FILE, _pem(signer) + _pem(intermediate), mode=0o644)
        self._write_atomically(self.ROOT_FILE, _pem(root), mode=0o644)

    def _certificate(self, subject_cn: str, subject_key: ec.EllipticCurvePrivateKey, issuer_cn: str,
                     issuer_key: ec.EllipticCurvePrivateKey, now: dt.datetime, validity: dt.timedelta, *,
                     is_ca: bool, path_length: int | None = None) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(self._name(subject_cn))
            .issuer_name(self._name(issuer_cn))
            .public_key(subject_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between machines
            .not_valid_after(now + validity)
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=path_length), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(subject_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                           critical=False)
            .add_extension(_key_usage(certificate_signing=is_ca), critical=True)
        )
        if not is_ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]),
                                            critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def _name(self, common_name: str) -> x509.Name:
        return x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])

    def _write_atomically(self, name: str, content: bytes, mode: int) -> None:
        target = self.directory / name
        temporary = self.directory / f".{name}.{os.getpid()}.tmp"
        # Created with its final mode, so the key is never readable by others, not even briefly.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, mode)  # os.open's mode is filtered by the umask
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    @contextlib.contextmanager
    def _exclusive_lock(self) -> Iterator[None]:
        with open(self.directory / self.LOCK_FILE, "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)  # released by the kernel if the process dies
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def ensure_dev_chain(directory: Path) -> SigningMaterial:
    """The development signing chain under `directory`, created on first use (see DevCertificateAuthority)."""
    return DevCertificateAuthority(directory).ensure()


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_usage(*, certificate_signing: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not certificate_signing, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=certificate_signing,
        crl_sign=certificate_signing, encipher_only=False, decipher_only=False,
    )


# --------------------------------------------------------------------------------------------------------------------
# Signers
# --------------------------------------------------------------------------------------------------------------------

def load_signing_material(cert_chain_path: Path, key_path: Path, alg: str = "es256") -> SigningMaterial:
    """A production chain (end-entity first, intermediates after, PEM) and its private key (PEM) from disk."""
    chain_pem = Path(cert_chain_path).read_text()
    key_pem = Path(key_path).read_text()
    if not x509.load_pem_x509_certificates(chain_pem.encode()):
        raise ValueError(f"{cert_chain_path} holds no PEM certificate")
    serialization.load_pem_private_key(key_pem.encode(), password=None)  # fail here, not at the first signature
    return SigningMaterial(chain_pem=chain_pem, key_pem=key_pem, alg=_signing_alg_name(alg))


def material_signer(material: SigningMaterial, tsa_url: str | None = None) -> c2pa.Signer:
    """A c2pa signer holding the private key in-process."""
    info = c2pa.C2paSignerInfo(_SIGNING_ALGS[_signing_alg_name(material.alg)], material.chain_pem.encode(),
                               material.key_pem.encode(), tsa_url)
    return c2pa.Signer.from_info(info)


def callback_signer(sign_fn: Callable[[bytes], bytes], chain_pem: str, alg: str = "es256",
                    tsa_url: str | None = None) -> c2pa.Signer:
    """A c2pa signer whose signatures come from `sign_fn` (a KMS or HSM call); the private key stays there.

    `sign_fn(message)` must sign the message itself (hashing it with the algorithm's hash, e.g. SHA-256 for
    es256), not a digest of it. For ECDSA, COSE wants the raw r||s form; KMS/HSM APIs usually return DER, so a
    DER signature is converted here (c2pa-rs 0.91 happens to accept both, but nothing promises it will).
    """
    alg = _signing_alg_name(alg)
    component_bytes = _ECDSA_COMPONENT_BYTES.get(alg)

    def sign_for_cose(message: bytes) -> bytes:
        signature = sign_fn(message)
        if component_bytes is not None:
            signature = ecdsa_signature_to_raw(signature, component_bytes)
        return signature

    # The Signer keeps the ctypes trampoline, whose closure keeps sign_for_cose, alive as long as itself.
    return c2pa.Signer.from_callback(sign_for_cose, _SIGNING_ALGS[alg], chain_pem, tsa_url)


def make_signer(material: SigningMaterial | None = None, *, sign_fn: Callable[[bytes], bytes] | None = None,
                chain_pem: str | None = None, alg: str = "es256", tsa_url: str | None = None) -> c2pa.Signer:
    """A c2pa signer from either in-process material or a remote signing callback (with its chain)."""
    if (material is None) == (sign_fn is None):
        raise ValueError("give either signing material or a sign_fn, not both or neither")
    if material is not None:
        return material_signer(material, tsa_url)
    if not chain_pem:
        raise ValueError("a callback signer needs the certificate chain (chain_pem)")
    return callback_signer(sign_fn, chain_pem, alg, tsa_url)


def ecdsa_signature_to_raw(signature: bytes, component_bytes: int) -> bytes:
    """An ECDSA signature as raw r||s (IEEE P1363): DER input is decoded, raw input is passed through."""
    try:
        r, s = decode_dss_signature(signature)
        is_der = encode_dss_signature(r, s) == signature  # strict: a raw r||s that merely parses is not DER
    except ValueError:
        is_der = False
    if is_der:
        return r.to_bytes(component_bytes, "big") + s.to_bytes(component_bytes, "big")
    if len(signature) != 2 * component_bytes:
        raise ValueError(f"ECDSA signature is neither DER nor {2 * component_bytes} raw bytes ({len(signature)} bytes)")
    return signature


def _signing_alg_name(alg: str) -> str:
    name = alg.lower()
    if name not in _SIGNING_ALGS:
        raise ValueError(f"unsupported signing algorithm {alg!r}; one of {sorted(_SIGNING_ALGS)}")
    return name


# --------------------------------------------------------------------------------------------------------------------
# Sign and verify
# --------------------------------------------------------------------------------------------------------------------

def manifest_definition(claims: GenerationClaims) -> dict[str, Any]:
    """The manifest the Builder gets: who made the video (vidgen + model), how (trained algorithmic media), from
    which inputs (their ingredients are added by ``sign_video``), and that it may not be used for training or
    mining."""
    version = vidgen_version()
    created: dict[str, Any] = {
        "action": "c2pa.created",
        "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
        # A generator-info map; like claim_generator_info it takes extra keys, so the model rides along.
        "softwareAgent": {"name": "vidgen", "version": version, "io.vidgen.model": claims.model},
    }
    if claims.inputs:  # the SDK turns these labels into hashed links to the ingredient assertions
        created["parameters"] = {"ingredientIds": [_input_label(i) for i in range(len(claims.inputs))]}
    return {
        "claim_generator_info": [{"name": "vidgen", "version": version}],
        "assertions": [
            {
                "label": ACTIONS_LABEL,
                "data": {"actions": [created]},
            },
            {"label": GENERATION_LABEL, "data": claims.assertion_data()},
            {
                "label": TRAINING_MINING_LABEL,
                "data": {"entries": {use: {"use": "notAllowed"} for use in TRAINING_MINING_USES}},
            },
        ],
    }


def _input_label(index: int) -> str:
    return f"vidgen-input-{index}"


def ingredient_definition(ingredient: InputIngredient, index: int) -> dict[str, Any]:
    return {"title": ingredient.title, "relationship": INPUT_RELATIONSHIP, "label": _input_label(index),
            "metadata": {INPUT_SHA256_KEY: ingredient.sha256, INPUT_BYTES_KEY: len(ingredient.data)}}


def sign_video(data: bytes, *, signer: c2pa.Signer, claims: GenerationClaims, mime: str = "video/mp4") -> SignedVideo:
    """Embed a signed manifest for `claims` in `data`. The signer is not consumed and can sign again."""
    with c2pa.Context.from_dict(SIGNING_SETTINGS) as context, \
            c2pa.Builder(manifest_definition(claims), context=context) as builder:
        for index, ingredient in enumerate(claims.inputs):
            builder.add_ingredient(ingredient_definition(ingredient, index), ingredient.media_type,
                                   io.BytesIO(ingredient.data))
        signed = io.BytesIO()
        builder.sign(signer, mime, io.BytesIO(data), signed)
    signed_bytes = signed.getvalue()
    # Read it back for the label and the JSON as a verifier will see them (also proves it parses).
    with c2pa.Reader(mime, io.BytesIO(signed_bytes)) as reader:
        manifest_json = reader.json()
    return SignedVideo(data=signed_bytes, manifest_label=json.loads(manifest_json)["active_manifest"],
                       manifest_json=manifest_json)


def verification_settings(trust_anchors_pem: str | None) -> dict[str, Any]:
    """Reader settings: always check the chain against trust anchors; the anchors are the given PEM roots.

    Without anchors the signature and hashes are still checked, so an intact file is "Valid", never "Trusted".
    """
    settings: dict[str, Any] = {"version": 1, "verify": {"verify_trust": True}}
    if trust_anchors_pem:
        settings["trust"] = {"trust_anchors": trust_anchors_pem}
    return settings


def verify_video(data: bytes, *, trust_anchors_pem: str | None, mime: str = "video/mp4") -> ProvenanceReport:
    """Validate the manifest embedded in `data`. A file without one is reported "Unsigned", not raised.

    Raises c2pa.C2paError only when `data` cannot be parsed as `mime` at all.
    """
    with c2pa.Context.from_dict(verification_settings(trust_anchors_pem)) as context:
        reader = c2pa.Reader.try_create(mime, io.BytesIO(data), None, context)
        if reader is None:
            return ProvenanceReport(validation_state=UNSIGNED)
        with reader:
            manifest_json = reader.json()
    store = json.loads(manifest_json)
    label = store.get("active_manifest")
    manifest = store.get("manifests", {}).get(label, {})
    generator_info = (manifest.get("claim_generator_info") or [{}])[0]
    claim_generator = "/".join(str(generator_info[key]) for key in ("name", "version") if key in generator_info)
    return ProvenanceReport(
        validation_state=store.get("validation_state", "Invalid"),
        manifest_label=label,
        assertions={assertion["label"]: assertion.get("data") for assertion in manifest.get("assertions", [])},
        validation_errors=_failure_codes(store),
        claim_generator=claim_generator or None,
        manifest_json=manifest_json,
        ingredients=[_ingredient_summary(i) for i in manifest.get("ingredients", [])],
    )


def _ingredient_summary(ingredient: dict[str, Any]) -> dict[str, Any]:
    """What a verifier shows of an ingredient; sha256/bytes only where vidgen recorded them (its own inputs)."""
    metadata = ingredient.get("metadata") or {}
    return {"title": ingredient.get("title"), "format": ingredient.get("format"),
            "relationship": ingredient.get("relationship"), "sha256": metadata.get(INPUT_SHA256_KEY),
            "bytes": metadata.get(INPUT_BYTES_KEY)}


def _failure_codes(store: dict[str, Any]) -> list[str]:
    """Failure codes from the active manifest and from any ingredient deltas, in report order."""
    results = store.get("validation_results") or {}
    codes = [status["code"] for status in (results.get("activeManifest") or {}).get("failure", [])]
    for delta in results.get("ingredientDeltas") or []:
        codes += [status["code"] for status in (delta.get("validationDeltas") or {}).get("failure", [])]
    if not results:  # older report shape: a flat list
        codes += [status["code"] for status in store.get("validation_status") or []]
    return codes
