// Bit-Llama Lab dashboard: runs table, curves, parallel coordinates, parameter importance, run pages.
// Served by `runner ui` (data from /api/..., polled every second) or inlined by `runner report --html`
// (data in <script id="inline-data">). Every user string reaches the page as text, never as HTML.
"use strict";

const INLINE = (() => {
  const el = document.getElementById("inline-data");
  return el ? JSON.parse(el.textContent) : null;
})();

// Script errors are shown on the page and counted on <body> (the browser test reads them).
const ERRORS = [];
function noteError(msg) {
  ERRORS.push(String(msg));
  document.body.dataset.errors = String(ERRORS.length);
  document.body.dataset.lastError = String(msg).slice(0, 300);
}
window.addEventListener("error", (e) => noteError(e.message || e));
window.addEventListener("unhandledrejection", (e) => noteError(e.reason && e.reason.message ? e.reason.message : e.reason));
document.body.dataset.errors = "0";

// ---------- data: the server's API, or the same answers from the inlined snapshot ----------

async function api(path, params) {
  if (INLINE) return inlineApi(path, params || {});
  const q = params ? "?" + new URLSearchParams(params).toString() : "";
  const res = await fetch("api/" + path + q, { cache: "no-store" });
  const body = await res.json();
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}

function inlineApi(path, params) {
  const d = INLINE;
  if (path === "state") return { token: "offline" };
  if (path === "runs") return d.runs;
  if (path === "sweeps") return d.sweeps;
  if (path === "metric-names") return d.metric_names;
  if (path === "metrics") {
    const out = {};
    const series = d.metrics[params.name] || {};
    for (const part of (params.runs || "").split(",")) {
      if (!part) continue;
      const [id, after] = part.split(":");
      const s = series[id];
      if (!s) { out[id] = { step: [], tokens: [], elapsed_s: [], value: [] }; continue; }
      const from = s.step.findIndex((x) => x > Number(after || 0));
      const cut = (a) => (from < 0 ? [] : a.slice(from));
      out[id] = { step: cut(s.step), tokens: cut(s.tokens), elapsed_s: cut(s.elapsed_s), value: cut(s.value) };
    }
    return out;
  }
  if (path === "scaling") {
    const by = (d.scaling || {})[params.sweep];
    const v = by && by[params.group_by || ""];
    if (!v) throw new Error("no scaling fit of " + params.sweep + " by " + (params.group_by || "nothing") + " in this report");
    return v;
  }
  const m = path.match(/^runs\/(\d+)$/);
  if (m) {
    const r = d.details[m[1]];
    if (!r) throw new Error("no run with id " + m[1] + " in this report");
    return r;
  }
  throw new Error("not in this report: " + path);
}

// ---------- small DOM helpers (text only) ----------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === undefined || kid === null || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e6) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  const t = v.toFixed(digits === undefined ? 4 : digits);
  return t.includes(".") ? t.replace(/0+$/, "").replace(/\.$/, "") : t;
}

function fmtSecs(s) {
  if (!s) return "–";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(2) + " h";
}

function paramStr(v) {
  return typeof v === "string" ? v : JSON.stringify(v);
}

// A distinct colour per run id, stable across redraws.
function color(id) {
  const hue = (id * 137.508) % 360;
  return `hsl(${hue.toFixed(0)}, 65%, 45%)`;
}

// ---------- state ----------

const S = {
  token: null,
  runs: [],
  sweeps: [],
  sweep: "",
  tag: "",
  filter: "",
  sort: { key: "id", asc: true },
  metric: "loss",
  x: "step",
  smooth: 0.6,
  log: false,
  objective: "best_val_loss",
  hidden: new Set(),
  brush: {}, // parallel-coordinates axis -> [lo, hi] in value space
  cache: {}, // metric -> run id -> {step, tokens, elapsed_s, value}
  charts: [],
  firstDraw: null,
};

const MAX_CURVES = 100;

function sweptKeys(rows) {
  const keys = new Set();
  for (const r of rows) for (const k of Object.keys(r.params || {})) keys.add(k);
  return [...keys].sort();
}

function filteredRuns() {
  const f = S.filter.trim().toLowerCase();
  return S.runs.filter((r) => {
    if (S.sweep && r.sweep_id !== S.sweep) return false;
    if (S.tag && !(r.tags || []).includes(S.tag)) return false;
    if (f) {
      const text = [r.id, r.sweep_id, r.status, ...(r.tags || []), r.note || "",
        ...Object.entries(r.params || {}).map(([k, v]) => k + "=" + paramStr(v))].join(" ").toLowerCase();
      if (!text.includes(f)) return false;
    }
    return true;
  });
}

// Runs the parallel-coordinates brushes keep.
function brushed(rows) {
  const axes = Object.entries(S.brush);
  if (!axes.length) return rows;
  return rows.filter((r) => axes.every(([k, [lo, hi]]) => {
    const v = axisValue(r, k);
    return v !== null && v >= lo && v <= hi;
  }));
}

function sortRows(rows) {
  const { key, asc } = S.sort;
  const val = (r) => (key in (r.params || {}) ? r.params[key] : r[key]);
  return [...rows].sort((a, b) => {
    const x = val(a), y = val(b);
    const mx = x === null || x === undefined, my = y === null || y === undefined;
    if (mx !== my) return mx ? 1 : -1;
    let c = 0;
    if (!mx) c = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
    if (!asc) c = -c;
    return c || a.id - b.id;
  });
}

// ---------- curves ----------

// TensorBoard's debiased exponential moving average.
function ema(values, w) {
  if (!w) return values;
  const out = new Array(values.length);
  let last = 0, n = 0;
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || !Number.isFinite(v)) { out[i] = v; continue; }
    last = last * w + (1 - w) * v;
    n++;
    out[i] = last / (1 - Math.pow(w, n));
  }
  return out;
}

