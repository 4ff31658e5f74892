// domaintune studio: one run (run.html). Curves grow from the event stream; jobs and exports refresh every 5 s.
"use strict";

const RUN_ID = location.pathname.slice("/run/".length).split("/").map(decodeURIComponent).join("/");
const RUN_API = "/api/runs/" + runPath(RUN_ID);
const lossChart = new LineChart($("loss-chart"), { yLabel: "loss", xLabel: "step", empty: "no loss logged yet" });
const lrChart = new LineChart($("lr-chart"), { yLabel: "learning rate", xLabel: "step", empty: "no learning rate logged yet" });
lossChart.seriesNamed("loss"); lossChart.seriesNamed("eval loss");  // the loss first: data-points counts it
lrChart.seriesNamed("learning rate");
let lastState = null;
let stopping = false;  // Stop was pressed and the run is saving a checkpoint of its step: no second SIGINT
let endedJobs = 0;  // jobs of this run that ended: when one more ends, its predictions or verdicts may be new

function addRecords(records) {
  for (const r of records) {
    if (typeof r.step !== "number") continue;
    if (typeof r.loss === "number") lossChart.add("loss", r.step, r.loss);
    if (typeof r.eval_loss === "number") lossChart.add("eval loss", r.step, r.eval_loss);
    if (typeof r.learning_rate === "number") lrChart.add("learning rate", r.step, r.learning_rate);
  }
}

function showStatus(s) {
  $("run-id").textContent = s.id;
  const badge = $("run-status");
  badge.className = "status " + (s.status || "");
  badge.textContent = s.status || "unknown";
  badge.dataset.state = s.status || "";
  $("run-message").textContent = s.message || "";
  const max = s.max_steps || 0, step = s.step || 0;
  $("progress").max = max || 1; $("progress").value = max ? Math.min(step, max) : 0;
  $("progress-text").textContent = (s.step === null || s.step === undefined) ? "–" : step + (max ? " / " + max : "");
  $("eta").textContent = s.status === "running" ? duration(s.eta_s) : "–";
  $("tokens-per-s").textContent = fmt(s.tokens_per_s, 0);
  $("memory").textContent = s.memory_mib ? Math.round(s.memory_mib) + " MiB" : "–";
  $("last-loss").textContent = fmt(s.loss);
  $("last-eval-loss").textContent = fmt(s.eval_loss);
  $("run-model").textContent = "model: " + (s.model || "–");
  $("run-data").textContent = "data: " + (s.data || "–");
  $("run-method").textContent = [s.method, s.stage].filter(Boolean).join(" ");
  $("run-metrics").textContent = metricsText(s);
  $("btn-stop").disabled = s.status !== "running" || stopping;
  $("btn-resume").disabled = s.status === "running" || s.status === "finished";
  if (lastState !== null && lastState !== s.status) loadDetail();
  lastState = s.status;
}

function connect() {
  const source = new EventSource(RUN_API + "/events");
  // the server sends the whole log first on every (re)connection: start the curves afresh
  source.addEventListener("open", () => { lossChart.clear(); lrChart.clear(); lossChart.seriesNamed("loss");
    lossChart.seriesNamed("eval loss"); lrChart.seriesNamed("learning rate"); notice("live"); });
  source.addEventListener("reset", () => { lossChart.clear(); lrChart.clear(); lossChart.seriesNamed("loss");
    lossChart.seriesNamed("eval loss"); lrChart.seriesNamed("learning rate"); });
  source.addEventListener("log", (ev) => addRecords(JSON.parse(ev.data)));
  source.addEventListener("status", (ev) => showStatus(JSON.parse(ev.data)));
  source.addEventListener("error", () => {
    notice("event stream interrupted, reconnecting…", true);
    // the browser retries by itself unless the server refused (a non-200 closes the source for good)
    if (source.readyState === EventSource.CLOSED) setTimeout(connect, 3000);
  });
}

