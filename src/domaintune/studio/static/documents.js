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
}

async function start(path) {
  try {
    const body = await api(path, { method: "POST", json: { config: $("gen-config").value, n: parseInt($("gen-n").value, 10) || 3 } });
    genJob = body.job.id;
    follow();
  } catch (e) {
    notice(e.message, true);
  }
}

async function rejected() {
  const tbody = $("rejected").tBodies[0];
  tbody.textContent = "";
  try {
    const body = await api("/api/documents/rejected?path=" + encodeURIComponent($("rejected-path").value.trim()));
    const rows = Array.isArray(body.rejected) ? body.rejected : (body.rejected && body.rejected.rows) || [];
    if (!rows.length) tbody.appendChild(el("tr", {}, el("td", { class: "muted", text: "nothing rejected" })));
    for (const r of rows) {
      tbody.appendChild(el("tr", { class: "rejected-row" }, Object.entries(r).map(([k, v]) =>
        el("td", {}, el("b", { text: k + ": " }), typeof v === "object" ? JSON.stringify(v) : String(v)))));
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
loadDocs().catch((e) => notice(e.message, true));
