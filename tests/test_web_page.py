"""The gateway's web page, end to end: headless Chromium (Debian's package, driven by Playwright) against the real
platform on the embedded broker and a real gateway process.

It types an API key and a prompt, submits, and checks what a person would see: the progress bar reaches 100 %, the
video element plays while the video is still decoding (Media Source Extensions over the fMP4 segments) and then
plays the final signed video without a media error, and the provenance summary names the C2PA manifest. With a model
that streams while generating (chunk after chunk, `tiny-helios`), picked in the page's model list, the first segment
plays while later chunks are still being denoised.

Chromium is Debian's (`apt-get install -y chromium`), launched through Playwright's `executable_path` with the
flags a closed network needs; Playwright never downloads a browser here (`playwright install` is not run).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from bench.common import wait_healthy
from streams.supervisor import STAGE_NAMES, PlatformProcesses

pytestmark = pytest.mark.integration

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "a lighthouse on a cliff at dawn"
JOB_TIMEOUT_S = 75  # from submit to the published video
STREAMING_MODEL = "tiny-helios"  # chunk-wise causal: its chunks leave the GPU agent as soon as they are final
MIN_CHUNKS = 4
PLATFORM_ENV = {
    "VIDGEN_KAFKA_SESSION_TIMEOUT_MS": "3000",  # Tansu holds joins for half of it
    "VIDGEN_LATENT_CHUNK_FRAMES": "1",  # 9 frames → 3 latent frames → 3 segments to stream
    # One torch thread per process: the GPU agent (a GPU's stand-in here) and the VAE decoder then work side by side
    # on two cores, as on separate machines. With all threads the agent takes both cores and the decoder, at nice 10,
    # decodes a streaming model's first chunk only once the last chunk is denoised (seen: 11 s after it was final).
    "OMP_NUM_THREADS": "1",
}


def _chromium() -> str:
    path = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if path is None:
        pytest.skip("Debian's chromium is not installed (the test command runs `apt-get install -y chromium`)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gateway_command(port: int) -> list[str]:
    return [sys.executable, "-m", "vidgen", "gateway", "--host", "127.0.0.1", "--port", str(port)]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The platform (every stage and the job tracker) and one gateway process; yields (base URL, dev API key)."""
    chromium = _chromium()
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install 'playwright~=1.65')")
    from gateway.tenants import load_or_create

    var_dir = tmp_path_factory.mktemp("var")
    platform = PlatformProcesses(var_dir, stages=(*STAGE_NAMES, "tracker"), env=PLATFORM_ENV)
    gateway_process = None
    try:
        platform.start()
        tenants_file = var_dir / "tenants.toml"
        _, key = load_or_create(tenants_file)  # the dev tenant, as the gateway would create it on its first run
        assert key, "a fresh tenants file must come with the dev tenant's key"
        port = _free_port()
        log = platform.log_dir / "gateway.log"
        with open(log, "ab") as log_file:
            gateway_process = subprocess.Popen(
                _gateway_command(port), env={**platform.env, "VIDGEN_TENANTS": str(tenants_file)},
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, gateway_process, 60.0, log)  # raises with the log's path if it exits or hangs
        yield dict(base=base, key=key, chromium=chromium, platform=platform, log=log)
    finally:
        if gateway_process is not None and gateway_process.poll() is None:
            gateway_process.terminate()
            try:
                gateway_process.wait(15)
            except subprocess.TimeoutExpired:
                gateway_process.kill()
                gateway_process.wait()
        platform.stop()


