"""The studio's defences, against a real uvicorn: paths confined to ROOT (uploads and file views; `..`, absolute
paths, symlinks), the token on a non-loopback host (every route 401 without it; a wrong one on the event stream),
Host and Origin checks, and the upload size limit (413, nothing left behind)."""
from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
import pytest

from domaintune import rundir
from domaintune.errors import UserError
from domaintune.studio.security import COOKIE, is_loopback, studio_token
from studio_runs import serving_printed as serving

TOKEN = "s3cret-token"


@pytest.fixture
def root(tmp_path):
    """ROOT with one run, a secret beside ROOT, and symlinks inside ROOT that point at it."""
    root = tmp_path / "project"
    run = root / "runs" / "alpha"
    run.mkdir(parents=True)
    (run / rundir.CONFIG).write_text("model:\n  name_or_path: x\n")
    (run / rundir.LOG).write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (tmp_path / "secret.txt").write_text("the secret")
    (run / "leak.txt").symlink_to(tmp_path / "secret.txt")
    (root / "data").mkdir()
    (root / "data" / "link.jsonl").symlink_to(tmp_path / "secret.txt")
    (root / "outside").symlink_to(tmp_path, target_is_directory=True)
    return root


ESCAPES = ["../../../secret.txt", "/etc/passwd", str(Path("/etc/passwd")), "leak.txt", "../alpha/../../../secret.txt",
           "..", "a\0b"]


@pytest.mark.parametrize("path", ESCAPES)
def test_file_views_and_downloads_stay_inside_root(root, path):
    with serving(root) as (url, _, _st):
        answers = [httpx.get(f"{url}/api/runs/runs/alpha/file", params={"path": path}),
                   httpx.get(f"{url}/api/runs/runs/alpha/download", params={"path": path}),
                   httpx.get(f"{url}/api/download", params={"path": path.replace("leak.txt", "outside/secret.txt")})]
    for r in answers:
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert "the secret" not in r.text


def test_hidden_files_are_not_served(root):
    (root / ".studio/jobs").mkdir(parents=True)
    (root / ".studio/jobs/serve-20261207-000000-abcd.json").write_text('{"key": "chat-key"}')
    with serving(root) as (url, _, _st):
        answers = [httpx.get(f"{url}/api/download", params={"path": ".studio/jobs/serve-20261207-000000-abcd.json"}),
                   httpx.get(f"{url}/api/download", params={"path": "runs/./.studio/../log"}),
                   httpx.get(f"{url}/api/runs/runs/alpha/file", params={"path": ".hidden"})]
    assert [r.status_code for r in answers] == [403] * 3
    assert all("chat-key" not in r.text for r in answers)


def test_a_symlink_to_a_hidden_file_is_not_served_nor_listed(root):
    (root / ".studio/jobs").mkdir(parents=True)
    (root / ".studio/jobs/serve-20261207-000000-abcd.json").write_text('{"key": "chat-key"}')
    (root / "data").mkdir(exist_ok=True)
    (root / "data/s.json").symlink_to(root / ".studio/jobs/serve-20261207-000000-abcd.json")
    (root / "runs/alpha/k.json").symlink_to(root / ".studio/jobs/serve-20261207-000000-abcd.json")
    with serving(root) as (url, _, _st):
        answers = [httpx.get(f"{url}/api/download", params={"path": "data/s.json"}),
                   httpx.get(f"{url}/api/runs/runs/alpha/download", params={"path": "k.json"}),
                   httpx.get(f"{url}/api/runs/runs/alpha/file", params={"path": "k.json"})]
        listed = httpx.get(f"{url}/api/files", params={"folder": "data"}).json()["files"]
    assert [r.status_code for r in answers] == [403] * 3
    assert all("chat-key" not in r.text for r in answers)
    assert [f["relpath"] for f in listed if f["name"] == "s.json"] == []


def test_run_ids_stay_inside_root(root):
    with serving(root) as (url, _, _st):
        escaped = httpx.get(f"{url}/api/runs/outside/events")  # a symlink to the folder above ROOT
        dotted = httpx.get(f"{url}/api/runs/runs/%2E%2E/%2E%2E/%2E%2E/log")
        inside = httpx.get(f"{url}/api/runs/runs/alpha/file", params={"path": "config.yaml"})
    assert escaped.status_code == 403 and "outside the project folder" in escaped.json()["error"]["message"]
    assert dotted.status_code in (403, 404)
    assert inside.status_code == 200 and inside.json()["text"] == "model:\n  name_or_path: x\n"


