"""`domaintune serve RUN`: an OpenAI-compatible API server (FastAPI + uvicorn) and a web chat page.

| module | what |
|---|---|
| `server.py` | `run_serve`: uvicorn on 127.0.0.1 (by default), the model loaded in the background |
| `app.py` | `create_app`: the endpoints, queueing, error bodies |
| `guard.py` | the ASGI guard: Host check against DNS rebinding (without a key), API key, body size |
| `protocol.py` | the OpenAI request and response shapes |
| `static/index.html` | the web chat page served at `/` |

Requests are queued and served one at a time (first come, first served); each generates in a worker
thread, so the server stays responsive, and a client that disconnects stops its own generation.
Requests that leave sampling parameters out get the "serve" preset (inference/params.py).
"""

ENV_KEY = "DOMAINTUNE_API_KEY"  # the environment variable holding the API key
