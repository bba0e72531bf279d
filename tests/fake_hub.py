"""A local folder served as a Hugging Face hub, so the real huggingface_hub download code runs
offline. ``root/<org>/<name>/<files>`` become repos; only the routes the hub client uses for
``snapshot_download`` and ``hf_hub_download`` are served."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_HEAD(self):
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                hub.requests.append(f"{self.command} {self.path}")
                path = self.path.split("?")[0].strip("/").split("/")
                if path[:2] == ["api", "models"] and "revision" in path:
                    repo = "/".join(path[2:path.index("revision")])
                    folder = hub.root / repo
                    if not folder.is_dir():
                        return self._send(404, b'{"error": "Repository not found"}', body)
                    info = {"id": repo, "sha": COMMIT, "siblings": [
                        {"rfilename": str(f.relative_to(folder))} for f in sorted(folder.rglob("*")) if f.is_file()]}
                    return self._send(200, json.dumps(info).encode(), body, {"Content-Type": "application/json"})
                if "resolve" in path:
                    i = path.index("resolve")
                    repo, filename = "/".join(path[:i]), "/".join(path[i + 2:])
                    file = hub.root / repo / filename
                    if not file.is_file():
                        return self._send(404, b"", body, {"X-Error-Code": "EntryNotFound"})
                    data = file.read_bytes()
                    etag = hashlib.sha256(data).hexdigest()
                    return self._send(200, data, body, {"X-Repo-Commit": COMMIT, "ETag": f'"{etag}"'})
                if path == [""]:
                    return self._send(200, b"fake hub", body)
                self._send(404, b"", body)

            def _send(self, status: int, data: bytes, body: bool, headers: dict | None = None) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
