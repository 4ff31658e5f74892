"""`domaintune serve RUN`: an OpenAI-compatible API server (FastAPI + uvicorn) and a web chat page.

| module | what |
|---|---|
| `server.py` | `run_serve`: uvicorn on 127.0.0.1 (by default), the model loaded in the background |
| `app.py` | `create_app`: the endpoints, queueing, error bodies, the page's security headers |
| `checks.py` | what a request may ask: schema errors as messages, refusals of what cannot be honoured, its decoding |
| `guard.py` | the ASGI guard: Host check against DNS rebinding (without a key), API key (one header), JSON content |
|  | type, body size and time, integers too long to read |
| `lifecycle.py` | admission (429 past the limits), generation from the engine's stream, disconnects |
| `protocol.py` | the OpenAI request and response shapes |
| `static/index.html` | the web chat page served at `/` |

Concurrent requests are decoded together by the engine's continuous batcher (inference/batching.py); the
event loop stays responsive, and a client that disconnects stops its own generation.
Requests that leave sampling parameters out get the "serve" preset (inference/params.py).
"""

ENV_KEY = "DOMAINTUNE_API_KEY"  # the environment variable holding the API key
