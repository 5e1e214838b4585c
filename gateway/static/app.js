// vidgen web page: submit a prompt, follow the job over the gateway's websocket, play the fMP4 segments with
// Media Source Extensions while the video is still decoding, then the final signed video and its provenance.
// Plain browser JavaScript: no build step, no external scripts (the page works offline).
"use strict";

(() => {
  const KEY_STORAGE = "vidgen.apiKey";
  const TERMINAL = new Set(["published", "flagged", "failed", "cancelled"]);
  const FALLBACK_CODEC = "avc1.64001f"; // High profile, level 3.1: used only if the init segment has no avcC
  const $ = (id) => document.getElementById(id);

  // What happened on the page, for people debugging it and for the end-to-end test (read-only by convention).
  const diag = (window.vidgen = {
    jobId: null,
    envelopes: [], // envelope types in arrival order
    progress: [], // [value, max] of every progress envelope
    marks: {}, // first time (ms since the page loaded) of: submitted, progress, segment, livePlaying, published
    live: { codec: null, appended: 0, played: false, maxTime: 0, ended: false, error: null },
    final: { src: null, played: false, maxTime: 0, error: null },
  });

  let apiKey = "";
  let job = null; // { id, terminal, ws, player, published, retries }
  let mode = "idle"; // which source the <video> shows: idle | live | final

  // -- small helpers ----------------------------------------------------------------------------------------
  const authHeaders = () => ({ Authorization: `Bearer ${apiKey}` });

  // Media elements and plain links cannot send an Authorization header: the gateway accepts ?api_key= there.
  function withKey(path) {
    const url = new URL(path, location.href);
    url.searchParams.set("api_key", apiKey);
    return url.pathname + url.search;
  }

  async function fetchBytes(path) {
    const response = await fetch(path, { headers: authHeaders(), cache: "no-store" });
    if (!response.ok) throw new Error(`GET ${path}: HTTP ${response.status}`);
    return new Uint8Array(await response.arrayBuffer());
  }

  async function errorMessage(response) {
    try {
      const body = await response.json();
      if (body && body.error) return body.error.message || body.error.code;
    } catch (_) { /* not JSON */ }
    return `HTTP ${response.status}`;
  }

  function mark(name) { if (!(name in diag.marks)) diag.marks[name] = Math.round(performance.now()); }

  function setStatus(text) { $("status").textContent = text; }

  function setProgress(value, max) {
    if (!(max > 0)) return;
    const bar = $("progress");
    const v = Math.max(0, Math.min(value, max));
    bar.max = max;
    bar.value = v;
    bar.setAttribute("aria-valuemax", String(max));
    bar.setAttribute("aria-valuenow", String(v));
    const pct = Math.round((100 * v) / max);
    bar.setAttribute("aria-valuetext", `${pct}% (step ${v} of ${max})`);
    $("progress-text").textContent = `${pct}%`;
  }

  function queueText(tier, position, etaS) {
    // Where a waiting job stands in the fleet's queue (the `queued` envelope, or the state's queue_* fields).
    const head = `Queued (${tier || "?"} tier)`;
    if (!position) return `${head}: waiting for a GPU…`;
    return `${head}: position ${position}` + (etaS == null ? "" : `, about ${Math.max(1, Math.round(etaS))} s`);
  }

  function formatEta(ms) {
    if (ms == null) return "";
    const s = Math.max(0, Math.round(ms / 1000));
    return s < 60 ? ` · about ${s} s left` : ` · about ${Math.round(s / 60)} min left`;
  }

  function showOutcome(text, kind) {
    const el = $("outcome");
    el.textContent = text;
    el.dataset.kind = kind;
    el.hidden = false;
  }

  // -- the codec strings, from the init segment's sample entries -----------------------------------------------
  // ISO-BMFF: moov > trak > mdia > minf > stbl > stsd > avc1 > avcC. avcC's payload starts with
  // configurationVersion, AVCProfileIndication, profile_compatibility, AVCLevelIndication: "avc1.PPCCLL".
  // A video with sound also has an mp4a entry: the platform's AAC is always AAC-LC, "mp4a.40.2".
  const CONTAINERS = new Set(["moov", "trak", "mdia", "minf", "stbl"]);
  const AAC_LC_CODEC = "mp4a.40.2";

  function boxes(bytes, start, end, visit) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    let offset = start;
    while (offset + 8 <= end) {
      let size = view.getUint32(offset);
      const type = String.fromCharCode(...bytes.subarray(offset + 4, offset + 8));
      let header = 8;
      if (size === 1) {
        if (offset + 16 > end) return null;
        size = Number(view.getBigUint64(offset + 8));
        header = 16;
      } else if (size === 0) {
        size = end - offset;
      }
      if (size < header || offset + size > end) return null;
      const found = visit(type, offset + header, offset + size);
      if (found) return found;
      offset += size;
    }
    return null;
  }

  function codecStrings(init) {
    const hex = (b) => b.toString(16).padStart(2, "0");
    const codecs = [];
    let entry = "avc1";
    const visit = (type, body, end) => {
      if (CONTAINERS.has(type)) return boxes(init, body, end, visit);
      if (type === "stsd") return boxes(init, body + 8, end, visit); // version/flags + entry_count
      if (type === "avc1" || type === "avc3") { // VisualSampleEntry: 78 bytes of fields, then its boxes
        entry = type;
        return boxes(init, body + 78, end, visit);
      }
      if (type === "avcC" && end - body >= 4) {
        codecs.push(`${entry}.${hex(init[body + 1])}${hex(init[body + 2])}${hex(init[body + 3])}`);
      }
      if (type === "mp4a") codecs.push(AAC_LC_CODEC);
      return null; // keep walking: every track counts
    };
    boxes(init, 0, init.length, visit);
    return codecs;
  }

  // -- playing while decoding: Media Source Extensions over the fMP4 segments ----------------------------------
  class LivePlayer {
    constructor(video) {
      this.video = video;
      this.pending = new Map(); // segment index -> {url, init_url, is_last}
      this.next = 0; // the index to append next (segments must go in order)
      this.started = false;
      this.ready = false;
      this.pumping = false;
      this.closed = false;
      this.objectUrl = null;
    }

    add(segment) {
      if (this.closed || segment.index < this.next || this.pending.has(segment.index)) return;
      this.pending.set(segment.index, segment);
      if (!this.started) this.start(segment.init_url);
      else this.pump();
    }

    async start(initUrl) {
      this.started = true;
      try {
        if (!window.MediaSource) throw new Error("this browser has no Media Source Extensions");
        const init = await fetchBytes(initUrl);
        // A SourceBuffer must be told of every track the segments carry (the sound too), or appending them fails.
        const codecs = codecStrings(init);
        if (!codecs.some((c) => c.startsWith("avc"))) codecs.unshift(FALLBACK_CODEC);
        const codec = codecs.join(", ");
        const type = `video/mp4; codecs="${codec}"`;
        diag.live.codec = codec;
        if (!MediaSource.isTypeSupported(type)) throw new Error(`this browser cannot play ${type}`);
        if (this.closed) return;
        this.mediaSource = new MediaSource();
        this.objectUrl = URL.createObjectURL(this.mediaSource);
        const opened = new Promise((resolve) =>
          this.mediaSource.addEventListener("sourceopen", resolve, { once: true }));
        mode = "live";
        this.video.loop = false;
        this.video.src = this.objectUrl;
        await opened;
        if (this.closed) return;
        this.buffer = this.mediaSource.addSourceBuffer(type);
        this.buffer.mode = "segments"; // each fragment carries its own decode time (tfdt)
        await this.append(init);
        this.ready = true;
        $("player-caption").textContent = `Playing while decoding (${codec})…`;
        await this.pump();
      } catch (error) {
        this.fail(error);
      }
    }

    async pump() {
      if (!this.ready || this.pumping || this.closed) return;
      this.pumping = true;
      try {
        while (!this.closed && this.pending.has(this.next)) {
          const segment = this.pending.get(this.next);
          const bytes = await fetchBytes(segment.url);
          if (this.closed) return;
          await this.append(bytes);
          this.pending.delete(this.next);
          this.next += 1;
          diag.live.appended += 1;
          if (this.video.paused && !this.video.ended) playWithSound(this.video);
          if (segment.is_last && this.mediaSource.readyState === "open") {
            this.mediaSource.endOfStream();
            diag.live.ended = true;
          }
        }
      } catch (error) {
        this.fail(error);
      } finally {
        this.pumping = false;
      }
    }

    append(bytes) {
      return new Promise((resolve, reject) => {
        const done = () => { cleanup(); resolve(); };
        const failed = () => { cleanup(); reject(new Error("the segment could not be appended")); };
        const cleanup = () => {
          this.buffer.removeEventListener("updateend", done);
          this.buffer.removeEventListener("error", failed);
        };
        this.buffer.addEventListener("updateend", done);
        this.buffer.addEventListener("error", failed);
        this.buffer.appendBuffer(bytes);
      });
    }

    fail(error) {
      diag.live.error = String(error && error.message ? error.message : error);
      if (!this.closed) $("player-caption").textContent =
        `Live playback unavailable (${diag.live.error}); the video will play when it is published.`;
      this.close();
    }

    close() {
      this.closed = true;
      this.pending.clear();
    }

    release() {
      this.close();
      if (this.objectUrl) URL.revokeObjectURL(this.objectUrl);
      this.objectUrl = null;
    }
  }

  // -- the video element --------------------------------------------------------------------------------------
  // With sound where the browser lets a page start it (the click on Generate usually counts); where it refuses,
  // muted, and the player's own controls turn the sound on.
  function playWithSound(video) {
    video.play().catch((error) => {
      if (!error || error.name !== "NotAllowedError") return; // e.g. the source changed: not about sound
      video.muted = true;
      video.play().catch(() => {});
    });
  }

  function watchVideo(video) {
    const stats = () => (mode === "final" ? diag.final : mode === "live" ? diag.live : null);
    video.addEventListener("playing", () => {
      const s = stats();
      if (s) s.played = true;
      mark(mode === "final" ? "finalPlaying" : "livePlaying");
    });
    video.addEventListener("timeupdate", () => {
      const s = stats();
      if (s) s.maxTime = Math.max(s.maxTime, video.currentTime);
    });
    video.addEventListener("error", () => {
      const s = stats();
      const err = video.error;
      if (s && err) s.error = `${err.code}: ${err.message || "media error"}`;
    });
  }

  function playFinal(url) {
    const video = $("player");
    if (job && job.player) job.player.release();
    mode = "final";
    diag.final.src = url;
    video.loop = true; // a generated clip is short: keep it going
    video.src = withKey(url);
    playWithSound(video);
    $("player-caption").textContent = "The published video: watermarked and C2PA-signed.";
  }

  // -- provenance ---------------------------------------------------------------------------------------------
  function listItem(parent, build) {
    const li = document.createElement("li");
    build(li);
    parent.appendChild(li);
  }

  function renderProvenance(summary) {
    $("provenance").hidden = false;
    const label = summary.manifest_label || "";
    $("manifest-label").textContent = label || "(none)";
    $("signed-by").textContent = label
      ? "Signed by vidgen (C2PA): the video carries a Content Credentials manifest naming it AI-generated."
      : "Not signed: no C2PA manifest.";
    if (summary.watermark_payload) {
      $("watermark").textContent = `payload ${summary.watermark_payload} (48 bits of the job id, in every frame)`;
    } else if (summary.watermark_payload === null || summary.watermark_note) {
      $("watermark").textContent = `none${summary.watermark_note ? `: ${summary.watermark_note}` : ""}`;
    } else {
      $("watermark").textContent = "…";
    }

    const renditions = $("renditions");
    renditions.replaceChildren();
    for (const r of summary.renditions || []) {
      listItem(renditions, (li) => {
        const a = document.createElement("a");
        a.href = withKey(r.url);
        a.textContent = r.name;
        a.dataset.testid = `rendition-${r.name}`;
        li.appendChild(a);
        const bits = [r.width && r.height ? `${r.width}×${r.height}` : null,
          r.bitrate ? `${Math.round(r.bitrate / 1000)} kb/s` : null,
          r.signed === true ? "signed" : r.signed === false ? "unsigned" : null].filter(Boolean);
        if (bits.length) li.appendChild(document.createTextNode(` — ${bits.join(", ")}`));
      });
    }
    if (!(summary.renditions || []).length) listItem(renditions, (li) => { li.textContent = "—"; });

    $("compliance").textContent = summary.review.length
      ? `sent to human review, published meanwhile: ${summary.review.join("; ")}`
      : summary.scoresPending ? "…" : "allowed by the prompt and detection policies";

    const scores = $("scores");
    scores.replaceChildren();
    const entries = Object.entries(summary.scores || {}).sort(([a], [b]) => a.localeCompare(b));
    for (const [name, score] of entries) {
      listItem(scores, (li) => {
        li.dataset.detector = name;
        li.textContent = `${name}: ${Number(score).toFixed(3)}`;
      });
    }
    if (!entries.length) listItem(scores, (li) => { li.textContent = summary.scoresPending ? "…" : "not reported"; });
  }

  // The published envelope has the label and the renditions; the job's state adds watermark and detector scores.
  function summaryFrom(published, state) {
    const outputs = (state && state.outputs) || {};
    const links = (state && state.links) || {};
    const renditions = (published.renditions || outputs.renditions || []).map((r) => {
      const detail = (outputs.renditions || []).find((o) => o.name === r.name) || {};
      const url = r.url || (links.renditions || {})[r.name] || `/v1/videos/${job.id}/content?variant=${encodeURIComponent(r.name)}`;
      return { ...detail, ...r, url };
    });
    let scores = outputs.scores || null;
    const review = [];
    for (const flag of (state && state.flags) || []) {
      const reasons = (flag.reasons || []).join(", ") || flag.decision;
      review.push(`${flag.decision || "REVIEW"} at ${flag.stage || "?"} (${reasons})`);
      // A REVIEW that went on carries the detectors' scores, which the published event's fold may not keep.
      if (!outputs.scores && /post/i.test(flag.stage || "")) scores = { ...(scores || {}), ...(flag.scores || {}) };
    }
    return {
      manifest_label: published.manifest_label || outputs.manifest_label || "",
      watermark_payload: state ? (outputs.watermark_payload ?? null) : undefined,
      watermark_note: outputs.watermark_note || "",
      renditions,
      scores: scores || {},
      review,
      scoresPending: !state,
    };
  }

  async function fetchState(jobId) {
    const response = await fetch(`/v1/videos/${encodeURIComponent(jobId)}`, { headers: authHeaders() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    return body.vidgen || body; // the OpenAI-shaped video object carries the full state under `vidgen`
  }

  async function onPublished(data, state) {
    if (job.published) return;
    job.published = true;
    job.terminal = true;
    const bar = $("progress");
    setProgress(Number(bar.max) || 1, Number(bar.max) || 1);
    setStatus("Published.");
    const url = data.url || (state && state.links && state.links.content) || `/v1/videos/${job.id}/content`;
    playFinal(url);
    renderProvenance(summaryFrom(data, state));
    if (!state) {
      try {
        renderProvenance(summaryFrom(data, await fetchState(job.id)));
      } catch (error) {
        console.warn("vidgen: could not read the job's state", error);
      }
    }
    closeSocket();
  }

  function onEnded(status, data) {
    job.terminal = true;
    if (job.player) job.player.close();
    const reasons = [];
    if (Array.isArray(data.reasons)) reasons.push(...data.reasons);
    if (data.reason) reasons.push(data.reason);
    const why = reasons.length ? reasons.join("; ") : "no reason given";
    const where = data.stage ? ` at ${data.stage}` : "";
    const text = {
      flagged: `Flagged${where}: ${why}. The video is not published.`,
      failed: `Failed${where}: ${why}.`,
      cancelled: `Cancelled${where}: ${why}.`,
    }[status];
    setStatus(status[0].toUpperCase() + status.slice(1) + ".");
    showOutcome(text, status);
    $("player-caption").textContent = "No video.";
    closeSocket();
  }

  // -- the job's event feed -----------------------------------------------------------------------------------
  function addSegment(segment, initUrl) {
    if (job.published || job.terminal) return;
    if (!job.player) job.player = new LivePlayer($("player"));
    job.player.add({ index: segment.index, url: segment.url, init_url: segment.init_url || initUrl,
      is_last: !!segment.is_last });
  }

  function onState(d) {
    if (d.total_steps) setProgress(d.status === "published" ? d.total_steps : d.step || 0, d.total_steps);
    const initUrl = (d.links && d.links.init) || `/v1/videos/${job.id}/segments/init.mp4`;
    if (d.status === "published") {
      onPublished({ url: d.links && d.links.content, manifest_label: (d.outputs || {}).manifest_label,
        renditions: (d.outputs || {}).renditions }, d);
      return;
    }
    if (d.status === "flagged" || d.status === "failed" || d.status === "cancelled") {
      const flag = (d.flags || []).slice(-1)[0] || {};
      onEnded(d.status, { ...(d.error || {}), reasons: d.error && d.error.reasons ? d.error.reasons : flag.reasons });
      return;
    }
    setStatus(d.queue_position ? queueText(d.tier, d.queue_position, d.queue_eta_s)
      : { requested: "Requested: waiting for the prompt stage…", queued: "Queued: waiting for a GPU…",
          running: "Denoising…", decoding: "Decoding…", review: "Held for review…" }[d.status] || d.status);
    for (const segment of d.segments || []) addSegment(segment, initUrl);
  }

  function handle(envelope) {
    if (!envelope || typeof envelope.type !== "string" || !job) return;
    const d = envelope.data || {};
    if (d.job_id && d.job_id !== job.id) return;
    diag.envelopes.push(envelope.type);
    mark(envelope.type);
    switch (envelope.type) {
      case "state": onState(d); break;
      case "queued": setStatus(queueText(d.tier, d.position, d.eta_s)); break;
      case "started":
        setStatus(d.attempt > 1 ? `Resumed from step ${d.resumed_from_step} (attempt ${d.attempt})…` : "Denoising…");
        break;
      case "progress":
        diag.progress.push([d.value, d.max]);
        setProgress(d.value, d.max);
        setStatus(`Denoising: step ${d.value} of ${d.max}${formatEta(d.eta_ms)}`);
        if (d.value >= d.max) setStatus("Denoised; decoding…");
        break;
      case "checkpoint": break;
      case "segment":
        addSegment(d);
        setStatus(`Decoding: segment ${d.index + 1} ready${d.is_last ? " (the last)" : ""}; checking and signing next…`);
        break;
      case "flagged":
        if (d.terminal) onEnded("flagged", d);
        else setStatus(`Flagged for review (${(d.reasons || []).join("; ") || d.decision}); it goes on…`);
        break;
      case "published": onPublished(d, null); break;
      case "failed": onEnded("failed", d); break;
      case "cancelled": onEnded("cancelled", d); break;
      default: break; // types this page does not know
    }
  }

  function closeSocket() {
    if (job && job.ws && job.ws.readyState <= WebSocket.OPEN) job.ws.close(1000);
  }

  function connect(current) {
    const url = new URL(`/v1/videos/${encodeURIComponent(current.id)}/events`, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("api_key", apiKey);
    const ws = new WebSocket(url.href);
    current.ws = ws;
    ws.addEventListener("message", (message) => {
      current.retries = 0;
      let envelope;
      try { envelope = JSON.parse(message.data); } catch (_) { return; }
      if (job === current) handle(envelope);
    });
    ws.addEventListener("close", (event) => {
      if (job !== current || current.terminal) return;
      // Dropped (too slow, the gateway restarting, the network): reconnect; the first envelope is the state again.
      current.retries += 1;
      if (current.retries > 8) {
        showOutcome(`Lost the job's event feed (close code ${event.code}). Reload to try again.`, "error");
        return;
      }
      setTimeout(() => { if (job === current && !current.terminal) connect(current); }, 500 * current.retries);
    });
  }

  // -- the form -----------------------------------------------------------------------------------------------
  function resetJobView() {
    if (job) {
      job.terminal = true;
      closeSocket();
      if (job.player) job.player.release();
    }
    mode = "idle";
    const video = $("player");
    video.removeAttribute("src");
    video.load();
    Object.assign(diag.live, { codec: null, appended: 0, played: false, maxTime: 0, ended: false, error: null });
    Object.assign(diag.final, { src: null, played: false, maxTime: 0, error: null });
    diag.envelopes = [];
    diag.marks = {};
    diag.progress = [];
    $("progress").max = 1;
    setProgress(0, 1);
    $("outcome").hidden = true;
    $("provenance").hidden = true;
    $("player-caption").textContent = "Waiting for the first segment…";
  }

  async function submit(event) {
    event.preventDefault();
    apiKey = $("api-key").value.trim();
    localStorage.setItem(KEY_STORAGE, apiKey);
    const button = $("submit");
    button.disabled = true;
    resetJobView();
    $("job").hidden = false;
    $("job-id").textContent = "";
    setStatus("Submitting…");
    const body = {
      prompt: $("prompt").value,
      size: $("size").value,
      frames: Number($("frames").value),
      steps: Number($("steps").value),
      seed: Number($("seed").value) || 0,
      preset: "fast", // guidance 1: one transformer pass per step
    };
    try {
      const response = await fetch("/v1/videos", {
        method: "POST",
        headers: { ...authHeaders(), "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      const video = await response.json();
      const id = video.id || video.job_id;
      job = { id, terminal: false, ws: null, player: null, published: false, retries: 0 };
      diag.jobId = id;
      mark("submitted");
      $("job-id").textContent = id;
      setStatus("Requested: waiting for the prompt stage…");
      connect(job);
    } catch (error) {
      setStatus("Not submitted.");
      showOutcome(`Could not submit: ${error.message}`, "error");
    } finally {
      button.disabled = false;
    }
  }

  function main() {
    const stored = localStorage.getItem(KEY_STORAGE);
    if (stored) $("api-key").value = stored;
    $("api-key").addEventListener("change", () => localStorage.setItem(KEY_STORAGE, $("api-key").value.trim()));
    $("job-form").addEventListener("submit", submit);
    watchVideo($("player"));
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
  else main();
})();
