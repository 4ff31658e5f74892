"""Row formats beyond alpaca: ShareGPT, and the OpenAI chat fine-tuning format (tool calls, tools, weights).

- ShareGPT: `{"conversations": [{"from": ROLE, "value": str}, ...], "system"?: str, "tools"?: list or JSON str}`.
  Roles (`SHAREGPT_ROLES`): human/user, gpt/assistant, system, function_call (an assistant tool call: its value is
  the JSON `{"name", "arguments"}`, or a list of them), observation/tool (a tool result). The conversation becomes
  OpenAI-style messages and is validated as a `messages` row, every problem named by its ShareGPT field
  (`"conversations"[3].from`).
- OpenAI: `{"messages": [...], "tools"?: [...]}` where an assistant message may carry `tool_calls`
  (`[{"id"?, "type": "function", "function": {"name", "arguments": JSON str or object}}]`, its content then optional),
  a `tool` message (`tool_call_id`?, `content`) answers a call, and an assistant message's `weight: 0|1` says
  whether it trains (OpenAI's semantics: default 1).

Arguments are kept as objects (a JSON string is parsed) because chat templates differ: Qwen2.5's writes
`arguments | tojson`, which would quote a string a second time. A tool schema given bare (`{"name", "parameters"}`,
LLaMA-Factory's ShareGPT form) is wrapped as `{"type": "function", "function": ...}`, the OpenAI form.

**Where tools ride.** A row's tools are stored under `TOOLS` on its first user message, so that every path that
renders the messages (training, data-check, predict, chat) hands them to the template with the conversation;
`Template` takes them off (`split_row`) and passes `tools=` to the chat_template. `weight` stays on its assistant
message the same way.
"""
from __future__ import annotations

import json
from typing import Any, Callable

TOOLS = "tools"  # key of a row's tool schemas on its first user message
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
Label = Callable[[int, str], str]  # (message index, field) -> how the row names that field


def _type_name(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "true/false", type(None): "null"}.get(type(v), type(v).__name__)


def openai_label(k: int, key: str) -> str:
    return f"messages[{k}].{key}"


def sharegpt_label(index: list[int]) -> Label:
    """Field names of the ShareGPT row whose k-th message came from `"conversations"[index[k]]`."""
    names = {"role": "from", "content": "value", "tool_calls": "value"}

    def label(k: int, key: str) -> str:
        i = index[k] if k < len(index) else k
        return '"system"' if i < 0 else f'"conversations"[{i}].{names.get(key, key)}'

    return label


def parse_tools(v: Any, field: str, problems: list[str]) -> list[dict] | None:
    """A row's tool schemas (a list, or a JSON string of one as ShareGPT files hold them), each in OpenAI form."""
    if v is None or v == "" or v == []:
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            problems.append(f"{field} is not valid JSON ({e.msg}): give a list of function schemas")
            return None
    if not isinstance(v, list):
        problems.append(f"{field} must be a list of function schemas, got {_type_name(v)}")
        return None
    out = []
    for k, t in enumerate(v):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else t
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            problems.append(f'{field}[{k}] must be a function schema with a "name" '
                            '({"type": "function", "function": {"name", "description", "parameters"}})')
            continue
        out.append(t if fn is not t else {"type": "function", "function": t})
    return out or None


def parse_tool_calls(v: Any, where: str, problems: list[str]) -> list[dict]:
    """An assistant message's tool calls in OpenAI form, arguments as objects; problems name `where`."""
    if not isinstance(v, list) or not v:
        problems.append(f"{where} must be a non-empty list of tool calls, got {_type_name(v)}")
        return []
    out = []
    for k, c in enumerate(v):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            problems.append(f'{where}[{k}] must be {{"type": "function", "function": {{"name", "arguments"}}}}')
            continue
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                problems.append(f"{where}[{k}].function.arguments is not valid JSON ({e.msg})")
                continue
        if not isinstance(args, dict):
            problems.append(f"{where}[{k}].function.arguments must be a JSON object, got {_type_name(args)}")
            continue
        call = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(c.get("id"), str):
            call["id"] = c["id"]
        out.append(call)
    return out