async function loadMetric(name, runs) {
  const cache = (S.cache[name] = S.cache[name] || {});
  // Ask only for what is new: each run from the last step already held (its progress tells whether any).
  const want = runs.filter((r) => {
    const c = cache[r.id];
    return !c || (c.seenStep < r.step) || (c.seenStatus !== r.status);
  });
  for (let i = 0; i < want.length; i += 200) {
    const part = want.slice(i, i + 200);
    const spec = part.map((r) => { const c = cache[r.id]; const last = c && c.step.length ? c.step[c.step.length - 1] : 0; return r.id + ":" + last; }).join(",");
    const got = await api("metrics", { name, runs: spec });
    for (const r of part) {
      const g = got[String(r.id)] || { step: [], tokens: [], elapsed_s: [], value: [] };
      const c = cache[r.id];
      if (!c) cache[r.id] = { ...g, seenStep: r.step, seenStatus: r.status };
      else {
        for (const k of ["step", "tokens", "elapsed_s", "value"]) c[k] = c[k].concat(g[k]);
        c.seenStep = r.step; c.seenStatus = r.status;
      }
    }
  }
  return cache;
}

// Aligned uPlot data for series with their own x values: the union of x when small, else a grid of
// `bins` buckets over the x range (the last point of each series in each bucket), so 100 runs stay fast.
function align(series, bins) {
  const xs = new Set();
  let n = 0;
  for (const s of series) { n += s.x.length; for (const x of s.x) xs.add(x); }
  let grid;
  if (xs.size <= 2500) {
    grid = [...xs].sort((a, b) => a - b);
    const at = new Map(grid.map((x, i) => [x, i]));
    return [grid, ...series.map((s) => {
      const col = new Array(grid.length).fill(null);
      s.x.forEach((x, i) => { col[at.get(x)] = s.y[i]; });
      return col;
    })];
  }
  let lo = Infinity, hi = -Infinity;
  for (const x of xs) { if (x < lo) lo = x; if (x > hi) hi = x; }
  const w = (hi - lo) / (bins - 1) || 1;
  grid = Array.from({ length: bins }, (_, i) => lo + i * w);
  return [grid, ...series.map((s) => {
    const col = new Array(bins).fill(null);
    s.x.forEach((x, i) => { col[Math.round((x - lo) / w)] = s.y[i]; });
    return col;
  })];
}

function runLabel(r, keys) {
  const p = keys.filter((k) => r.params && k in r.params).map((k) => k + "=" + paramStr(r.params[k]));
  return "run " + r.id + (p.length ? " · " + p.join(" ") : "");
}

const X_LABEL = { step: "step", tokens: "tokens seen", flops: "training FLOPs", elapsed_s: "wall time (s)" };

// Tooltip: the run under the cursor (the focused series) and its value.
function tooltipPlugin(labels) {
  const tip = document.getElementById("tooltip");
  let focused = null;
  return {
    hooks: {
      setSeries: (u, idx) => { focused = idx; },
      setCursor: (u) => {
        const { left, top, idx } = u.cursor;
        if (focused === null || focused === undefined || idx === null || idx === undefined || left < 0) { tip.hidden = true; return; }
        const v = u.data[focused][idx];
        if (v === null || v === undefined) { tip.hidden = true; return; }
        const rect = u.over.getBoundingClientRect();
        tip.textContent = labels[focused - 1] + " — " + fmt(v) + " at " + fmt(u.data[0][idx]);
        tip.hidden = false;
        tip.style.left = Math.min(rect.left + left + 14, window.innerWidth - 430) + "px";
        tip.style.top = rect.top + top + 14 + "px";
      },
    },
  };
}

function lineChart(el, title, xLabel, series, opts) {
  const cs = getComputedStyle(el);
  const inner = el.clientWidth - parseFloat(cs.paddingLeft || 0) - parseFloat(cs.paddingRight || 0);
  const width = Math.max(320, inner || 600);
  const data = align(series.map((s) => ({ x: s.x, y: s.y })), 800);
  const labels = series.map((s) => s.label);
  const u = new uPlot({
    title,
    width,
    height: opts.height || 300,
    plugins: [tooltipPlugin(labels)],
    cursor: { focus: { prox: 24 }, drag: { x: true, y: false } },
    focus: { alpha: 0.25 },
    legend: { live: false },
    scales: { x: { time: false }, y: { distr: opts.log ? 3 : 1 } },
    axes: [{ label: xLabel }, { label: opts.yLabel || "", size: 60 }],
    series: [{ label: xLabel }, ...series.map((s) => ({
      label: s.label,
      stroke: s.color,
      width: 1.4,
      spanGaps: true,
      show: !(opts.hidden && opts.hidden.has(s.id)),
      points: { show: false },
    }))],
    hooks: {
      setSeries: [(u2, idx, o) => {
        if (idx && opts.hidden && o && "show" in o) {
          const id = series[idx - 1].id;
          if (o.show) opts.hidden.delete(id); else opts.hidden.add(id);
        }
      }],
    },
  }, data, el);
  S.charts.push(u);
  return u;
}

function curveSeries(rows, cache, keys, smooth, log) {
  const out = [];
  for (const r of rows) {
    const c = cache[r.id];
    if (!c || !c.step.length) continue;
    const xs = [], ys = [];
    const yv = ema(c.value, smooth);
    for (let i = 0; i < c.step.length; i++) {
      // FLOPs spent: tokens seen × the run's training FLOPs per token (recorded with the run).
      const x = S.x === "flops"
        ? (r.flops_per_token && c.tokens[i] != null ? c.tokens[i] * r.flops_per_token : null)
        : c[S.x][i];
      let y = yv[i];
      if (x === null || x === undefined || y === null || y === undefined) continue;
      if (log && !(y > 0)) y = null;
      xs.push(S.x === "step" ? c.step[i] : x);
      ys.push(y);
    }
    out.push({ id: r.id, label: runLabel(r, keys), color: color(r.id), x: xs, y: ys });
  }
  return out;
}

// ---------- scaling: IsoFLOP profiles and the compute-optimal frontier ----------

// A tick's label: log axes get minor ticks without a value (no label) and wide ranges (exponents).
function tickLabel(t) {
  if (t === null || t === undefined) return "";
  const a = Math.abs(t);
  return a !== 0 && (a < 1e-2 || a >= 1e4) ? t.toExponential(0) : fmt(t, 3);
}