@pytest.fixture(scope="module")
def streaming_job():
    """(size, frames, steps, chunk_count, total_steps) of a job of the streaming model with at least MIN_CHUNKS
    chunks, from the model's own chunk plan; skips where the catalogue has no such model. Module-scoped and named
    before `gateway` by the test that uses it, so a skip costs no platform start."""
    from gpu_agents.models import ModelCatalogue

    catalogue = ModelCatalogue(device="cpu")
    if STREAMING_MODEL not in catalogue.model_ids():
        pytest.skip(f"the catalogue has no {STREAMING_MODEL!r} (gpu_agents/families/helios.py, a chunk-wise causal "
                    f"family, is not registered yet); `vidgen models` lists: {', '.join(catalogue.model_ids())}")
    facts = catalogue.facts(STREAMING_MODEL)
    assert facts.streams_while_generating, f"{STREAMING_MODEL} should stream while generating: {facts.as_dict()}"
    denoiser = catalogue.denoiser(STREAMING_MODEL)
    rules = facts.rules
    # Denoising the later chunks (50 steps each at 256x256 on one core: over a second a chunk) takes clearly longer
    # than the first segment's way to the page (decode, the tracker's two hops, the websocket, the fetch).
    side = rules.spatial_multiple * max(1, round(256 / rules.spatial_multiple))
    steps = 50
    for frames in range(1 + rules.temporal_multiple, rules.max_frames + 1, rules.temporal_multiple):
        chunk_count, total_steps = denoiser.chunk_plan(side, side, frames, steps)
        if chunk_count is not None and chunk_count >= MIN_CHUNKS:
            return dict(size=f"{side}x{side}", frames=frames, steps=steps, chunks=chunk_count, total_steps=total_steps)
    pytest.fail(f"no frame count up to {rules.max_frames} gives {STREAMING_MODEL} {MIN_CHUNKS} chunks")


def open_page(browser, base: str, problems: list[str], urls: list[str] | None = None):
    """The web page in a new tab, with every page error, console error and failed request noted in ``problems``
    (and every URL it asks for, websockets too, in ``urls``)."""
    page = browser.new_page()
    if urls is not None:
        page.on("request", lambda r: urls.append(r.url))
        page.on("websocket", lambda ws: urls.append(ws.url))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("response", lambda r: problems.append(f"HTTP {r.status} for {r.url}") if r.status >= 400 else None)
    page.goto(base + "/")
    return page


