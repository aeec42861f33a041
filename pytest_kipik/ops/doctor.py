"""``kipik doctor``: a preflight of everything a nested cluster needs, each with its fix.

Each backend's checks gather findings and judge them (:mod:`pytest_kipik.ops.judges`, pure):
the Docker SDK for the engine, the probe (:mod:`pytest_kipik.ops.probe`) in a privileged
container for what only the engine's host can tell, and for the pod backend the official
Kubernetes client (SelfSubjectAccessReviews) and one real DinD pod that runs the same probe.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import docker
import docker.errors
from kubernetes import client as k8s_client
from kubernetes.client.exceptions import ApiException

from pytest_kipik.config import KipikConfig
from pytest_kipik.errors import KipikError
from pytest_kipik.hosts import engine
from pytest_kipik.hosts.base import INNER_ADDRESS_POOL, INNER_BRIDGE
from pytest_kipik.hosts.choice import Choice, choose, make_backend
from pytest_kipik.hosts.engine import engine_location
from pytest_kipik.hosts.outer import OuterCluster, local_outer_addresses
from pytest_kipik.hosts.transfer import default_image_tag
from pytest_kipik.kind import config as kind
from pytest_kipik.ops.judges import (
    FAIL,
    OK,
    POD_BACKEND_ACCESS,
    Result,
    as_network,
    judge_access,
    judge_engine,
    judge_outer_api,
    judge_overlap,
    judge_pod_probe,
    judge_privileged,
)
from pytest_kipik.ops.probe import (
    POD_DATA_ROOT,
    PROBE_TIMEOUT,
    judge_facts,
    parse_route,
    run_pod_probe,
    run_probe,
)


def nested_ranges(config: KipikConfig) -> dict[str, str]:
    """The nested cluster's subnets and the inner daemon's, labelled."""
    user = config.user_kind_config
    found = kind.subnets(user, config.pod_subnet, config.service_subnet)
    ranges = {f"nested {key}": value for key, value in found.items()}
    ranges["inner Docker bridge"] = str(ipaddress.ip_network(INNER_BRIDGE, strict=False))
    ranges["inner Docker address pool"] = INNER_ADDRESS_POOL
    return ranges


def docker_checks(config: KipikConfig) -> list[Result]:
    """Engine, privileged container, cgroups, modules, inotify, disk and subnets."""
    location = engine_location()
    try:
        client = engine.client(timeout=PROBE_TIMEOUT + 10)
        version = str(client.version().get("Version", "?"))
    except docker.errors.DockerException as exc:
        return [judge_engine(location, None, str(exc))]
    try:
        results = [judge_engine(location, version, None)]
        info = client.info()
        data_root = str(info.get("DockerRootDir") or "/var/lib/docker")
        image = config.image or default_image_tag()
        probe = run_probe(client, image, data_root, config.name_prefix)
        results.append(
            judge_privileged(
                image,
                default=config.image is None,
                missing=probe.missing,
                error=probe.error,
                exit_code=probe.exit_code,
            )
        )
        facts = probe.facts or {}
        ran = probe.facts is not None
        results.extend(judge_facts(facts, data_root))
        outer: dict[str, str] = {}
        for line in facts.get("route", []) if ran else []:
            route = parse_route(line)
            if route is not None:
                outer[f"engine host route via {route[0]}"] = route[1]
        for network in client.api.networks():
            for index, entry in enumerate((network.get("IPAM") or {}).get("Config") or []):
                if entry.get("Subnet"):
                    suffix = f" #{index + 1}" if index else ""
                    outer[f"Docker network {network.get('Name')}{suffix}"] = entry["Subnet"]
        results.append(judge_overlap(nested_ranges(config), outer))
        return results
    finally:
        client.close()


def _review(api: k8s_client.ApiClient, namespace: str, verb: str, resource: str) -> bool:
    name, _, sub = resource.partition("/")
    review = k8s_client.V1SelfSubjectAccessReview(
        spec=k8s_client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=k8s_client.V1ResourceAttributes(
                namespace=namespace, verb=verb, resource=name, subresource=sub or None
            )
        )
    )
    answer: Any = k8s_client.AuthorizationV1Api(api).create_self_subject_access_review(
        review, _request_timeout=15
    )
    return bool(answer.status.allowed)


def _image_result(config: KipikConfig) -> Result:
    if config.image:
        return Result(OK, "image", f"{config.image} (the outer cluster's nodes must pull it)")
    return Result(
        FAIL,
        "image",
        "the pod backend needs a DinD image the outer cluster's nodes can pull",
        "build pytest-kipik's image/ and push it: docker build -t REGISTRY/kipik-dind:1 "
        "image/ && docker push REGISTRY/kipik-dind:1; then --image=REGISTRY/kipik-dind:1",
    )


def _pod_backend_addresses(outer: OuterCluster, server: str) -> dict[str, str]:
    """The addresses a DinD pod's nested subnets must not hide: this network, the API, pods."""
    addresses = local_outer_addresses()
    host = urlsplit(server).hostname or ""
    if as_network(host) is not None:
        addresses["the outer API server"] = host
    with contextlib.suppress(ApiException, OSError):  # only adds ranges to compare
        pods: Any = outer.core.list_namespaced_pod(outer.namespace, _request_timeout=15)
        for pod in pods.items:
            if pod.status.pod_ip:
                addresses[f"outer pod {pod.metadata.name}"] = str(pod.status.pod_ip)
    return addresses