// One chart of point and line series with their own x values (log axes where asked).
function xyChart(el, title, xLabel, yLabel, series, logx, logy) {
  // The box's own width (a phone's column too), not a fixed minimum that would overflow it.
  const cs = getComputedStyle(el);
  const inner = el.clientWidth - parseFloat(cs.paddingLeft || 0) - parseFloat(cs.paddingRight || 0);
  const width = Math.max(200, inner || 600);
  const data = align(series.map((s) => ({ x: s.x, y: s.y })), 2000);
  const u = new uPlot({
    title, width, height: 300,
    legend: { live: false },
    scales: { x: { time: false, distr: logx ? 3 : 1 }, y: { distr: logy ? 3 : 1 } },
    axes: [{ label: xLabel, values: (u2, ticks) => ticks.map(tickLabel) },
      { label: yLabel, size: 60, values: (u2, ticks) => ticks.map(tickLabel) }],
    series: [{ label: xLabel }, ...series.map((s) => ({
      label: s.label,
      stroke: s.color,
      width: s.points ? 0 : 1.4,
      dash: s.dash,
      spanGaps: true,
      paths: s.points ? () => null : undefined,
      points: s.points ? { show: true, size: s.size || 7, fill: s.color, stroke: s.color } : { show: false },
    }))],
  }, data, el);
  S.charts.push(u);
  return u;
}

// Budgets of a group's points, by value (an IsoFLOP cell's budget is exact).
function byBudget(points) {
  const out = new Map();
  for (const p of points) {
    const k = p.c.toPrecision(6);
    if (!out.has(k)) out.set(k, []);
    out.get(k).push(p);
  }
  return [...out.values()].sort((a, b) => a[0].c - b[0].c);
}

async function scalingCard(main, rows, keys) {
  const studied = [...new Set(rows.filter((r) => r.budget !== null && r.budget !== undefined).map((r) => r.sweep_id))];
  if (studied.length !== 1) return;
  const sweep = studied[0];
  const groupSel = h("select", { id: "scale-group", onchange: (e) => { S.scaleGroup = e.target.value; render(); } },
    [["", "none"], ...keys.filter((k) => k !== "max_tokens").map((k) => [k, k])].map(([v, l]) => {
      const o = h("option", { value: v }, l); if (v === (S.scaleGroup || "")) o.selected = true; return o;
    }));
  const card = h("div", { class: "card", id: "scaling" },
    h("div", { class: "toolbar" }, h("h2", {}, "Scaling: IsoFLOP profiles and the compute-optimal frontier"), h("label", {}, "group by", groupSel)));
  main.append(card);
  let fit;
  try {
    fit = await api("scaling", { sweep, group_by: S.scaleGroup || "" });
  } catch (e) {
    card.append(h("p", { class: "muted" }, "No fit: " + e.message));
    return;
  }
  const profiles = h("div", { class: "chart", id: "isoflop-profiles" });
  const frontier = h("div", { class: "chart", id: "frontier" });
  card.append(h("div", { class: "grid2" }, profiles, frontier));
  const palette = (i) => `hsl(${(i * 67) % 360}, 60%, 42%)`;
  const prof = [], fr = [];
  let ci = 0, minima = 0;
  for (const g of fit.groups) {
    const pts = fit.points.filter((p) => p.group === g.name);
    const budgets = byBudget(pts);
    const gx = [], gy = [];
    budgets.forEach((bp, bi) => {
      const col = palette(ci++);
      const sorted = bp.slice().sort((a, b) => a.n - b.n);
      const name = (fit.groups.length > 1 ? g.name + " · " : "") + "C = " + sorted[0].c.toExponential(1);
      prof.push({ label: name, color: col, points: true, x: sorted.map((p) => p.n), y: sorted.map((p) => p.loss) });
      const m = g.isoflop.find((q) => Math.abs(q.budget / sorted[0].c - 1) <= 0.01);
      if (m) {
        minima++;
        const lo = Math.log(sorted[0].n), hi = Math.log(sorted[sorted.length - 1].n);
        const xs = [], ys = [];
        for (let i = 0; i <= 40; i++) {
          const x = lo + (hi - lo) * i / 40;
          xs.push(Math.exp(x)); ys.push(m.parabola[0] + m.parabola[1] * x + m.parabola[2] * x * x);
        }
        prof.push({ label: name + " fit", color: col, dash: [6, 4], x: xs, y: ys });
        prof.push({ label: name + " minimum", color: col, points: true, size: 12, x: [m.n_opt], y: [m.loss_opt] });
        gx.push(m.budget); gy.push(m.n_opt);
      }
    });
    const col = palette(ci++);
    if (gx.length) fr.push({ label: g.name + " N_opt", color: col, points: true, x: gx, y: gy });
    const f = g.frontier;
    if (f && gx.length >= 2) {
      const lo = Math.log(Math.min(...gx) / 3), hi = Math.log(Math.max(...gx) * 3);
      const mc = gx.reduce((a, c) => a + Math.log(c), 0) / gx.length;
      const line = (a) => {
        const xs = [], ys = [];
        for (let i = 0; i <= 20; i++) {
          const x = lo + (hi - lo) * i / 20;
          xs.push(Math.exp(x)); ys.push(Math.exp(f.ka + f.a * mc + a * (x - mc)));
        }
        return { xs, ys };
      };
      const mid = line(f.a), a0 = line(f.a_ci[0]), a1 = line(f.a_ci[1]);
      fr.push({ label: g.name + ": N_opt ∝ C^" + f.a.toFixed(3), color: col, x: mid.xs, y: mid.ys });
      fr.push({ label: "95% band (a " + f.a_ci[0].toFixed(3) + "…" + f.a_ci[1].toFixed(3) + ")", color: col, dash: [3, 3], x: a0.xs, y: a0.ys });
      fr.push({ label: " ", color: col, dash: [3, 3], x: a1.xs, y: a1.ys });
    }
  }
  xyChart(profiles, "Final val loss against model size, per budget", "N (parameters outside the embedding)", "val loss", prof, true, false);
  if (fr.length) xyChart(frontier, "Compute-optimal model size", "C (training FLOPs)", "N_opt", fr, true, true);
  else frontier.append(h("p", { class: "muted" }, "The frontier needs an IsoFLOP minimum (an interior optimum over at least 3 sizes) at 2 or more budgets."));
  const notes = [];
  for (const g of fit.groups) {
    for (const p of g.problems || []) notes.push(g.name + ": " + p);
    if (g.law) notes.push(g.name + ": L(N, D) = " + fmt(g.law.E, 3) + " + " + fmt(g.law.A, 3) + "/N^" + fmt(g.law.alpha, 3) + " + " + fmt(g.law.B, 3) + "/D^" + fmt(g.law.beta, 3));
  }
  for (const c of fit.crossovers || []) notes.push(c.groups[0] + " and " + c.groups[1] + " cross at " + c.flops.toExponential(2) + " FLOPs");
  notes.push("Loss against FLOPs for every run: choose x = training FLOPs above. `runner scaling " + sweep + "` prints the fits with their intervals.");
  card.append(h("ul", { class: "muted" }, notes.map((t) => h("li", {}, t))));
  document.body.dataset.scalingPoints = String(fit.points.length);
  document.body.dataset.scalingMinima = String(minima);
}

