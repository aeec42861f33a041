"""Registries in a host: the settings' files put in place, and the registry inside.

The registry inside runs the way kind's local-registry guide wires it: a container named
``kind-registry`` in the host's inner daemon, published there on port 5001 (which the backend
makes reachable from this process like the API server), and attached to kind's network, where
every node's containerd finds it for ``localhost:5001/...`` (``hosts.toml`` from
:mod:`pytest_kipik.kind.registries`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pytest_kipik.errors import HostError, ImageError, KipikError, option
from pytest_kipik.hosts.base import Host
from pytest_kipik.hosts.transfer import split_reference
from pytest_kipik.kind import config as kind
from pytest_kipik.kind.registries import (
    DOCKER_HUB,
    LOCAL_CONTAINER_PORT,
    LOCAL_INSIDE,
    LOCAL_NAME,
    LOCAL_PORT,
    Registries,
)

#: Labels the registry container inside carries (what made it, for whoever looks).
_LABEL = "io.kipik.role=registry"


def files(registries: Registries) -> dict[str, tuple[bytes, int]]:
    """The inner daemon's and the nodes' registry files for a host: path -> (data, 0600)."""
    found = {**registries.daemon_files(), **registries.node_files()}
    return {path: (data, 0o600) for path, data in found.items()}


def pulled(host: Host, image: str, registries: Registries, timeout: float) -> None:
    """``docker pull image`` in ``host``; an ImageError that says what to check when it fails.

    The inner daemon pulls through Docker Hub's mirrors and falls back to Docker Hub itself, so
    the error shown may be Docker Hub's even when a mirror refused.
    """
    done = host.exec(["docker", "pull", "--quiet", image], timeout=timeout)
    if done.exit_code == 0:
        return
    hub = [m.url for m in registries.mirrors if m.registry == DOCKER_HUB]
    through = f" through the mirror(s) {', '.join(hub)} (then Docker Hub)" if hub else ""
    raise ImageError(
        f"the DinD host {host.name} could not pull the node image {image}{through}: "
        f"{done.stderr.strip()}\n  Load it into your Docker engine (kipik moves local images "
        f"in), or check that its registry or mirror serves it: {option('registry_mirror')}, "
        f"the CA ({option('registry_ca')}) and the credentials ({option('registry_auth')})."
    )


def local_started(host: Host, image: str, timeout: float) -> None:
    """Run the registry inside ``host`` from ``image`` unless it runs already.

    The image moves in from the local engine when it is there, else the inner daemon pulls
    it. ``--restart=always``: the inner daemon starts it again in a restored snapshot.
    """
    running = host.exec(
        ["docker", "container", "inspect", "--format", "{{.State.Running}}", LOCAL_NAME],
        timeout=60,
    )
    if running.exit_code == 0:  # a warm or restored host's: started again, images kept
        if running.stdout.strip() != "true":
            started = host.exec(["docker", "start", LOCAL_NAME], timeout=60)
            if started.exit_code != 0:
                raise HostError(
                    f"the registry inside {host.name} did not start again: {started.stderr.strip()}"
                )
        return
    loaded = host.load_image(image, timeout)
    reference = loaded.reference if loaded is not None else image
    started = host.exec(
        [
            "docker", "run", "--detach", "--restart=always", "--name", LOCAL_NAME,
            "--label", _LABEL, "--publish", f"{LOCAL_PORT}:{LOCAL_CONTAINER_PORT}", reference,
        ],
        timeout=timeout,
    )  # fmt: skip
    if started.exit_code != 0:
        raise HostError(
            f"the registry inside {host.name} did not start from {image}: "
            f"{started.stderr.strip()}\n  Check {option('registry')} (an image of a Docker "
            f"registry listening on {LOCAL_CONTAINER_PORT}, e.g. registry:2)."
        )


def local_attached(host: Host) -> None:
    """Attach the registry inside to kind's network (where the nodes resolve its name)."""
    attached = host.exec(["docker", "network", "connect", kind.NETWORK, LOCAL_NAME], timeout=60)
    if attached.exit_code != 0 and "already exists" not in attached.stderr:
        raise HostError(
            f"could not attach the registry inside {host.name} to kind's network: "
            f"{attached.stderr.strip()}"
        )


def has_local(host: Host) -> bool:
    """Whether ``host`` runs a registry inside."""
    found = host.exec(["docker", "container", "inspect", LOCAL_NAME], timeout=60)
    return found.exit_code == 0


@dataclass(frozen=True)
class ClusterRegistry:
    """The registry inside a nested cluster's host: push here, pull as ``localhost:5001/...``.

    ``address`` is ``host:port`` where this process reaches it (a loopback address with the
    local Docker engine, which Docker trusts over plain HTTP); ``inside`` is the registry's
    name for the cluster's nodes.
    """

    address: str
    inside: str = LOCAL_INSIDE

    def __str__(self) -> str:
        return self.address

    def name_for(self, image: str) -> str:
        """The name a pod pulls ``image`` (a name such as ``app:v1``) by: ``localhost:5001/...``."""
        return f"{self.inside}/{_path_of(image)}"

    def push(self, image: str, *, timeout: float = 600) -> str:
        """Push ``image`` of the local Docker engine here; returns the name a pod pulls it by.

        The engine pushes the image under ``address/NAME:TAG`` (that tag is removed again).
        Needs the Docker engine where the tests run; without one, push to :attr:`address`
        with any registry client.
        """
        from pytest_kipik.hosts import engine  # noqa: PLC0415 - only this call needs the SDK

        path = _path_of(image)
        repository, tag = path.rsplit(":", 1)
        target = f"{self.address}/{repository}"
        client = engine.connect(timeout)
        try:
            pushed = _pushed(client, image, target, tag)
        finally:
            client.close()
        if pushed:
            raise KipikError(
                f"pushing {image} to the cluster's registry at {self.address}: {pushed}"
            )
        return f"{self.inside}/{path}"


def _path_of(image: str) -> str:
    """``repository:tag`` of ``image`` without its registry (``:latest`` when it has none)."""
    name, tag, digest = split_reference(image)
    if digest and not tag:
        raise KipikError(f"push {image} by a tag: a registry stores pushed images by tag")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        name = rest
    return f"{name}:{tag or 'latest'}"


def _pushed(client: Any, image: str, target: str, tag: str) -> str | None:
    """Tag ``image`` as ``target:tag`` and push it; None, or the error the engine gave."""
    import docker.errors  # noqa: PLC0415 - only this call needs the SDK

    try:
        local = client.images.get(image)
    except docker.errors.ImageNotFound:
        return f"the local Docker engine has no image {image}"
    local.tag(target, tag)
    try:
        for line in client.api.push(target, tag, stream=True, decode=True):
            if line.get("error"):
                return str(line["error"])
    except docker.errors.DockerException as exc:
        return str(exc)
    finally:
        client.images.remove(f"{target}:{tag}", noprune=True)
    return None