function jobRow(j) {
  const logButton = el("button", { type: "button", text: "log", class: "job-log-button" });
  logButton.addEventListener("click", async () => {
    const body = await api("/api/jobs/" + encodeURIComponent(j.id));
    $("job-log").hidden = false;
    $("job-log").textContent = body.log || "(empty)";
  });
  let stopButton = null;
  if (j.state === "running") {  // e.g. the chat server, or a predict that takes too long
    stopButton = el("button", { type: "button", text: "stop", class: "job-stop-button" });
    stopButton.addEventListener("click", async () => {
      stopButton.disabled = true;
      try { await api("/api/jobs/" + encodeURIComponent(j.id) + "/stop", { method: "POST", json: {} }); }
      catch (e) { notice(e.message, true); }
      loadDetail();
      if (j.kind === "serve") chatPoll();
    });
  }
  return el("tr", { class: "job-row", dataset: { jobId: j.id, kind: j.kind, state: j.state } },
    el("td", { text: j.id }), el("td", { text: j.kind }), el("td", {}, statusBadge(j.state)),
    el("td", { class: "muted", text: (j.started || "").replace("T", " ").slice(0, 19) }),
    el("td", {}, logButton, " ", stopButton));
}

function showExports(files) {
  const box = $("exports");
  box.textContent = "";
  if (!files.length) return;
  const newest = files.slice().sort((a, b) => b.mtime - a.mtime);
  const main = newest.find((f) => f.name.endsWith(".gguf")) || newest[0];
  box.appendChild(el("div", { class: "muted", text: "exported files:" }));
  for (const f of files) {
    box.appendChild(el("div", {}, el("a", {
      class: "download-link", id: f === main ? "download-link" : null, download: f.name,
      href: "/api/download?path=" + encodeURIComponent(f.path), text: f.path }),
      el("span", { class: "muted", text: " " + Math.round(f.size / 1024) + " KiB" })));
  }
}

function showDataReport(report) {
  const tbody = $("data-report").tBodies[0];
  tbody.textContent = "";
  const flat = (obj, prefix) => Object.entries(obj || {}).forEach(([k, v]) => {
    if (v && typeof v === "object" && !Array.isArray(v)) flat(v, prefix + k + ".");
    else tbody.appendChild(el("tr", {}, el("th", { text: prefix + k }), el("td", { text: JSON.stringify(v) })));
  });
  if (report) flat(report, ""); else tbody.appendChild(el("tr", {}, el("td", { class: "muted", text: "no data report yet (written when training ends)" })));
}

async function loadDetail() {
  try {
    const d = await api(RUN_API);
    $("config").textContent = d.config || "(no config.yaml)";
    showDataReport(d.data_report);
    showExports(d.exports);
    const tbody = $("jobs").tBodies[0];
    tbody.textContent = "";
    for (const j of d.jobs) tbody.appendChild(jobRow(j));
    stopping = d.jobs.some((j) => j.kind === "train" && j.stopping);
    if (stopping) $("btn-stop").disabled = true;
    if (d.has_report) {
      const r = await api(RUN_API + "/report");
      const box = $("report");
      box.classList.remove("muted");
      // the server rendered it with every piece of text escaped (studio/markdown_html.py): no raw HTML passes
      box.innerHTML = r.html;
    }
    const ended = d.jobs.filter((j) => j.state !== "running").length;
    if (d.has_predictions && (!predictionsShown || ended !== endedJobs)) loadPredictions();
    endedJobs = ended;
  } catch (e) {
    notice(e.message, true);
  }
}

async function fillSelect(select, folder, filter) {
  const body = await api("/api/files?folder=" + folder);
  select.textContent = "";
  for (const f of body.files.filter(filter)) select.appendChild(el("option", { value: f.relpath, text: f.relpath }));
}

async function act(button, path, json) {
  button.disabled = true;
  try {
    const body = await api(RUN_API + path, { method: "POST", json: json || {} });
    notice(body.job ? "started " + body.job.kind + " job " + body.job.id : "done");
    await loadDetail();
  } catch (e) {
    notice(e.message, true);
  } finally {
    button.disabled = false;
  }
}

// ---- predictions browser
const pred = { q: "", offset: 0, limit: 20, matched: 0 };
let predictionsShown = false;

