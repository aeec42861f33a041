"""Registries for nested clusters: mirrors, private CAs, credentials, and a registry inside.

Pure builders of what the inner Docker daemon and the kind nodes' containerd need, from one
:class:`Registries` (which :func:`load` reads from the settings' files):

- the inner daemon (it pulls the node images): ``--registry-mirror`` for Docker Hub's mirrors
  (the only registry dockerd mirrors), ``--insecure-registry`` for those served over plain HTTP,
  a CA per registry in ``/etc/docker/certs.d/HOST/ca.crt``, credentials in the Docker CLI's
  ``config.json`` (kind and kipik pull with the CLI);
- every kind node (it pulls the workload images): containerd's ``config_path`` (one
  ``hosts.toml`` per registry, containerd 1.5 and later) and the kubelet's
  ``/var/lib/kubelet/config.json``, which hands the credentials to containerd with each pull,
  as kind's private-registries guide wires them. Both are files in the DinD host mounted into
  every node (``extraMounts``), so a restored snapshot gets them too.

Credentials are never part of a repr, a log line or the kind config: only the two
``config.json`` files carry them, written 0600.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pytest_kipik.errors import ConfigError

DOCKER_HUB = "docker.io"
#: The key Docker (and the kubelet) file Docker Hub's credentials under.
DOCKER_HUB_AUTH_KEY = "https://index.docker.io/v1/"
_DOCKER_HUB_NAMES = {"docker.io", "index.docker.io", "registry-1.docker.io"}
#: Where containerd pulls Docker Hub's images when no mirror answers.
DOCKER_HUB_SERVER = "https://registry-1.docker.io"

#: The registry inside the host: its container, its port there, the name nodes pull by.
LOCAL_NAME = "kind-registry"
LOCAL_PORT = 5001
LOCAL_INSIDE = f"localhost:{LOCAL_PORT}"
#: Where the registry container listens (on the host's bridge and on kind's network).
LOCAL_CONTAINER_PORT = 5000

#: In the host: the tree mounted as every node's containerd certs.d, the kubelet's credentials.
#: A dot: no cluster name (a DNS label) can be it, so no cluster's own directory is.
HOST_DIR = "/kipik/.registries"
HOST_CERTS_DIR = f"{HOST_DIR}/certs.d"
HOST_KUBELET_AUTH = f"{HOST_DIR}/kubelet-config.json"
NODE_CERTS_DIR = "/etc/containerd/certs.d"
NODE_KUBELET_AUTH = "/var/lib/kubelet/config.json"
#: The inner daemon's CAs (read per connection) and the Docker CLI's credentials.
DAEMON_CERTS_DIR = "/etc/docker/certs.d"
DAEMON_AUTH = "/root/.docker/config.json"

#: kind's containerdConfigPatches entry that makes containerd read ``hosts.toml`` files.
CONTAINERD_PATCH = (
    f'[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "{NODE_CERTS_DIR}"\n'
)


def registry_host(key: str) -> str:
    """The registry a ``config.json`` key or a name means: ``host[:port]``, Docker Hub folded."""
    text = key.strip()
    host = urlsplit(text).netloc if "://" in text else text.split("/", 1)[0]
    host = host.lower()
    return DOCKER_HUB if host in _DOCKER_HUB_NAMES else host


@dataclass(frozen=True)
class Mirror:
    """A mirror (``url``) that serves the images of ``registry``."""

    registry: str
    url: str

    @property
    def host(self) -> str:
        """The mirror's ``host[:port]``."""
        return urlsplit(self.url).netloc

    @property
    def plain(self) -> bool:
        """Whether the mirror is served over plain HTTP."""
        return self.url.startswith("http://")


def parse_mirror(text: str) -> Mirror:
    """``[REGISTRY=]URL``: a mirror of REGISTRY (default Docker Hub) at an http(s) URL."""
    named, sep, url = text.strip().rpartition("=")
    registry = registry_host(named) if sep else DOCKER_HUB
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"{text!r} is not a mirror: use [REGISTRY=]URL with URL http(s)://HOST[:PORT], "
            "e.g. https://mirror.example:5000 or ghcr.io=https://mirror.example/ghcr"
        )
    if sep and (not registry or "/" in named.strip() or "=" in named):
        raise ValueError(f"{text!r}: {registry!r} is not a registry host (e.g. docker.io)")
    return Mirror(registry, f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}")


