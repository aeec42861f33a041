"""A real registry mirror for the tests: TLS from a CA made here, and a password.

Debian's docker-registry (``kipik-test/registry:dev``) runs in the network namespace of a small
holder container (the test app), which joins the Docker networks the DinD hosts are on (the
engine's bridge; the outer cluster's ``kind`` network for DinD pods) and publishes the registry
on loopback, where the test pushes (Docker trusts loopback registries). The holder's addresses
are known before the registry starts, so its certificate names them all.
"""

from __future__ import annotations

import base64
import json
import secrets
import ssl
import subprocess
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.types import Mount

from pytest_kipik.waiting import NotYet, wait_until
from tests.conftest import APP_IMAGE
from tests.e2e.outer import REGISTRY_IMAGE

USER = "kipik"
CONFIG = """\
version: 0.1
log: {level: warn, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: /var/lib/registry}}
http:
  addr: :5000
  tls: {certificate: /certs/server.crt, key: /certs/server.key}
auth:
  htpasswd: {realm: kipik-test, path: /certs/htpasswd}
"""


@dataclass(frozen=True)
class Mirror:
    """The mirror: its address on each network, where the test pushes, its CA and credentials."""

    addresses: dict[str, str]
    pushed_to: str
    ca: Path
    auth: Path
    password: str

    def host(self, network: str = "bridge") -> str:
        """``address:5000`` on ``network``, as DinD hosts there (and their nodes) reach it."""
        return f"{self.addresses[network]}:5000"

    def settings(self, network: str = "bridge") -> dict[str, Any]:
        """KipikConfig keywords: this mirror for Docker Hub, its CA and its credentials."""
        auths = {"auths": {self.host(network): {"auth": self.secrets[1]}}}
        self.auth.write_text(json.dumps(auths))
        return {
            "registry_mirror": (f"docker.io=https://{self.host(network)}",),
            "registry_ca": (f"{self.host(network)}={self.ca}",),
            "registry_auth": self.auth,
        }

    @property
    def secrets(self) -> list[str]:
        """The password and its base64 form: neither may appear anywhere readable."""
        return [self.password, base64.b64encode(f"{USER}:{self.password}".encode()).decode()]

    def push(self, client: docker.DockerClient, image: str, name: str) -> None:
        """Push the local ``image`` into the mirror as ``name`` (a Docker Hub name)."""
        repository, tag = name.rsplit(":", 1)
        target = f"{self.pushed_to}/{repository}"
        client.images.get(image).tag(target, tag)
        try:
            credentials = {"username": USER, "password": self.password}
            for event in client.api.push(
                target, tag, stream=True, decode=True, auth_config=credentials
            ):
                assert "error" not in event, event
        finally:
            client.images.remove(f"{target}:{tag}", noprune=True)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _certificates(directory: Path, addresses: Sequence[str]) -> None:
    """A CA, and a server certificate it signed for ``addresses`` and 127.0.0.1."""
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=kipik-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", "ca.key", "-out", "ca.crt", cwd=directory,
    )  # fmt: skip
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=kipik-test-mirror",
        "-keyout", "server.key", "-out", "server.csr", cwd=directory,
    )  # fmt: skip
    names = ",".join(f"IP:{a}" for a in [*addresses, "127.0.0.1"])
    (directory / "server.ext").write_text(f"subjectAltName={names}\nextendedKeyUsage=serverAuth\n")
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "server.ext", "-out", "server.crt",
        cwd=directory,
    )  # fmt: skip
    (directory / "server.key").chmod(0o644)  # read by the registry in its container
    (directory / "ca.key").unlink()


def _htpasswd(password: str) -> str:
    """An htpasswd line with a bcrypt hash (the only kind docker-registry accepts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import crypt

    hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH))
    assert hashed.startswith("$2"), "this Python's crypt has no bcrypt"
    return f"{USER}:{hashed}\n"


def _asks_for_a_password(url: str, ca: Path, container: Any) -> None:
    """Wait until the mirror answers ``url`` over TLS verified with ``ca`` with a 401."""
    context = ssl.create_default_context(cafile=str(ca))

    def answers() -> None:
        try:
            urllib.request.urlopen(url, timeout=5, context=context)
        except urllib.error.HTTPError as exc:
            if exc.code != 401:
                raise AssertionError(f"{url} answered {exc.code}, not 401") from None
            return
        except OSError as exc:
            container.reload()
            assert container.status == "running", container.logs()[-2000:]
            raise NotYet(str(exc)) from None
        raise AssertionError(f"{url} answered without asking for a password")

    wait_until(answers, what="the mirror", timeout=60, hint="see its container's log")


@contextmanager
def started(
    client: docker.DockerClient, directory: Path, networks: Sequence[str] = ("bridge",)
) -> Iterator[Mirror]:
    """The mirror on ``networks`` (the first one the holder starts on); removed afterwards.

    The registry image must be there (the ``registry_image`` fixture builds it).
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    suffix = secrets.token_hex(3)
    ports: Any = {"5000/tcp": ("127.0.0.1", None)}  # any free port (the stubs want one)
    holder = client.containers.run(
        APP_IMAGE, detach=True, name=f"kipik-test-mirror-net-{suffix}", network=networks[0],
        ports=ports,
    )  # fmt: skip
    registry = None
    try:
        for network in networks[1:]:
            client.networks.get(network).connect(holder)
        holder.reload()
        found = holder.attrs["NetworkSettings"]["Networks"]
        addresses = {network: found[network]["IPAddress"] for network in networks}
        _certificates(directory, list(addresses.values()))
        password = secrets.token_urlsafe(18)
        (directory / "htpasswd").write_text(_htpasswd(password))
        (directory / "config.yml").write_text(CONFIG)
        registry = client.containers.run(
            REGISTRY_IMAGE, detach=True, name=f"kipik-test-mirror-{suffix}",
            network_mode=f"container:{holder.id}",
            mounts=[
                Mount("/certs", str(directory), type="bind", read_only=True),
                Mount("/etc/docker/registry/config.yml", str(directory / "config.yml"),
                      type="bind", read_only=True),
            ],
        )  # fmt: skip
        port = holder.attrs["NetworkSettings"]["Ports"]["5000/tcp"][0]["HostPort"]
        _asks_for_a_password(f"https://127.0.0.1:{port}/v2/", directory / "ca.crt", registry)
        auth = directory / "config.json"
        auth.touch(0o600)
        yield Mirror(addresses, f"127.0.0.1:{port}", directory / "ca.crt", auth, password)
    finally:
        for container in (registry, holder):
            if container is not None:
                container.remove(force=True, v=True)
