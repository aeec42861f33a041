"""A minimal plain-HTTP stand-in for the API server, to test the kubelet double on its own.

Run inside a node container (`python3 fake_node_api.py PORT STATE_DIR`): serves the node's pods
from STATE_DIR/pods.json (written by the test), stores status patches into
STATE_DIR/status/<uid>.json, events into STATE_DIR/events.jsonl, and ConfigMaps/Secrets/
Services/Endpoints from STATE_DIR/<resource>.json. Stdlib only.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

STATE = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("/smoke")
LOCK = threading.Lock()


def read(name: str) -> list[dict[str, Any]]:
    path = STATE / f"{name}.json"
    if not path.exists():
        return []
    items: list[dict[str, Any]] = json.loads(path.read_text())
    return items


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def reply(self, code: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length)) if length else None

    def do_GET(self) -> None:
        parts = urlsplit(self.path).path.strip("/").split("/")
        if parts[-1] in ("pods", "services", "endpoints"):
            self.reply(200, {"kind": "List", "items": read(parts[-1])})
            return
        if len(parts) == 6 and parts[4] in ("configmaps", "secrets"):
            for obj in read(parts[4]):
                if obj["metadata"]["name"] == parts[5]:
                    self.reply(200, obj)
                    return
        self.reply(404, {"kind": "Status", "code": 404, "reason": "NotFound"})

    def do_PATCH(self) -> None:
        parts = urlsplit(self.path).path.strip("/").split("/")
        body = self.body()
        with LOCK:
            if parts[-1] == "status":
                folder = STATE / "status"
                folder.mkdir(exist_ok=True)
                uid = body["metadata"]["uid"]
                (folder / f"{uid}.json").write_text(json.dumps(body["status"]))
            else:
                with open(STATE / "events.jsonl", "a") as f:
                    f.write(json.dumps({"patch": parts[-1], **body}) + "\n")
        self.reply(200, body)

    def do_POST(self) -> None:
        body = self.body()
        with LOCK, open(STATE / "events.jsonl", "a") as f:
            f.write(json.dumps(body) + "\n")
        self.reply(201, body)


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