@pytest.mark.parametrize("name,saved", [("../../evil.jsonl", "evil.jsonl"), ("/etc/evil.jsonl", "evil.jsonl"),
                                        ("..\\..\\evil.jsonl", "evil.jsonl")])
def test_upload_names_are_reduced_to_a_file_in_the_folder(root, tmp_path, name, saved):
    with serving(root) as (url, _, _st):
        r = httpx.post(f"{url}/api/upload/data", params={"filename": name}, content=b"{}\n")
    assert r.status_code == 201 and r.json()["path"] == f"data/{saved}"
    assert (root / "data" / saved).read_bytes() == b"{}\n"
    assert not (tmp_path / "evil.jsonl").exists() and not Path("/etc/evil.jsonl").exists()


@pytest.mark.parametrize("name", ["..", ".hidden", "", "link.jsonl"])
def test_uploads_refused_without_writing_outside(root, tmp_path, name):
    with serving(root) as (url, _, _st):
        r = httpx.post(f"{url}/api/upload/data", params={"filename": name}, content=b"overwritten")
    assert r.status_code == 403, r.text
    assert (tmp_path / "secret.txt").read_text() == "the secret"  # link.jsonl points at it: not written through
    assert sorted(p.name for p in (root / "data").iterdir()) == ["link.jsonl"]


def test_upload_over_the_limit_is_413_and_leaves_nothing(root):
    def chunks():  # no Content-Length: the body is counted as it streams
        for _ in range(10):
            yield b"x" * 1000

    with serving(root, upload_limit=4096) as (url, _, _st):
        declared = httpx.post(f"{url}/api/upload/data", params={"filename": "big.jsonl"}, content=b"x" * 5000)
        streamed = httpx.post(f"{url}/api/upload/data", params={"filename": "big.jsonl"}, content=chunks())
        fits = httpx.post(f"{url}/api/upload/data", params={"filename": "ok.jsonl"}, content=b"x" * 4096)
    assert declared.status_code == 413 and "4096" in declared.json()["error"]["message"]
    assert streamed.status_code == 413 and "nothing was saved" in streamed.json()["error"]["message"]
    assert fits.status_code == 201
    assert sorted(p.name for p in (root / "data").iterdir()) == ["link.jsonl", "ok.jsonl"]  # no partial, hidden or not


ROUTES = [("GET", "/"), ("GET", "/new"), ("GET", "/documents"), ("GET", "/run/runs/alpha"),
          ("GET", "/static/studio.js"), ("GET", "/api/runs"), ("GET", "/api/runs/runs/alpha"),
          ("GET", "/api/runs/runs/alpha/events"),
          ("GET", "/api/runs/runs/alpha/log"), ("GET", "/api/runs/runs/alpha/predictions"), ("GET", "/api/jobs"),
          ("GET", "/api/form"), ("GET", "/api/files?folder=data"), ("GET", "/api/download?path=runs/alpha/log.jsonl"),
          ("POST", "/api/runs/runs/alpha/stop"), ("POST", "/api/runs/runs/alpha/export"),
          ("POST", "/api/upload/data?filename=x.jsonl"), ("POST", "/api/config/save"), ("GET", "/no/such/route")]


def test_a_non_loopback_studio_without_a_token_gets_one_and_every_route_needs_it(root):
    with serving(root, host="0.0.0.0") as (url, printed, st):
        token = st.token
        refused = {path: httpx.request(method, url + path, json={}) for method, path in ROUTES}
        with_header = httpx.get(f"{url}/api/runs", headers={"Authorization": f"Bearer {token}"})
        with_query = httpx.get(f"{url}/api/runs/runs/alpha/log", params={"token": token})
        opened = httpx.get(printed.replace("127.0.0.1", "127.0.0.1", 1), follow_redirects=False)
        cookie = opened.cookies.get(COOKIE)
        page = httpx.get(f"{url}/", cookies={COOKIE: cookie or ""})
        api = httpx.get(f"{url}/api/runs", cookies={COOKIE: cookie or ""})
    assert token and len(token) >= 24 and printed.endswith(f"/?token={token}")
    for path, r in refused.items():
        assert r.status_code == 401, (path, r.status_code)
        assert r.json()["error"]["code"] == "unauthorized" and "alpha" not in r.text
    assert with_header.status_code == 200 and [x["id"] for x in with_header.json()["runs"]] == ["runs/alpha"]
    assert with_query.status_code == 200
    assert opened.status_code == 303 and opened.headers["location"] == "/" and cookie == token
    set_cookie = opened.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    assert page.status_code == 200 and 'id="runs-table"' in page.text and api.status_code == 200


