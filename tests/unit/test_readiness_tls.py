import datetime as dt
import ssl
import subprocess
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from pytest_kipik.errors import ClusterUnusableError
from pytest_kipik.k8s import readiness
from pytest_kipik.k8s.tls import subject_alt_names
from pytest_kipik.waiting import NotYet


def test_subject_alt_names_of_a_real_certificate(tmp_path: Path) -> None:
    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=kube-apiserver", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=DNS:localhost,DNS:kubernetes.default,IP:0.0.0.0,"
         "IP:10.96.0.1,IP:::1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert subject_alt_names(der) == [
        "localhost",
        "kubernetes.default",
        "0.0.0.0",
        "10.96.0.1",
        "::1",
    ]


def test_classify_fails_fast_only_on_what_waiting_cannot_fix() -> None:
    server = "https://127.0.0.1:1"  # nothing listens: the certificate cannot be read
    tls = readiness.classify(
        server, ApiException(status=0, reason="SSLError(CERTIFICATE_VERIFY_FAILED ...)")
    )
    assert isinstance(tls, ClusterUnusableError)
    assert str(tls).startswith(f"the nested API server's certificate does not verify for {server}")
    assert "names in the certificate: (could not be read)" in str(tls)
    forbidden = readiness.classify(server, ApiException(status=403, reason="Forbidden"))
    assert isinstance(forbidden, ClusterUnusableError)
    assert "refused kipik's credentials: HTTP 403" in str(forbidden)
    assert isinstance(readiness.classify(server, ApiException(status=503, reason="x")), NotYet)
    assert isinstance(readiness.classify(server, ConnectionRefusedError(111, "refused")), NotYet)


def test_guard_raises_the_permanent_error_itself() -> None:
    def refused() -> None:
        raise ApiException(status=401, reason="Unauthorized")

    with pytest.raises(ClusterUnusableError, match="HTTP 401"):
        readiness._guard("https://x:1", refused)()


def test_a_pods_status_is_current_once_the_restarted_kubelet_reported_it() -> None:
    from kubernetes.client import (
        V1ContainerState,
        V1ContainerStateRunning,
        V1ContainerStateWaiting,
        V1ContainerStatus,
        V1ObjectMeta,
        V1Pod,
        V1PodCondition,
        V1PodStatus,
    )

    since = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)

    def pod(
        name: str, phase: str, *started: int | None, ready: tuple[bool, int] | None = None
    ) -> V1Pod:
        # started: seconds after since per container (None: waiting); ready: the Ready
        # condition's status and its transition, in seconds after since
        statuses = [
            V1ContainerStatus(
                name=f"c{i}",
                image="i",
                image_id="",
                restart_count=1,
                ready=False,
                state=V1ContainerState(
                    waiting=V1ContainerStateWaiting(reason="ContainerCreating")
                    if at is None
                    else None,
                    running=None
                    if at is None
                    else V1ContainerStateRunning(started_at=since + dt.timedelta(seconds=at)),
                ),
            )
            for i, at in enumerate(started)
        ]
        conditions = []
        if ready is not None:
            conditions.append(
                V1PodCondition(
                    type="Ready",
                    status="True" if ready[0] else "False",
                    last_transition_time=since + dt.timedelta(seconds=ready[1]),
                )
            )
        return V1Pod(
            metadata=V1ObjectMeta(name=name),
            status=V1PodStatus(phase=phase, container_statuses=statuses, conditions=conditions),
        )

    pods = [
        pod("coredns-a", "Running", 5, ready=(False, 4)),  # started since the restore
        pod("coredns-b", "Running", -60, ready=(True, -55)),  # Running and Ready as copied
        pod("kindnet", "Running", None, ready=(False, 2)),  # the kubelet reported it gone
        pod("kube-proxy", "Running", 2, -60, ready=(True, -55)),  # one container of before
        pod("etcd", "Pending"),  # no status from anyone yet
        pod("old-down", "Running", -60, ready=(False, -30)),  # down before the copy
        pod("job", "Succeeded", -600),  # finished: left out
    ]
    assert readiness.not_current(pods, since) == [
        "coredns-b", "etcd", "kube-proxy", "old-down"
    ]  # fmt: skip
    assert readiness.not_current([pods[0], pods[2], pods[-1]], since) == []


