"""Running the server: `run_serve` starts uvicorn on the app (app.py) and loads the model in the background.

The server starts listening at once and loads the model in a background thread: `GET /health` answers
503 while the model loads and 200 once it is ready. If loading fails, the server stops and the error
is raised as a UserError.

Before it listens, `run_serve` refuses an API key no client could send (empty, blank, not printable ASCII:
`resolve_api_key`) and names the hosts it answers without a key (`startup_notes`; see guard.py).
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from ... import console
from ...errors import UserError
from ..batching import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE, check_batch_limits
from ..vllm_engine import check_engine, load_engine
from . import ENV_KEY

if TYPE_CHECKING:
    from ..params import GenerationParams


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(api_key: str | None, environ: Mapping[str, str]) -> str | None:
    """The API key clients must send: `api_key` (the --api-key flag) if given, else $DOMAINTUNE_API_KEY, else
    None (no key). Surrounding whitespace is dropped, with a note: HTTP header values cannot carry it. An
    empty or blank key, or one no HTTP client could send, is a UserError: never a silent "no key"."""
    from .guard import normalise_api_key

    if api_key is not None:
        source, unset_hint = "--api-key", "leave --api-key out"
    else:
        api_key, source, unset_hint = environ.get(ENV_KEY), f"${ENV_KEY}", f"unset it (`unset {ENV_KEY}`)"
    key = normalise_api_key(api_key, source, unset_hint)
    if key is not None and key != api_key:
        console.note(f"note: the API key from {source} has leading or trailing whitespace, which HTTP cannot carry in "
                     "a header; it is used without that whitespace.")
    return key


def startup_notes(host: str, port: int, api_key: str | None, allowed_hosts: Iterable[str]) -> list[str]:
    """What to tell the person starting the server about who can reach it (printed to stderr)."""
    from .guard import ANY_HOST, WILDCARD_BINDS, accepted_hosts, describe_hosts, host_name

    if api_key:
        return []
    allowed = list(allowed_hosts)
    if any(h.strip() == ANY_HOST for h in allowed):
        return [f"warning: --allowed-hosts {ANY_HOST} turns the Host check off: without an API key, any web page you "
                f"visit can reach this server through DNS rebinding (set --api-key or ${ENV_KEY})"]
    if _is_loopback(host):
        return []
    hosts = accepted_hosts(([] if host in WILDCARD_BINDS or host_name(host) is None else [host]) + allowed)
    assert hosts is not None, "None means any host: answered above"
    return [f"warning: serving on {host} without an API key: anyone who can reach this port can use the model "
            f"(set --api-key or ${ENV_KEY})",
            f"note: without an API key only requests addressed to {describe_hosts(hosts)} are answered (a defence "
            f"against DNS rebinding); to use http://NAME:{port} from other machines, add NAME to --allowed-hosts "
            "(comma-separated), or set an API key, which lifts the check"]


def run_serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              model_name: str | None = None, base_only: bool = False, template: str | None = None,
              defaults: GenerationParams | None = None, max_body_bytes: int = 1 << 20, device: str | None = None,
              dtype: str = "auto", log_level: str = "info", allowed_hosts: Iterable[str] = (),
              allow_pickle: bool = False, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
              max_queue: int = DEFAULT_MAX_QUEUE, engine_kind: str = "hf") -> int:
    """Serve until interrupted. The API key defaults to $DOMAINTUNE_API_KEY (`resolve_api_key`: an empty or
    blank key is an error, not "no key"). Without a key, only requests addressed to localhost, 127.0.0.1, ::1,
    `host` or an `allowed_hosts` name are answered ("*": any; see guard.py).
    `defaults`: the sampling for requests that leave a parameter out (default: the "serve" preset).
    `allow_pickle`: load .bin/.pt weights of a model without safetensors (Engine.from_run).
    `max_batch_size`: requests decoded together; `max_queue`: requests admitted beyond those, waiting (more get
    429; see app.py). `engine_kind`: "hf" (Engine: transformers with continuous batching, batching.py) or
    "vllm" (vllm_engine.py: vLLM's engine on a CUDA GPU, same API, auth, model name and prompts)."""
    import uvicorn

    from ..params import PRESETS
    from .app import create_app
    from .guard import WILDCARD_BINDS, host_name, shown

    defaults = (defaults or PRESETS["serve"]).validate()
    check_batch_limits(max_batch_size, max_queue)
    check_engine(engine_kind, run, base_only, allow_pickle)  # before the server listens: said at once
    if not Path(run).is_dir():
        raise UserError(f"'{run}' is not a directory: give a run directory or a model directory")
    api_key = resolve_api_key(api_key, os.environ)
    allowed_hosts = list(allowed_hosts)
    bound = [] if host in WILDCARD_BINDS or host_name(host) is None else [host]  # the bound address is a Host too
    app = create_app(None, api_key=api_key, max_body_bytes=max_body_bytes, defaults=defaults,
                     allowed_hosts=bound + allowed_hosts, max_queue=max_queue)
    for line in startup_notes(host, port, api_key, allowed_hosts):
        console.warn(line.removeprefix("warning: ")) if line.startswith("warning: ") else console.note(line)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off"))

    def load() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.should_exit:
            return
        try:
            engine = load_engine(engine_kind, run, base_only=base_only, template=template, device=device, dtype=dtype,
                                 allow_pickle=allow_pickle, max_batch_size=max_batch_size)
            if model_name:
                engine.model_id = model_name
        except Exception as e:  # noqa: BLE001 - reported below, and the server stops
            app.state.load_error = f"{e.__class__.__name__}: {e}" if not isinstance(e, UserError) else str(e)
            server.should_exit = True
            return
        app.state.engine = engine
        limit = engine.batch_status()["max_batch_size"]
        if limit < max_batch_size:
            console.note(f"note: this model's attention cache (sliding-window or linear-attention layers) cannot be "
                         f"joined across requests: requests are decoded one at a time (--max-batch-size "
                         f"{max_batch_size} is not reached)")
        url = f"http://{shown(host)}:{port}"
        console.note(f"ready: model '{engine.model_id}' at {url}/v1 (web chat: {url}/)"
                     + (" - API key required" if api_key else ""))

    console.note(f"loading {run} in the background; GET /health answers 200 when the model is ready")
    threading.Thread(target=load, daemon=True, name="domaintune-load").start()
    server.run()
    if app.state.load_error:
        raise UserError(app.state.load_error)
    return 0
