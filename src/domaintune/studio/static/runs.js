// domaintune studio: the runs table (index.html). Rows are keyed by run id (data-run-id) and updated in place.
"use strict";

const selected = new Set();

function runRow(s) {
  const box = el("input", { type: "checkbox", class: "compare-select", dataset: { runId: s.id } });
  box.checked = selected.has(s.id);
  box.addEventListener("change", () => {
    if (box.checked) selected.add(s.id); else selected.delete(s.id);
    $("compare-button").disabled = selected.size < 2;
  });
  const step = s.step === null || s.step === undefined ? "–" : s.step + (s.max_steps ? " / " + s.max_steps : "");
  return el("tr", { class: "run-row", dataset: { runId: s.id, status: s.status || "" } },
    el("td", {}, box),
    el("td", {}, el("a", { class: "run-link", href: "/run/" + runPath(s.id), text: s.id })),
    el("td", { class: "run-status" }, statusBadge(s.status)),
    el("td", { text: s.model || "–" }),
    el("td", { text: s.data || "–" }),
    el("td", { text: [s.method, s.stage && s.stage !== "sft" ? s.stage : null].filter(Boolean).join(" ") || "–" }),
    el("td", { class: "num", text: step }),
    el("td", { class: "num", text: fmt(s.loss) }),
    el("td", { class: "num", text: fmt(s.eval_loss) }),
    el("td", { class: "metrics", text: metricsText(s) }),
    el("td", { class: "muted", text: (s.started || "").replace("T", " ").slice(0, 19) }));
}

let summaries = [];

async function refresh() {
  try {
    const body = await api("/api/runs");
    summaries = body.runs;
    const tbody = $("runs-body");
    tbody.textContent = "";
    for (const s of summaries) tbody.appendChild(runRow(s));
    $("runs-empty").hidden = summaries.length > 0;
    notice(summaries.filter((s) => s.status === "running").length + " running · updated " + new Date().toLocaleTimeString());
  } catch (e) {
    notice(e.message, true);
  }
}

async function compare() {
  const ids = [...selected];
  $("compare").hidden = false;
  const chart = new LineChart($("compare-chart"), { yLabel: "loss", xLabel: "step" });
  const logs = await Promise.all(ids.map((id) => api("/api/runs/" + runPath(id) + "/log")));
  ids.forEach((id, k) => {
    for (const r of logs[k].records) {
      if (typeof r.loss === "number") chart.add(id + " loss", r.step, r.loss);
      if (typeof r.eval_loss === "number") chart.add(id + " eval", r.step, r.eval_loss);
    }
  });
  const rows = summaries.filter((s) => selected.has(s.id));
  const keys = [...new Set(rows.flatMap((s) => Object.keys(s.metrics || {})))].sort();
  const table = $("compare-table");
  table.tHead.textContent = ""; table.tBodies[0].textContent = "";
  table.tHead.appendChild(el("tr", {}, el("th", { text: "run" }), el("th", { class: "num", text: "loss" }),
    el("th", { class: "num", text: "eval loss" }), keys.map((k) => el("th", { class: "num", text: k })),
    el("th", { text: "judge win-rate" }), el("th", { text: "benchmark" })));
  for (const s of rows) {
    const j = s.judge && typeof s.judge.win_rate === "number" ? metricsText({ judge: s.judge }) : "–";
    table.tBodies[0].appendChild(el("tr", { dataset: { runId: s.id } }, el("td", { text: s.id }),
      el("td", { class: "num", text: fmt(s.loss) }), el("td", { class: "num", text: fmt(s.eval_loss) }),
      keys.map((k) => el("td", { class: "num", text: fmt((s.metrics || {})[k], 2) })),
      el("td", { text: j }), el("td", { text: metricsText({ benchmark: s.benchmark }) || "–" })));
  }
}

navigation("/");
$("compare-button").addEventListener("click", () => compare().catch((e) => notice(e.message, true)));
refresh().then(() => { document.body.dataset.ready = "1"; });
setInterval(refresh, 5000);
