// swissroll-diffusion web page: fetch /trajectory, animate it on a canvas, load the same run as MP4.
// Plain ES2020, no build step, no external resources: the service must work offline.
"use strict";

(() => {
  const AXIS = 2.5; // fixed axes [-AXIS, AXIS] in normalized coordinates, so the cloud never jumps
  const BASE_FPS = 10; // playback rate at 1x speed, in trajectory frames per second
  const REF_POINTS = 4000;
  const MP4 = { fps: 10, size: 480 };

  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("controls"), sampler: $("sampler"), samplerInfo: $("sampler-info"),
    steps: $("steps"), stepsHint: $("steps-hint"), n: $("n"), seed: $("seed"), seedHint: $("seed-hint"),
    eta: $("eta"), etaField: $("eta-field"), etaHint: $("eta-hint"), run: $("run"), busy: $("busy"),
    error: $("error"), canvas: $("canvas"), play: $("play"), slider: $("slider"), speed: $("speed"),
    frameLabel: $("frame-label"), refLabel: $("ref-label"), latency: $("latency"),
    loadMp4: $("load-mp4"), video: $("video"), videoStatus: $("video-status"),
  };
  const ctx = el.canvas.getContext("2d");

  const state = {
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
    const q = { sampler: el.sampler.value };
    const n = el.n.value.trim();
    const steps = el.steps.value.trim();
    const seed = el.seed.value.trim();
    if (n !== "") q.n = n; // sent as typed: the API validates and its message is shown
    if (steps !== "") q.steps = steps;
    if (seed !== "") q.seed = seed;
    if (s && s.params && s.params.eta && el.eta.value.trim() !== "") q.eta = el.eta.value.trim();
    return q;
  }

  function syncUrl(query) {
    const url = new URL(location.href);
    url.search = new URLSearchParams(query).toString();
    history.replaceState(null, "", url);
  }

  // ---------------------------------------------------------------- sampling

  async function runTrajectory() {
    if (!current()) return;
    const query = readQuery();
    if (state.controller) state.controller.abort();
    const controller = new AbortController();
    state.controller = controller;
    clearError();
    setBusy(true);
    const t0 = performance.now();
    try {
      const resp = await apiGet("/trajectory", query, controller.signal);
      const data = await resp.json();
      const roundTrip = performance.now() - t0;
      // The seed as a string from the header: seeds go up to 2^63-1, beyond a JS number's exact range.
      const seed = resp.headers.get("X-Seed") || String(data.seed);
      const bytes = Number(resp.headers.get("Content-Length")) || 0;
      state.run = {
        query,
        seed,
        sampler: data.sampler,
        steps: data.steps,
        spacing: data.spacing,
        n: data.n,
        eta: query.eta,
        timesteps: data.timesteps,
        frames: data.frames.map((f) => Float32Array.from(f.flat())),
      };
      syncUrl(query);
      el.seedHint.textContent = query.seed !== undefined ? "fixed seed" : `blank = random · this run: ${seed}`;
      el.latency.replaceChildren(
        strong(`${Math.round(roundTrip)} ms`), " round trip · ",
        strong(`${data.elapsed_ms} ms`), " server compute · ",
        `${data.n} points × ${data.frames.length} frames` + (bytes ? ` · ${formatBytes(bytes)}` : ""),
        " · seed ", seedChip(seed),
      );
      el.slider.max = String(state.run.frames.length - 1);
      el.slider.disabled = false;
      el.play.disabled = false;
      el.loadMp4.disabled = false;
      el.canvas.dataset.frames = String(state.run.frames.length);
      el.canvas.dataset.sampler = data.sampler;
      const reduceMotion = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
      if (reduceMotion) {
        pause();
        setFrame(state.run.frames.length - 1);
      } else {
        setFrame(0);
        play();
      }
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
    for (let i = 0; i < REF_POINTS; i++) {
      const t = 1.5 * Math.PI * (1 + 2 * rand());
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
    if (el.canvas.width !== size || el.canvas.height !== size) {
      el.canvas.width = size;
      el.canvas.height = size;
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

  function draw() {
    if (!state.palette) state.palette = readPalette();
    if (!state.background) state.background = renderBackground();
    const g = geometry();
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.drawImage(state.background, 0, 0);
    ctx.setTransform(g.dpr, 0, 0, g.dpr, 0, 0);
    const run = state.run;
    if (!run) return;
    const last = run.frames.length - 1;
    const k = clamp(state.frame, 0, last);
    const pts = run.frames[k];
    const n = pts.length / 2;
    const r = (n <= 600 ? 2.1 : n <= 2000 ? 1.6 : 1.2) * Math.max(0.75, g.plot / 520);
    ctx.save();
    clipPlot(ctx, g);
    ctx.fillStyle = pointColor(last ? k / last : 1);
    ctx.globalAlpha = n > 2000 ? 0.75 : 0.9;
    ctx.beginPath();
    for (let i = 0; i < pts.length; i += 2) {
      const x = g.px(pts[i]);
      const y = g.py(pts[i + 1]);
      ctx.moveTo(x + r, y);
      ctx.arc(x, y, r, 0, 2 * Math.PI);
    }
    ctx.fill();
    ctx.restore();
    // caption: sampler and step, like the MP4's
    const caption = `${run.sampler} · step ${k}/${last}`;
    ctx.font = "600 12px system-ui, sans-serif";
    const w = ctx.measureText(caption).width + 12;
    ctx.fillStyle = state.palette.captionBg;
    ctx.fillRect(g.left + 6, g.top + 6, w, 20);
    ctx.fillStyle = state.palette.captionText;
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    ctx.fillText(caption, g.left + 12, g.top + 16);
  }

  function setFrame(k) {
    if (!state.run) return;
    const last = state.run.frames.length - 1;
    state.frame = clamp(k, 0, last);
    el.slider.value = String(state.frame);
    el.canvas.dataset.frame = String(state.frame);
    const t = state.frame > 0 ? state.run.timesteps[state.frame - 1] : null;
    el.frameLabel.textContent =
      state.frame === 0
        ? `step 0/${last} · pure noise`
        : state.frame === last
          ? `step ${last}/${last} · final samples`
          : `step ${state.frame}/${last} · after t = ${t}`;
    draw();
  }

  // ---------------------------------------------------------------- playback

  function play() {
    if (!state.run) return;
    if (state.frame >= state.run.frames.length - 1) setFrame(0);
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
    if (!state.playing || !state.run) return;
    if (state.lastTs !== null) {
      const dt = Math.min(0.25, (ts - state.lastTs) / 1000);
      state.clock += dt * BASE_FPS * Number(el.speed.value);
    }
    state.lastTs = ts;
    const last = state.run.frames.length - 1;
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
    const q = { n: run.n, sampler: run.sampler, steps: run.steps, spacing: run.spacing, seed: run.seed, fps: MP4.fps, size: MP4.size };
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
        `${state.run.sampler}, seed ${state.run.seed}: ${el.video.duration.toFixed(1)} s video, ready in ${ms} ms.`;
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
  el.eta.addEventListener("change", runTrajectory);
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
  window.addEventListener("resize", resizeCanvas);
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
    const model = apiGet("/model")
      .then((r) => r.json())
      .then((m) => {
        state.ref = buildReference(m.metadata && m.metadata.data);
        el.refLabel.textContent = state.ref ? "training data (reference)" : "no data reference";
        state.background = null;
        draw();
      })
      .catch(() => {
        el.refLabel.textContent = "no data reference";
      });
    try {
      const list = await (await apiGet("/samplers")).json();
      populateSamplers(list, initial.get("sampler") || "ddpm");
    } catch (e) {
      showError(`Could not load the sampler list: ${e.message}`);
      el.sampler.replaceChildren(new Option("unavailable"));
      return;
    }
    await model;
    runTrajectory();
  }

  init();
})();