def parse_ca(text: str) -> tuple[str, str]:
    """``HOST[:PORT]=PATH``: the CA (PEM) that signed the certificate of a registry or mirror."""
    host, sep, path = text.strip().partition("=")
    if not sep or not host.strip() or not path.strip() or "/" in host:
        raise ValueError(
            f"{text!r} is not a registry CA: use HOST[:PORT]=PATH, e.g. "
            "mirror.example:5000=/etc/ssl/mirror-ca.pem"
        )
    return registry_host(host), path.strip()


def check_pem(data: bytes, where: str) -> bytes:
    """``data`` if it holds a PEM certificate, else a ConfigError naming ``where``."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"{where} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    return data


def parse_auths(data: bytes, where: str) -> dict[str, dict[str, str]]:
    """The ``auths`` of a Docker ``config.json``: registry -> {"auth": base64(user:password)}.

    Keys are folded to registries (Docker Hub's under :data:`DOCKER_HUB`). Errors name
    ``where`` and the key, never a secret.
    """
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{where} is not a JSON Docker config.json") from None
    auths = document.get("auths") if isinstance(document, dict) else None
    if not isinstance(auths, dict) or not auths:
        helpers = isinstance(document, dict) and (
            "credsStore" in document or "credHelpers" in document
        )
        raise ConfigError(
            f'{where} has no credentials under "auths"'
            + (
                " (it names a credential helper, which the DinD host and the nodes cannot run): "
                "log in with a config of your own, e.g. DOCKER_CONFIG=$(mktemp -d) docker login "
                "REGISTRY, and give $DOCKER_CONFIG/config.json"
                if helpers
                else ""
            )
        )
    found: dict[str, dict[str, str]] = {}
    for key, entry in auths.items():
        found[registry_host(key)] = {"auth": _auth_of(entry, f"{where}: auths[{key!r}]")}
    return found


def _auth_of(entry: Any, where: str) -> str:
    """base64(user:password) of one ``auths`` entry (``auth``, or ``username``/``password``)."""
    if isinstance(entry, dict) and isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, sep, _ = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            user, sep = "", ""
        if not sep or not user:
            raise ConfigError(f"{where}.auth is not base64 of USER:PASSWORD")
        return str(entry["auth"])
    if isinstance(entry, dict) and entry.get("username") and entry.get("password"):
        return base64.b64encode(f"{entry['username']}:{entry['password']}".encode()).decode()
    raise ConfigError(f"{where} has neither auth nor username and password")


@dataclass(frozen=True)
class Registries:
    """What the settings say about registries (files read): see the module's docstring."""

    mirrors: tuple[Mirror, ...] = ()
    #: Registry or mirror ``host[:port]`` -> the PEM of its CA.
    cas: Mapping[str, bytes] = field(default_factory=dict)
    #: Registry -> {"auth": ...}: secrets, never in a repr.
    auths: Mapping[str, Mapping[str, str]] = field(default_factory=dict, repr=False)
    #: The image of the registry to run inside each host, or None.
    local: str | None = None

    @property
    def configured(self) -> bool:
        """Whether any registry setting is given."""
        return bool(self.mirrors or self.cas or self.auths or self.local)

    def dockerd_args(self) -> list[str]:
        """Arguments of the inner daemon: Docker Hub's mirrors, the plain-HTTP ones insecure."""
        hub = [m for m in self.mirrors if m.registry == DOCKER_HUB]
        return [f"--registry-mirror={m.url}" for m in hub] + [
            f"--insecure-registry={m.host}" for m in hub if m.plain
        ]

    def credentials(self) -> dict[str, Mapping[str, str]]:
        """The auths, plus each mirrored registry's filed under its mirror's when it has none.

        Docker and the kubelet look credentials up by the image's registry and hand them to
        whichever mirror serves the pull, so a mirror's credentials must also stand under the
        registry it mirrors.
        """
        found = dict(self.auths)
        for mirror in self.mirrors:
            if mirror.registry not in found and mirror.host in self.auths:
                found[mirror.registry] = self.auths[mirror.host]
        return found

    def _config_json(self) -> bytes:
        auths = {
            (DOCKER_HUB_AUTH_KEY if registry == DOCKER_HUB else registry): dict(entry)
            for registry, entry in sorted(self.credentials().items())
        }
        return json.dumps({"auths": auths}, indent=2).encode()

    def daemon_files(self) -> dict[str, bytes]:
        """Files of the inner daemon and the Docker CLI in the host: CAs, credentials."""
        files = {f"{DAEMON_CERTS_DIR}/{host}/ca.crt": pem for host, pem in self.cas.items()}
        if self.auths:
            files[DAEMON_AUTH] = self._config_json()
        return files

    def _hosts(self) -> dict[str, list[tuple[str, list[str], str | None]]]:
        """Registry -> its hosts as containerd tries them: (URL, capabilities, CA file)."""
        hosts: dict[str, list[tuple[str, list[str], str | None]]] = {}
        for mirror in self.mirrors:
            ca = f"{mirror.host}.crt" if mirror.host in self.cas else None
            hosts.setdefault(mirror.registry, []).append((mirror.url, ["pull", "resolve"], ca))
        for host in self.cas:
            if host not in {m.host for m in self.mirrors}:  # a private registry of its own
                hosts.setdefault(host, []).append(
                    (f"https://{host}", ["pull", "resolve", "push"], f"{host}.crt")
                )
        if self.local:
            url = f"http://{LOCAL_NAME}:{LOCAL_CONTAINER_PORT}"
            hosts.setdefault(LOCAL_INSIDE, []).append((url, ["pull", "resolve", "push"], None))
        return hosts

    def node_files(self) -> dict[str, bytes]:
        """Files in the host that every node mounts: ``hosts.toml`` and CAs, credentials."""
        files: dict[str, bytes] = {}
        for registry, hosts in self._hosts().items():
            files[f"{HOST_CERTS_DIR}/{registry}/hosts.toml"] = hosts_toml(registry, hosts).encode()
            for url, _, ca in hosts:
                if ca is not None:
                    files[f"{HOST_CERTS_DIR}/{registry}/{ca}"] = self.cas[urlsplit(url).netloc]
        if self.auths:
            files[HOST_KUBELET_AUTH] = self._config_json()
        return files

    def node_mounts(self) -> list[dict[str, Any]]:
        """Kind ``extraMounts`` of every node for :meth:`node_files`."""
        mounts = []
        if self._hosts():
            mounts.append(
                {"hostPath": HOST_CERTS_DIR, "containerPath": NODE_CERTS_DIR, "readOnly": True}
            )
        if self.auths:
            mounts.append(
                {
                    "hostPath": HOST_KUBELET_AUTH,
                    "containerPath": NODE_KUBELET_AUTH,
                    "readOnly": True,
                }
            )
        return mounts


def _toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's for these characters)."""
    return json.dumps(text)


def hosts_toml(registry: str, hosts: Sequence[tuple[str, list[str], str | None]]) -> str:
    """Containerd's ``hosts.toml`` for ``registry``: its ``hosts`` first, then the registry."""
    server = DOCKER_HUB_SERVER if registry == DOCKER_HUB else f"https://{registry}"
    lines = [f"server = {_toml_string(server)}"]
    for url, capabilities, ca in hosts:
        lines += ["", f"[host.{_toml_string(url)}]"]
        lines.append(f"  capabilities = [{', '.join(_toml_string(c) for c in capabilities)}]")
        if ca is not None:
            lines.append(f"  ca = {_toml_string(f'{NODE_CERTS_DIR}/{registry}/{ca}')}")
    return "\n".join(lines) + "\n"


def load(
    mirrors: Sequence[str],
    cas: Sequence[str],
    auth: Path | None,
    local: str | None,
) -> Registries:
    """The registries the settings describe, their files read (errors name the file)."""
    read_cas: dict[str, bytes] = {}
    for entry in cas:
        host, path = parse_ca(entry)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the CA of {host} at {path}: {exc.strerror}") from None
        read_cas[host] = check_pem(data, f"the CA of {host} ({path})")
    auths: dict[str, dict[str, str]] = {}
    if auth is not None:
        try:
            data = auth.read_bytes()
        except OSError as exc:
            raise ConfigError(
                f"cannot read the registry credentials {auth}: {exc.strerror}"
            ) from None
        auths = parse_auths(data, f"the registry credentials {auth}")
    return Registries(tuple(parse_mirror(m) for m in mirrors), read_cas, auths, local)