// ---------- parallel coordinates, scatter, importance ----------

function isNumericKey(rows, k) {
  return rows.every((r) => !(k in (r.params || {})) || typeof r.params[k] === "number");
}

function axisValue(r, k) {
  if (k === "__objective") return r[S.objective] ?? null;
  const v = (r.params || {})[k];
  if (v === undefined || v === null) return null;
  if (typeof v === "number") return v;
  const cats = AXES.cats[k] || [];
  const i = cats.indexOf(paramStr(v));
  return i < 0 ? null : i;
}

const AXES = { cats: {} };

function axisSpec(rows, k) {
  if (k !== "__objective" && !isNumericKey(rows, k)) {
    const cats = [...new Set(rows.filter((r) => k in (r.params || {})).map((r) => paramStr(r.params[k])))].sort();
    AXES.cats[k] = cats;
    return { key: k, label: k, cats, lo: -0.5, hi: cats.length - 0.5, log: false };
  }
  const vals = rows.map((r) => axisValue(r, k)).filter((v) => v !== null && Number.isFinite(v));
  let lo = Math.min(...vals), hi = Math.max(...vals);
  const log = k !== "__objective" && lo > 0 && hi / lo >= 20;
  if (!vals.length) { lo = 0; hi = 1; }
  if (lo === hi) { lo -= 0.5; hi += 0.5; }
  return { key: k, label: k === "__objective" ? S.objective : k, lo, hi, log };
}

function axisPos(a, v) {
  // 0 at the bottom, 1 at the top.
  if (a.log) return (Math.log(v) - Math.log(a.lo)) / (Math.log(a.hi) - Math.log(a.lo));
  return (v - a.lo) / (a.hi - a.lo);
}
function axisInv(a, p) {
  if (a.log) return Math.exp(Math.log(a.lo) + p * (Math.log(a.hi) - Math.log(a.lo)));
  return a.lo + p * (a.hi - a.lo);
}

function parallelCoords(card, rows, keys, onBrush) {
  const canvas = h("canvas", { class: "pc" });
  card.append(canvas, h("p", { class: "muted" }, "Drag along an axis to keep only the runs inside the range (the table and curves follow); double-click an axis to clear it. Colour: the objective, from best (blue) to worst (red)."));
  const withObj = rows.filter((r) => r[S.objective] !== null && r[S.objective] !== undefined);
  const axes = [...keys.map((k) => axisSpec(rows, k)), axisSpec(withObj.length ? withObj : rows, "__objective")];
  const draw = () => {
    const dpr = window.devicePixelRatio || 1;
    const W = canvas.clientWidth, H = canvas.clientHeight;
    canvas.width = W * dpr; canvas.height = H * dpr;
    const g = canvas.getContext("2d");
    g.scale(dpr, dpr);
    g.clearRect(0, 0, W, H);
    const top = 24, bottom = H - 24, left = 50, right = W - 60;
    const ax = axes.map((a, i) => ({ ...a, x: axes.length > 1 ? left + (i * (right - left)) / (axes.length - 1) : left }));
    const y = (a, v) => bottom - axisPos(a, v) * (bottom - top);
    const objA = ax[ax.length - 1];
    const keep = new Set(brushed(rows).map((r) => r.id));
    for (const pass of [false, true]) {
      for (const r of rows) {
        if (keep.has(r.id) !== pass) continue;
        const o = r[S.objective];
        const t = o === null || o === undefined ? 0.5 : Math.max(0, Math.min(1, axisPos(objA, o)));
        g.strokeStyle = pass ? `hsl(${(220 - 220 * t).toFixed(0)}, 70%, 45%)` : "rgba(160,160,170,0.25)";
        g.lineWidth = pass ? 1.5 : 1;
        g.beginPath();
        let started = false;
        for (const a of ax) {
          const v = axisValue(r, a.key);
          if (v === null) { started = false; continue; }
          const py = y(a, v);
          if (!started) { g.moveTo(a.x, py); started = true; } else g.lineTo(a.x, py);
        }
        g.stroke();
      }
    }
    g.fillStyle = "#1d2330"; g.font = "11px system-ui, sans-serif"; g.textAlign = "center";
    for (const a of ax) {
      g.strokeStyle = "#556"; g.lineWidth = 1;
      g.beginPath(); g.moveTo(a.x, top); g.lineTo(a.x, bottom); g.stroke();
      g.fillText(a.label, a.x, top - 8);
      const ticks = a.cats ? a.cats.map((c, i) => [i, c]) : [0, 0.5, 1].map((p) => [axisInv(a, p), fmt(axisInv(a, p), 3)]);
      g.textAlign = "left";
      for (const [v, txt] of ticks) g.fillText(String(txt).slice(0, 14), a.x + 4, y(a, v) + 4);
      g.textAlign = "center";
      const b = S.brush[a.key];
      if (b) {
        g.fillStyle = "rgba(47,111,222,0.18)";
        const y1 = y(a, b[1]), y2 = y(a, b[0]);
        g.fillRect(a.x - 7, Math.min(y1, y2), 14, Math.abs(y2 - y1));
        g.fillStyle = "#1d2330";
      }
    }
    canvas._axes = ax; canvas._y = { top, bottom };
  };
  let drag = null;
  const axisAt = (e) => {
    const rect = canvas.getBoundingClientRect();
    const x = e.clientX - rect.left;
    return (canvas._axes || []).find((a) => Math.abs(a.x - x) < 18);
  };
  const valueAt = (a, e) => {
    const rect = canvas.getBoundingClientRect();
    const { top, bottom } = canvas._y;
    const p = Math.max(0, Math.min(1, (bottom - (e.clientY - rect.top)) / (bottom - top)));
    return axisInv(a, p);
  };
  canvas.addEventListener("mousedown", (e) => { const a = axisAt(e); if (a) drag = { a, from: valueAt(a, e) }; });
  canvas.addEventListener("mousemove", (e) => {
    if (!drag) return;
    const v = valueAt(drag.a, e);
    S.brush[drag.a.key] = [Math.min(drag.from, v), Math.max(drag.from, v)];
    draw();
  });
  window.addEventListener("mouseup", () => { if (drag) { drag = null; onBrush(); } });
  canvas.addEventListener("dblclick", (e) => { const a = axisAt(e); if (a) { delete S.brush[a.key]; draw(); onBrush(); } });
  requestAnimationFrame(draw);
}

