"""`domaintune serve RUN`: an OpenAI-compatible API server (FastAPI + uvicorn) and a web chat page.

The server starts listening at once and loads the model in a background thread: `GET /health` answers
503 while the model loads and 200 once it is ready. Requests are queued and served one at a time
(first come, first served); each generates in a worker thread, so the server stays responsive, and a
client that disconnects stops its own generation. See `app.py` for the endpoints and error bodies.

This module imports only the stdlib at top level (the CLI builds its parser from it).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from ..errors import UserError

ENV_KEY = "DOMAINTUNE_API_KEY"
HELP = ("Serve a run (or an exported / any local model directory) with an OpenAI-compatible API: GET /health, "
        "GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming as server-sent events), and a "
        "web chat page at /. The model loads in the background after the server starts listening (/health: 503 "
        "while loading, 200 when ready). One model serves one request at a time: concurrent requests wait in a "
        "first-come-first-served queue, and a client that disconnects stops its generation. Binds 127.0.0.1 "
        "unless --host says otherwise; set an API key (--api-key or $DOMAINTUNE_API_KEY) before exposing it. "
        "Requests that leave sampling parameters out get the defaults below; temperature 0 means greedy. "
        "'stop' strings are honoured; n must be 1.")


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API server + web chat page for a run or model directory",
                       description=HELP)
    p.add_argument("run", help="run directory (adapter or full model), exported model, or local model directory")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind; 0.0.0.0 exposes the server (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${ENV_KEY} if set, else no key)")
    p.add_argument("--model-name", default=None,
                   help="model id clients must send (default: the directory's name, '-base' added with --base-only)")
    p.add_argument("--base-only", action="store_true", help="serve the base model without the run's adapter (default: off)")
    p.add_argument("--template", default=None,
                   help="prompt template for a directory without template.json: domain_zh, alpaca, chatml, tokenizer "
                        "or a .json path (default: the run's template.json, else the tokenizer's chat_template)")
    p.add_argument("--max-tokens", type=int, default=512,
                   help="max_tokens when a request sets none (capped by the context left) (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.7,
                   help="temperature when a request sets none; 0 = greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.9, help="top_p when a request sets none (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="top_k when a request sets none; 0 = off (default: %(default)s)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="repetition_penalty when a request sets none (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted; larger ones get 413 (default: %(default)s)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                   help="weight dtype; auto = bf16/fp16 on GPU, fp32 on CPU (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: %(default)s)")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(a) -> int:
    from .app import ServeDefaults

    defaults = ServeDefaults(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                             repetition_penalty=a.repetition_penalty)
    return run_serve(a.run, host=a.host, port=a.port, api_key=a.api_key, model_name=a.model_name,
                     base_only=a.base_only, template=a.template, defaults=defaults, max_body_bytes=a.max_body_bytes,
                     device=a.device, dtype=a.dtype, log_level=a.log_level)


def run_serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              model_name: str | None = None, base_only: bool = False, template: str | None = None,
              defaults=None, max_body_bytes: int = 1 << 20, device: str | None = None, dtype: str = "auto",
              log_level: str = "info") -> int:
    """Serve until interrupted. The API key defaults to $DOMAINTUNE_API_KEY; an empty key means none."""
    import uvicorn

    from ..generation import GenerationParams
    from .app import ServeDefaults, create_app

    defaults = defaults or ServeDefaults()
    GenerationParams(max_new_tokens=defaults.max_tokens, do_sample=defaults.temperature != 0,
                     temperature=defaults.temperature or 1.0, top_p=defaults.top_p, top_k=defaults.top_k,
                     repetition_penalty=defaults.repetition_penalty).validate()
    if not Path(run).is_dir():
        raise UserError(f"'{run}' is not a directory: give a run directory or a model directory")
    api_key = api_key if api_key is not None else os.environ.get(ENV_KEY)
    api_key = api_key or None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without an API key: anyone who can reach this port can use the model "
              f"(set --api-key or ${ENV_KEY})", file=sys.stderr)
    app = create_app(None, api_key=api_key, max_body_bytes=max_body_bytes, defaults=defaults)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off"))

    def load():
        from ..generation import Engine

        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.should_exit:
            return
        try:
            engine = Engine.from_run(run, base_only=base_only, template=template, device=device, dtype=dtype)
            if model_name:
                engine.model_id = model_name
        except Exception as e:  # noqa: BLE001 - reported below, and the server stops
            app.state.load_error = f"{e.__class__.__name__}: {e}" if not isinstance(e, UserError) else str(e)
            server.should_exit = True
            return
        app.state.engine = engine
        print(f"ready: model '{engine.model_id}' at http://{host}:{port}/v1 (web chat: http://{host}:{port}/)"
              + (" - API key required" if api_key else ""), flush=True)

    print(f"loading {run} in the background; GET /health answers 200 when the model is ready", flush=True)
    threading.Thread(target=load, daemon=True, name="domaintune-load").start()
    server.run()
    if app.state.load_error:
        raise UserError(app.state.load_error)
    return 0
