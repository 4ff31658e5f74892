// domaintune studio: helpers shared by the pages (no library, no build step). The pages talk to the studio's
// JSON API with fetch; the cookie set by /?token=... authenticates them. Text from runs (model output, file
// names, messages) is only ever put into the page as text (textContent), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);

// el("td", {class: "num", dataset: {runId: "x"}}, "text", child, ...): an element with attributes and children
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}

class ApiError extends Error {
  constructor(status, body) {
    super(body && body.error ? body.error.message : ("HTTP " + status));
    this.status = status; this.body = body;
  }
}

// The JSON API: api("/api/runs"), api("/api/x", {method: "POST", json: {...}}). Throws ApiError on 4xx/5xx.
async function api(path, opts) {
  opts = opts || {};
  const init = { method: opts.method || "GET", headers: {}, credentials: "same-origin" };
  if (opts.json !== undefined) { init.headers["Content-Type"] = "application/json"; init.body = JSON.stringify(opts.json); }
  if (opts.body !== undefined) { init.body = opts.body; }
  const r = await fetch(path, init);
  let body = null;
  try { body = await r.json(); } catch (e) { /* not JSON */ }
  if (!r.ok) throw new ApiError(r.status, body);
  return body;
}

function notice(text, isError) {
  const n = $("notice");
  if (!n) return;
  n.textContent = text || "";
  n.classList.toggle("error", !!isError);
}

// a run id is a path ("runs/a"): each part is escaped, the slashes kept
function runPath(id) { return id.split("/").map(encodeURIComponent).join("/"); }

function fmt(v, digits) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toFixed(digits === undefined ? 4 : digits);
  return String(v);
}

function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + sec + "s";
}

function statusBadge(state) {
  return el("span", { class: "status " + (state || ""), text: state || "unknown", dataset: { state: state || "" } });
}

// the metrics a summary carries, as short text: BLEU/ROUGE, judge win-rate with its interval, benchmark deltas
function metricsText(s) {
  const parts = [];
  const m = s.metrics || {};
  for (const k of ["bleu-4", "rouge-l"]) if (typeof m[k] === "number") parts.push(k + " " + m[k].toFixed(2));
  const j = s.judge;
  if (j && typeof j.win_rate === "number") {
    const iv = (typeof j.low === "number" && typeof j.high === "number") ? " [" + j.low.toFixed(2) + ", " + j.high.toFixed(2) + "]" : "";
    parts.push("win " + j.win_rate.toFixed(2) + iv + (j.n ? " n=" + j.n : ""));
  }
  const b = s.benchmark;
  if (b && typeof b === "object") {
    for (const [task, d] of Object.entries(b)) {
      for (const [metric, delta] of Object.entries((d && d.delta) || {})) {
        if (typeof delta === "number") parts.push(task + " " + metric + " " + (delta >= 0 ? "+" : "") + delta.toFixed(3));
      }
    }
  }
  return parts.join(" · ");
}

function navigation(here) {
  for (const a of document.querySelectorAll("header nav a")) {
    if (a.getAttribute("href") === here) a.classList.add("here");
  }
}
