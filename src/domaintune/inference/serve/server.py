"""Running the server: `run_serve` starts uvicorn on the app (app.py) and loads the model in the background.

The server starts listening at once and loads the model in a background thread: `GET /health` answers
503 while the model loads and 200 once it is ready. If loading fails, the server stops and the error
is raised as a UserError.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import UserError

if TYPE_CHECKING:
    from ..params import GenerationParams

ENV_KEY = "DOMAINTUNE_API_KEY"


def run_serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              model_name: str | None = None, base_only: bool = False, template: str | None = None,
              defaults: GenerationParams | None = None, max_body_bytes: int = 1 << 20, device: str | None = None,
              dtype: str = "auto", log_level: str = "info") -> int:
    """Serve until interrupted. The API key defaults to $DOMAINTUNE_API_KEY; an empty key means none.
    `defaults`: the sampling for requests that leave a parameter out (default: the "serve" preset)."""
    import uvicorn

    from ..params import PRESETS
    from .app import create_app

    defaults = (defaults or PRESETS["serve"]).validate()
    if not Path(run).is_dir():
        raise UserError(f"'{run}' is not a directory: give a run directory or a model directory")
    api_key = api_key if api_key is not None else os.environ.get(ENV_KEY)
    api_key = api_key or None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: serving on {host} without an API key: anyone who can reach this port can use the model "
              f"(set --api-key or ${ENV_KEY})", file=sys.stderr)
    app = create_app(None, api_key=api_key, max_body_bytes=max_body_bytes, defaults=defaults)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off"))

    def load() -> None:
        from ..engine import Engine

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
