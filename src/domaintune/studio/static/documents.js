// domaintune studio: data from documents (documents.html).
"use strict";

let genJob = null;

async function loadDocs() {
  const body = await api("/api/files?folder=documents");
  const tbody = $("doc-files").tBodies[0];
  tbody.textContent = "";
  for (const f of body.files) tbody.appendChild(el("tr", { dataset: { path: f.relpath } }, el("td", { text: f.relpath }), el("td", { class: "num", text: String(f.size) })));
  const configs = await api("/api/files?folder=configs");
  const select = $("gen-config");
  const keep = select.value;
  select.textContent = "";
  for (const f of configs.files.filter((x) => /\.ya?ml$/.test(x.name))) select.appendChild(el("option", { value: f.relpath, text: f.relpath }));
  if (keep) select.value = keep;
}

async function uploadDocs() {
  for (const file of $("doc-file").files) {
    try {
      await api("/api/upload/documents?filename=" + encodeURIComponent(file.name), { method: "POST", body: file });
      notice("uploaded " + file.name);
    } catch (e) {
      notice(file.name + ": " + e.message, true);
    }
  }
  await loadDocs();
}

async function follow() {
  if (!genJob) return;
  const body = await api("/api/jobs/" + encodeURIComponent(genJob));
  $("gen-job").textContent = body.job.kind + " " + body.job.id + ": " + body.job.state;
  $("gen-job").dataset.state = body.job.state;
  $("gen-log").hidden = false;
  $("gen-log").textContent = body.log;
  $("gen-log").scrollTop = $("gen-log").scrollHeight;
  if (body.job.state === "running") setTimeout(follow, 1500);
  else if ($("gen-out").value.trim()) pairs();
}

async function start(path) {
  try {
    const body = await api(path, { method: "POST", json: { config: $("gen-config").value, n: parseInt($("gen-n").value, 10) || 3 } });
    genJob = body.job.id;
    if (body.out) $("gen-out").value = body.out;
    follow();
  } catch (e) {
    notice(e.message, true);
  }
}

async function pairs() {
  const tbody = $("pairs").tBodies[0];
  tbody.textContent = "";
  try {
    const body = await api("/api/documents/pairs?path=" + encodeURIComponent($("gen-out").value.trim()));
    $("gen-summary").textContent = (body.status || "") + (body.message ? ": " + body.message : "") +
      " · " + body.pairs.length + " pairs" + (body.target ? " of " + body.target : "");
    for (const p of body.pairs) {
      tbody.appendChild(el("tr", { class: "pair-row" }, el("td", { text: p.question || "" }),
        el("td", { text: p.answer || "" }),
        el("td", {}, el("div", { text: p.where || "" }), el("div", { class: "reason", text: (p.source && p.source.passage) || "" }))));
    }
  } catch (e) {
    notice(e.message, true);
  }
}

async function rejected() {
  const tbody = $("rejected").tBodies[0];
  tbody.textContent = "";
  try {
    const body = await api("/api/documents/rejected?path=" + encodeURIComponent($("gen-out").value.trim()));
    $("gen-summary").textContent = body.total + " rejected: " + Object.entries(body.counts).map(([k, v]) => k + " " + v).join(", ");
    for (const p of body.problems) {
      tbody.appendChild(el("tr", { class: "rejected-row" }, el("td", { text: "document" }), el("td", { text: p.reason || "" }),
        el("td", { text: p.file || "" }), el("td", { text: p.detail ? JSON.stringify(p.detail) : "" })));
    }
    for (const r of body.rows) {
      tbody.appendChild(el("tr", { class: "rejected-row" }, el("td", { text: r.stage || "" }), el("td", { text: r.reason || "" }),
        el("td", { text: r.question || "" }),
        el("td", {}, el("div", { text: r.hint || "" }), el("div", { class: "reason", text: JSON.stringify(r.detail) }))));
    }
  } catch (e) {
    notice(e.message, true);
  }
}

navigation("/documents");
$("doc-upload").addEventListener("click", uploadDocs);
$("btn-gen-preview").addEventListener("click", () => start("/api/documents/preview"));
$("btn-gen").addEventListener("click", () => start("/api/documents/generate"));
$("btn-rejected").addEventListener("click", rejected);
$("btn-pairs").addEventListener("click", pairs);
loadDocs().catch((e) => notice(e.message, true));
