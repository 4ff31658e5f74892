// domaintune studio: chat with the run (the chat panel of run.html). "Start chat server" runs a `serve` job on a
// local port; the studio proxies POST /api/runs/{id}/chat/completions to it with the server's key, streaming.
// Answers are put in the page as text only.
"use strict";

const chat = { history: [], busy: false, model: null };

function chatBubble(role, text) {
  const div = el("div", { class: "msg " + role, text });
  $("chat-messages").appendChild(div);
  $("chat-messages").scrollTop = $("chat-messages").scrollHeight;
  return div;
}

async function chatPoll() {
  try {
    const s = await api(RUN_API + "/chat");
    const status = $("chat-status");
    status.dataset.ready = s.ready ? "1" : "0";
    status.textContent = s.job ? (s.ready ? "ready: " + s.model : "loading the model…") : "not started";
    $("btn-chat").disabled = !!s.job;
    $("chat-send").disabled = !s.ready || chat.busy;
    chat.model = s.model;
    if (s.job && !s.ready) setTimeout(chatPoll, 1500);
  } catch (e) {
    notice(e.message, true);
  }
}

async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (data) yield data;
    }
  }
}

async function chatSend(text) {
  chat.busy = true;
  $("chat-send").disabled = true;
  chatBubble("user", text);
  const out = chatBubble("assistant", "");
  out.dataset.done = "0";
  let answer = "";
  try {
    const r = await fetch(RUN_API + "/chat/completions", { method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ messages: [...chat.history, { role: "user", content: text }], stream: true, max_tokens: 256 }) });
    if (!r.ok) {
      let body = null;
      try { body = await r.json(); } catch (e) { /* not JSON */ }
      throw new ApiError(r.status, body);
    }
    for await (const data of sseData(r)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) { answer += choice.delta.content; out.textContent = answer; }
      }
    }
    chat.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
  } catch (e) {
    out.remove();
    chatBubble("notice", e.message);
  } finally {
    out.dataset.done = "1";
    chat.busy = false;
    $("chat-send").disabled = false;
  }
}

$("btn-chat").addEventListener("click", async () => {
  $("btn-chat").disabled = true;
  try { await api(RUN_API + "/chat/start", { method: "POST", json: {} }); } catch (e) { notice(e.message, true); }
  chatPoll();
});
$("chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || chat.busy) return;
  $("chat-input").value = "";
  chatSend(text);
});
$("chat-input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); $("chat-form").requestSubmit(); }
});
chatPoll();