// η² (the correlation ratio): the share of the objective's variance between the groups of a parameter's
// values; numeric parameters with more than 6 distinct values are cut into 5 quantile bins.
function importance(rows, keys) {
  const withObj = rows.filter((r) => Number.isFinite(r[S.objective]));
  const ys = withObj.map((r) => r[S.objective]);
  const mean = ys.reduce((a, b) => a + b, 0) / (ys.length || 1);
  const total = ys.reduce((a, y) => a + (y - mean) ** 2, 0);
  const out = [];
  for (const k of keys) {
    const have = withObj.filter((r) => k in (r.params || {}));
    if (have.length < 3 || total === 0) continue;
    const raw = have.map((r) => r.params[k]);
    let group;
    const distinct = new Set(raw.map(paramStr));
    if (typeof raw[0] === "number" && distinct.size > 6) {
      const sorted = [...raw].sort((a, b) => a - b);
      const cuts = [1, 2, 3, 4].map((q) => sorted[Math.floor((q * sorted.length) / 5)]);
      group = (v) => cuts.filter((c) => v >= c).length;
    } else group = (v) => paramStr(v);
    const groups = new Map();
    have.forEach((r) => {
      const g = group(r.params[k]);
      const e = groups.get(g) || { n: 0, s: 0 };
      e.n++; e.s += r[S.objective];
      groups.set(g, e);
    });
    let between = 0;
    for (const e of groups.values()) between += e.n * (e.s / e.n - mean) ** 2;
    out.push([k, between / total]);
  }
  return out.sort((a, b) => b[1] - a[1]);
}

function scatter(el, rows, k) {
  const pts = rows.filter((r) => k in (r.params || {}) && Number.isFinite(r[S.objective]));
  if (!pts.length) return;
  const a = axisSpec(rows, k);
  const xy = pts.map((r) => [axisValue(r, k), r[S.objective], r]).sort((p, q) => p[0] - q[0]);
  const xs = xy.map((p) => p[0]);
  let lo = a.lo, hi = a.hi;
  if (!a.cats) {
    if (a.log) { lo = lo / 1.3; hi = hi * 1.3; } else { const pad = (hi - lo) * 0.08 || 0.5; lo -= pad; hi += pad; }
  }
  const ys = xy.map((p) => p[1]);
  const ylo = Math.min(...ys), yhi = Math.max(...ys);
  const ypad = (yhi - ylo) * 0.1 || 0.05;
  const labels = [xy.map((p) => "run " + p[2].id)][0];
  const box = h("div", { class: "scatter" });
  el.append(box);
  const tip = document.getElementById("tooltip");
  const u = new uPlot({
    title: S.objective + " vs " + k,
    width: 300, height: 220,
    legend: { show: false },
    cursor: { points: { size: 9 } },
    scales: { x: { time: false, distr: a.log ? 3 : 1, range: () => [lo, hi] }, y: { range: () => [ylo - ypad, yhi + ypad] } },
    axes: [
      a.cats ? { label: k, splits: () => a.cats.map((_, i) => i), values: (u2, splits) => splits.map((i) => a.cats[i] ?? "") } : { label: k },
      { size: 55 },
    ],
    series: [{}, { stroke: "#2f6fde", fill: "#2f6fde", paths: () => null, points: { show: true, size: 7, fill: "#2f6fde" } }],
    hooks: {
      setCursor: [(u2) => {
        const i = u2.cursor.idx;
        if (i === null || i === undefined || u2.cursor.left < 0) { tip.hidden = true; return; }
        const rect = u2.over.getBoundingClientRect();
        tip.textContent = labels[i] + " · " + k + "=" + paramStr(xy[i][2].params[k]) + " → " + fmt(ys[i]);
        tip.hidden = false;
        tip.style.left = rect.left + u2.cursor.left + 12 + "px";
        tip.style.top = rect.top + u2.cursor.top + 12 + "px";
      }],
    },
  }, [xs, ys], box);
  S.charts.push(u);
}

// ---------- pages ----------

function clearCharts() {
  for (const u of S.charts) u.destroy();
  S.charts = [];
  S.curves = null;
  document.getElementById("tooltip").hidden = true;
}

function bestSummary(rows) {
  const done = rows.filter((r) => Number.isFinite(r.best_val_loss));
  if (!done.length) return h("div", { class: "card best" }, h("span", { class: "muted" }, "No validation result yet."));
  const best = done.reduce((a, b) => (b.best_val_loss < a.best_val_loss ? b : a));
  const p = Object.entries(best.params || {}).map(([k, v]) => k + "=" + paramStr(v)).join("  ");
  return h("div", { class: "card best" },
    "Best: ", h("a", { href: "#/run/" + best.id }, "run " + best.id), " (", best.sweep_id, ") — best val loss ",
    h("b", {}, fmt(best.best_val_loss)), best.val_bpb ? "  ·  " + fmt(best.val_bpb) + " bits/byte" : "",
    h("div", { class: "muted" }, p || "no swept parameters"));
}

