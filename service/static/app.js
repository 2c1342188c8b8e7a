// swissroll-diffusion web page: fetch /trajectory (and /forward on the same points' scale), animate either on a
// canvas with the learned field (/field) and predicted x0 overlaid, compare the final samples with real data, load
// the same run as MP4. Plain ES2020, no build step, no external resources: the service must work offline.
// Point clouds travel as .npy float16 (format=npy&dtype=float16: 3.7x smaller than the JSON), parsed below.
"use strict";

(() => {
  const AXIS = 2.5; // fixed axes [-AXIS, AXIS] in normalized coordinates, so the cloud never jumps
  const BASE_FPS = 10; // playback rate at 1x speed, in trajectory frames per second
  const REF_POINTS = 4000;
  const MP4 = { fps: 10, size: 480 };
  const FIELD = { grid: 19, extent: 2.3 }; // arrows every ~0.26 units, inside the axes
  const QUALITY = { points: 2000, directions: 128 }; // sliced W2 on a subsample, computed here

  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("controls"), model: $("model"), modelInfo: $("model-info"), sampler: $("sampler"), samplerInfo: $("sampler-info"),
    steps: $("steps"), stepsHint: $("steps-hint"), n: $("n"), seed: $("seed"), seedHint: $("seed-hint"),
    eta: $("eta"), etaField: $("eta-field"), etaHint: $("eta-hint"), run: $("run"), busy: $("busy"),
    error: $("error"), canvas: $("canvas"), play: $("play"), slider: $("slider"), speed: $("speed"),
    frameLabel: $("frame-label"), refLabel: $("ref-label"), latency: $("latency"),
    loadMp4: $("load-mp4"), video: $("video"), videoStatus: $("video-status"),
    processReverse: $("process-reverse"), processForward: $("process-forward"), showField: $("show-field"),
    showX0: $("show-x0"), compare: $("compare"), canvasReal: $("canvas-real"), canvasWrap: $("canvas-wrap"),
    quality: $("quality"), ptsLabel: $("pts-label"), realItem: $("real-item"), x0Item: $("x0-item"),
    fieldItem: $("field-item"), fieldLabel: $("field-label"),
    conditionField: $("condition-field"), usePosition: $("use-position"), position: $("position"),
    positionValue: $("position-value"), guidance: $("guidance"), guidanceValue: $("guidance-value"),
  };
  const ctx = el.canvas.getContext("2d");

  const state = {
    models: new Map(), // name -> /models summary
    samplers: new Map(),
    stepsTouched: false, // the user typed a step count: keep it (clamped) across sampler changes
    controller: null, // AbortController of the /trajectory request in flight
    run: null, // {query, seed, sampler, steps, n, timesteps, frames: Float32Array[]}
    frame: 0,
    playing: false,
    clock: 0, // fractional frame position while playing
    lastTs: null,
    ref: null, // Float32Array [x0, y0, x1, y1, ...] of reference data points (normalized)
    background: null, // offscreen canvas: axes, grid, reference cloud
    palette: null,
    mode: "reverse", // which process the canvas shows: "reverse" (the run) or "forward" (real data noised)
    fwd: null, // {seed, levels, frames: Float32Array[]}: /forward with the run's n, steps and seed
    real: null, // Float32Array: real data (the forward process's frame 0)
    fields: new Map(), // level -> {points, eps} from /field
    fieldRequests: new Map(), // level -> promise of the /field request (one per level)
    t0: 0, // when the current run was requested (time to first frame)
    firstFrameDrawn: true,
  };

  // ---------------------------------------------------------------- API

  class ApiError extends Error {}

  async function describeError(resp) {
    let body = null;
    try {
      body = await resp.json();
    } catch (_) {
      /* not JSON */
    }
    const detail = body && body.detail;
    let msg;
    if (Array.isArray(detail)) msg = detail.map((d) => (d && d.msg) || JSON.stringify(d)).join("; ");
    else if (typeof detail === "string") msg = detail;
    else msg = resp.statusText || "request failed";
    const params = Array.isArray(detail)
      ? detail.map((d) => d && Array.isArray(d.loc) && d.loc[d.loc.length - 1]).filter(Boolean)
      : [];
    let text;
    if (resp.status === 422) text = `Invalid input (422): ${msg}`;
    else if (resp.status === 503) {
      const retry = resp.headers.get("Retry-After");
      text = `Server busy (503): ${msg}` + (retry ? ` — retry in ${retry} s.` : "");
    } else if (resp.status === 504) text = `Timed out (504): ${msg}`;
    else if (resp.status === 404) text = `Not found (404): ${resp.url.replace(location.origin, "")}`;
    else text = `Error ${resp.status}: ${msg}`;
    const err = new ApiError(text);
    err.params = params;
    return err;
  }

  async function apiGet(path, params, signal) {
    const url = params ? `${path}?${new URLSearchParams(params)}` : path;
    let resp;
    try {
      resp = await fetch(url, { signal, headers: { Accept: "application/json" } });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(`Network error: could not reach the server (${e.message}).`);
    }
    if (!resp.ok) throw await describeError(resp);
    return resp;
  }

  // ---------------------------------------------------------------- .npy

  let halfTable = null; // float16 bit pattern -> value, built once (256 kB)
  function halfToFloat(bits) {
    if (!halfTable) {
      halfTable = new Float32Array(65536);
      for (let h = 0; h < 65536; h++) {
        const sign = h & 0x8000 ? -1 : 1;
        const exp = (h >> 10) & 0x1f;
        const frac = h & 0x3ff;
        halfTable[h] = exp === 0 ? sign * frac * 2 ** -24
          : exp === 31 ? (frac ? NaN : sign * Infinity)
            : sign * (1 + frac / 1024) * 2 ** (exp - 15);
      }
    }
    const out = new Float32Array(bits.length);
    for (let i = 0; i < bits.length; i++) out[i] = halfTable[bits[i]];
    return out;
  }

  // NumPy's .npy format (v1-v3): magic, header length, a Python-literal header, then the raw little-endian array.
  function parseNpy(buffer) {
    const bytes = new Uint8Array(buffer);
    if (bytes[0] !== 0x93 || String.fromCharCode(...bytes.subarray(1, 6)) !== "NUMPY") throw new ApiError("Bad response: not an .npy array.");
    const view = new DataView(buffer);
    const [lenBytes, headerLen] = bytes[6] === 1 ? [2, view.getUint16(8, true)] : [4, view.getUint32(8, true)];
    const start = 8 + lenBytes;
    const header = new TextDecoder().decode(bytes.subarray(start, start + headerLen));
    const descr = /'descr':\s*'([^']+)'/.exec(header);
    const shape = /'shape':\s*\(([^)]*)\)/.exec(header);
    if (!descr || !shape || /'fortran_order':\s*True/.test(header)) throw new ApiError("Bad response: unsupported .npy header.");
    const dims = shape[1].split(",").filter((d) => d.trim()).map(Number);
    const count = dims.reduce((a, b) => a * b, 1);
    const offset = start + headerLen; // a multiple of 64 by the format, so typed views are aligned
    let data;
    if (descr[1] === "<f4") data = new Float32Array(buffer, offset, count);
    else if (descr[1] === "<f2") data = halfToFloat(new Uint16Array(buffer, offset, count));
    else throw new ApiError(`Bad response: unsupported .npy dtype ${descr[1]}.`);
    return { shape: dims, data };
  }

  // [frames, n, 2] -> one Float32Array view of [x0, y0, x1, y1, ...] per frame (no copies)
  function splitFrames(data, frames, n, offset = 0) {
    return Array.from({ length: frames }, (_, k) => data.subarray(offset + k * n * 2, offset + (k + 1) * n * 2));
  }

  async function getNpy(path, params, signal) {
    const resp = await apiGet(path, { ...params, format: "npy", dtype: "float16" }, signal);
    const bytes = Number(resp.headers.get("Content-Length")) || 0;
    return { resp, npy: parseNpy(await resp.arrayBuffer()), bytes };
  }

  // ---------------------------------------------------------------- errors and status

  function showError(message, params = []) {
    el.error.textContent = message;
    el.error.hidden = false;
    for (const name of params) {
      const input = el.form.elements.namedItem(name);
      if (input) input.setAttribute("aria-invalid", "true");
    }
  }

  function clearError() {
    el.error.hidden = true;
    el.error.textContent = "";
    for (const input of el.form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  }

  function setBusy(busy) {
    el.busy.hidden = !busy;
    el.run.textContent = busy ? "Sampling…" : "Sample";
    el.form.setAttribute("aria-busy", String(busy));
  }

  // ---------------------------------------------------------------- controls

  const current = () => state.samplers.get(el.sampler.value);

  function populateSamplers(list, preferred) {
    state.samplers = new Map(list.map((s) => [s.name, s]));
    el.sampler.replaceChildren(
      ...list.map((s) => {
        const opt = document.createElement("option");
        opt.value = s.name;
        opt.textContent = s.name;
        opt.title = s.description;
        return opt;
      }),
    );
    el.sampler.value = state.samplers.has(preferred) ? preferred : list[0].name;
    el.sampler.disabled = false;
    el.run.disabled = false;
    applySampler();
  }

  function applySampler() {
    const s = current();
    if (!s) return;
    el.samplerInfo.textContent = `${s.description}${s.paper ? ` — ${s.paper}` : ""}`;
    const { min, max } = s.steps;
    el.steps.min = min;
    el.steps.max = max;
    if (!state.stepsTouched || el.steps.value === "") el.steps.value = s.steps.default;
    else el.steps.value = clamp(Math.round(Number(el.steps.value)) || s.steps.default, min, max);
    const tuned = Object.keys(s.tuned_timesteps || {});
    el.stepsHint.textContent = `${min}–${max}, default ${s.steps.default}` + (tuned.length ? ` · tuned at ${tuned.join(", ")}` : "");
    const eta = s.params && s.params.eta;
    el.etaField.hidden = !eta;
    if (eta) {
      el.eta.min = eta.min;
      el.eta.max = eta.max;
      if (el.eta.value === "") el.eta.value = eta.default;
      el.etaHint.textContent = `${eta.min}–${eta.max}; ${eta.description}`;
    }
  }

  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

  function readQuery() {
    const s = current();
    const q = { model: el.model.value, sampler: el.sampler.value };
    const n = el.n.value.trim();
    const steps = el.steps.value.trim();
    const seed = el.seed.value.trim();
    if (n !== "") q.n = n; // sent as typed: the API validates and its message is shown
    if (steps !== "") q.steps = steps;
    if (seed !== "") q.seed = seed;
    if (s && s.params && s.params.eta && el.eta.value.trim() !== "") q.eta = el.eta.value.trim();
    if (conditioned()) {
      q.position = el.position.value;
      q.guidance = el.guidance.value;
    }
    return q;
  }

  // A conditional model (its /models summary has a condition) with the position box ticked.
  function conditioned() {
    const m = state.models.get(el.model.value);
    return Boolean(m && m.condition && el.usePosition.checked);
  }

  function syncUrl(query) {
    const url = new URL(location.href);
    url.search = new URLSearchParams(query).toString();
    history.replaceState(null, "", url);
  }

  // ---------------------------------------------------------------- sampling

  // keepSeed: the same run again (e.g. now with predicted x0), whatever the seed field says
  async function runTrajectory(keepSeed = false) {
    if (!current()) return;
    const query = readQuery();
    if (keepSeed && state.run) query.seed = state.run.seed;
    if (el.showX0.checked) query.include_x0 = "true";
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    clearError();
    setBusy(true);
    const t0 = performance.now();
    try {
      const { resp, npy, bytes } = await getNpy("/trajectory", query, controller.signal);
      const roundTrip = performance.now() - t0;
      // The seed as a string from the header: seeds go up to 2^63-1, beyond a JS number's exact range.
      const seed = resp.headers.get("X-Seed");
      const timesteps = (resp.headers.get("X-Timesteps") || "").split(",").filter(Boolean).map(Number);
      const withX0 = npy.shape.length === 4; // [2, steps + 1, n, 2]: frames, then x0 predicted from each frame
      const [frameCount, n] = withX0 ? npy.shape.slice(1, 3) : npy.shape.slice(0, 2);
      const elapsed = resp.headers.get("X-Elapsed-Ms");
      delete query.include_x0;
      state.run = {
        query,
        model: query.model,
        seed,
        sampler: resp.headers.get("X-Sampler"),
        steps: timesteps.length,
        spacing: resp.headers.get("X-Spacing"),
        n,
        eta: query.eta,
        timesteps,
        frames: splitFrames(npy.data, frameCount, n),
        x0: withX0 ? splitFrames(npy.data, frameCount, n, frameCount * n * 2) : null,
      };
      el.canvas.dataset.hasX0 = String(withX0);
      // The same points again (x0 added): the forward frames and the quality figure still hold.
      const sameRun = state.fwd && state.fwd.key === `${n}|${timesteps.length}|${seed}`;
      if (!sameRun) {
        state.fwd = null;
        state.real = null;
        el.quality.textContent = "";
      }
      state.t0 = t0;
      state.firstFrameDrawn = false;
      if (!keepSeed) syncUrl(query);
      if (!keepSeed) el.seedHint.textContent = query.seed !== undefined ? "fixed seed" : `blank = random · this run: ${seed}`;
      el.latency.replaceChildren(
        strong(`${Math.round(roundTrip)} ms`), " round trip · ",
        strong(`${elapsed} ms`), " server compute · ",
        `${n} points × ${frameCount} frames` + (bytes ? ` · ${formatBytes(bytes)}` : ""),
        " · seed ", seedChip(seed),
      );
      el.slider.disabled = false;
      el.play.disabled = false;
      el.loadMp4.disabled = false;
      el.canvas.dataset.sampler = state.run.sampler;
      if (sameRun) {
        showRun();
        return;
      }
      const forward = loadForward(state.run, controller.signal); // real data and the noising, same n, steps, seed
      if (state.mode === "forward") await forward;
      showRun();
      await forward;
      await loadQuality(state.run, controller.signal);
    } catch (e) {
      if (e.name === "AbortError") return;
      showError(e.message, e.params || []);
    } finally {
      if (state.controller === controller) {
        state.controller = null;
        setBusy(false);
      }
    }
  }

  // The view's frames from the start: the first one now, then play (or the last one, for reduced motion).
  function showRun() {
    const frames = activeFrames();
    if (!frames) return;
    el.slider.max = String(frames.length - 1);
    el.canvas.dataset.frames = String(frames.length);
    prefetchFields();
    if (window.matchMedia("(prefers-reduced-motion: reduce)").matches) {
      pause();
      setFrame(frames.length - 1);
    } else {
      setFrame(0);
      play();
    }
  }

  async function loadForward(run, signal) {
    const q = { model: run.model, n: run.n, steps: run.steps, seed: run.seed };
    const { resp, npy } = await getNpy("/forward", q, signal);
    const levels = (resp.headers.get("X-Levels") || "").split(",").filter(Boolean).map(Number);
    if (state.run !== run) return;
    const key = `${run.n}|${run.steps}|${run.seed}`;
    state.fwd = { key, levels, frames: splitFrames(npy.data, npy.shape[0], npy.shape[1]) };
    state.real = state.fwd.frames[0];
    el.canvas.dataset.forwardFrames = String(npy.shape[0]);
    updateLegend();
    if (state.mode === "forward") prefetchFields();
    draw();
  }

  // The real-vs-real floor needs a second, independent real sample: the next seed's data.
  async function loadQuality(run, signal) {
    if (state.run !== run || !state.real) return;
    const other = String((BigInt(run.seed) + 1n) % 2n ** 63n);
    const floor = await getNpy("/forward", { model: run.model, n: run.n, steps: 1, seed: other }, signal);
    if (state.run !== run) return;
    showQuality(run, floor.npy.data.subarray(0, run.n * 2));
  }

  // ---------------------------------------------------------------- original vs generated

  // Sliced Wasserstein-2 between two clouds (as training/metrics.py): the 1D W2 of their projections on fixed
  // random directions, exact by sorting, averaged. On the first QUALITY.points points of each.
  function slicedW2(a, b) {
    const m = Math.min(a.length, b.length, 2 * QUALITY.points) / 2;
    const rand = mulberry32(7);
    const pa = new Float64Array(m);
    const pb = new Float64Array(m);
    let total = 0;
    for (let d = 0; d < QUALITY.directions; d++) {
      const angle = 2 * Math.PI * rand();
      const c = Math.cos(angle);
      const s = Math.sin(angle);
      for (let i = 0; i < m; i++) {
        pa[i] = a[2 * i] * c + a[2 * i + 1] * s;
        pb[i] = b[2 * i] * c + b[2 * i + 1] * s;
      }
      pa.sort();
      pb.sort();
      let sum = 0;
      for (let i = 0; i < m; i++) sum += (pa[i] - pb[i]) ** 2;
      total += sum / m;
    }
    return { w2: Math.sqrt(total / QUALITY.directions), m };
  }

  function showQuality(run, otherReal) {
    const generated = run.frames[run.frames.length - 1];
    const model = slicedW2(generated, state.real);
    const floor = slicedW2(otherReal, state.real);
    const ratio = model.w2 / floor.w2;
    el.quality.replaceChildren(
      "Generated vs real: sliced W2 ", strong(model.w2.toFixed(3)),
      " · real vs real (the floor at this n) ", strong(floor.w2.toFixed(3)),
      ` · ${ratio.toFixed(2)}× the floor (${model.m} points, ${QUALITY.directions} directions; small n is noisy).`,
    );
    el.quality.dataset.ratio = ratio.toFixed(3);
  }

  function strong(text) {
    const b = document.createElement("strong");
    b.textContent = text;
    return b;
  }

  function seedChip(seed) {
    const b = document.createElement("button");
    b.type = "button";
    b.className = "chip";
    b.textContent = seed;
    b.title = "Use this seed (fills the seed field)";
    b.addEventListener("click", () => {
      el.seed.value = seed;
      el.seedHint.textContent = "fixed seed";
    });
    return b;
  }

  const formatBytes = (b) => (b >= 1e6 ? `${(b / 1e6).toFixed(1)} MB` : `${Math.max(1, Math.round(b / 1e3))} kB`);

  // ---------------------------------------------------------------- reference data

  // The data the model was trained on: sklearn's make_swiss_roll, coordinates (x, z), normalized with the
  // checkpoint's own mean/std. Drawn client-side from the same distribution (t ~ 1.5π(1 + 2U), isotropic
  // Gaussian noise), so the reference is the real data, not the model's output.
  function buildReference(data) {
    const mean = data && data.mean;
    const std = data && data.std;
    if (!Array.isArray(mean) || !Array.isArray(std) || mean.length < 2 || std.length < 2) return null;
    const noise = Number(data.noise) || 0;
    const rand = mulberry32(12345);
    const gauss = () => Math.sqrt(-2 * Math.log(1 - rand())) * Math.cos(2 * Math.PI * rand());
    const out = new Float32Array(REF_POINTS * 2);
    out.positions = new Float32Array(REF_POINTS); // each point's position on the roll, (t - 1.5π) / (3π)
    for (let i = 0; i < REF_POINTS; i++) {
      const t = 1.5 * Math.PI * (1 + 2 * rand());
      out.positions[i] = (t - 1.5 * Math.PI) / (3 * Math.PI);
      out[2 * i] = (t * Math.cos(t) + noise * gauss() - mean[0]) / std[0];
      out[2 * i + 1] = (t * Math.sin(t) + noise * gauss() - mean[1]) / std[1];
    }
    return out;
  }

  function mulberry32(a) {
    return () => {
      a |= 0;
      a = (a + 0x6d2b79f5) | 0;
      let t = Math.imul(a ^ (a >>> 15), 1 | a);
      t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  // ---------------------------------------------------------------- drawing

  function readPalette() {
    const css = getComputedStyle(document.documentElement);
    const get = (name) => css.getPropertyValue(name).trim();
    return {
      panel: get("--panel"), bg: get("--plot-bg"), grid: get("--plot-grid"), axis: get("--plot-axis"), text: get("--muted"),
      ref: get("--ref"), noise: hexToRgb(get("--noise")), final: hexToRgb(get("--accent")),
      captionBg: get("--caption-bg"), captionText: get("--text"),
      real: get("--real"), x0: get("--x0"), field: get("--field"),
    };
  }

  function hexToRgb(hex) {
    const m = /^#?([0-9a-f]{6})$/i.exec(hex);
    const v = m ? parseInt(m[1], 16) : 0x888888;
    return [(v >> 16) & 255, (v >> 8) & 255, v & 255];
  }

  function geometry() {
    const dpr = window.devicePixelRatio || 1;
    const css = el.canvas.width / dpr;
    const pad = { left: 32, right: 10, top: 10, bottom: 28 };
    const plot = Math.max(10, Math.min(css - pad.left - pad.right, css - pad.top - pad.bottom));
    return {
      dpr, css, plot, left: pad.left, top: pad.top,
      px: (x) => pad.left + ((x + AXIS) / (2 * AXIS)) * plot,
      py: (y) => pad.top + ((AXIS - y) / (2 * AXIS)) * plot,
    };
  }

  function resizeCanvas() {
    const dpr = window.devicePixelRatio || 1;
    const width = el.canvas.getBoundingClientRect().width || 300;
    const size = Math.round(width * dpr);
    for (const canvas of [el.canvas, el.canvasReal]) {
      if (canvas.width !== size || canvas.height !== size) {
        canvas.width = size;
        canvas.height = size;
      }
    }
    state.background = null;
    draw();
  }

  function renderBackground() {
    const g = geometry();
    const off = document.createElement("canvas");
    off.width = el.canvas.width;
    off.height = el.canvas.height;
    const c = off.getContext("2d");
    const p = state.palette;
    c.scale(g.dpr, g.dpr);
    c.fillStyle = p.panel;
    c.fillRect(0, 0, g.css, g.css);
    c.fillStyle = p.bg;
    c.fillRect(g.left, g.top, g.plot, g.plot);
    // grid and tick labels at integer coordinates
    c.lineWidth = 1;
    c.font = "11px system-ui, sans-serif";
    c.fillStyle = p.text;
    for (let v = -2; v <= 2; v++) {
      const x = Math.round(g.px(v)) + 0.5;
      const y = Math.round(g.py(v)) + 0.5;
      c.strokeStyle = v === 0 ? p.axis : p.grid;
      c.beginPath();
      c.moveTo(x, g.top);
      c.lineTo(x, g.top + g.plot);
      c.moveTo(g.left, y);
      c.lineTo(g.left + g.plot, y);
      c.stroke();
      c.textAlign = "center";
      c.textBaseline = "top";
      c.fillText(String(v), x, g.top + g.plot + 6);
      c.textAlign = "right";
      c.textBaseline = "middle";
      c.fillText(String(v), g.left - 6, y);
    }
    c.strokeStyle = p.axis;
    c.strokeRect(g.left + 0.5, g.top + 0.5, g.plot - 1, g.plot - 1);
    if (state.ref) {
      c.save();
      clipPlot(c, g);
      c.fillStyle = p.ref;
      const r = Math.max(0.8, g.plot / 400);
      c.beginPath();
      for (let i = 0; i < state.ref.length; i += 2) c.rect(g.px(state.ref[i]) - r, g.py(state.ref[i + 1]) - r, 2 * r, 2 * r);
      c.fill();
      if (conditioned()) {
        // The requested part of the roll: reference points within 0.02 of the position.
        const want = Number(el.position.value);
        c.fillStyle = p.real;
        c.beginPath();
        for (let i = 0; i < state.ref.positions.length; i++) {
          if (Math.abs(state.ref.positions[i] - want) > 0.02) continue;
          c.rect(g.px(state.ref[2 * i]) - 1.5 * r, g.py(state.ref[2 * i + 1]) - 1.5 * r, 3 * r, 3 * r);
        }
        c.fill();
      }
      c.restore();
    }
    return off;
  }

  function clipPlot(c, g) {
    c.beginPath();
    c.rect(g.left + 1, g.top + 1, g.plot - 2, g.plot - 2);
    c.clip();
  }

  function pointColor(progress) {
    const { noise, final } = state.palette;
    const k = progress * progress; // stays near the noise colour until the structure appears
    const mix = noise.map((a, i) => Math.round(a + (final[i] - a) * k));
    return `rgb(${mix[0]}, ${mix[1]}, ${mix[2]})`;
  }

  const activeFrames = () => (state.mode === "forward" ? state.fwd && state.fwd.frames : state.run && state.run.frames);

  // The noise level of frame k, where the field is drawn: reverse frame k is the input of step k + 1 (the final
  // samples are clean: level 0); forward frame 0 is the data (level 0), frame k is at levels[k - 1].
  function frameLevel(k) {
    if (state.mode === "forward") return k === 0 ? 0 : state.fwd.levels[k - 1];
    const ts = state.run.timesteps;
    return k < ts.length ? ts[k] : 0;
  }

  function drawCloud(c, g, pts, color, alpha, r) {
    c.save();
    clipPlot(c, g);
    c.fillStyle = color;
    c.globalAlpha = alpha;
    c.beginPath();
    for (let i = 0; i < pts.length; i += 2) {
      const x = g.px(pts[i]);
      const y = g.py(pts[i + 1]);
      if (Number.isNaN(x) || Number.isNaN(y)) continue;
      c.moveTo(x + r, y);
      c.arc(x, y, r, 0, 2 * Math.PI);
    }
    c.fill();
    c.restore();
  }

  function drawCaption(c, g, text) {
    c.font = "600 12px system-ui, sans-serif";
    const w = c.measureText(text).width + 12;
    c.fillStyle = state.palette.captionBg;
    c.fillRect(g.left + 6, g.top + 6, w, 20);
    c.fillStyle = state.palette.captionText;
    c.textAlign = "left";
    c.textBaseline = "middle";
    c.fillText(text, g.left + 12, g.top + 16);
  }

  // Arrows of -eps (the score's direction, score = -eps / sigma) on the /field grid, lengths relative to the
  // longest at this level.
  function drawField(c, g, field) {
    const { points, eps } = field;
    let longest = 0;
    for (const [ex, ey] of eps) longest = Math.max(longest, Math.hypot(ex, ey));
    if (!longest) return;
    const cell = (g.plot * (2 * FIELD.extent)) / (2 * AXIS) / (FIELD.grid - 1);
    const scale = (0.9 * cell) / longest;
    c.save();
    clipPlot(c, g);
    c.strokeStyle = state.palette.field;
    c.fillStyle = state.palette.field;
    c.lineWidth = 1.2;
    c.globalAlpha = 0.85;
    c.beginPath();
    const heads = [];
    for (let i = 0; i < points.length; i++) {
      const x = g.px(points[i][0]);
      const y = g.py(points[i][1]);
      const dx = -eps[i][0] * scale;
      const dy = eps[i][1] * scale; // canvas y grows downwards
      const len = Math.hypot(dx, dy);
      if (len < 1.5) continue;
      c.moveTo(x, y);
      c.lineTo(x + dx, y + dy);
      heads.push([x + dx, y + dy, dx / len, dy / len, Math.min(5, 0.45 * len)]);
    }
    c.stroke();
    c.beginPath();
    for (const [hx, hy, ux, uy, h] of heads) {
      c.moveTo(hx, hy);
      c.lineTo(hx - h * ux + 0.5 * h * uy, hy - h * uy - 0.5 * h * ux);
      c.lineTo(hx - h * ux - 0.5 * h * uy, hy - h * uy + 0.5 * h * ux);
      c.closePath();
    }
    c.fill();
    c.restore();
  }

  function ensureField(t) {
    if (!state.fieldRequests.has(t)) {
      const fields = state.fields; // replaced when the model changes: a late answer lands in the old one
      const request = (async () => {
        try {
          const q = { model: el.model.value, t, grid: FIELD.grid, extent: FIELD.extent };
          const body = await (await apiGet("/field", q)).json();
          fields.set(t, { points: body.points, eps: body.eps });
          if (el.showField.checked && activeFrames() && frameLevel(state.frame) === t) draw();
        } catch (e) {
          state.fieldRequests.delete(t);
          el.showField.checked = false;
          updateLegend();
          showError(`Field overlay: ${e.message}`);
        }
      })();
      state.fieldRequests.set(t, request);
    }
    return state.fieldRequests.get(t);
  }

  // Every level of the process on screen, one request at a time, so arrows are there when playback reaches them.
  async function prefetchFields() {
    const frames = activeFrames();
    for (let k = 0; frames && k < frames.length; k++) {
      if (!el.showField.checked || activeFrames() !== frames) return;
      await ensureField(frameLevel(k));
    }
  }

  function draw() {
    if (!state.palette) state.palette = readPalette();
    if (!state.background) state.background = renderBackground();
    const g = geometry();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.drawImage(state.background, 0, 0);
    ctx.setTransform(g.dpr, 0, 0, g.dpr, 0, 0);
    drawReal(g);
    const run = state.run;
    const frames = activeFrames();
    if (!run || !frames) return;
    const last = frames.length - 1;
    const k = clamp(state.frame, 0, last);
    const pts = frames[k];
    const n = pts.length / 2;
    const r = (n <= 600 ? 2.1 : n <= 2000 ? 1.6 : 1.2) * Math.max(0.75, g.plot / 520);
    const progress = last ? k / last : 1;
    if (state.real && el.compare.value === "overlay") drawCloud(ctx, g, state.real, state.palette.real, 0.55, r);
    const forward = state.mode === "forward";
    drawCloud(ctx, g, pts, pointColor(forward ? 1 - progress : progress), n > 2000 ? 0.75 : 0.9, r);
    const x0 = !forward && el.showX0.checked && run.x0 && k < last ? run.x0[k] : null;
    if (x0) drawCloud(ctx, g, x0, state.palette.x0, 0.6, 0.8 * r);
    el.canvas.dataset.x0Drawn = x0 ? String(k) : "";
    el.canvas.dataset.fieldDrawn = "";
    if (el.showField.checked) {
      const t = frameLevel(k);
      el.fieldLabel.textContent = `−ε̂ (score direction) at t = ${t}`;
      const field = state.fields.get(t);
      if (field) {
        drawField(ctx, g, field);
        el.canvas.dataset.fieldDrawn = String(t);
      } else ensureField(t);
    }
    // caption: process and step, like the MP4's
    const caption = forward
      ? (k === 0 ? "forward · data x₀" : `forward · ${k}/${last} · t = ${state.fwd.levels[k - 1]}`)
      : `${run.sampler} · step ${k}/${last}`;
    drawCaption(ctx, g, caption);
    el.canvas.dataset.mode = state.mode;
    if (!state.firstFrameDrawn) {
      state.firstFrameDrawn = true;
      el.canvas.dataset.ttff = String(Math.round(performance.now() - state.t0));
    }
  }

  // The side-by-side panel: real data alone, on the same axes.
  function drawReal(g) {
    if (el.canvasReal.hidden || !state.real) return;
    const c = el.canvasReal.getContext("2d");
    c.setTransform(1, 0, 0, 1, 0, 0);
    c.drawImage(state.background, 0, 0);
    c.setTransform(g.dpr, 0, 0, g.dpr, 0, 0);
    const n = state.real.length / 2;
    const r = (n <= 600 ? 2.1 : n <= 2000 ? 1.6 : 1.2) * Math.max(0.75, g.plot / 520);
    drawCloud(c, g, state.real, state.palette.real, 0.8, r);
    drawCaption(c, g, `real data · n = ${n}`);
  }

  // Side by side: two equal columns (stacked at phone width); the canvases' pixel sizes follow their new width.
  function applyCompareLayout() {
    const side = el.compare.value === "side";
    if (el.canvasReal.hidden === !side) return;
    el.canvasReal.hidden = !side;
    el.canvasWrap.classList.toggle("side-by-side", side);
    resizeCanvas();
  }

  function updateLegend() {
    const forward = state.mode === "forward";
    el.ptsLabel.textContent = forward ? "noised data" : `samples · ${(state.run && state.run.model) || el.model.value}`;
    const real = el.compare.value !== "off";
    el.realItem.hidden = !real;
    el.x0Item.hidden = !(el.showX0.checked && !forward);
    el.fieldItem.hidden = !el.showField.checked;
    el.showX0.disabled = forward;
    el.showX0.parentElement.title = forward ? "Predicted x₀ belongs to the reverse run" : "";
  }

  function setFrame(k) {
    const frames = activeFrames();
    if (!frames) return;
    const last = frames.length - 1;
    state.frame = clamp(k, 0, last);
    el.slider.value = String(state.frame);
    el.canvas.dataset.frame = String(state.frame);
    if (state.mode === "forward") {
      const t = state.frame > 0 ? state.fwd.levels[state.frame - 1] : null;
      el.frameLabel.textContent =
        state.frame === 0
          ? `level 0/${last} · real data x₀`
          : `level ${state.frame}/${last} · t = ${t}` + (state.frame === last ? " · ≈ pure noise" : "");
    } else {
      const t = state.frame > 0 ? state.run.timesteps[state.frame - 1] : null;
      el.frameLabel.textContent =
        state.frame === 0
          ? `step 0/${last} · pure noise`
          : state.frame === last
            ? `step ${last}/${last} · final samples`
            : `step ${state.frame}/${last} · after t = ${t}`;
    }
    draw();
  }

  function setMode(mode) {
    if (mode === state.mode) return;
    state.mode = mode;
    el.slider.setAttribute("aria-label", mode === "forward" ? "Noising level" : "Denoising step");
    updateLegend();
    const frames = activeFrames();
    if (!frames) {
      draw(); // the forward frames are still on their way: loadForward draws them
      return;
    }
    el.slider.max = String(frames.length - 1);
    el.canvas.dataset.frames = String(frames.length);
    setFrame(state.frame); // the same position on the other process: scrub one, then the other
    prefetchFields();
  }

  // ---------------------------------------------------------------- playback

  function play() {
    if (!activeFrames()) return;
    if (state.frame >= activeFrames().length - 1) setFrame(0);
    state.playing = true;
    state.clock = state.frame;
    state.lastTs = null;
    el.play.textContent = "❚❚";
    el.play.setAttribute("aria-label", "Pause");
    requestAnimationFrame(tick);
  }

  function pause() {
    state.playing = false;
    el.play.textContent = "▶";
    el.play.setAttribute("aria-label", "Play");
  }

  function tick(ts) {
    if (!state.playing || !activeFrames()) return;
    if (state.lastTs !== null) {
      const dt = Math.min(0.25, (ts - state.lastTs) / 1000);
      state.clock += dt * BASE_FPS * Number(el.speed.value);
    }
    state.lastTs = ts;
    const last = activeFrames().length - 1;
    const k = Math.min(last, Math.floor(state.clock));
    if (k !== state.frame) setFrame(k);
    if (k >= last) {
      pause();
      return;
    }
    requestAnimationFrame(tick);
  }

  // ---------------------------------------------------------------- MP4

  function animationUrl() {
    const run = state.run;
    // The same levels as the run on screen (tuned or trailing), so the video shows exactly that run.
    if (state.mode === "forward") {
      return `/animation?${new URLSearchParams({ process: "forward", model: run.model, n: run.n, steps: run.steps, seed: run.seed, fps: MP4.fps, size: MP4.size })}`;
    }
    const q = { model: run.model, n: run.n, sampler: run.sampler, steps: run.steps, spacing: run.spacing, seed: run.seed, fps: MP4.fps, size: MP4.size };
    if (run.eta !== undefined) q.eta = run.eta;
    return `/animation?${new URLSearchParams(q)}`;
  }

  function loadMp4() {
    if (!state.run) return;
    const url = animationUrl();
    const t0 = performance.now();
    clearError();
    el.videoStatus.textContent = "Rendering MP4 on the server…";
    el.video.hidden = false;
    el.video.onloadeddata = () => {
      const ms = Math.round(performance.now() - t0);
      el.videoStatus.textContent =
        `${url.includes("process=forward") ? "forward process" : state.run.sampler}, seed ${state.run.seed}: ` +
        `${el.video.duration.toFixed(1)} s video, ready in ${ms} ms.`;
      el.video.play().catch(() => {}); // autoplay may be refused; the controls remain
    };
    el.video.onerror = async () => {
      // The <video> element hides the HTTP error: ask the endpoint itself for its message.
      let message = "The browser could not play the MP4.";
      try {
        const resp = await fetch(url, { headers: { Range: "bytes=0-0" } });
        if (resp.status === 404) message = "This server has no /animation endpoint (404).";
        else if (!resp.ok) message = (await describeError(resp)).message;
      } catch (e) {
        message = `Network error: could not reach the server (${e.message}).`;
      }
      el.videoStatus.textContent = "MP4 failed.";
      el.video.hidden = true;
      showError(message);
    };
    el.video.src = url;
    el.video.load();
  }

  // ---------------------------------------------------------------- wiring

  el.form.addEventListener("submit", (e) => {
    e.preventDefault();
    runTrajectory();
  });
  el.model.addEventListener("change", async () => {
    await selectModel(el.model.value, el.sampler.value);
    runTrajectory();
  });
  function conditionChanged() {
    el.positionValue.textContent = Number(el.position.value).toFixed(2);
    el.guidanceValue.textContent = Number(el.guidance.value).toFixed(1);
    state.background = null;
    draw();
  }
  for (const input of [el.position, el.guidance]) input.addEventListener("input", conditionChanged);
  for (const input of [el.usePosition, el.position, el.guidance]) {
    input.addEventListener("change", () => {
      conditionChanged();
      runTrajectory();
    });
  }
  el.sampler.addEventListener("change", () => {
    applySampler();
    runTrajectory();
  });
  el.steps.addEventListener("input", () => {
    state.stepsTouched = true;
  });
  el.steps.addEventListener("change", () => {
    const s = current();
    if (s && el.steps.value !== "") el.steps.value = clamp(Math.round(Number(el.steps.value)) || s.steps.default, s.steps.min, s.steps.max);
    runTrajectory();
  });
  el.eta.addEventListener("change", () => runTrajectory());
  el.seed.addEventListener("input", () => {
    el.seedHint.textContent = el.seed.value.trim() ? "fixed seed" : "blank = random";
  });
  el.play.addEventListener("click", () => (state.playing ? pause() : play()));
  el.slider.addEventListener("input", () => {
    pause();
    setFrame(Number(el.slider.value));
  });
  el.speed.addEventListener("change", () => {
    state.clock = state.frame;
  });
  el.loadMp4.addEventListener("click", loadMp4);
  for (const radio of [el.processReverse, el.processForward]) {
    radio.addEventListener("change", () => radio.checked && setMode(radio.value));
  }
  el.showField.addEventListener("change", () => {
    updateLegend();
    draw();
    prefetchFields();
  });
  el.showX0.addEventListener("change", () => {
    updateLegend();
    if (el.showX0.checked && state.run && !state.run.x0) runTrajectory(true); // the same run, now with x0
    else draw();
  });
  el.compare.addEventListener("change", () => {
    updateLegend();
    applyCompareLayout();
    if (el.compare.value !== "off" && state.mode === "reverse" && state.run && !state.playing) {
      setFrame(state.run.frames.length - 1); // original vs generated: the end of the run
    } else draw();
  });
  window.addEventListener("resize", resizeCanvas);
  updateLegend();
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => {
    state.palette = null;
    state.background = null;
    draw();
  });

  async function init() {
    // Initial values from the URL (?sampler=ddim&steps=20&n=2000&seed=7&eta=0.5), so a run can be shared.
    const initial = new URLSearchParams(location.search);
    for (const name of ["n", "seed", "eta"]) if (initial.has(name)) el[name].value = initial.get(name);
    if (initial.has("steps")) {
      el.steps.value = initial.get("steps");
      state.stepsTouched = true;
    }
    resizeCanvas();
    try {
      const listing = await (await apiGet("/models")).json();
      populateModels(listing, initial.get("model"));
    } catch (e) {
      showError(`Could not load the model list: ${e.message}`);
      el.model.replaceChildren(new Option("unavailable"));
      return;
    }
    if (await selectModel(el.model.value, initial.get("sampler") || "ddpm")) runTrajectory();
  }

  function populateModels(listing, preferred) {
    state.models = new Map(listing.models.map((m) => [m.name, m]));
    el.model.replaceChildren(
      ...listing.models.map((m) => {
        const opt = new Option(m.default ? `${m.name} (default)` : m.name, m.name);
        opt.title = `${m.file} · ${m.id.slice(0, 12)}`;
        return opt;
      }),
    );
    el.model.value = state.models.has(preferred) ? preferred : listing.default;
    el.model.disabled = listing.models.length < 2;
  }

  // The chosen model's samplers (what they support depends on the model) and its data reference.
  async function selectModel(name, preferredSampler) {
    const m = state.models.get(name);
    el.conditionField.hidden = !(m && m.condition);
    el.modelInfo.textContent = m
      ? `${m.preset || "custom"} network · ${m.prediction_type}-prediction · T = ${m.num_timesteps} · ${m.id.slice(0, 12)}`
      : "";
    state.fields = new Map();
    state.fieldRequests = new Map();
    const details = apiGet(`/models/${encodeURIComponent(name)}`)
      .then((r) => r.json())
      .then((full) => {
        if (el.model.value !== name) return;
        state.ref = buildReference(full.metadata && full.metadata.data);
        el.refLabel.textContent = state.ref ? "training data (reference)" : "no data reference";
        state.background = null;
        draw();
      })
      .catch(() => {
        el.refLabel.textContent = "no data reference";
      });
    try {
      const list = await (await apiGet("/samplers", { model: name })).json();
      populateSamplers(list, preferredSampler);
    } catch (e) {
      showError(`Could not load the sampler list: ${e.message}`);
      el.sampler.replaceChildren(new Option("unavailable"));
      return false;
    }
    updateLegend();
    await details;
    return true;
  }

  init();
})();
