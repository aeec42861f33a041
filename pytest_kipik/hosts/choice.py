"""Choosing a backend: where the Docker daemon that kind drives lives (DinD container or pod).

The ``backend`` setting maps to an implementation here, once per session; ``auto`` picks one
and says why.
"""

from __future__ import annotations

from dataclasses import dataclass

from pytest_kipik.config import KipikConfig
from pytest_kipik.hosts.base import Backend, in_pod
from pytest_kipik.hosts.docker import DockerBackend
from pytest_kipik.hosts.engine import engine_answers
from pytest_kipik.hosts.pod import PodBackend
from pytest_kipik.progress import Reporter


@dataclass(frozen=True)
class Choice:
    """The backend a session uses and why."""

    name: str
    reason: str


def choose(config: KipikConfig) -> Choice:
    """Resolve ``auto``: pod inside a pod with no Docker engine, otherwise docker."""
    if config.backend != "auto":
        return Choice(config.backend, f"from {config.sources.get('backend', 'the default')}")
    if not in_pod():
        return Choice("docker", "auto: not running in a Kubernetes pod")
    if engine_answers():
        return Choice("docker", "auto: in a Kubernetes pod, but a Docker engine answers")
    return Choice("pod", "auto: in a Kubernetes pod with a service-account token and no Docker")


def make_backend(config: KipikConfig, report: Reporter, choice: Choice | None = None) -> Backend:
    """The backend ``choice`` names (default: :func:`choose`), not connected yet."""
    name = (choice or choose(config)).name
    if name == "docker":
        return DockerBackend(config.image, report, config.bundle, config.registries.dockerd_args())
    if name == "pod":
        return PodBackend(config, report)
    raise ValueError(f"unknown backend {name!r}")  # config validation makes this unreachable