def test_the_control_planes_mirror_pods_prove_themselves_otherwise() -> None:
    from kubernetes.client import V1ContainerStatus, V1ObjectMeta, V1Pod, V1PodStatus

    since = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)
    mirror = {readiness.MIRROR_ANNOTATION: "abc"}

    def stale(name: str, component: str, annotations: dict[str, str]) -> V1Pod:
        # Running as the copy remembers it: no container state of since the restore
        copied = V1ContainerStatus(name="c", image="i", image_id="", restart_count=0, ready=True)
        return V1Pod(
            metadata=V1ObjectMeta(
                name=name, labels={"component": component}, annotations=annotations
            ),
            status=V1PodStatus(phase="Running", container_statuses=[copied]),
        )

    pods = [
        *(stale(c, c, mirror) for c in readiness.CONTROL_PLANE),  # /readyz and leases prove them
        stale("my-static-pod", "my-agent", mirror),  # another static pod: its status must be new
        stale("etcd-lookalike", "etcd", {}),  # not a mirror pod: its status must be new
    ]
    assert readiness.not_current(pods, since) == ["etcd-lookalike", "my-static-pod"]


def test_a_leader_lease_counts_once_taken_or_renewed_since_the_restore() -> None:
    from kubernetes.client import V1Lease, V1LeaseSpec, V1ObjectMeta

    since = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)

    def lease(name: str, renewed: int | None) -> V1Lease:
        at = None if renewed is None else since + dt.timedelta(seconds=renewed)
        return V1Lease(metadata=V1ObjectMeta(name=name), spec=V1LeaseSpec(renew_time=at))

    names = ["kube-controller-manager", "kube-scheduler"]
    assert readiness.leaderless([], names, since) == names  # released, not taken yet
    copied = [lease("kube-controller-manager", -300), lease("kube-scheduler", None)]
    assert readiness.leaderless(copied, names, since) == names
    taken = [lease("kube-controller-manager", 0), lease("kube-scheduler", 3), lease("x", -9)]
    assert readiness.leaderless(taken, names, since) == []
    assert readiness.leaderless(copied, [], since) == []  # leader election off: nothing awaited


def test_service_endpoints_are_current_only_when_they_show_the_pods_new_ip_and_readiness() -> None:
    from kubernetes.client import (
        V1Endpoint,
        V1EndpointConditions,
        V1EndpointSlice,
        V1ObjectMeta,
        V1ObjectReference,
        V1Pod,
        V1PodCondition,
        V1PodStatus,
    )

    def pod(name: str, ip: str, ready: bool) -> V1Pod:
        condition = V1PodCondition(type="Ready", status="True" if ready else "False")
        return V1Pod(
            metadata=V1ObjectMeta(name=name),
            status=V1PodStatus(pod_ip=ip, conditions=[condition]),
        )

    def endpoints(service: str, *shown: tuple[str, str, bool]) -> V1EndpointSlice:
        return V1EndpointSlice(
            address_type="IPv4",
            metadata=V1ObjectMeta(labels={"kubernetes.io/service-name": service}),
            endpoints=[
                V1Endpoint(
                    addresses=[address],
                    conditions=V1EndpointConditions(ready=ready),
                    target_ref=V1ObjectReference(kind="Pod", name=name),
                )
                for name, address, ready in shown
            ],
        )

    pods = [pod("dns-a", "10.0.0.7", True), pod("dns-b", "10.0.0.8", False)]
    current = endpoints("kube-dns", ("dns-a", "10.0.0.7", True), ("dns-b", "10.0.0.8", False))
    assert readiness.stale_endpoints(pods, [current]) == []
    before_the_copy = endpoints("kube-dns", ("dns-a", "10.0.0.3", True))  # the old IP
    not_yet_ready = endpoints("kube-dns", ("dns-a", "10.0.0.7", False))
    still_ready = endpoints("metrics", ("dns-b", "10.0.0.8", True))
    of_a_gone_pod = endpoints("other", ("gone", "10.0.0.9", True))  # not ours to judge
    assert readiness.stale_endpoints(
        pods, [before_the_copy, not_yet_ready, still_ready, of_a_gone_pod]
    ) == ["kube-dns -> dns-a", "kube-dns -> dns-a", "metrics -> dns-b"]