function sweepsTable() {
  return h("div", { class: "card" }, h("h2", {}, "Sweeps"), h("table", { class: "runs" },
    h("tr", {}, ["sweep", "name", "file", "created", "runs", "early stopping"].map((c) => h("th", {}, c))),
    S.sweeps.map((s) => h("tr", {},
      h("td", {}, h("a", { href: "#/", onclick: (e) => { e.preventDefault(); S.sweep = s.id; S.brush = {}; render(); } }, s.id)),
      h("td", {}, s.name), h("td", {}, s.file), h("td", {}, s.created_at),
      h("td", {}, Object.entries(s.counts || {}).map(([k, v]) => v + " " + k).join(", ")),
      h("td", {}, s.early_stop || "–")))));
}

function runsTable(rows, keys, shownIds) {
  const cols = [
    ["id", "id"], ["sweep_id", "sweep"], ["status", "status"], ["rung", "rung"],
    ...keys.map((k) => [k, k]),
    ["step", "step"], ["best_val_loss", "best val loss"], ["val_bpb", "val bpb"],
    ["tokens_per_s", "tokens/s (avg)"], ["wall_s", "wall"], ["tags", "tags"], ["note", "note"],
  ];
  const head = h("tr", {}, cols.map(([k, label]) => h("th", {
    class: S.sort.key === k ? "sorted" + (S.sort.asc ? " asc" : "") : "",
    onclick: () => { S.sort = { key: k, asc: S.sort.key === k ? !S.sort.asc : true }; render(); },
  }, label)));
  const body = sortRows(rows).map((r) => h("tr", { class: shownIds.has(r.id) ? "" : "dim", dataset: { run: String(r.id) } },
    h("td", {}, h("a", { href: "#/run/" + r.id }, String(r.id))),
    h("td", {}, r.sweep_id),
    h("td", {}, h("span", { class: "status " + r.status }, r.status)),
    h("td", { class: "num" }, r.rung ?? "–"),
    keys.map((k) => h("td", {}, k in (r.params || {}) ? paramStr(r.params[k]) : "–")),
    h("td", { class: "num" }, r.step + (r.total_steps ? "/" + r.total_steps : "")),
    h("td", { class: "num" }, fmt(r.best_val_loss)),
    h("td", { class: "num" }, fmt(r.val_bpb)),
    h("td", { class: "num" }, r.tokens_per_s ? Math.round(r.tokens_per_s) : "–"),
    h("td", { class: "num" }, fmtSecs(r.wall_s)),
    h("td", {}, (r.tags || []).map((t) => h("span", { class: "tag" }, t))),
    h("td", { title: r.note || "" }, (r.note || "").slice(0, 40)),
  ));
  return h("div", { class: "tablewrap" }, h("table", { class: "runs", id: "runs-table" }, h("thead", {}, head), h("tbody", {}, body)));
}

function toolbar(metricNames) {
  const tags = [...new Set(S.runs.flatMap((r) => r.tags || []))].sort();
  const sel = (value, options, on, id) => h("select", { id, onchange: (e) => on(e.target.value) },
    options.map(([v, label]) => { const o = h("option", { value: v }, label); if (v === value) o.selected = true; return o; }));
  const filter = h("input", { type: "search", placeholder: "filter: id, status, n_layers=4, tag…", value: S.filter, size: 32 });
  filter.addEventListener("change", (e) => { S.filter = e.target.value; render(); });
  return h("div", { class: "toolbar" },
    h("label", {}, "sweep", sel(S.sweep, [["", "all"], ...S.sweeps.map((s) => [s.id, s.id + " · " + s.name])], (v) => { S.sweep = v; S.brush = {}; render(); }, "sweep")),
    h("label", {}, "tag", sel(S.tag, [["", "any"], ...tags.map((t) => [t, t])], (v) => { S.tag = v; render(); }, "tag")),
    filter,
    h("span", { class: "muted" }, ""),
  );
}

let renderSeq = 0;

