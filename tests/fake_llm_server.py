"""A scripted OpenAI-compatible chat server on 127.0.0.1, for the self-instruct tests.

POST /v1/chat/completions answers, in arrival order, with the next scripted fault (if any) and otherwise a
valid completion:

- a prompt starting with ``QUESTIONS`` (the tests' question template) gets a numbered list of
  ``questions_per_reply`` fresh questions; each is built from tokens unique to it, so no two are
  near-duplicates;
- a prompt starting with ``ANSWER:`` gets ``"Answer to: <question>"`` so a test can check the pairing;
- a prompt starting with ``JUDGE`` (the tests' judge template) gets ``judge_fn(prompt)``, by default
  ``"SUPPORTED: every claim is in the passage"``.

``question_fn(prompt, n)``, when given, makes the question replies (e.g. from the passage in the prompt).

``reply_fn(prompt)``, when given, is asked first for every request that no script item claims: a string is the
reply's text; ``{"fault": ITEM}`` answers as the script item ITEM would (e.g. ``"malformed"``), so a test can
fault chosen prompts whatever the arrival order; None falls through to the replies above. ``usage=False``
leaves the ``usage`` block out of completions (the client then estimates tokens).

Script items: ``"429"`` (with ``Retry-After``), ``"500"``, ``"401"``, ``"400"``, ``"slow"`` (sleeps
``slow_seconds`` before answering, past the client's timeout), ``"malformed"`` (200 with a non-JSON body),
``"no_choices"`` (200 with JSON lacking ``choices``), ``"length"`` (a valid completion cut with
``finish_reason: length``), or a dict ``{"questions": [...]}`` to reply with exactly those questions.
"""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeLLM:
    """Start with ``with FakeLLM(script=[...]) as srv:``; ``srv.base_url`` is the /v1 URL."""

    def __init__(self, script=(), *, questions_per_reply: int = 3, retry_after: str = "1",
                 slow_seconds: float = 2.0, delay: float = 0.0, answer_fn=None, judge_fn=None, question_fn=None,
                 reply_fn=None, usage: bool = True):
        self.script = list(script)
        self.questions_per_reply = questions_per_reply
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.delay = delay  # added to every reply: lets a test kill a run mid-way
        self.answer_fn = answer_fn or (lambda q: f"Answer to: {q}")
        self.judge_fn = judge_fn or (lambda prompt: "SUPPORTED: every claim is in the passage")
        self.question_fn = question_fn
        self.reply_fn = reply_fn
        self.usage = usage
        self.lock = threading.Lock()
        self.log: list[dict] = []  # one entry per request: time, kind, action, prompt, status
        self.in_flight = 0
        self.max_in_flight = 0
        self._next_question = 0
        self._server: ThreadingHTTPServer | None = None

    # -- lifecycle -----------------------------------------------------------------------------------
    def __enter__(self) -> "FakeLLM":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                fake._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        assert self._server is not None
        self._server.shutdown()
        self._server.server_close()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def statuses(self) -> list[int]:
        with self.lock:
            return [e["status"] for e in self.log]

    # -- replies -------------------------------------------------------------------------------------
    def _fresh_questions(self, n: int) -> list[str]:
        out = []
        for _ in range(n):
            i = self._next_question
            self._next_question += 1
            out.append(f"Q{i}: how to handle k{i}x k{i}y k{i}z k{i}w?")
        return out

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        if h.path != "/v1/chat/completions":
            self._send(h, 404, {"error": {"message": "not found"}})
            return
        body = json.loads(h.rfile.read(int(h.headers.get("Content-Length", 0))))
        prompt = body["messages"][-1]["content"]
        kind = "question" if prompt.startswith("QUESTIONS") else "judge" if prompt.startswith("JUDGE") else "answer"
        with self.lock:
            action = self.script.pop(0) if self.script else "ok"
        if action == "ok" and self.reply_fn is not None:
            custom = self.reply_fn(prompt)
            if isinstance(custom, dict):
                action = custom["fault"]
            elif custom is not None:
                action = {"text": custom}
        with self.lock:
            entry = {"time": time.monotonic(), "kind": kind, "prompt": prompt, "body": body,
                     "action": action if isinstance(action, str) else "text" if "text" in action else "questions",
                     "status": 200,
                     "auth": h.headers.get("Authorization")}
            self.log.append(entry)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            self._reply(h, body, prompt, kind, action, entry)
        finally:
            with self.lock:
                self.in_flight -= 1

    def _reply(self, h, body, prompt, kind, action, entry) -> None:
        err = {"429": (429, "rate limited"), "500": (500, "boom"), "401": (401, "bad key"),
               "400": (400, "bad request")}
        if isinstance(action, str) and action in err:
            status, msg = err[action]
            entry["status"] = status
            headers = {"Retry-After": self.retry_after} if status == 429 else {}
            self._send(h, status, {"error": {"message": msg, "type": "x", "code": status}}, headers)
            return
        if action == "malformed":
            self._send_raw(h, 200, b"<html>this is not json", "application/json")
            return
        if action == "no_choices":
            self._send(h, 200, {"id": "x", "object": "chat.completion", "model": body.get("model")})
            return
        if action == "slow":
            time.sleep(self.slow_seconds)
        finish = "length" if action == "length" else "stop"
        if isinstance(action, dict) and "text" in action:
            text = action["text"]
        elif isinstance(action, dict):
            text = "\n".join(f"{k}. {q}" for k, q in enumerate(action["questions"], 1))
        elif kind == "question":
            with self.lock:
                qs = (self.question_fn(prompt, self.questions_per_reply) if self.question_fn
                      else self._fresh_questions(self.questions_per_reply))
            text = "\n".join(f"{k}. {q}" for k, q in enumerate(qs, 1))
        elif kind == "judge":
            text = self.judge_fn(prompt)
        else:
            q = prompt[len("ANSWER:"):].strip()
            text = self.answer_fn(q)
            if finish == "length":
                text = text[: max(1, len(text) // 2)]
        completion = {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": finish,
                         "message": {"role": "assistant", "content": text}}],
        }
        if self.usage:
            completion["usage"] = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        try:
            self._send(h, 200, completion)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout): expected for "slow"
            pass

    def _send(self, h, status: int, obj: dict, headers: dict | None = None) -> None:
        self._send_raw(h, status, json.dumps(obj).encode(), "application/json", headers)

    @staticmethod
    def _send_raw(h, status: int, data: bytes, ctype: str, headers: dict | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", ctype)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
        h.wfile.flush()