def pod_checks(config: KipikConfig) -> list[Result]:
    """The pod backend's checks: image, outer API, RBAC, a real DinD pod, and subnets.

    RBAC is asked with SelfSubjectAccessReviews; in the DinD pod the probe also judges cgroups,
    modules, inotify and disk.
    """
    results = [_image_result(config)]
    outer = OuterCluster(config)
    try:
        try:
            api = outer.api
        except KipikError as exc:
            return [*results, judge_outer_api("?", "no configuration", None, str(exc))]
        server = str(api.configuration.host)
        source = outer.describe()
        try:
            code: Any = k8s_client.VersionApi(api).get_code(_request_timeout=15)
        except Exception as exc:  # any failure here means: unreachable
            return [*results, judge_outer_api(server, source, None, str(exc).splitlines()[0])]
        results.append(judge_outer_api(server, source, str(code.git_version), None))
        namespace = outer.namespace
        allowed: dict[tuple[str, str], bool | None] = {}
        error = None
        try:
            for verb, resource in POD_BACKEND_ACCESS:
                allowed[(verb, resource)] = _review(api, namespace, verb, resource)
        except ApiException as exc:
            error = f"SelfSubjectAccessReview refused: HTTP {exc.status} {exc.reason}"
        results.append(judge_access(namespace, allowed, direct=outer.direct, error=error))
        if config.image:
            backend = make_backend(config, lambda line: None, Choice("pod", "doctor"))
            try:
                probe = run_pod_probe(backend, config.image, config.name_prefix, config.timeout)
            finally:
                backend.close()
            results.append(judge_pod_probe(config.image, probe.error, probe.exit_code))
            if probe.facts is not None:
                results.extend(judge_facts(probe.facts, POD_DATA_ROOT))
        addresses = _pod_backend_addresses(outer, server)
        results.append(judge_overlap(nested_ranges(config), addresses))
        return results
    finally:
        outer.close()


#: Runs the checks of one backend.
Checks = Callable[[KipikConfig], list[Result]]


def run_checks(config: KipikConfig) -> tuple[str, list[Result]]:
    """The backend the config selects and its checks' results."""
    choice = choose(config)
    checks: Checks = pod_checks if choice.name == "pod" else docker_checks
    results = [Result(OK, "backend", f"{choice.name} ({choice.reason})"), *checks(config)]
    return choice.name, results