async function renderOverview() {
  const seq = ++renderSeq;
  const t0 = performance.now();
  const rows = filteredRuns();
  const keys = sweptKeys(rows);
  const kept = brushed(rows);
  const shown = sortRows(kept).slice(0, MAX_CURVES);
  const cache = await loadMetric(S.metric, shown);
  const recorded = shown.length ? await api("metric-names", { runs: shown.map((r) => r.id).join(",") }) : [];
  if (seq !== renderSeq) return;
  // The usual ones first, then any other metric these runs logged (e.g. allreduce_ms).
  const names = new Set(["loss", "val_loss", "val_bpb", "lr", "tokens_per_s", "grad_norm", "elapsed_s", ...recorded]);
  const main = document.getElementById("main");
  clearCharts();
  main.replaceChildren();
  const sw = S.sweeps.find((s) => s.id === S.sweep);
  document.getElementById("title").textContent = INLINE ? INLINE.title : sw ? sw.id + " · " + sw.name : "all runs";
  main.append(toolbar([...names]));
  if (sw && sw.early_stop) main.append(h("p", { class: "muted" }, "Early stopping: " + sw.early_stop));
  main.append(bestSummary(rows));
  if (!S.sweep && S.sweeps.length > 1) main.append(sweepsTable());

  // Curves.
  const card = h("div", { class: "card" });
  const mSel = h("select", { id: "metric", onchange: (e) => { S.metric = e.target.value; render(); } },
    [...names].map((n) => { const o = h("option", { value: n }, n); if (n === S.metric) o.selected = true; return o; }));
  const xSel = h("select", { id: "xaxis", onchange: (e) => { S.x = e.target.value; render(); } },
    Object.entries(X_LABEL).map(([v, l]) => { const o = h("option", { value: v }, l); if (v === S.x) o.selected = true; return o; }));
  const smooth = h("input", { type: "range", min: 0, max: 0.99, step: 0.01, value: S.smooth, id: "smooth" });
  smooth.addEventListener("change", (e) => { S.smooth = Number(e.target.value); render(); });
  const log = h("input", { type: "checkbox", id: "logy" });
  log.checked = S.log;
  log.addEventListener("change", (e) => { S.log = e.target.checked; render(); });
  card.append(h("div", { class: "toolbar" },
    h("label", {}, "metric", mSel), h("label", {}, "x", xSel),
    h("label", {}, "smoothing", smooth, h("span", {}, S.smooth.toFixed(2))), h("label", {}, log, "log scale"),
    h("span", { class: "muted" }, kept.length > MAX_CURVES ? `first ${MAX_CURVES} of ${kept.length} runs (filter or brush to pick others)` : `${shown.length} runs · click a legend entry to hide it · drag to zoom, double-click to reset`)));
  const chartEl = h("div", { class: "chart", id: "curves" });
  card.append(chartEl);
  main.append(card);
  const series = curveSeries(shown, cache, keys, S.metric === "lr" ? 0 : S.smooth, S.log);
  S.curves = null;
  if (series.length) S.curves = lineChart(chartEl, S.metric, X_LABEL[S.x], series, { log: S.log, hidden: S.hidden, yLabel: S.metric });
  else chartEl.append(h("p", { class: "muted" }, "No " + S.metric + " points yet for these runs."));
  document.body.dataset.series = String(series.length);
  document.body.dataset.runsShown = String(shown.filter((r) => cache[r.id] && cache[r.id].step.length).length);

  await scalingCard(main, rows, keys);
  if (seq !== renderSeq) return;

  // The sweep's analysis: parallel coordinates, importance, each parameter against the objective.
  const scored = rows.filter((r) => Number.isFinite(r[S.objective])).length;
  if (keys.length && rows.length >= 2 && scored < 2 && S.objective === "best_val_loss") {
    main.append(h("div", { class: "card muted" }, "Parallel coordinates, parameter importance and each parameter against the objective appear once two runs have a validation result."));
  } else if (keys.length && rows.length >= 2) {
    const objSel = h("select", { id: "objective", onchange: (e) => { S.objective = e.target.value; render(); } },
      ["best_val_loss", "val_loss", "val_bpb", "tokens_per_s"].map((n) => { const o = h("option", { value: n }, n); if (n === S.objective) o.selected = true; return o; }));
    const pc = h("div", { class: "card" }, h("div", { class: "toolbar" }, h("h2", {}, "Parallel coordinates"), h("label", {}, "objective", objSel)));
    main.append(pc);
    parallelCoords(pc, rows, keys, () => render());
    const grid = h("div", { class: "grid2" });
    const imp = importance(rows, keys);
    const impCard = h("div", { class: "card bars" }, h("h2", {}, "Parameter importance"),
      h("p", { class: "muted" }, "η² (correlation ratio): the share of " + S.objective + "'s variance between the groups of each parameter's values (numbers with more than 6 values in 5 quantile bins). A quick, main-effects-only measure, not fANOVA."),
      imp.length ? imp.map(([k, v]) => h("div", { class: "bar" }, h("span", { class: "name", title: k }, k),
        h("span", { class: "fill", style: "width:" + Math.max(2, v * 240).toFixed(0) + "px" }), fmt(v, 3)))
        : h("p", { class: "muted" }, "Needs at least 3 runs with a result."));
    const sc = h("div", { class: "card" }, h("h2", {}, "Each parameter against " + S.objective));
    grid.append(impCard, sc);
    main.append(grid);
    for (const k of keys) scatter(sc, rows, k);
  }

  const tcard = h("div", { class: "card" }, h("h2", {}, `Runs (${rows.length}${kept.length !== rows.length ? ", " + kept.length + " inside the brushes" : ""})`));
  tcard.append(runsTable(rows, keys, new Set(kept.map((r) => r.id))));
  main.append(tcard);
  S.signature = signature(rows);
  const ms = performance.now() - t0;
  document.body.dataset.renderMs = ms.toFixed(1);
  if (S.firstDraw === null) { S.firstDraw = performance.now(); document.body.dataset.firstDrawMs = S.firstDraw.toFixed(1); }
  document.body.dataset.ready = "1";
}