function verdictText(j) {
  if (!j) return el("span", { class: "muted", text: "–" });
  const out = el("div", { class: "verdict " + (j.outcome || "") , text: j.outcome ? "tuned " + j.outcome + (j.why ? " (" + j.why + ")" : "") : "" });
  if (j.grade_a !== null && j.grade_a !== undefined) out.appendChild(el("div", { text: "grades: base " + j.grade_a + " · tuned " + j.grade_b }));
  for (const c of j.calls || []) {
    const head = c.kind === "pairwise" ? "order " + c.order + ": " + c.verdict : "grade of " + c.answer + ": " + c.grade;
    out.appendChild(el("details", {}, el("summary", { text: head }), el("div", { class: "reason", text: c.reason || "" })));
  }
  return out;
}

function scoreText(s) {
  if (!s) return "";
  return Object.entries(s).filter(([, v]) => typeof v === "number").map(([k, v]) => k + " " + v.toFixed(1)).join(" · ");
}

async function loadPredictions() {
  predictionsShown = true;
  const q = new URLSearchParams({ q: pred.q, offset: pred.offset, limit: pred.limit });
  const page = await api(RUN_API + "/predictions?" + q);
  pred.matched = page.matched;
  const tbody = $("predictions").tBodies[0];
  tbody.textContent = "";
  for (const r of page.rows) {
    tbody.appendChild(el("tr", { class: "pred-row", dataset: { id: String(r.id) } },
      el("td", { text: String(r.id) }),
      el("td", { class: "question" }, el("div", { text: r.input })),
      el("td", {}, el("div", { class: "answers" },
        el("div", { class: "base" }, el("b", { text: "base" }), "\n", r.base === null ? "–" : r.base,
          el("div", { class: "scores", text: scoreText(r.base_scores) })),
        el("div", { class: "tuned" }, el("b", { text: "tuned" }), "\n", r.tuned === null ? "–" : r.tuned,
          el("div", { class: "scores", text: scoreText(r.scores) })),
        el("div", { class: "reference" }, el("b", { text: "reference" }), "\n", r.reference))),
      el("td", {}, verdictText(r.judge))));
  }
  const last = Math.min(page.offset + page.rows.length, page.matched);
  $("pred-count").textContent = page.matched ? (page.offset + 1) + "–" + last + " of " + page.matched +
    (page.matched !== page.total ? " (of " + page.total + ")" : "") : (page.total ? "no row matches" : "no predictions yet");
  $("pred-prev").disabled = page.offset === 0;
  $("pred-next").disabled = last >= page.matched;
}

let searchTimer = null;
$("pred-search").addEventListener("input", () => {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(() => { pred.q = $("pred-search").value; pred.offset = 0; loadPredictions(); }, 250);
});
$("pred-prev").addEventListener("click", () => { pred.offset = Math.max(0, pred.offset - pred.limit); loadPredictions(); });
$("pred-next").addEventListener("click", () => { pred.offset += pred.limit; loadPredictions(); });

// ---- actions
$("btn-stop").addEventListener("click", async () => {
  stopping = true;
  await act($("btn-stop"), "/stop");
  $("btn-stop").disabled = true;
  notice("stopping: the run finishes its step and saves a checkpoint of it");
});
$("btn-resume").addEventListener("click", () => act($("btn-resume"), "/resume"));
$("btn-report").addEventListener("click", () => act($("btn-report"), "/report"));
$("btn-predict").addEventListener("click", () => act($("btn-predict"), "/predict",
  { data: $("predict-data").value, base: $("predict-base").checked }));
$("btn-judge").addEventListener("click", () => act($("btn-judge"), "/judge", { config: $("judge-config").value }));
$("btn-benchmark").addEventListener("click", () => {
  const limit = parseInt($("benchmark-limit").value, 10);
  act($("btn-benchmark"), "/benchmark", { tasks: $("benchmark-tasks").value.split(/[\s,]+/).filter(Boolean),
    limit: Number.isNaN(limit) ? null : limit });
});
$("btn-export").addEventListener("click", () => act($("btn-export"), "/export",
  { format: $("export-format").value, quant: $("export-quant").value || null }));

navigation("");
connect();
loadDetail().then(() => { document.body.dataset.ready = "1"; });
setInterval(loadDetail, 5000);
fillSelect($("predict-data"), "data", (f) => /\.(jsonl|json)$/.test(f.name)).catch((e) => notice(e.message, true));
fillSelect($("judge-config"), "configs", (f) => /\.ya?ml$/.test(f.name)).catch((e) => notice(e.message, true));
