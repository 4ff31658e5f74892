// domaintune studio: the new-run form (new.html). Every value is sent as text; an empty field takes the
// default. The server validates with the CLI's own checks and answers errors per field ("section.field").
"use strict";

let FIELDS = [];
let MODELS = [];

function fieldInput(f) {
  const id = "f-" + f.name;
  const attrs = { id, name: f.name, class: "field-input", dataset: { type: f.type } };
  const shown = (v) => (v === null || v === undefined) ? "" : (typeof v === "object" ? JSON.stringify(v) : String(v));
  if (f.type === "bool") {
    const box = el("input", Object.assign(attrs, { type: "checkbox" }));
    box.checked = !!f.default;
    return box;
  }
  if (f.type === "choice") {
    const select = el("select", attrs);
    for (const c of f.choices) select.appendChild(el("option", { value: String(c), text: String(c) }));
    select.value = shown(f.default);
    return select;
  }
  if (f.type === "list" || f.type === "mapping") {
    return el("textarea", Object.assign(attrs, { rows: 2, placeholder: f.type === "list" ? "one per line" : "YAML" }));
  }
  const input = el("input", Object.assign(attrs, { type: "text", placeholder: shown(f.default) }));
  if (f.choices && f.choices.length) {
    const list = el("datalist", { id: id + "-choices" }, f.choices.map((c) => el("option", { value: String(c) })));
    input.setAttribute("list", id + "-choices");
    return el("span", {}, input, list);
  }
  return input;
}

function renderFields() {
  for (const f of FIELDS) {
    const box = el("div", { class: "field", dataset: { field: f.name } },
      el("label", { for: "f-" + f.name, text: f.name }),
      fieldInput(f),
      el("div", { class: "help", text: f.help + (f.path ? " (a path inside the project folder)" : "") }),
      el("div", { class: "field-error", id: "err-" + f.name, dataset: { for: f.name } }));
    $(f.basic ? "basic-fields" : "advanced-fields").appendChild(box);
  }
}

function input(name) { return document.getElementById("f-" + name); }

function values() {
  const out = { name: $("run-name").value.trim() };
  for (const f of FIELDS) {
    const node = input(f.name);
    if (!node) continue;
    if (f.type === "bool") { if (node.checked !== !!f.default) out[f.name] = node.checked ? "true" : "false"; }
    else if (f.type === "choice") { if (node.value !== String(f.default)) out[f.name] = node.value; }
    else if (node.value.trim() !== "") out[f.name] = node.value;
  }
  return out;
}

function showErrors(errors) {
  for (const slot of document.querySelectorAll(".field-error")) slot.textContent = "";
  for (const box of document.querySelectorAll(".field.invalid")) box.classList.remove("invalid");
  const rest = [];
  for (const [name, message] of Object.entries(errors || {})) {
    const slot = document.getElementById("err-" + name);
    if (slot) {
      slot.textContent = message;
      const box = slot.closest(".field");
      if (box) box.classList.add("invalid");
      if (box && box.closest("details")) box.closest("details").open = true;
    } else rest.push(name ? name + ": " + message : message);
  }
  $("form-message").textContent = rest.join("\n");
  const first = document.querySelector(".field.invalid");
  if (first) first.scrollIntoView({ block: "center" });
}

async function post(path, json) {
  try {
    return await api(path, { method: "POST", json });
  } catch (e) {
    if (e.body && e.body.errors) { showErrors(e.body.errors); return null; }
    notice(e.message, true);
    return null;
  }
}

async function check() {
  const body = await post("/api/config/check", { values: values() });
  if (!body) return;
  showErrors(body.errors);
  notice(body.ok ? "the config is valid" : "some fields need a change", !body.ok);
}

async function preview() {
  const body = await post("/api/config/preview", { values: values(), example: parseInt($("preview-example").value, 10) || 0 });
  if (!body) return;
  showErrors({});
  // the lines `domaintune data-check` prints (rows, lengths, over-length, dropped), then this example's counts
  $("preview-report").textContent = (body.summary || []).join("\n") + "\nexample " + body.example + " ("
    + (body.where || "") + "): " + body.tokens + " tokens, " + body.trained + " trained (highlighted)";
  const box = $("preview");
  box.hidden = false;
  box.textContent = "";
  for (const s of body.segments) box.appendChild(el("span", { class: "seg" + (s.trained ? " trained" : ""), text: s.text }));
}