def sharegpt_messages(obj: dict, problems: list[str]) -> tuple[list[dict], list[int]]:
    """The ShareGPT row `obj` as OpenAI-style raw messages (validated afterwards as a `messages` row), and for each
    message the index of its entry in "conversations". ShareGPT-only problems (an unknown role, a function_call that
    is not JSON) go to `problems`."""
    conv = obj.get("conversations")
    if not isinstance(conv, list) or not conv:
        problems.append('"conversations" must be a non-empty list of {"from", "value"} objects')
        return [], []
    msgs: list[dict] = []
    index: list[int] = []
    system = obj.get("system")
    if system is not None:
        if isinstance(system, str):
            if system.strip():
                msgs.append({"role": "system", "content": system})
                index.append(-1)
        else:
            problems.append(f'"system" must be a string, got {_type_name(system)}')
    for k, m in enumerate(conv):
        if not isinstance(m, dict):
            problems.append(f'"conversations"[{k}] must be an object, got {_type_name(m)}')
            continue
        src, value = m.get("from"), m.get("value")
        if src not in SHAREGPT_ROLES:
            problems.append(f'"conversations"[{k}].from {repr(src)[:40]} is not a known role; accepted: '
                            + ", ".join(SHAREGPT_ROLES))
            continue
        if src == "function_call":
            calls = _sharegpt_calls(value, f'"conversations"[{k}].value', problems)
            msg: dict = {"role": "assistant", "content": "", "tool_calls": calls}
            if msgs and msgs[-1]["role"] == "assistant" and "tool_calls" not in msgs[-1]:
                # "gpt" text then "function_call": one assistant turn that talks, then calls (LLaMA-Factory's reading).
                msgs[-1]["tool_calls"] = calls
                continue
        else:
            msg = {"role": SHAREGPT_ROLES[src], "content": value}
        msgs.append(msg)
        index.append(k)
    return msgs, index


def _sharegpt_calls(value: Any, where: str, problems: list[str]) -> list[dict]:
    """A function_call's value: JSON `{"name", "arguments"}` or a list of them (parallel calls)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            problems.append(f'{where} is not valid JSON ({e.msg}): a function_call holds {{"name", "arguments"}}')
            return []
    calls = value if isinstance(value, list) else [value]
    return parse_tool_calls([{"type": "function", "function": c} for c in calls], where, problems)


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """`messages` with a leading system message `system` when they have none (the run's data.system:
    training adds it to rows without their own, and inference must do the same)."""
    if system and not (messages and messages[0]["role"] == "system"):
        return [{"role": "system", "content": system}, *messages]
    return messages


def split_row(messages: list[dict], last_only: bool = False) -> tuple[list[dict], list[dict] | None, list[bool]]:
    """(messages as the chat_template gets them, the row's tools or None, per message: its answer trains).

    A message trains when it is an assistant turn whose `weight` is not 0 and, with `last_only`
    (data.train_on_turns: last), when it is the last assistant turn."""
    tools = None
    clean, trains = [], []
    last = max((k for k, m in enumerate(messages) if m.get("role") == "assistant"), default=-1)
    for k, m in enumerate(messages):
        if TOOLS in m or "weight" in m:
            tools = m.get(TOOLS) or tools
            m = {key: v for key, v in m.items() if key not in (TOOLS, "weight")}
        clean.append(m)
        weight = messages[k].get("weight", 1)
        trains.append(m.get("role") == "assistant" and weight != 0 and (not last_only or k == last))
    return clean, tools, trains


def uses_tools(messages: list[dict]) -> bool:
    """The conversation holds tools, a tool call or a tool result."""
    return any(TOOLS in m or "tool_calls" in m or m.get("role") == "tool" for m in messages)
