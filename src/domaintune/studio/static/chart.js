// domaintune studio: a small SVG line chart (no library). new LineChart(container, {yLabel, logY}) draws into
// `container`; chart.add(seriesName, x, y) appends a point and redraws (at most once per animation frame), so a
// live run's curves grow as events arrive. The svg carries data-points: the point count of the first series
// (the loss), which the browser test reads.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#db2777"];

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// 1, 2, 5 x 10^k steps: about `count` ticks between lo and hi
function ticks(lo, hi, count) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / count, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
  return out;
}

function tickText(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return String(+v.toPrecision(4));
}

class LineChart {
  constructor(container, opts) {
    this.container = container;
    this.opts = opts || {};
    this.series = [];  // {name, color, points: [[x, y]]}
    this.svg = svgEl("svg", { viewBox: "0 0 640 260", preserveAspectRatio: "none", role: "img",
                              "data-points": "0", "aria-label": this.opts.yLabel || "chart" });
    this.legend = document.createElement("div");
    this.legend.className = "legend";
    container.textContent = "";
    container.appendChild(this.svg);
    container.appendChild(this.legend);
    this.pending = false;
    this.draw();
  }

  seriesNamed(name) {
    let s = this.series.find((t) => t.name === name);
    if (!s) {
      s = { name, color: PALETTE[this.series.length % PALETTE.length], points: [] };
      this.series.push(s);
    }
    return s;
  }

  add(name, x, y) {
    if (typeof x !== "number" || typeof y !== "number" || !isFinite(x) || !isFinite(y)) return;
    this.seriesNamed(name).points.push([x, y]);
    this.schedule();
  }

  clear() { this.series = []; this.schedule(); }

  schedule() {
    this.svg.setAttribute("data-points", String(this.series.length ? this.series[0].points.length : 0));
    if (this.pending) return;
    this.pending = true;
    const run = () => { this.pending = false; this.draw(); };
    if (document.hidden) setTimeout(run, 0); else requestAnimationFrame(run);
  }

  draw() {
    const W = 640, H = 260, L = 56, R = 12, T = 10, B = 28;
    const svg = this.svg;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const pts = this.series.flatMap((s) => s.points);
    this.legend.textContent = "";
    for (const s of this.series) {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = s.color;
      item.appendChild(swatch);
      item.appendChild(document.createTextNode(s.name + " (" + s.points.length + ")"));
      this.legend.appendChild(item);
    }
    if (!pts.length) {
      svg.appendChild(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, this.opts.empty || "no points yet"));
      return;
    }
    const xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys), y1 = Math.max(...ys);
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
    const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
    const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
    const sy = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
    for (const v of ticks(y0, y1, 5)) {
      svg.appendChild(svgEl("line", { x1: L, x2: W - R, y1: sy(v), y2: sy(v), class: "gridline" }));
      svg.appendChild(svgEl("text", { x: L - 6, y: sy(v) + 4, "text-anchor": "end" }, tickText(v)));
    }
    for (const v of ticks(x0, x1, 6)) {
      svg.appendChild(svgEl("text", { x: sx(v), y: H - B + 16, "text-anchor": "middle" }, tickText(v)));
    }
    svg.appendChild(svgEl("line", { x1: L, x2: L, y1: T, y2: H - B, class: "axis" }));
    svg.appendChild(svgEl("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    if (this.opts.xLabel) svg.appendChild(svgEl("text", { x: W - R, y: H - 2, "text-anchor": "end" }, this.opts.xLabel));
    for (const s of this.series) {
      if (!s.points.length) continue;
      const sorted = s.points.slice().sort((a, b) => a[0] - b[0]);
      const d = sorted.map((p, i) => (i ? "L" : "M") + sx(p[0]).toFixed(1) + " " + sy(p[1]).toFixed(1)).join(" ");
      svg.appendChild(svgEl("path", { d, class: "line", stroke: s.color, "data-series": s.name }));
      if (sorted.length < 40) {
        for (const p of sorted) svg.appendChild(svgEl("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: s.color }));
      }
    }
  }
}
