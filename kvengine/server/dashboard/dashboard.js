// kvengine dashboard: polls /dashboard/state (engine.stats() plus tokens/s) and draws the KV pool live.
"use strict";

const POLL_MS = 500;
const HISTORY = 120; // tokens/s points in the sparkline
const COLORS = { shared: "#c46cff", cached: "#1fb89a", free: "#2a3040", line: "#4f8cff" };
const rateHistory = [];
const requestHue = new Map(); // request id -> hue, stable while the request lives
let nextHue = 0;

const $ = (id) => document.getElementById(id);

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${Math.round(n)} B` : `${n.toFixed(1)} ${units[i]}`;
}

function count(n) {
  if (n >= 1e9) return `${(n / 1e9).toFixed(2)} G`;
  if (n >= 1e6) return `${(n / 1e6).toFixed(2)} M`;
  if (n >= 1e4) return `${(n / 1e3).toFixed(1)} k`;
  return String(n);
}

// Hues near the shared (purple) and cached-free (teal) colours are skipped so owners never look shared.
const RESERVED_HUES = [[255, 305], [155, 185]];

function hueFor(id) {
  if (!requestHue.has(id)) {
    while (RESERVED_HUES.some(([lo, hi]) => nextHue >= lo && nextHue <= hi)) nextHue = (nextHue + 137.508) % 360;
    requestHue.set(id, nextHue);
    nextHue = (nextHue + 137.508) % 360;
  }
  return requestHue.get(id);
}

function requestColor(id) { return `hsl(${hueFor(id)}, 72%, 60%)`; }

function esc(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function setText(id, text) { const el = $(id); if (el.textContent !== String(text)) el.textContent = text; }

function render(s) {
  setText("model", `${s.model} · context ${s.max_model_len} · up to ${s.max_num_seqs} running`);
  setText("kv-dtype", s.kv_dtype);
  setText("bytes-per-token", bytes(s.bytes_per_token));
  setText("block-size", s.block_size);
  setText("bytes-per-block", bytes(s.bytes_per_block));
  setText("pool-bytes", bytes(s.pool_bytes));
  setText("blocks-used", s.blocks_used);
  setText("blocks-total", s.blocks_total);
  setText("blocks-shared", s.blocks_shared);
  setText("blocks-cached", s.blocks_cached_free);
  setText("usage-pct", `${(100 * s.blocks_used / Math.max(1, s.blocks_total)).toFixed(1)}%`);
  setText("hit-rate", `${(100 * s.prefix_hit_rate).toFixed(1)}%`);
  setText("hit-tokens", count(s.prefix_hit_tokens));
  setText("query-tokens", count(s.prefix_query_tokens));
  setText("tokens-per-s", s.tokens_per_s.toFixed(1));
  setText("running", s.running);
  setText("waiting", s.waiting);
  setText("preemptions", s.preemptions);
  setText("tokens-generated", count(s.tokens_generated));
  setText("steps", count(s.steps));
  const pct = (n) => `${(100 * n / Math.max(1, s.blocks_total)).toFixed(2)}%`;
  $("bar-private").style.width = pct(s.blocks_used - s.blocks_shared);
  $("bar-shared").style.width = pct(s.blocks_shared);
  $("bar-cached").style.width = pct(s.blocks_cached_free);
  renderDisk(s.disk);
  rateHistory.push(s.tokens_per_s);
  if (rateHistory.length > HISTORY) rateHistory.shift();
  drawSparkline();
  drawPool(s);
  renderRequests(s);
}

function renderDisk(d) {
  $("disk-card").hidden = !d;
  if (!d) return;
  setText("disk-dir", d.dir);
  setText("disk-files", count(d.store_files));
  setText("disk-bytes", bytes(d.store_bytes));
  setText("disk-budget", bytes(d.store_budget));
  setText("disk-tokens", count(d.tokens_loaded));
  setText("disk-read", bytes(d.bytes_loaded));
  setText("disk-load", `${(1000 * d.load_s).toFixed(0)} ms`);
  setText("disk-hits", count(d.store_reads));
  setText("disk-misses", count(d.store_misses));
  setText("disk-written", count(d.store_writes));
  setText("disk-evictions", count(d.store_evictions));
  setText("disk-skipped", count(Object.values(d.store_skipped).reduce((a, b) => a + b, 0)));
  setText("disk-stopped", d.store_writes_stopped ? ` · writes stopped: ${d.store_writes_stopped}` : "");
}

function fitCanvas(canvas, cssHeight) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  canvas.style.height = `${cssHeight}px`;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(cssHeight * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  return { ctx, width, height: cssHeight };
}

function drawSparkline() {
  const { ctx, width, height } = fitCanvas($("sparkline"), 44);
  ctx.clearRect(0, 0, width, height);
  if (rateHistory.length < 2) return;
  const max = Math.max(1, ...rateHistory);
  const step = width / (HISTORY - 1);
  const x0 = width - (rateHistory.length - 1) * step;
  const y = (v) => height - 3 - (v / max) * (height - 8);
  ctx.beginPath();
  rateHistory.forEach((v, i) => (i ? ctx.lineTo(x0 + i * step, y(v)) : ctx.moveTo(x0, y(v))));
  ctx.strokeStyle = COLORS.line;
  ctx.lineWidth = 2;
  ctx.stroke();
  ctx.lineTo(x0 + (rateHistory.length - 1) * step, height);
  ctx.lineTo(x0, height);
  ctx.closePath();
  ctx.fillStyle = "rgba(79, 140, 255, 0.15)";
  ctx.fill();
}

// Cells in pool order: each request's private blocks in its colour, then shared, cached-free and free.
function poolCells(s) {
  const cells = [];
  for (const r of s.requests) {
    const color = requestColor(r.request_id);
    for (let i = 0; i < r.blocks - r.shared_blocks; i++) cells.push(color);
  }
  for (let i = 0; i < s.blocks_shared; i++) cells.push(COLORS.shared);
  for (let i = 0; i < s.blocks_cached_free; i++) cells.push(COLORS.cached);
  while (cells.length < s.blocks_total) cells.push(COLORS.free);
  return cells;
}

function drawPool(s) {
  const canvas = $("pool");
  const width = canvas.clientWidth;
  const total = Math.max(1, s.blocks_total);
  const cell = Math.max(3, Math.min(22, Math.floor(Math.sqrt((width * 300) / total))));
  const cols = Math.max(1, Math.floor(width / cell));
  const rows = Math.ceil(total / cols);
  const { ctx } = fitCanvas(canvas, rows * cell);
  const gap = cell >= 6 ? 1.5 : cell >= 4 ? 1 : 0;
  poolCells(s).forEach((color, i) => {
    ctx.fillStyle = color;
    ctx.globalAlpha = color === COLORS.cached ? 0.7 : 1;
    ctx.fillRect((i % cols) * cell, Math.floor(i / cols) * cell, cell - gap, cell - gap);
  });
  ctx.globalAlpha = 1;
}

function renderRequests(s) {
  const body = document.querySelector("#requests tbody");
  const rows = s.requests.slice().sort((a, b) => (a.status === b.status ? 0 : a.status === "running" ? -1 : 1));
  const maxBlocks = Math.max(1, ...rows.map((r) => r.blocks));
  body.innerHTML = rows.map((r) => {
    const priv = r.blocks - r.shared_blocks;
    return `<tr><td class="id"><i style="background:${requestColor(r.request_id)}"></i>${esc(r.request_id)}</td>
      <td><span class="pill ${esc(r.status)}">${esc(r.status)}</span></td>
      <td><div class="mini" style="width:${(100 * r.blocks / maxBlocks).toFixed(1)}%">
        <div class="s" style="flex:${r.shared_blocks}"></div>
        <div class="p" style="flex:${priv};background:${requestColor(r.request_id)}"></div></div>
        <small>${r.shared_blocks} · ${priv}</small></td>
      <td>${r.tokens}</td><td>${r.computed_tokens}</td><td>${r.cached_tokens}</td></tr>`;
  }).join("");
  $("no-requests").style.display = rows.length ? "none" : "block";
  setText("request-count", rows.length ? `${rows.length} in flight` : "");
  const live = new Set(rows.map((r) => r.request_id));
  for (const id of requestHue.keys()) if (!live.has(id)) requestHue.delete(id);
}

// With --api-key the state needs a key: asked once, kept for this tab only (sessionStorage), sent as a bearer.
async function fetchState() {
  const key = sessionStorage.getItem("kvengine-key");
  const headers = key ? { Authorization: `Bearer ${key}` } : {};
  const response = await fetch("/dashboard/state", { cache: "no-store", headers });
  if (response.status === 401) {
    const given = window.prompt("This server needs an API key to show its dashboard:");
    if (given) sessionStorage.setItem("kvengine-key", given);
  }
  return response;
}

async function poll() {
  try {
    const response = await fetchState();
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    $("status").classList.add("live");
    setText("status-text", `live · ${new Date().toLocaleTimeString()}`);
  } catch (err) {
    $("status").classList.remove("live");
    setText("status-text", `disconnected (${err.message})`);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
