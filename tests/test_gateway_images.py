"""Image-to-video intake: POST /v1/videos with input_reference (a multipart file part or a JSON data URL), and
`vidgen submit --image`. The gateway runs over the in-memory fakes of tests/test_gateway_http.py (no Kafka)."""
from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from aiohttp import FormData
from skimage import data

from compliance.input_image import MAX_INPUT_IMAGE_BYTES
from gateway.app import MAX_CREATE_BODY_BYTES
from tests.fakes import FakeJobsView
from tests.samples import I2V_MODEL, face_png, image_file, no_face_png
from tests.test_gateway_http import BODY, Gateway, _json, assert_error, async_test
from vidgen.cli import main as vidgen_main

# The gateway's modules share state through string keys, as their contract says (gateway/app.py).
pytestmark = pytest.mark.filterwarnings("ignore:It is recommended to use web")

I2V_BODY = {**BODY, "model": I2V_MODEL, "size": "64x64"}


def data_url(image: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(image).decode()}"


async def post_multipart(gw: Gateway, image: bytes, headers=None, key=None):
    """What the openai SDK sends for client.videos.create(..., input_reference=open(path, "rb"))."""
    form = FormData({name: str(value) for name, value in I2V_BODY.items()})
    form.add_field("input_reference", image, filename="holiday photo.png", content_type="image/png")
    response = await gw.client.post("/v1/videos", data=form, headers={**gw.auth(key), **(headers or {})})
    return response, await _json(response)


def assert_no_blob_uri_shown(video: dict) -> None:
    assert "file:" not in json.dumps(video), "a blob URI is an internal path"


@async_test
async def test_a_multipart_upload_is_stored_as_a_blob_that_the_request_names(tmp_path):
    image = no_face_png()
    async with Gateway(tmp_path) as gw:
        response, video = await post_multipart(gw, image)
        assert response.status == 200, video
        [event] = gw.publisher.requests
        ref = event["params"]["input_reference"]
        assert gw.blobs.get(ref) == image and ref["dtype"] == "image/png" and f"/{video['id']}/" in ref["uri"]
        assert video["vidgen"]["params"]["input_reference"] == {"sha256": ref["sha256"], "bytes": len(image)}
        assert_no_blob_uri_shown(video)
        response, again = await gw.get(f"/v1/videos/{video['id']}")
        assert response.status == 200 and again["vidgen"]["params"] == video["vidgen"]["params"]
        assert_no_blob_uri_shown(again)


@async_test
async def test_a_json_body_takes_the_image_as_a_data_url(tmp_path):
    image = image_file(data.coffee(), "JPEG")
    async with Gateway(tmp_path) as gw:
        response, video = await gw.post({**I2V_BODY, "input_reference": data_url(image, "image/jpeg")})
        assert response.status == 200, video
        ref = gw.publisher.requests[-1]["params"]["input_reference"]
        assert gw.blobs.get(ref) == image and ref["dtype"] == "image/jpeg"
        response, video = await gw.post({**I2V_BODY, "input_reference": None})  # null: text-to-video
        assert response.status == 200 and gw.publisher.requests[-1]["params"]["input_reference"] is None


@async_test
async def test_the_largest_image_passes_the_body_limit_in_either_encoding(tmp_path):
    largest = no_face_png().ljust(MAX_INPUT_IMAGE_BYTES, b"\x00")  # bytes after the PNG's end are kept as sent
    assert len(data_url(largest)) + 20_000 < MAX_CREATE_BODY_BYTES
    async with Gateway(tmp_path) as gw:
        response, video = await gw.post({**I2V_BODY, "input_reference": data_url(largest)})
        assert response.status == 200, video
        response, video = await post_multipart(gw, largest)
        assert response.status == 200, video
        assert [gw.blobs.get(e["params"]["input_reference"]) for e in gw.publisher.requests] == [largest] * 2


