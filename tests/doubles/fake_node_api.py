"""A minimal plain-HTTP stand-in for the API server, to test the kubelet double on its own.

Run inside a node container (`python3 fake_node_api.py PORT STATE_DIR`, with the node double at
/kipik-node): serves the node's pods from STATE_DIR/pods.json (written by the test) with the
status the kubelet patched (stored in STATE_DIR/status/<uid>.json), events into
STATE_DIR/events.jsonl, ConfigMaps/Secrets/Services/Endpoints from STATE_DIR/<resource>.json,
and `pods/NAME/log` and `pods/NAME/portforward` through the node double's `streaming.serve`, the
way its API server does. Stdlib only; nothing is validated.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, "/kipik-node")  # the node double, as its API server imports it
import streaming  # type: ignore[import-not-found]

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

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        for pod in read("pods"):
            meta = pod["metadata"]
            if (meta["namespace"], meta["name"]) == (namespace, name):
                status = STATE / "status" / f"{meta['uid']}.json"
                if status.exists():
                    pod["status"] = json.loads(status.read_text())
                return pod
        return None

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        parts = url.path.strip("/").split("/")
        if parts[-1] in ("pods", "services", "endpoints"):
            items = read(parts[-1])
            if parts[-1] == "pods":
                items = [p for p in (self.pod(i["metadata"]["namespace"], i["metadata"]["name"])
                                     for i in items) if p]  # fmt: skip
            self.reply(200, {"kind": "List", "items": items})
            return
        if len(parts) in (6, 7) and parts[4] == "pods":
            pod = self.pod(parts[3], parts[5])
            if pod is not None and len(parts) == 6:
                self.reply(200, pod)
                return
            if pod is not None and parts[6] in ("log", "portforward"):
                streaming.serve(self, parts[6], pod, parse_qs(url.query))
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
    ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
