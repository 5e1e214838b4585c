// vidgen web page: pick a model, submit a prompt, follow the job over the gateway's websocket, play the fMP4 segments
// with Media Source Extensions as they come (while the video is still decoding, and for a model that streams while
// generating, while later chunks are still being denoised), then the final signed video and its provenance.
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
    models: [], // the /v1/models entries the picker offers (id, vidgen facts)
    modelsError: null,
    model: null, // the model of the job submitted last (null: the gateway's default)
    // firstAppendProgress / firstPlayProgress: the denoising progress [value, max] when the first media segment was
    // appended to the live player / when it first played (currentTime > 0), and firstAppendIndex: how many progress
    // envelopes had arrived by then. Below max: the video played while denoising was still going on.
    live: { ...liveDefaults() },
    final: { src: null, played: false, maxTime: 0, error: null },
  });

  let apiKey = "";
  let job = null; // { id, terminal, ws, player, published, retries }
  let mode = "idle"; // which source the <video> shows: idle | live | final
  let current = null; // the job's denoising progress as last heard: [value, max]

  function liveDefaults() {
    return { codec: null, appended: 0, played: false, maxTime: 0, ended: false, error: null,
      firstAppendProgress: null, firstAppendIndex: null, firstAppendAt: null, firstPlayProgress: null,
      firstPlayAt: null };
  }

  // -- small helpers ----------------------------------------------------------------------------------------
  const authHeaders = () => ({ Authorization: `Bearer ${apiKey}` });

  // Media elements, plain links and websockets cannot send an Authorization header: their URLs carry a short-lived
  // token for the job's own media (POST /v1/videos/{id}/media-token), never the API key.
  function withToken(path) {
    const url = new URL(path, location.href);
    if (job && job.token) url.searchParams.set("token", job.token);
    return url.pathname + url.search;
  }

  async function refreshToken(current) {
    if (current.token && current.tokenExpires - Date.now() / 1000 > 300) return;
    const response = await fetch(`/v1/videos/${encodeURIComponent(current.id)}/media-token`, {
      method: "POST", headers: authHeaders(), cache: "no-store",
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    current.token = body.token;
    current.tokenExpires = body.expires_at;
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

  // Denoising still going on: some step of the job is yet to come.
  const generating = () => !!current && current[0] < current[1];

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
          if (diag.live.appended === 1) {
            diag.live.firstAppendProgress = current ? [...current] : null;
            diag.live.firstAppendIndex = diag.progress.length;
            diag.live.firstAppendAt = Math.round(performance.now());
            $("player-caption").textContent = generating()
              ? `Playing while generating (${diag.live.codec}): later chunks are still being denoised…`
              : `Playing while decoding (${diag.live.codec})…`;
          }
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
      if (mode === "live" && video.currentTime > 0 && !diag.live.firstPlayAt) {
        diag.live.firstPlayProgress = current ? [...current] : null;
        diag.live.firstPlayAt = Math.round(performance.now());
      }
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
    video.src = withToken(url);
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
        a.href = withToken(r.url);
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
    if (d.total_steps) {
      const value = d.status === "published" ? d.total_steps : d.step || 0;
      current = [value, d.total_steps];
      setProgress(value, d.total_steps);
    }
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
      case "progress": {
        diag.progress.push([d.value, d.max]);
        current = [d.value, d.max];
        setProgress(d.value, d.max);
        const chunk = d.chunk_count ? ` (chunk ${(d.chunk_index ?? 0) + 1} of ${d.chunk_count})` : "";
        setStatus(`Denoising: step ${d.value} of ${d.max}${chunk}${formatEta(d.eta_ms)}`);
        if (d.value >= d.max) setStatus("Denoised; decoding…");
        break;
      }
      case "checkpoint": break;
      case "segment":
        addSegment(d);
        setStatus(generating()
          ? `Segment ${d.index + 1} ready while denoising goes on (step ${current[0]} of ${current[1]})…`
          : `Decoding: segment ${d.index + 1} ready${d.is_last ? " (the last)" : ""}; checking and signing next…`);
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

  async function connect(current) {
    try {
      await refreshToken(current);
    } catch (error) {
      setTimeout(() => { if (job === current && !current.terminal) connect(current); }, 1000);
      return;
    }
    const url = new URL(`/v1/videos/${encodeURIComponent(current.id)}/events`, location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("token", current.token);
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

  // -- the model picker: /v1/models, and the size/frames/steps controls held to the chosen model's limits ----------
  let sizeChoices = []; // [value, label] of the page's sizes; each model offers those its limits allow
  let modelsFor = null; // the API key the list was loaded with
  let modelsTimer = null;

  function modelLabel(model) {
    const v = model.vidgen || {};
    const modalities = v.modalities || [];
    const notes = [];
    if (v.default) notes.push("default");
    if (!modalities.includes("t2v")) notes.push("image-to-video only: needs an input image");
    else if (v.streams_while_generating) notes.push("streams while generating");
    if (modalities.includes("audio")) notes.push("with sound");
    return notes.length ? `${model.id} — ${notes.join(", ")}` : model.id;
  }

  function scheduleModels() {
    clearTimeout(modelsTimer);
    modelsTimer = setTimeout(() => loadModels($("api-key").value.trim()), 300);
  }

  async function loadModels(key) {
    if (!key || key === modelsFor) return;
    modelsFor = key;
    const select = $("model");
    try {
      const response = await fetch("/v1/models", { headers: { Authorization: `Bearer ${key}` }, cache: "no-store" });
      if (!response.ok) throw new Error(await errorMessage(response));
      const list = await response.json();
      if (modelsFor !== key) return; // another key was entered meanwhile
      const models = (list.data || []).filter((m) => m && typeof m.id === "string");
      const previous = select.value;
      select.replaceChildren();
      for (const model of models) {
        const option = document.createElement("option");
        option.value = model.id;
        option.textContent = modelLabel(model);
        option.disabled = !((model.vidgen || {}).modalities || []).includes("t2v"); // this page uploads no image
        select.appendChild(option);
      }
      const usable = models.filter((m) => ((m.vidgen || {}).modalities || []).includes("t2v"));
      const chosen = usable.find((m) => m.id === previous) || usable.find((m) => (m.vidgen || {}).default) || usable[0];
      diag.models = models;
      diag.modelsError = null;
      select.disabled = !chosen;
      if (chosen) select.value = chosen.id;
      applyModel();
    } catch (error) {
      if (modelsFor !== key) return;
      modelsFor = null; // try again with the next key typed
      diag.modelsError = error.message;
      $("model-help").textContent = `Could not list the models: ${error.message}`;
    }
  }

  function chosenModel() {
    return diag.models.find((m) => m.id === $("model").value) || null;
  }

  // The chosen model's limits on the controls: sizes that are multiples of its spatial multiple, frame counts of
  // the form temporal_multiple·k+1 up to its maximum, steps up to its maximum. A value that no longer fits moves to
  // the nearest one that does.
  function applyModel() {
    const model = chosenModel();
    if (!model) return;
    const v = model.vidgen || {};
    const limits = v.limits || {};
    const spatial = limits.spatial_multiple || 16;
    const maxSide = limits.max_side || 1920;
    const temporal = limits.temporal_multiple || 4;
    const maxFrames = limits.max_frames || 257;

    const size = $("size");
    const previous = size.value;
    const fits = (value) => value.split("x").every((n) => Number(n) % spatial === 0 && Number(n) <= maxSide);
    let choices = sizeChoices.filter(([value]) => fits(value));
    if (!choices.length) {
      const side = Math.min(maxSide - (maxSide % spatial), spatial * Math.max(1, Math.round(256 / spatial)));
      choices = [[`${side}x${side}`, `${side}×${side}`]];
    }
    size.replaceChildren(...choices.map(([value, label]) => new Option(label, value)));
    size.value = choices.some(([value]) => value === previous) ? previous : choices[0][0];

    const frames = $("frames");
    frames.min = "1";
    frames.step = String(temporal);
    frames.max = String(maxFrames);
    const wanted = Number(frames.value) || 1;
    const k = Math.max(0, Math.min(Math.floor((maxFrames - 1) / temporal), Math.round((wanted - 1) / temporal)));
    if ((wanted - 1) % temporal !== 0 || wanted > maxFrames || wanted < 1) frames.value = String(temporal * k + 1);
    const suggestions = [2, 4, 8, 16].map((n) => temporal * n + 1).filter((n) => n <= maxFrames);
    $("frame-counts").replaceChildren(...suggestions.map((n) => new Option("", String(n))));
    $("frames-help").textContent = `${temporal}k+1, at most ${maxFrames}`;

    for (const option of $("steps").options) option.disabled = Number(option.value) > (limits.max_steps || 1000);

    const modalities = v.modalities || [];
    const description = (v.description || "").trim();
    $("model-help").textContent = [
      description && !/[.!?]$/.test(description) ? `${description}.` : description,
      v.streams_while_generating
        ? "Streams while generating: each chunk plays as soon as it is denoised, while the next ones are still "
          + "being made."
        : "Streams while decoding: the video plays once every step is done, while it is still being decoded.",
      modalities.includes("audio") ? "With a sound track." : "",
    ].filter(Boolean).join(" ");
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
    Object.assign(diag.live, liveDefaults());
    current = null;
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
    const model = $("model").value || null; // none chosen (the list is not loaded): the gateway's default
    diag.model = model;
    const body = {
      prompt: $("prompt").value,
      ...(model ? { model } : {}),
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
      job = { id, terminal: false, ws: null, player: null, published: false, retries: 0, token: null,
        tokenExpires: 0 };
      diag.jobId = id;
      mark("submitted");
      $("job-id").textContent = id;
      setStatus("Requested: waiting for the prompt stage…");
      await connect(job);
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
    $("api-key").addEventListener("change", () => {
      localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
      scheduleModels();
    });
    $("api-key").addEventListener("input", scheduleModels);
    sizeChoices = [...$("size").options].map((o) => [o.value, o.textContent]);
    $("model").addEventListener("change", applyModel);
    if (stored) loadModels(stored.trim());
    $("job-form").addEventListener("submit", submit);
    watchVideo($("player"));
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", main);
  else main();
})();
