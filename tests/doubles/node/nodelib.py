"""TEST DOUBLE: helpers shared by the kind node image doubles (kubeadm, kubectl, crictl, ctr).

Stdlib only: the node image has python3 and openssl but no PyYAML, so the configuration the kind
double writes (/kind/kubeadm.conf) is YAML made of JSON documents, which this module reads with
PyYAML when present and with `json` otherwise.
"""

from __future__ import annotations

import base64
import json
import re
import ssl
import tempfile
from typing import Any

ADMIN_CONF = "/etc/kubernetes/admin.conf"
PKI = "/etc/kubernetes/pki"
APISERVER_CONFIG = "/etc/kubernetes/kipik-apiserver.json"
CNI_MARKER = "/etc/cni/net.d/10-kindnet.conflist"


def load_documents(text: str) -> list[dict[str, Any]]:
    """Split a multi-document YAML stream (as kind writes kubeadm.conf) into mappings."""
    try:
        import yaml

        return [d for d in yaml.safe_load_all(text) if d]
    except ImportError:
        pass
    docs = []
    for chunk in re.split(r"^---\s*$", text, flags=re.MULTILINE):
        if chunk.strip():
            docs.append(json.loads(chunk))
    return docs


def write_kubeconfig(
    path: str, *, cluster: str, user: str, server: str, ca: bytes, cert: bytes, key: bytes
) -> None:
    """Write a kubeconfig in the layout kubeadm uses for admin.conf."""

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    context = f"{user}@{cluster}"
    text = (
        "apiVersion: v1\n"
        "clusters:\n"
        "- cluster:\n"
        f"    certificate-authority-data: {b64(ca)}\n"
        f"    server: {server}\n"
        f"  name: {cluster}\n"
        "contexts:\n"
        "- context:\n"
        f"    cluster: {cluster}\n"
        f"    user: {user}\n"
        f"  name: {context}\n"
        f"current-context: {context}\n"
        "kind: Config\n"
        "preferences: {}\n"
        "users:\n"
        f"- name: {user}\n"
        "  user:\n"
        f"    client-certificate-data: {b64(cert)}\n"
        f"    client-key-data: {b64(key)}\n"
    )
    with open(path, "w") as f:
        f.write(text)


def admin_ssl_context(admin_conf: str = ADMIN_CONF) -> tuple[ssl.SSLContext, str]:
    """An SSL context with admin.conf's CA and client certificate, and the server URL."""
    with open(admin_conf) as f:
        text = f.read()

    def field(name: str) -> str:
        match = re.search(rf"^\s*{re.escape(name)}:\s*(\S+)\s*$", text, flags=re.MULTILINE)
        if not match:
            raise ValueError(f"{admin_conf}: no {name}")
        return match.group(1)

    context = ssl.create_default_context(
        cadata=base64.b64decode(field("certificate-authority-data")).decode()
    )
    with tempfile.NamedTemporaryFile("wb", dir="/run", delete=True) as cert_file:
        cert_file.write(base64.b64decode(field("client-certificate-data")))
        cert_file.write(b"\n")
        cert_file.write(base64.b64decode(field("client-key-data")))
        cert_file.flush()
        context.load_cert_chain(cert_file.name)
    return context, field("server")
