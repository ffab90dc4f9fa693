"""A local stand-in for the Hugging Face Hub: serves files of fake repos at
/{repo}/resolve/{revision}/{filename} with HEAD, GET and Range, the headers huggingface-hub reads
(X-Repo-Commit, ETag, X-Error-Code), and records every request and the bytes sent."""

from __future__ import annotations

import hashlib
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, repos: dict[str, Path], honour_range: bool = True):
        self.repos = repos
        self.honour_range = honour_range
        self.requests: list[tuple[str, str, dict]] = []
        self.bytes_sent: dict[str, int] = {}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _api(self, body: bool) -> bool:
                """/api/models/{repo}/revision/{rev} (repo info) and /api/models/{repo}/tree/{rev} (file list)."""
                import json
                from urllib.parse import urlparse

                m = re.match(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/?]+)", urlparse(self.path).path)
                if not m:
                    return False
                repo, kind, _ = m.groups()
                if repo not in hub.repos:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return True
                files = sorted(p for p in hub.repos[repo].iterdir() if p.is_file())
                if kind == "revision":
                    obj = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": p.name} for p in files]}
                else:
                    obj = [{"type": "file", "path": p.name, "size": p.stat().st_size,
                            "oid": hashlib.sha1(p.name.encode()).hexdigest()} for p in files]
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)
                return True

            def _serve(self, body: bool):
                hub.requests.append((self.command, self.path, dict(self.headers)))
                if self.path.startswith("/api/") and self._api(body):
                    return
                m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", self.path)
                if not m or m.group(1) not in hub.repos:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                repo, _, name = m.groups()
                path = hub.repos[repo] / name
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", COMMIT)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                size = path.stat().st_size
                start, end, status = 0, size - 1, 200
                rng = self.headers.get("Range")
                if rng and hub.honour_range:
                    a, b = re.match(r"bytes=(\d+)-(\d*)", rng).groups()
                    start, end = int(a), min(int(b) if b else size - 1, size - 1)
                    status = 206
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha1(f"{name}{size}".encode()).hexdigest() + '"')
                self.send_header("Content-Length", str(end - start + 1))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
                self.end_headers()
                if not body:
                    return
                sent = 0
                try:
                    with open(path, "rb") as f:
                        f.seek(start)
                        left = end - start + 1
                        while left > 0:
                            chunk = f.read(min(left, 1 << 20))
                            self.wfile.write(chunk)
                            sent += len(chunk)
                            left -= len(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                hub.bytes_sent[name] = hub.bytes_sent.get(name, 0) + sent

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def hub_env(hub: FakeHub, cache: Path, offline: bool = False, token: str | None = "hf_test_token") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1")
    if token:
        env["HF_TOKEN"] = token
    return env