def test_a_wrong_token_is_refused_on_the_event_stream(root):
    with serving(root, token=TOKEN) as (url, printed, _st):
        events = f"{url}/api/runs/runs/alpha/events"
        answers = [httpx.get(events, params={"token": "wrong"}),
                   httpx.get(events, headers={"Authorization": "Bearer wrong"}),
                   httpx.get(events, cookies={COOKIE: "wrong"}),
                   httpx.get(events, params={"token": TOKEN[:-1]}),
                   httpx.get(events)]
        with httpx.stream("GET", events, params={"token": TOKEN}, timeout=20) as ok:
            status, first = ok.status_code, next(ok.iter_lines())
    assert [r.status_code for r in answers] == [401] * 5
    assert printed.endswith(f"?token={TOKEN}")
    assert status == 200 and first == "event: log"


def test_a_foreign_origin_is_refused(root):
    with serving(root) as (url, _, _st):
        port = url.rsplit(":", 1)[1]
        foreign = [httpx.get(f"{url}/api/runs", headers={"Origin": "http://evil.example"}),
                   httpx.post(f"{url}/api/runs/runs/alpha/report", headers={"Origin": "http://evil.example"}),
                   httpx.get(f"{url}/api/runs/runs/alpha/events", headers={"Origin": "null"}),
                   httpx.get(f"{url}/api/runs", headers={"Origin": f"http://127.0.0.1:{int(port) + 1}"}),
                   httpx.get(f"{url}/api/runs", headers={"Origin": f"http://localhost:{port}"})]
        same = httpx.get(f"{url}/api/runs", headers={"Origin": f"http://127.0.0.1:{port}"})
    assert [r.status_code for r in foreign] == [403] * 5
    assert foreign[1].json()["error"]["code"] == "origin_not_allowed"
    assert not list(root.glob(".studio/jobs/*.json"))  # the refused POST started no job
    assert same.status_code == 200


def test_a_foreign_host_is_refused_without_a_token(root):
    with serving(root) as (url, _, _st):
        rebound = httpx.get(f"{url}/api/runs", headers={"Host": "evil.example"})
        local = httpx.get(f"{url}/api/runs", headers={"Host": "localhost"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
    assert local.status_code == 200


def test_token_rules():
    assert studio_token("127.0.0.1", None) is None and studio_token("localhost", None) is None
    assert studio_token("::1", None) is None and studio_token("127.0.0.2", None) is None
    assert studio_token("0.0.0.0", None) and studio_token("192.168.1.5", None) != studio_token("192.168.1.5", None)
    assert studio_token("0.0.0.0", "  given  ") == "given"
    assert [is_loopback(h) for h in ("127.0.0.1", "localhost", "[::1]", "0.0.0.0", "::", "myhost.lan")] == \
        [True, True, True, False, False, False]
    for bad in ("", "   ", "caf\u00e9"):
        with pytest.raises(UserError, match="--token"):
            studio_token("0.0.0.0", bad)



def test_opening_any_path_with_the_token_redirects_to_that_path_on_this_studio(root):
    """The ?token= redirect keeps the path as sent (percent-encoded: a non-Latin-1 character is no 500) and never
    turns "//host/x" into another site's address."""
    with serving(root, host="0.0.0.0") as (url, _printed, st):
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
            s.sendall(f"GET //evil.example/x?token={st.token} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      "Connection: close\r\n\r\n".encode())
            raw = b""
            while chunk := s.recv(65536):
                raw += chunk
        euro = httpx.get(f"{url}/%E2%82%AC", params={"token": st.token, "page": "2"}, follow_redirects=False)
    head = raw.decode("latin-1").split("\r\n\r\n", 1)[0].lower()
    assert head.startswith("http/1.1 303") and "\r\nlocation: /evil.example/x\r\n" in head + "\r\n"
    assert euro.status_code == 303 and euro.headers["location"] == "/%E2%82%AC?page=2"


def test_a_chunked_json_body_past_the_limit_is_413_before_it_is_parsed(root):
    def chunks():
        for _ in range(3):
            yield b" " * (1 << 20)  # 3 MiB of JSON whitespace, no Content-Length
        yield b"{}"

    with serving(root) as (url, _, _st):
        r = httpx.post(f"{url}/api/config/check", content=chunks(), headers={"Content-Type": "application/json"})
        small = httpx.post(f"{url}/api/config/check", content=iter([b'{"values": ', b'{"name": "x"}}']),
                           headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert small.status_code == 200 and small.json()["ok"] is False  # a small chunked body still reaches the app