async function renderRun(id) {
  const seq = ++renderSeq;
  let d;
  try { d = await api("runs/" + id); } catch (e) {
    if (seq !== renderSeq) return;
    clearCharts();
    document.getElementById("main").replaceChildren(h("div", { class: "card" }, h("p", {}, String(e.message || e)), h("a", { href: "#/" }, "back to all runs")));
    return;
  }
  const r = d.run;
  const keys = Object.keys(r.params || {});
  const curves = {};
  for (const m of ["loss", "val_loss"]) curves[m] = await loadMetric(m, [r]);
  if (seq !== renderSeq) return;
  clearCharts();
  const main = document.getElementById("main");
  main.replaceChildren();
  document.getElementById("title").textContent = "run " + r.id;
  main.append(h("p", {}, h("a", { href: "#/" }, "← all runs")));
  main.append(h("div", { class: "card" },
    h("h2", {}, "Run " + r.id + " of " + r.sweep_id + " ", h("span", { class: "status " + r.status }, r.status)),
    h("dl", { class: "kv" },
      keys.map((k) => [h("dt", {}, k), h("dd", {}, paramStr(r.params[k]))]),
      h("dt", {}, "step"), h("dd", {}, r.step + (r.total_steps ? " / " + r.total_steps : "")),
      h("dt", {}, "tokens"), h("dd", {}, String(r.tokens)),
      r.flops ? [h("dt", {}, "training FLOPs"), h("dd", {}, fmt(r.flops) + (r.budget ? " (budget " + fmt(r.budget) + ")" : ""))] : [],
      r.parent_id ? [h("dt", {}, "forked from"), h("dd", {}, h("a", { href: "#/run/" + r.parent_id }, "run " + r.parent_id), " at step " + r.fork_step)] : [],
      h("dt", {}, "best val loss"), h("dd", {}, fmt(r.best_val_loss)),
      h("dt", {}, "val bits/byte"), h("dd", {}, fmt(r.val_bpb)),
      h("dt", {}, "tokens/s (avg)"), h("dd", {}, r.tokens_per_s ? String(Math.round(r.tokens_per_s)) : "–"),
      h("dt", {}, "wall time"), h("dd", {}, fmtSecs(r.wall_s)),
      r.rung !== null && r.rung !== undefined ? [h("dt", {}, "rung"), h("dd", {}, String(r.rung))] : null,
      h("dt", {}, "sampler"), h("dd", {}, r.sampler || "–"),
      h("dt", {}, "parameters"), h("dd", {}, r.param_count ? r.param_count.toLocaleString() : "–"),
      h("dt", {}, "device"), h("dd", {}, d.device || "–"),
      d.slurm_job ? [h("dt", {}, "Slurm job"), h("dd", {}, d.slurm_job)] : null,
      h("dt", {}, "run dir"), h("dd", {}, d.run_dir + (r.run_dir_exists ? "" : " (deleted)")),
      h("dt", {}, "tags"), h("dd", {}, (r.tags || []).length ? r.tags.map((t) => h("span", { class: "tag" }, t)) : "–"),
      h("dt", {}, "note"), h("dd", { class: "note" }, r.note || "–"),
      r.error ? [h("dt", {}, "reason"), h("dd", {}, r.error)] : null,
    )));
  const charts = h("div", { class: "grid2" });
  main.append(charts);
  for (const m of ["loss", "val_loss"]) {
    const el = h("div", { class: "card chart", id: "run-" + m });
    charts.append(el);
    const ser = curveSeries([r], curves[m], [], m === "loss" ? S.smooth : 0, false);
    if (ser.length) lineChart(el, m, X_LABEL[S.x], ser, { yLabel: m, height: 240 });
    else el.append(h("p", { class: "muted" }, "no " + m + " points yet"));
  }
  main.append(h("div", { class: "card" }, h("h2", {}, "Chat with it"),
    d.generate ? h("code", { class: "cmd" }, d.generate) : h("p", { class: "muted" }, "No checkpoint of this run exists any more.")));
  main.append(h("div", { class: "card" }, h("h2", {}, "Manage"),
    h("p", { class: "muted" }, "The dashboard only reads; the runner is the one writer. From a terminal:"),
    h("code", { class: "cmd" }, d.manage.tag), h("code", { class: "cmd" }, d.manage.note), h("code", { class: "cmd" }, d.manage.rm)));
  main.append(h("div", { class: "card" }, h("h2", {}, "Checkpoints"),
    d.checkpoints.length ? h("table", { class: "runs" }, h("tr", {}, h("th", {}, "step"), h("th", {}, "bytes"), h("th", {}, "path"), h("th", {}, "sha256")),
      d.checkpoints.map((c) => h("tr", { class: c.exists ? "" : "dim" }, h("td", { class: "num" }, String(c.step)), h("td", { class: "num" }, String(c.bytes)),
        h("td", {}, c.path + (c.exists ? "" : " (rotated away)")), h("td", {}, (c.sha256 || "").slice(0, 16)))))
      : h("p", { class: "muted" }, "none recorded")));
  main.append(h("div", { class: "card" }, h("h2", {}, "Events"),
    h("table", { class: "runs" }, h("tr", {}, h("th", {}, "time"), h("th", {}, "kind"), h("th", {}, "status"), h("th", {}, "reason")),
      d.events.map((e) => h("tr", {}, h("td", {}, e.time), h("td", {}, e.kind), h("td", {}, e.status || ""), h("td", {}, e.reason || ""))))));
  main.append(h("div", { class: "card" }, h("h2", {}, "Config"), h("pre", {}, d.config)));
  document.body.dataset.ready = "1";
}

// What a redraw of everything but the curves and the table depends on: runs, statuses, results, notes.
function signature(rows) {
  return location.hash + "|" + rows.map((r) => [r.id, r.status, r.best_val_loss, r.rung, (r.tags || []).join(" "), r.note].join(":")).join(",");
}

// A running sweep's new points: append them to the curves and refresh the table, keeping zoom, hidden
// runs and scroll position; anything else that changed redraws the page.
async function liveUpdate() {
  const rows = filteredRuns();
  if (location.hash.startsWith("#/run/") || !S.curves || signature(rows) !== S.signature) return render();
  const seq = renderSeq;
  const keys = sweptKeys(rows);
  const kept = brushed(rows);
  const shown = sortRows(kept).slice(0, MAX_CURVES);
  const cache = await loadMetric(S.metric, shown);
  if (seq !== renderSeq) return;
  const series = curveSeries(shown, cache, keys, S.metric === "lr" ? 0 : S.smooth, S.log);
  if (series.length !== S.curves.series.length - 1) return render();
  S.curves.setData(align(series.map((x) => ({ x: x.x, y: x.y })), 800));
  const old = document.querySelector(".tablewrap");
  if (old) {
    const fresh = runsTable(rows, keys, new Set(kept.map((r) => r.id)));
    fresh.scrollTop = old.scrollTop;
    old.replaceWith(fresh);
  }
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function render() {
  const m = location.hash.match(/^#\/run\/(\d+)/);
  const p = m ? renderRun(Number(m[1])) : renderOverview();
  p.catch((e) => noteError(e.message || e));
}

// ---------- live updates ----------

async function refresh(force) {
  const st = await api("state");
  if (!force && st.token === S.token) return false;
  S.token = st.token;
  const [runs, sweeps] = await Promise.all([api("runs"), api("sweeps")]);
  S.runs = runs;
  S.sweeps = sweeps;
  return true;
}

async function start() {
  const params = new URLSearchParams(location.search);
  if (params.get("sweep")) S.sweep = params.get("sweep");
  await refresh(true);
  if (!S.sweep && S.sweeps.length === 1) S.sweep = S.sweeps[0].id;
  render();
  window.addEventListener("hashchange", render);
  let resizeTimer;
  window.addEventListener("resize", () => { clearTimeout(resizeTimer); resizeTimer = setTimeout(render, 200); });
  const live = document.getElementById("live");
  if (INLINE) { live.textContent = "offline report · " + INLINE.generated; return; }
  live.textContent = "live";
  setInterval(async () => {
    try {
      if (await refresh(false)) await liveUpdate();
      live.textContent = "live · " + new Date().toLocaleTimeString();
    } catch (e) {
      live.textContent = "disconnected: " + (e.message || e);
    }
  }, 1000);
}

start().catch((e) => {
  noteError(e.message || e);
  document.getElementById("main").replaceChildren(h("p", {}, "Could not load the runs: " + (e.message || e)));
});
