"""`domaintune studio`: the web app over a project folder (studio/)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .. import console
from ..errors import UserError

DEFAULT_PORT = 7860
DEFAULT_UPLOAD_MIB = 256  # = studio.security.DEFAULT_UPLOAD_LIMIT (not imported here: --help stays instant)
ENV_TOKEN = "DOMAINTUNE_STUDIO_TOKEN"

STUDIO_HELP = ("A local web app over a project folder, for the whole loop without editing YAML: a table of every "
               "run under ROOT (whatever started it) with its status and scores, live loss curves, a new-run form "
               "made from the config schema (the same validation and messages as the CLI), data from your "
               "documents, predictions side by side, and stop / resume / predict / judge / benchmark / export / "
               "chat buttons. Every action runs the same `domaintune` command you would type, as its own process "
               "writing into its run directory: closing the page or stopping the studio leaves it running, and a "
               "restarted studio finds it again. ROOT holds configs/, data/, documents/, models/ and runs/ "
               "(created when first needed). Binds 127.0.0.1 unless --host says otherwise; on any other address "
               "every request needs the token (--token, $DOMAINTUNE_STUDIO_TOKEN, or one generated and printed "
               "at start), and requests naming another Host or coming from another site's page are refused.")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("studio", help="web app over a project folder: runs, live curves, new runs, data, chat",
                       description=STUDIO_HELP)
    p.add_argument("root", nargs="?", default=".",
                   help="the project folder (created if missing; default: the current folder)")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind; any address other than 127.0.0.1/localhost/::1 requires the token "
                        "(default: %(default)s)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    p.add_argument("--token", default=None,
                   help=f"the access token every request must carry (a header, the cookie set by opening "
                        f"/?token=TOKEN, or ?token=): default ${ENV_TOKEN}, else none on 127.0.0.1 and a generated "
                        f"one, printed at start, on any other host")
    p.add_argument("--max-upload-mib", type=int, default=DEFAULT_UPLOAD_MIB,
                   help="largest file an upload may be, in MiB (default: %(default)s)")
    p.set_defaults(func=cmd_studio)


def cmd_studio(a: argparse.Namespace) -> int:
    from ..studio.app import serve_studio

    if a.max_upload_mib < 1:
        raise UserError(f"--max-upload-mib must be at least 1 (got {a.max_upload_mib})")
    root = Path(a.root).expanduser()
    if not root.exists():
        root.mkdir(parents=True)
        console.note(f"created the project folder {root.resolve()}")
    token = a.token if a.token is not None else os.environ.get(ENV_TOKEN)
    serve_studio(root, host=a.host, port=a.port, token=token, upload_limit=a.max_upload_mib << 20)
    return 0
