// vqtok token explorer: a worked example of the public HTTP API (GET /info, /codebook, /layouts; POST /encode,
// /decode). Plain JavaScript, no build step, no external requests. The API key, when the server asks for one,
// lives in `state.key` only (never in storage, cookies or the URL).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  const state = {
    key: null,            // the API key, in memory only
    info: null,           // GET /info
    K: 0, f: 1,           // codebook size, downsample factor
    colors: null,         // Uint8ClampedArray(K * 3): each code's RGB (PCA of the codebook)
    layouts: {},          // name -> spec (GET /layouts)
    defaultLayout: "flat",
    source: null,         // the image file (Blob) being explored
    sourceName: "image",
    encoded: null,        // the /encode answer's first image
    layoutName: null,     // the layout of `encoded.tokens`
    h: 0, w: 0,
    grid: null,           // Int32Array(h * w), the current (possibly edited) grid
    encodedGrid: null,    // the grid as /encode returned it
    originalData: null,   // ImageData of the original as encoded (null when the browser cannot draw it)
    reconBlob: null,      // the last /decode image
    cursor: { r: 0, c: 0 },
    anchor: { r: 0, c: 0 },
    selection: null,      // { r0, c0, r1, c1 } inclusive
    clipboard: null,      // { h, w, data: Int32Array }
    edited: false,
  };

  class ApiError extends Error {
    constructor(message, status) { super(message); this.status = status; }
  }

  // ------------------------------------------------------------------ the API

  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (state.key !== null) headers.set("Authorization", `Bearer ${state.key}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (err) {
      throw new ApiError(`cannot reach the server (${err.message})`, 0);
    }
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        const body = await response.json();
        message = `${response.status} ${body.error_type}: ${body.error}`;
      } catch (_) { /* not the JSON error shape */ }
      if (response.status === 401) askForKey(state.key === null ? "" : message);
      throw new ApiError(message, response.status);
    }
    return response;
  }

  function headerMs(response, name) {
    const value = parseFloat(response.headers.get(name));
    return Number.isFinite(value) ? value : null;
  }

  function timing(response) {
    return {
      inference: headerMs(response, "x-inference-time-ms"),
      queue: headerMs(response, "x-queue-time-ms"),
      total: headerMs(response, "x-total-time-ms"),
    };
  }

  // ------------------------------------------------------------------ status and errors

  function setStatus(text) { $("status").textContent = text; }
  function setError(text) { $("error").textContent = text || ""; }

  function askForKey(message) {
    const form = $("key-form");
    form.hidden = false;
    $("key-error").textContent = message || "";
    $("model-line").textContent = "This server needs an API key.";
    $("api-key").focus();
  }

  // ------------------------------------------------------------------ start: model, codebook colours, layouts

  async function connect() {
    let info;
    try {
      info = await (await api("info")).json();
    } catch (err) {
      if (err.status === 401) return;  // the key form is up; its submit calls connect() again
      if (err.status === 503 || err.status === 0) {
        $("model-line").textContent = `Waiting for the model (${err.message})…`;
        setTimeout(connect, 1000);
        return;
      }
      $("model-line").textContent = `Cannot read /info: ${err.message}`;
      return;
    }
    $("key-form").hidden = true;
    state.info = info;
    state.K = info.model.num_embeddings;
    state.f = info.model.downsample;
    $("model-line").textContent =
      `Model ${info.model.name}: K = ${state.K} codes of dimension ${info.model.embedding_dim}, ` +
      `downsample f = ${state.f}, on ${info.device} (vqtok ${info.version}).`;
    $("max-code").textContent = String(state.K - 1);
    $("edit-code").max = String(state.K - 1);
    try {
      const [codebook, layouts] = await Promise.all([
        api("codebook", { headers: { Accept: "application/x-npy" } }).then((r) => r.arrayBuffer()).then(readNpy),
        api("layouts").then((r) => r.json()),
      ]);
      state.colors = pcaColors(codebook.data, codebook.shape[0], codebook.shape[1]);
      state.layouts = layouts.layouts;
      state.defaultLayout = layouts.default;
      fillLayoutSelect($("layout"), layouts.default);
      fillLayoutSelect($("paste-layout"), layouts.default);
    } catch (err) {
      setError(`Cannot read the codebook or layouts: ${err.message}`);
      return;
    }
    $("encode-button").disabled = state.source === null;
    document.body.dataset.ready = "true";
  }

  function fillLayoutSelect(select, selected) {
    select.replaceChildren();
    for (const name of Object.keys(state.layouts).sort()) {
      const option = document.createElement("option");
      option.value = name;
      option.textContent = name;
      option.selected = name === selected;
      select.append(option);
    }
  }

  // A little-endian float32 .npy file (GET /codebook with Accept: application/x-npy): { shape, data }.
  function readNpy(buffer) {
    const bytes = new Uint8Array(buffer);
    const view = new DataView(buffer);
    const major = bytes[6];
    const headerLength = major === 1 ? view.getUint16(8, true) : view.getUint32(8, true);
    const start = major === 1 ? 10 : 12;
    const header = new TextDecoder("latin1").decode(bytes.subarray(start, start + headerLength));
    if (!header.includes("'<f4'") || header.includes("'fortran_order': True")) {
      throw new Error(`unexpected codebook array: ${header.trim()}`);
    }
    const shape = header.match(/'shape':\s*\((\d+),\s*(\d+)\)/).slice(1, 3).map(Number);
    const data = new Float32Array(buffer.slice(start + headerLength, start + headerLength + shape[0] * shape[1] * 4));
    return { shape, data };
  }

  // The codebook's top three principal components, each stretched to 0..255 between its 1st and 99th
  // percentile: similar codes get similar colours. `vectors` is the (K, D) codebook, row-major; the
  // covariance is estimated from at most 4096 evenly spaced codes, so large codebooks stay quick.
  function pcaColors(vectors, K, D) {
    const mean = new Float64Array(D);
    for (let k = 0; k < K; k++) for (let d = 0; d < D; d++) mean[d] += vectors[k * D + d] / K;
    const X = new Float64Array(K * D);
    for (let k = 0; k < K; k++) for (let d = 0; d < D; d++) X[k * D + d] = vectors[k * D + d] - mean[d];
    const cov = new Float64Array(D * D);
    const step = Math.max(1, Math.floor(K / 4096));
    for (let k = 0; k < K; k += step) {
      for (let i = 0; i < D; i++) {
        const xi = X[k * D + i];
        if (xi === 0) continue;
        for (let j = 0; j < D; j++) cov[i * D + j] += xi * X[k * D + j];
      }
    }
    const components = [];
    for (let p = 0; p < 3; p++) {
      let v = new Float64Array(D).map((_, i) => 1 + ((i * 7919 + p * 104729) % 97) / 97);
      for (let iter = 0; iter < 200; iter++) {
        const next = new Float64Array(D);
        for (let i = 0; i < D; i++) {
          let s = 0;
          for (let j = 0; j < D; j++) s += cov[i * D + j] * v[j];
          next[i] = s;
        }
        for (const u of components) {  // deflate: stay orthogonal to the components found
          let dot = 0;
          for (let i = 0; i < D; i++) dot += next[i] * u[i];
          for (let i = 0; i < D; i++) next[i] -= dot * u[i];
        }
        const norm = Math.hypot(...next) || 1;
        v = next.map((x) => x / norm);
      }
      let big = 0;  // a fixed sign: the largest entry positive
      for (let i = 0; i < D; i++) if (Math.abs(v[i]) > Math.abs(big)) big = v[i];
      if (big < 0) v = v.map((x) => -x);
      components.push(v);
    }
    const colors = new Uint8ClampedArray(K * 3);
    components.forEach((u, p) => {
      const proj = new Float64Array(K);
      for (let k = 0; k < K; k++) {
        let s = 0;
        for (let d = 0; d < D; d++) s += X[k * D + d] * u[d];
        proj[k] = s;
      }
      const sorted = Float64Array.from(proj).sort();
      const lo = sorted[Math.floor(0.01 * (K - 1))], hi = sorted[Math.ceil(0.99 * (K - 1))];
      const span = hi - lo || 1;
      for (let k = 0; k < K; k++) colors[k * 3 + p] = Math.round(((proj[k] - lo) / span) * 255);
    });
    return colors;
  }

  // ------------------------------------------------------------------ choosing an image

  function useSource(blob, name) {
    state.source = blob;
    state.sourceName = name;
    $("encode-button").disabled = state.info === null;
    if (state.info !== null) encode();
  }

  async function loadSample(name) {
    setError("");
    try {
      const response = await fetch(`web/samples/${name}.jpg`);
      if (!response.ok) throw new Error(`${response.status}`);
      useSource(await response.blob(), `${name}.jpg`);
    } catch (err) {
      setError(`Cannot load the sample ${name}: ${err.message}`);
    }
  }

  // ------------------------------------------------------------------ encode

  async function encode() {
    if (state.source === null || state.info === null) return;
    setError("");
    setStatus("Encoding…");
    const form = new FormData();
    form.append("image", state.source, state.sourceName);
    const size = $("size").value.trim();
    if (size) form.append("size", size);
    form.append("fit", $("fit").value);
    form.append("layout", $("layout").value || state.defaultLayout);
    let response, body;
    try {
      response = await api("encode", { method: "POST", body: form });
      body = await response.json();
    } catch (err) {
      setStatus("");
      setError(`Encode failed: ${err.message}`);
      return;
    }
    const image = body.images[0];
    state.encoded = image;
    state.layoutName = body.layout || state.defaultLayout;
    [state.h, state.w] = image.grid;
    state.encodedGrid = Int32Array.from(image.indices.flat());
    state.grid = Int32Array.from(state.encodedGrid);
    state.edited = false;
    state.cursor = { r: 0, c: 0 };
    state.anchor = { r: 0, c: 0 };
    state.selection = null;
    state.encodeTiming = timing(response);
    $("result").hidden = false;
    $("paste-fill").disabled = false;
    await drawOriginal(image, body.fit);
    drawTokenMap();
    updateOverlays();
    showFigures();
    await decode();
  }

  // The picture the model saw, redrawn in the page from the API's answer: fitted to encoded_size the way
  // `fit` says (pad: the content at the top left, its last row and column repeated into the padding).
  async function drawOriginal(image, fit) {
    const canvas = $("original");
    const W = image.encoded_size.width, H = image.encoded_size.height;
    canvas.width = W;
    canvas.height = H;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.clearRect(0, 0, W, H);
    state.originalData = null;
    let bitmap;
    try {
      bitmap = await createImageBitmap(state.source);
    } catch (_) {
      canvas.setAttribute("aria-label", "the original: this browser cannot draw this image format");
      return;  // e.g. TIFF: the server reads it, the browser does not
    }
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    if (fit === "pad") {
      const cw = image.content_size.width, ch = image.content_size.height;
      ctx.drawImage(bitmap, 0, 0, cw, ch);
      if (W > cw) ctx.drawImage(canvas, cw - 1, 0, 1, ch, cw, 0, W - cw, ch);
      if (H > ch) ctx.drawImage(canvas, 0, ch - 1, W, 1, 0, ch, W, H - ch);
    } else if (fit === "crop") {
      const scale = Math.max(W / bitmap.width, H / bitmap.height);
      const sw = W / scale, sh = H / scale;
      ctx.drawImage(bitmap, (bitmap.width - sw) / 2, (bitmap.height - sh) / 2, sw, sh, 0, 0, W, H);
    } else {
      ctx.drawImage(bitmap, 0, 0, W, H);
    }
    bitmap.close();
    state.originalData = ctx.getImageData(0, 0, W, H);
  }

  function drawTokenMap() {
    const canvas = $("token-map");
    canvas.width = state.w;
    canvas.height = state.h;
    const ctx = canvas.getContext("2d");
    const pixels = ctx.createImageData(state.w, state.h);
    for (let i = 0; i < state.grid.length; i++) {
      const k = state.grid[i];
      pixels.data[i * 4] = state.colors[k * 3];
      pixels.data[i * 4 + 1] = state.colors[k * 3 + 1];
      pixels.data[i * 4 + 2] = state.colors[k * 3 + 2];
      pixels.data[i * 4 + 3] = 255;
    }
    ctx.putImageData(pixels, 0, 0);
  }

  // ------------------------------------------------------------------ decode

  function gridRows() {
    const rows = [];
    for (let r = 0; r < state.h; r++) rows.push(Array.from(state.grid.subarray(r * state.w, (r + 1) * state.w)));
    return rows;
  }

  async function decode() {
    setError("");
    setStatus("Decoding…");
    let response, blob;
    try {
      response = await api("decode", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ indices: gridRows(), format: "png" }),
      });
      blob = await response.blob();
    } catch (err) {
      setStatus("");
      setError(`Decode failed: ${err.message}`);
      return;
    }
    state.reconBlob = blob;
    state.decodeTiming = timing(response);
    const bitmap = await createImageBitmap(blob);
    const canvas = $("reconstruction");
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    bitmap.close();
    state.reconData = ctx.getImageData(0, 0, canvas.width, canvas.height);
    $("recon-note").textContent = state.edited ? "(of the edited grid)" : "";
    canvas.dataset.decodes = String(Number(canvas.dataset.decodes || 0) + 1);
    showFigures();
    setStatus(state.edited ? "Decoded the edited grid." : "Encoded and decoded.");
  }

  // PSNR of the reconstruction against the original as encoded, over the content region (pad: not the padding).
  function psnr() {
    const a = state.originalData, b = state.reconData;
    if (!a || !b || a.width !== b.width || a.height !== b.height) return null;
    const cw = state.encoded.content_size.width, ch = state.encoded.content_size.height;
    let sum = 0;
    for (let y = 0; y < ch; y++) {
      for (let x = 0; x < cw; x++) {
        const i = (y * a.width + x) * 4;
        for (let c = 0; c < 3; c++) { const d = a.data[i + c] - b.data[i + c]; sum += d * d; }
      }
    }
    const mse = sum / (cw * ch * 3);
    return 10 * Math.log10((255 * 255) / Math.max(mse, 1e-12));
  }

  function ms(t) {
    if (!t || t.inference === null) return "–";
    const total = t.total === null ? "" : `, ${t.total.toFixed(1)} ms in all`;
    return `${t.inference.toFixed(1)} ms model${total}`;
  }

  function setFigure(id, text, value) {
    const dd = $(id);
    dd.textContent = text;
    dd.dataset.value = String(value);
  }

  function showFigures() {
    const tokens = state.h * state.w;
    const bits = Math.log2(state.K);
    const distinct = new Set(state.grid).size;
    setFigure("fig-grid", `${state.h} × ${state.w}`, `${state.h},${state.w}`);
    const seq = state.encoded.tokens ? ` (${state.encoded.tokens.length} in ${state.layoutName})` : "";
    setFigure("fig-tokens", `${tokens}${seq}`, tokens);
    setFigure("fig-bits", `${Number.isInteger(bits) ? bits : bits.toFixed(2)} (K = ${state.K})`, bits);
    const p = psnr();
    setFigure("fig-psnr", p === null ? "n/a" : `${p.toFixed(2)} dB`, p === null ? "" : p.toFixed(3));
    setFigure("fig-distinct", `${distinct} of ${state.K}`, distinct);
    setFigure("fig-encode-time", ms(state.encodeTiming), state.encodeTiming ? state.encodeTiming.inference : "");
    setFigure("fig-decode-time", ms(state.decodeTiming), state.decodeTiming ? state.decodeTiming.inference : "");
  }

  // ------------------------------------------------------------------ cells: hover, cursor, selection

  function tokenIdOf(code) {
    const spec = state.layouts[state.layoutName] || {};
    if (Array.isArray(spec.vocabulary)) return spec.vocabulary[code];
    return (spec.offset || 0) + code;
  }

  // Where cell (r, c) sits in the layout's sequence: rows of w ids (plus end-of-row), then the closing ids.
  function tokenPosition(r, c) {
    const tokens = state.encoded.tokens;
    if (!tokens) return null;
    const spec = state.layouts[state.layoutName] || {};
    const stride = state.w + (spec.eol != null ? 1 : 0);
    const tail = ["eof", "eoi", "eos"].filter((name) => spec[name] != null).length;
    const start = tokens.length - tail - state.h * stride;
    return start >= 0 ? start + r * stride + c : null;
  }

  function describeCell(r, c) {
    const code = state.grid[r * state.w + c];
    const position = tokenPosition(r, c);
    const where = position === null ? "" : ` at position ${position}`;
    const edited = code !== state.encodedGrid[r * state.w + c] ? " (edited)" : "";
    return `row ${r}, column ${c}: code ${code}${edited}, token id ${tokenIdOf(code)}${where} in ${state.layoutName}`;
  }

  function showCell(r, c) {
    const info = $("hover-info");
    info.textContent = describeCell(r, c);
    Object.assign(info.dataset, { row: r, col: c, code: state.grid[r * state.w + c], token: tokenIdOf(state.grid[r * state.w + c]) });
  }

  function cellAt(event, element) {
    const rect = element.getBoundingClientRect();
    const c = Math.floor(((event.clientX - rect.left) / rect.width) * state.w);
    const r = Math.floor(((event.clientY - rect.top) / rect.height) * state.h);
    return { r: Math.min(state.h - 1, Math.max(0, r)), c: Math.min(state.w - 1, Math.max(0, c)) };
  }

  function place(element, r0, c0, r1, c1) {
    Object.assign(element.style, {
      left: `${(c0 / state.w) * 100}%`, top: `${(r0 / state.h) * 100}%`,
      width: `${((c1 - c0 + 1) / state.w) * 100}%`, height: `${((r1 - r0 + 1) / state.h) * 100}%`,
    });
  }

  function updateOverlays() {
    const cursor = $("cursor"), selection = $("selection");
    cursor.hidden = state.grid === null;
    if (state.grid !== null) place(cursor, state.cursor.r, state.cursor.c, state.cursor.r, state.cursor.c);
    const s = state.selection;
    selection.hidden = s === null;
    if (s !== null) {
      place(selection, s.r0, s.c0, s.r1, s.c1);
      $("selection-info").textContent =
        `Selected rows ${s.r0}–${s.r1}, columns ${s.c0}–${s.c1} (${(s.r1 - s.r0 + 1) * (s.c1 - s.c0 + 1)} cells).`;
    } else {
      $("selection-info").textContent = "";
    }
  }

  function selectTo(cell) {
    const a = state.anchor;
    state.cursor = cell;
    state.selection = {
      r0: Math.min(a.r, cell.r), c0: Math.min(a.c, cell.c), r1: Math.max(a.r, cell.r), c1: Math.max(a.c, cell.c),
    };
    updateOverlays();
    showCell(cell.r, cell.c);
  }

  function wireCells() {
    for (const id of ["original", "reconstruction", "token-map"]) {
      const element = $(id);
      element.addEventListener("mousemove", (event) => {
        if (state.grid === null) return;
        const { r, c } = cellAt(event, element);
        showCell(r, c);
      });
    }
    const map = $("token-map");
    let dragging = false;
    map.addEventListener("pointerdown", (event) => {
      if (state.grid === null) return;
      dragging = true;
      map.setPointerCapture(event.pointerId);
      const cell = cellAt(event, map);
      state.anchor = cell;
      selectTo(cell);
      map.focus();
    });
    map.addEventListener("pointermove", (event) => { if (dragging) selectTo(cellAt(event, map)); });
    const stop = () => { dragging = false; };
    map.addEventListener("pointerup", stop);
    map.addEventListener("pointercancel", stop);
    map.addEventListener("keydown", (event) => {
      if (state.grid === null) return;
      const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
      if (event.key in moves) {
        event.preventDefault();
        const [dr, dc] = moves[event.key];
        const cell = {
          r: Math.min(state.h - 1, Math.max(0, state.cursor.r + dr)),
          c: Math.min(state.w - 1, Math.max(0, state.cursor.c + dc)),
        };
        if (!event.shiftKey) state.anchor = cell;
        selectTo(cell);
      } else if (event.key === "Enter") {
        event.preventDefault();
        fillSelection();
      } else if (event.key === "c" && !event.ctrlKey && !event.metaKey) {
        copySelection();
      } else if (event.key === "v" && !event.ctrlKey && !event.metaKey) {
        pasteAtCursor();
      }
    });
    map.addEventListener("focus", () => { if (state.grid !== null) showCell(state.cursor.r, state.cursor.c); });
  }

  // ------------------------------------------------------------------ editing

  function markEdited() {
    state.edited = true;
    drawTokenMap();
    showFigures();
    $("recon-note").textContent = "(grid edited: press Decode)";
  }

  function fillSelection() {
    if (state.grid === null) return;
    const code = Number($("edit-code").value);
    if (!Number.isInteger(code) || code < 0 || code >= state.K) {
      setError(`The code must be an integer in [0, ${state.K}).`);
      return;
    }
    setError("");
    const s = state.selection || { r0: state.cursor.r, c0: state.cursor.c, r1: state.cursor.r, c1: state.cursor.c };
    for (let r = s.r0; r <= s.r1; r++) for (let c = s.c0; c <= s.c1; c++) state.grid[r * state.w + c] = code;
    markEdited();
    setStatus(`Set ${(s.r1 - s.r0 + 1) * (s.c1 - s.c0 + 1)} cells to code ${code}; press Decode.`);
  }

  function copySelection() {
    if (state.grid === null) return;
    const s = state.selection || { r0: state.cursor.r, c0: state.cursor.c, r1: state.cursor.r, c1: state.cursor.c };
    const h = s.r1 - s.r0 + 1, w = s.c1 - s.c0 + 1;
    const data = new Int32Array(h * w);
    for (let r = 0; r < h; r++) for (let c = 0; c < w; c++) data[r * w + c] = state.grid[(s.r0 + r) * state.w + s.c0 + c];
    state.clipboard = { h, w, data };
    $("paste-button").disabled = false;
    setStatus(`Copied a ${h} × ${w} region; move the cursor and paste.`);
  }

  function pasteAtCursor() {
    if (state.grid === null || state.clipboard === null) return;
    const { h, w, data } = state.clipboard;
    const { r: r0, c: c0 } = state.cursor;
    for (let r = 0; r < h && r0 + r < state.h; r++) {
      for (let c = 0; c < w && c0 + c < state.w; c++) state.grid[(r0 + r) * state.w + c0 + c] = data[r * w + c];
    }
    markEdited();
    setStatus(`Pasted the ${h} × ${w} region at row ${r0}, column ${c0}; press Decode.`);
  }

  function pickCode() {
    if (state.grid === null) return;
    $("edit-code").value = String(state.grid[state.cursor.r * state.w + state.cursor.c]);
  }

  function resetEdits() {
    if (state.grid === null) return;
    state.grid = Int32Array.from(state.encodedGrid);
    state.edited = false;
    drawTokenMap();
    decode();
  }

  // ------------------------------------------------------------------ downloads

  function save(blob, filename) {
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = filename;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // A ready /decode request body: curl -H 'Content-Type: application/json' -d @vqtok-tokens.json .../decode
  function downloadJson() {
    if (state.grid === null) return;
    const body = { indices: gridRows(), crop_to: state.encoded.content_size };
    save(new Blob([JSON.stringify(body)], { type: "application/json" }), "vqtok-tokens.json");
  }

  // The same (1, h, w) int64 array /encode answers with Accept: application/x-npy.
  function npyBytes() {
    let header = `{'descr': '<i8', 'fortran_order': False, 'shape': (1, ${state.h}, ${state.w}), }`;
    const unpadded = 10 + header.length + 1;
    header += " ".repeat((64 - (unpadded % 64)) % 64) + "\n";
    const head = new Uint8Array(10 + header.length);
    head.set([0x93, 0x4e, 0x55, 0x4d, 0x50, 0x59, 1, 0]);  // \x93NUMPY, version 1.0
    new DataView(head.buffer).setUint16(8, header.length, true);
    for (let i = 0; i < header.length; i++) head[10 + i] = header.charCodeAt(i);
    const data = new BigInt64Array(state.grid.length);
    state.grid.forEach((k, i) => { data[i] = BigInt(k); });
    return new Blob([head, new Uint8Array(data.buffer)], { type: "application/x-npy" });
  }

  // ------------------------------------------------------------------ paste tokens

  function parseGrid(text) {
    const numbers = (text.match(/\d+/g) || []).map(Number);
    if (numbers.length === 0) return null;
    if (numbers.length !== 2) throw new Error("grid: give two numbers, h and w");
    return numbers;
  }

  async function decodePasted() {
    const out = $("paste-error");
    out.textContent = "";
    const tokens = ($("paste-tokens").value.match(/-?\d+/g) || []).map(Number);
    if (tokens.length === 0) {
      out.textContent = "Paste some token ids first.";
      return;
    }
    const body = { tokens, layout: $("paste-layout").value || state.defaultLayout, repair: "lenient" };
    try {
      const grid = parseGrid($("paste-grid").value);
      if (grid !== null) body.grid = grid;
    } catch (err) {
      out.textContent = err.message;
      return;
    }
    let answer;
    try {
      const response = await api("decode", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify(body),
      });
      answer = await response.json();
    } catch (err) {
      out.textContent = `Decode failed: ${err.message}`;
      return;
    }
    const image = answer.images[0];
    $("paste-image").src = `data:${image.media_type};base64,${image.image}`;
    const repairs = image.repairs || [];
    $("paste-summary").textContent =
      `Decoded a ${image.grid[0]} × ${image.grid[1]} grid with the ${answer.layout} layout: ` +
      (repairs.length === 0 ? "nothing needed repair." : `${repairs.length} repair${repairs.length > 1 ? "s" : ""}:`);
    $("paste-summary").dataset.repairs = String(repairs.length);
    const list = $("paste-repairs");
    list.replaceChildren(...repairs.map((repair) => {
      const item = document.createElement("li");
      item.textContent = `position ${repair.position}: ${repair.kind}: ${repair.detail}`;
      return item;
    }));
    $("paste-result").hidden = false;
  }

  function fillPasteFromEncoded() {
    if (!state.encoded || !state.encoded.tokens) return;
    $("paste-tokens").value = state.encoded.tokens.join(" ");
    $("paste-layout").value = state.layoutName;
    $("paste-grid").value = `${state.h},${state.w}`;
  }

  // ------------------------------------------------------------------ wiring

  function wire() {
    $("key-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = $("api-key").value;
      if (!key) return;
      state.key = key;
      $("api-key").value = "";
      $("key-error").textContent = "";
      connect().then(() => { if (state.info !== null && state.source !== null) encode(); });
    });
    $("file-input").addEventListener("change", (event) => {
      const file = event.target.files[0];
      if (file) useSource(file, file.name);
    });
    const zone = $("drop-zone");
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      const file = event.dataTransfer.files[0];
      if (file) useSource(file, file.name);
    });
    for (const button of document.querySelectorAll("button.sample")) {
      button.addEventListener("click", () => loadSample(button.dataset.sample));
    }
    $("encode-button").addEventListener("click", encode);
    $("fill-button").addEventListener("click", fillSelection);
    $("pick-button").addEventListener("click", pickCode);
    $("copy-button").addEventListener("click", copySelection);
    $("paste-button").addEventListener("click", pasteAtCursor);
    $("reset-button").addEventListener("click", resetEdits);
    $("decode-button").addEventListener("click", decode);
    $("download-json").addEventListener("click", downloadJson);
    $("download-npy").addEventListener("click", () => { if (state.grid !== null) save(npyBytes(), "vqtok-indices.npy"); });
    $("download-png").addEventListener("click", () => { if (state.reconBlob) save(state.reconBlob, "vqtok-reconstruction.png"); });
    $("paste-decode").addEventListener("click", decodePasted);
    $("paste-fill").addEventListener("click", fillPasteFromEncoded);
    wireCells();
  }

  wire();
  connect();
})();
