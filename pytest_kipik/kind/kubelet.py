"""The kubelets of kind nodes: their API budget, and a start without cAdvisor's Docker wait.

**API budget.** Kubelets before v1.27 may send 5 requests a second to the API server (burst
10). After a restore from a snapshot every pod's status, the node's and the events all wait
in that queue: the kube-system pods' status came back 3-5 s after the API server, a quarter of
the restore. kipik gives every kubelet the budget v1.27 made the default (50, burst 100), as
the first kubeadm patch, so a user's own ``KubeletConfiguration`` patch still decides.

**The Docker wait.** Kubelets up to v1.23 embed cAdvisor with its Docker plugin. At every
start, before anything else, that plugin asks the Docker endpoint (the kubelet's ``--docker``)
for Docker's root directory, five times one second apart, and only then goes on without it
(``container/docker.RootDir`` in cAdvisor v0.39). A kind node has no Docker, so each of its
kubelets waits 5 s before it starts a single pod: on every create, and again on every restore
from a snapshot, where it was a fifth of the time to ready.

kipik gives those kubelets an endpoint that answers at once. A systemd socket in the node
(one short-lived service per connection) answers every request with a Docker root and
nothing else. The kubelet's ``--docker`` points there, and a kubelet drop-in starts the socket
before the kubelet. cAdvisor finds no Docker version in that answer and registers no Docker
factory, as before. The answers are not logged (``LogLevelMax``); the kubelet asks for a
version with every node status update (every 10 s).

The files live in the DinD host under :data:`HOST_DIR` and are mounted read-only into every
node (``extraMounts``), so a restored snapshot's nodes have them when they boot again.
Kubelets from v1.24 on have no Docker plugin (and no ``--docker``): nothing is added for them,
nor for a node image whose version the tag does not say.

Pure builders; :meth:`pytest_kipik.steps.Steps._node_files_in` writes the files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import yaml

#: The kubelet's requests per second to the API server and its burst (v1.27's defaults).
API_QPS = 50
API_BURST = 100
#: The newest kubelet with cAdvisor's Docker plugin (and its ``--docker`` flag).
LAST_WITH_DOCKER_PLUGIN = (1, 23)
#: In the DinD host: the files mounted into every node. A dot: no cluster is named so.
HOST_DIR = "/kipik/.kubelet"
#: In the node.
SOCKET = "/run/kipik/cadvisor-docker.sock"
UNIT = "kipik-cadvisor-docker"
UNIT_DIR = "/etc/systemd/system"
ANSWER = "/etc/kipik/cadvisor-docker-answer.sh"
#: What cAdvisor reads from the answer: the Docker root, nothing more.
BODY = '{"DockerRootDir":"/var/lib/docker"}'

_TAG = re.compile(r":v(\d+)\.(\d+)(?:\.\d+)?(?:[-+][\w.-]*)?(?:@sha256:[0-9a-f]+)?$")

_SOCKET_UNIT = f"""\
[Unit]
Description=kipik: a Docker root for the kubelet's cAdvisor (it waits 5 s without one)
Before=kubelet.service

[Socket]
ListenStream={SOCKET}
Accept=yes
SocketMode=0600
"""

_SERVICE_UNIT = f"""\
[Unit]
Description=kipik: answer one cAdvisor request with a Docker root

[Service]
StandardInput=socket
StandardOutput=socket
StandardError=journal
LogLevelMax=notice
ExecStart=/bin/sh {ANSWER}
"""

_DROP_IN = f"""\
[Unit]
Wants={UNIT}.socket
After={UNIT}.socket
"""

#: Reads the request's head (leaving it unread would reset the connection), then answers.
_ANSWER_SCRIPT = f"""\
#!/bin/sh
# kipik: answers one HTTP request from the kubelet's cAdvisor with a Docker root.
cr=$(printf '\\r')
while IFS= read -r line; do
  [ -z "${{line%"$cr"}}" ] && break
done
body='{BODY}'
printf 'HTTP/1.1 200 OK\\r\\nContent-Type: application/json\\r\\n'
printf 'Content-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s' "${{#body}}" "$body"
"""


def kubelet_minor(node_image: str) -> tuple[int, int] | None:
    """The Kubernetes version a node image's tag says (``...:v1.22.3``); None if none."""
    found = _TAG.search(node_image)
    return (int(found[1]), int(found[2])) if found else None


def needs_answer(node_images: Sequence[str]) -> bool:
    """Whether every one of the nodes' images has a kubelet that waits for a Docker.

    False when kind chooses the image (no ``node_images``): kind v0.32.0's default is newer.
    """
    versions = [kubelet_minor(image) for image in node_images]
    return bool(versions) and all(v is not None and v <= LAST_WITH_DOCKER_PLUGIN for v in versions)


#: Each file: its name in :data:`HOST_DIR`, where the node has it, its text.
_FILES = (
    (f"{UNIT}.socket", f"{UNIT_DIR}/{UNIT}.socket", _SOCKET_UNIT),
    (f"{UNIT}@.service", f"{UNIT_DIR}/{UNIT}@.service", _SERVICE_UNIT),
    (f"{UNIT}.conf", f"{UNIT_DIR}/kubelet.service.d/{UNIT}.conf", _DROP_IN),
    ("answer.sh", ANSWER, _ANSWER_SCRIPT),
)


def host_files() -> dict[str, bytes]:
    """The files to write into the DinD host, by path."""
    return {f"{HOST_DIR}/{name}": text.encode() for name, _inside, text in _FILES}


def node_mounts() -> list[dict[str, Any]]:
    """The kind ``extraMounts`` that put :func:`host_files` where the node's systemd reads them."""
    return [
        {"hostPath": f"{HOST_DIR}/{name}", "containerPath": inside, "readOnly": True}
        for name, inside, _text in _FILES
    ]


def flag_patches() -> list[str]:
    """The kubeadm patches (first node, the others) that point the kubelet's ``--docker`` there."""
    args = {"nodeRegistration": {"kubeletExtraArgs": {"docker": f"unix://{SOCKET}"}}}
    return [
        yaml.safe_dump({"kind": kind, **args}, default_flow_style=False, sort_keys=False)
        for kind in ("InitConfiguration", "JoinConfiguration")
    ]


def budget_patch() -> str:
    """The kubeadm patch that gives the kubelet :data:`API_QPS` and :data:`API_BURST`."""
    body = {"kind": "KubeletConfiguration", "kubeAPIQPS": API_QPS, "kubeAPIBurst": API_BURST}
    return yaml.safe_dump(body, default_flow_style=False, sort_keys=False)