@async_test
async def test_what_is_not_an_acceptable_image_is_a_400_naming_input_reference(tmp_path):
    png = no_face_png()
    too_many_pixels = image_file(np.zeros((4097, 16, 3), np.uint8))
    oversized = png.ljust(MAX_INPUT_IMAGE_BYTES + 1, b"\x00")
    async with Gateway(tmp_path) as gw:
        for upload, code, words in ((b"%PDF-1.7 not an image", "invalid_image", "not a PNG, JPEG or WebP"),
                                    (png[:len(png) // 2], "invalid_image", "cannot be decoded"),
                                    (oversized, "image_too_large", "10 MiB"),
                                    (too_many_pixels, "image_too_large", "16×4097 pixels")):
            response, error = await post_multipart(gw, upload)
            assert_error(response, error, 400, code, "input_reference")
            assert words in error["error"]["message"]
        response, error = await gw.post({**I2V_BODY, "input_reference": data_url(oversized)})
        assert_error(response, error, 400, "image_too_large", "input_reference")  # not a 413 from the body limit
        for value in ("https://example.com/cat.png", "data:image/png,rawbytes", "data:image/png;base64,@@@@", 7,
                      {"image_url": "https://example.com/cat.png"}):
            response, error = await gw.post({**I2V_BODY, "input_reference": value})
            assert_error(response, error, 400, "invalid_parameter", "input_reference")
        assert not gw.publisher.requests
        assert not (tmp_path / "blobs").exists() or not any((tmp_path / "blobs").rglob("input*"))


@async_test
async def test_an_idempotency_key_binds_the_image_by_its_hash(tmp_path):
    key = {"Idempotency-Key": "i2v-1"}
    jobs = FakeJobsView()  # the platform's job states, which every gateway process sees
    async with Gateway(tmp_path, jobs=jobs) as one:
        response, first = await post_multipart(one, no_face_png(), headers=key)
        assert response.status == 200, first
        response, again = await post_multipart(one, no_face_png(), headers=key)
        assert response.status == 200 and response.headers["Idempotent-Replayed"] == "true"
        assert again["id"] == first["id"] and len(one.publisher.requests) == 1
        response, error = await post_multipart(one, face_png(), headers=key)
        assert_error(response, error, 409, "idempotency_key_reused", "Idempotency-Key")
        response, error = await one.post(I2V_BODY, headers=key)  # the same request without its image
        assert_error(response, error, 409, "idempotency_key_reused", "Idempotency-Key")
        stored = one.publisher.requests[0]["params"]["input_reference"]
        assert one.blobs.get(stored) == no_face_png()  # the refused image never touched the accepted one's blob
    two = Gateway(tmp_path, jobs=jobs)  # another gateway process: no local record of the key, only the job state
    two.app["tenants"] = one.tenants
    async with two:
        response, error = await post_multipart(two, face_png(), headers=key, key=one.acme_key)
        assert_error(response, error, 409, "idempotency_key_reused", "Idempotency-Key")
        response, again = await post_multipart(two, no_face_png(), headers=key, key=one.acme_key)
        assert response.status == 200 and again["id"] == first["id"] and not two.publisher.requests


# -- vidgen submit --image ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("content", "message"), [(None, "cannot read it"),
                                                 (b"just text", "not a PNG, JPEG or WebP image")])
def test_submit_with_a_missing_or_invalid_image_fails_in_one_line_before_connecting(tmp_path, content, message,
                                                                                  monkeypatch):
    path = tmp_path / "input.png"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv("VIDGEN_VAR_DIR", str(tmp_path))
    with pytest.raises(SystemExit) as exited:
        vidgen_main(["submit", "a cat", "--model", I2V_MODEL, "--image", str(path)])
    text = exited.value.code
    assert isinstance(text, str) and "\n" not in text  # Python prints it and exits with status 1
    assert text.startswith(f"--image {path}: ") and message in text


@async_test
async def test_the_model_must_take_an_image_exactly_when_one_is_given(tmp_path):
    async with Gateway(tmp_path) as gw:
        response, error = await gw.post({**I2V_BODY, "model": "tiny-wan", "input_reference": data_url(no_face_png())})
        assert_error(response, error, 400, "invalid_parameter", "input_reference")  # text-to-video only
        response, error = await gw.post({**I2V_BODY, "model": "tiny-wan2.2-i2v-a14b"})
        assert_error(response, error, 400, "invalid_parameter", "input_reference")  # needs an image
        response, video = await gw.post({**I2V_BODY, "model": "tiny-wan2.2-i2v-a14b",
                                         "input_reference": data_url(no_face_png())})
        assert response.status == 200, video
        assert len(list((tmp_path / "blobs").rglob("input*"))) == 1  # the refused requests stored nothing