// Save and Launch stay disabled while a save is pending: a double click must not launch one run twice (the server
// refuses a second launch of a training run as well, with 409).
async function save(launch) {
  const buttons = [$("btn-save"), $("btn-launch")];
  if (buttons.some((b) => b.disabled)) return;
  buttons.forEach((b) => { b.disabled = true; });
  let leaving = false;
  try {
    const body = await post("/api/config/save", { values: values(), name: $("run-name").value.trim(), launch });
    if (!body) return;
    showErrors({});
    if (launch && body.run) { leaving = true; location.href = "/run/" + runPath(body.run); return; }
    notice("saved " + body.config);
  } finally {
    if (!leaving) buttons.forEach((b) => { b.disabled = false; });
  }
}

async function loadFiles(selectValue) {
  const body = await api("/api/files?folder=data");
  const picker = $("data-picker");
  picker.length = 1;
  for (const f of body.files) picker.appendChild(el("option", { value: f.relpath, text: f.relpath + " (" + f.size + " bytes)" }));
  if (selectValue) { picker.value = selectValue; picker.dispatchEvent(new Event("change")); }
}

function loadModels() {
  const picker = $("model-picker");
  MODELS.forEach((m, k) => {
    if (m.kind === "family") {
      picker.appendChild(el("option", { value: "tiny:" + k, text: m.title + ": tiny offline model (" + m.tiny + ")" + (m.tiny_exists ? "" : " – build first") }));
      if (m.real) picker.appendChild(el("option", { value: "hub:" + k, text: m.title + ": " + m.real + " (from the hub)" }));
    } else picker.appendChild(el("option", { value: "local:" + k, text: "local: " + m.title + (m.model_type ? " (" + m.model_type + ")" : "") }));
  });
  picker.addEventListener("change", () => {
    const [kind, k] = picker.value.split(":");
    const m = MODELS[+k];
    $("btn-make-tiny").hidden = !(m && kind === "tiny" && !m.tiny_exists);
    if (!m) return;
    input("model.name_or_path").value = kind === "tiny" ? m.tiny : kind === "hub" ? m.real : m.path;
  });
}

async function makeTiny() {
  const m = MODELS[+$("model-picker").value.split(":")[1]];
  const body = await post("/api/models/tiny", { arch: m.arch });
  if (!body) return;
  notice("building " + m.tiny + " (job " + body.job.id + ")…");
  for (;;) {
    await new Promise((res) => setTimeout(res, 1000));
    const j = await api("/api/jobs/" + encodeURIComponent(body.job.id));
    if (j.job.state !== "running") {
      notice(j.job.state === "finished" ? "built " + m.tiny : "building failed: " + j.log.slice(-300), j.job.state !== "finished");
      if (j.job.state === "finished") { m.tiny_exists = true; $("btn-make-tiny").hidden = true; }
      return;
    }
  }
}

async function upload() {
  const file = $("upload-file").files[0];
  if (!file) { notice("choose a file to upload first", true); return; }
  try {
    const body = await api("/api/upload/data?filename=" + encodeURIComponent(file.name), { method: "POST", body: file });
    notice("uploaded " + body.path);
    await loadFiles(body.path);
  } catch (e) {
    notice(e.message, true);
  }
}

async function init() {
  navigation("/new");
  const form = await api("/api/form");
  FIELDS = form.fields; MODELS = form.models;
  renderFields();
  loadModels();
  await loadFiles();
  $("data-picker").addEventListener("change", () => { if ($("data-picker").value) input("data.path").value = $("data-picker").value; });
  $("btn-make-tiny").addEventListener("click", makeTiny);
  $("upload-button").addEventListener("click", upload);
  $("btn-check").addEventListener("click", check);
  $("btn-preview").addEventListener("click", preview);
  $("btn-save").addEventListener("click", () => save(false));
  $("new-form").addEventListener("submit", (ev) => { ev.preventDefault(); save(true); });
  document.body.dataset.ready = "1";
}
init().catch((e) => notice(e.message, true));