def _wait_until_published(page, job_id: str, gateway, each=None) -> dict:
    """The page's facts once its final video is playable (or the job ended otherwise, which fails the test);
    ``each`` sees the facts of every look."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        facts = _page_facts(page)
        if each is not None:
            each(facts)
        if facts["outcome"] or (facts["diag"]["final"]["src"] and facts["video"]["readyState"] >= 2):
            break
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} not published in {JOB_TIMEOUT_S} s; the page shows {json.dumps(facts)}; "
                        f"logs in {gateway['platform'].log_dir}")
        time.sleep(0.1)
    assert facts["outcome"] is None, f"the job ended badly: {facts['outcome']}"
    return facts


def _page_facts(page) -> dict:
    return page.evaluate("""() => {
        const bar = document.querySelector('[data-testid=progress]');
        const video = document.querySelector('[data-testid=player]');
        return {
            now: Number(bar.getAttribute('aria-valuenow')), max: Number(bar.getAttribute('aria-valuemax')),
            value: bar.value, barMax: bar.max,
            status: document.querySelector('[data-testid=status]').textContent,
            outcome: document.querySelector('[data-testid=outcome]').hidden
                ? null : document.querySelector('[data-testid=outcome]').textContent,
            video: {currentTime: video.currentTime, readyState: video.readyState, paused: video.paused,
                    error: video.error && `${video.error.code}: ${video.error.message}`, src: video.currentSrc},
            diag: window.vidgen,
        };
    }""")


def test_page_generates_streams_and_plays_the_signed_video(gateway):
    from playwright.sync_api import sync_playwright

    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=gateway["chromium"], args=CHROMIUM_ARGS)
        try:
            urls: list[str] = []
            page = open_page(browser, gateway["base"], problems, urls)

            page.get_by_label("API key").fill(gateway["key"])
            page.get_by_label("Prompt").fill(PROMPT)
            assert page.get_by_test_id("size").input_value() == "256x256"  # big enough to carry a watermark
            assert page.get_by_test_id("frames").input_value() == "9"
            page.get_by_test_id("steps").select_option("4")
            page.get_by_test_id("submit").click()

            page.wait_for_function("() => window.vidgen && window.vidgen.jobId", timeout=15_000)
            job_id = page.evaluate("() => window.vidgen.jobId")
            # The key is remembered in local storage.
            assert page.evaluate("() => localStorage.getItem('vidgen.apiKey')") == gateway["key"]

            # Follow the job until it ends, watching the bar move and the live video play.
            seen_values: list[float] = []

            def note_value(facts: dict) -> None:
                if facts["now"] not in seen_values:
                    seen_values.append(facts["now"])

            facts = _wait_until_published(page, job_id, gateway, each=note_value)

            # The bar reached 100 %.
            page.wait_for_function("""() => {
                const bar = document.querySelector('[data-testid=progress]');
                return bar.getAttribute('aria-valuenow') === bar.getAttribute('aria-valuemax')
                    && Number(bar.getAttribute('aria-valuemax')) === 4;
            }""", timeout=5_000)
            assert page.get_by_test_id("progress-text").inner_text() == "100%"
            # ... driven by the progress envelopes (one per denoising step, unless the gateway folded several).
            progress = page.evaluate("() => window.vidgen.progress")
            assert progress and progress[-1] == [4, 4], progress
            assert [v for v, _ in progress] == sorted(v for v, _ in progress), progress
            print("bar values seen:", seen_values, "progress envelopes:", progress)

            # While it was decoding, the segments played through Media Source Extensions.
            live = facts["diag"]["live"]
            assert live["error"] is None, live
            assert live["codec"] and live["codec"].startswith("avc1."), live
            assert live["appended"] >= 1 and live["played"] and live["maxTime"] > 0, live

            # The final signed video plays: time advances, no media error.
            page.wait_for_function("""() => {
                const v = document.querySelector('[data-testid=player]');
                return !v.paused && v.readyState >= 2 && !v.error && window.vidgen.final.played;
            }""", timeout=15_000)
            start = page.evaluate("() => document.querySelector('[data-testid=player]').currentTime")
            page.wait_for_function(
                f"""() => {{ const v = document.querySelector('[data-testid=player]');
                           return v.currentTime !== {start} || window.vidgen.final.maxTime > 0; }}""", timeout=10_000)
            facts = _page_facts(page)
            assert facts["video"]["error"] is None and facts["diag"]["final"]["error"] is None, facts
            assert facts["diag"]["final"]["src"] == f"/v1/videos/{job_id}/content"
            assert f"/v1/videos/{job_id}/content" in facts["video"]["src"]

            # The provenance summary: the C2PA manifest, the watermark, the renditions.
            provenance = page.get_by_test_id("provenance")
            provenance.wait_for(state="visible", timeout=10_000)
            label = page.get_by_test_id("manifest-label").inner_text()
            assert label.startswith("urn:"), f"no C2PA manifest label: {label!r}"
            assert "Signed by vidgen (C2PA)" in page.get_by_test_id("signed-by").inner_text()
            page.wait_for_function(
                "() => /^payload [0-9a-f]+/.test(document.querySelector('[data-testid=watermark]').textContent)",
                timeout=10_000)
            assert page.get_by_test_id("rendition-native").count() == 1
            href = page.get_by_test_id("rendition-native").get_attribute("href")
            assert href.startswith(f"/v1/videos/{job_id}/content?variant=native&token=")
            # The key never went into a URL: the video element, the links and the websocket carry a media token.
            assert not [u for u in urls if gateway["key"] in u or "api_key" in u], urls
            assert any(f"/v1/videos/{job_id}/events?token=" in u for u in urls), urls
            assert "token=" in facts["video"]["src"], facts["video"]["src"]
            assert not problems, problems
            print("page timeline (ms):", json.dumps(page.evaluate("() => window.vidgen.marks")))
        finally:
            browser.close()
    gateway["platform"].check_alive()


def test_page_shows_why_a_blocked_prompt_is_not_generated(gateway):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=gateway["chromium"], args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(gateway["base"] + "/")
            page.get_by_label("API key").fill(gateway["key"])
            page.get_by_label("Prompt").fill("Abr4ham L1ncoln giving a speech")  # a protected person
            page.get_by_test_id("submit").click()
            outcome = page.get_by_test_id("outcome")
            outcome.wait_for(state="visible", timeout=JOB_TIMEOUT_S * 1000)
            text = outcome.inner_text()
            print("outcome:", text)
            assert text.startswith("Flagged") and "not published" in text, text
            assert "no reason given" not in text, text
            assert page.get_by_test_id("status").inner_text() == "Flagged."
            assert page.get_by_test_id("provenance").is_hidden()
            assert page.evaluate("() => window.vidgen.final.src") is None
        finally:
            browser.close()


def test_page_picks_a_model_that_streams_while_generating_and_plays_it_before_the_last_step(streaming_job, gateway):
    """The model list comes from /v1/models; a chunk-wise causal model's first segment is appended to the live player
    (Media Source Extensions) and plays while denoising is still going on, as the page's own diagnostics show: the
    progress heard at that moment is below its maximum, and progress envelopes keep coming after it."""
    from playwright.sync_api import sync_playwright

    job = streaming_job
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=gateway["chromium"], args=CHROMIUM_ARGS)
        try:
            page = open_page(browser, gateway["base"], problems)
            assert page.get_by_test_id("model").is_disabled()  # no key, no list
            page.get_by_label("API key").fill(gateway["key"])

            # The picker lists the gateway's models, its default first and chosen; it says which stream while
            # generating, and offers no model that needs an input image (the page uploads none).
            page.wait_for_function("() => window.vidgen.models.length > 0 && !document.querySelector("
                                   "'[data-testid=model]').disabled", timeout=15_000)
            options = page.evaluate("""() => [...document.querySelector('[data-testid=model]').options].map(
                (o) => ({value: o.value, text: o.textContent, disabled: o.disabled}))""")
            by_id = {o["value"]: o for o in options}
            assert options[0]["value"] == page.get_by_test_id("model").input_value() == "tiny-wan", options
            assert STREAMING_MODEL in by_id, options
            assert by_id[STREAMING_MODEL]["text"] == f"{STREAMING_MODEL} — streams while generating", options
            assert not by_id[STREAMING_MODEL]["disabled"]
            assert "streams while generating" not in by_id["tiny-wan"]["text"], options
            assert by_id["tiny-wan2.2-i2v-a14b"]["disabled"], options

            page.get_by_test_id("model").select_option(STREAMING_MODEL)
            assert "Streams while generating" in page.get_by_test_id("model-help").inner_text()
            page.get_by_label("Prompt").fill(PROMPT)
            page.get_by_test_id("size").select_option(job["size"])
            page.get_by_test_id("frames").fill(str(job["frames"]))
            page.get_by_test_id("steps").select_option(str(job["steps"]))
            # The frames control takes the value as valid for this model (form validation would refuse it otherwise).
            assert page.evaluate("() => document.querySelector('[data-testid=frames]').checkValidity()")
            page.get_by_test_id("submit").click()

            page.wait_for_function("() => window.vidgen && window.vidgen.jobId", timeout=15_000)
            job_id = page.evaluate("() => window.vidgen.jobId")
            assert page.evaluate("() => window.vidgen.model") == STREAMING_MODEL
            video = page.evaluate("""async (id) => (await fetch(`/v1/videos/${id}`, {headers: {
                Authorization: `Bearer ${document.querySelector('[data-testid=api-key]').value}`}})).json()""", job_id)
            assert video["model"] == STREAMING_MODEL, video

            facts = _wait_until_published(page, job_id, gateway)

            diag = facts["diag"]
            live, progress = diag["live"], diag["progress"]
            total = job["total_steps"]
            print(f"job: {job}; live: {json.dumps(live)}; progress envelopes: {progress}; "
                  f"marks: {json.dumps(diag['marks'])}")
            assert progress and progress[-1] == [total, total], progress
            assert live["error"] is None and live["codec"] and live["codec"].startswith("avc1."), live
            # The first segment went into the live player, and played, while denoising was still going on.
            assert live["firstAppendProgress"] is not None, live
            value, maximum = live["firstAppendProgress"]
            assert maximum == total and value < total, (
                f"the first segment was appended at step {value} of {maximum}: not while generating; {live}")
            assert live["firstPlayProgress"] is not None and live["firstPlayProgress"][0] < total, (
                f"the live video first played at {live['firstPlayProgress']}: not while generating; {live}")
            later = [v for v, _ in progress[live["firstAppendIndex"]:]]
            assert later and max(later) == total and min(later) > value, (later, live)
            assert live["played"] and live["maxTime"] > 0 and live["appended"] >= 1, live
            print(f"first segment appended at step {value} of {total} ({100 * value / total:.0f} %), first played "
                  f"at step {live['firstPlayProgress'][0]}; segments appended live: {live['appended']} "
                  f"of {job['chunks']} chunks")

            # Then the final signed video plays.
            page.wait_for_function("""() => {
                const v = document.querySelector('[data-testid=player]');
                return !v.paused && v.readyState >= 2 && !v.error && window.vidgen.final.played;
            }""", timeout=15_000)
            page.wait_for_function("() => window.vidgen.final.maxTime > 0", timeout=10_000)
            facts = _page_facts(page)
            assert facts["video"]["error"] is None and facts["diag"]["final"]["error"] is None, facts
            assert facts["diag"]["final"]["src"] == f"/v1/videos/{job_id}/content"
            assert not problems, problems
        finally:
            browser.close()
    gateway["platform"].check_alive()
