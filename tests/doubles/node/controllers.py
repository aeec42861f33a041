"""TEST DOUBLE support: the control loops of the node image's API server double (stdlib only).

What kube-controller-manager and kube-scheduler do, run in the API server's process under its
store lock: the scheduler (taints and tolerations, nodeSelector, least-loaded spreading,
`FailedScheduling`), the node lifecycle taints, Deployments -> ReplicaSets -> Pods (rollouts,
scaling, status and conditions), Jobs, garbage collection by ownerReferences, Service IP and
NodePort allocation, Endpoints and EndpointSlices. Pods are only created and deleted here; a
kubelet (the runtime helper's kubelet double) runs them and writes their status.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import random
import time
from collections import Counter
from typing import Any

try:
    from tests.doubles.node import podspec
except ImportError:  # in the node image: /kipik-node/podspec.py
    import podspec  # type: ignore[import-not-found,no-redef]

JSON = dict[str, Any]
Cluster = Any  # apiserver.Cluster (not imported: apiserver imports this module)

NODE_PORT_RANGE = (30000, 32767)
FAILED_CREATE_BACKOFF = 1.0
SAFE_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
TERMINAL = ("Succeeded", "Failed")


class GoValue:
    """A value shown in a field error as Go's %#v prints it (maps, slices, structs)."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def go_map(values: dict[str, str]) -> GoValue:
    inner = ", ".join(f'"{k}":"{v}"' for k, v in sorted(values.items()))
    return GoValue(f"map[string]string{{{inner}}}")


def go_strings(values: list[str]) -> GoValue:
    return GoValue("[]string{" + ", ".join(f'"{v}"' for v in values) + "}")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def condition(kind: str, status: str, reason: str, message: str, update: bool = False) -> JSON:
    stamp = now()
    cond: JSON = {"type": kind, "status": status}
    if update:
        cond["lastUpdateTime"] = stamp
    cond |= {"lastTransitionTime": stamp, "reason": reason, "message": message}
    return cond


def set_condition(obj: JSON, cond: JSON) -> bool:
    """Put a condition into obj.status.conditions; True when status, reason or message changed."""
    conditions = obj.setdefault("status", {}).setdefault("conditions", [])
    for index, old in enumerate(conditions):
        if old.get("type") == cond["type"]:
            if all(old.get(k) == cond.get(k) for k in ("status", "reason", "message")):
                return False
            if old.get("status") == cond["status"]:
                cond = {**cond, "lastTransitionTime": old.get("lastTransitionTime")}
            conditions[index] = cond
            return True
    conditions.append(cond)
    return True


def has_condition(obj: JSON, kind: str, status: str = "True") -> bool:
    return any(
        c.get("type") == kind and c.get("status") == status
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def controlled_by(obj: JSON, uid: str) -> bool:
    return any(
        r.get("uid") == uid and r.get("controller")
        for r in obj["metadata"].get("ownerReferences") or []
    )


def owner_reference(owner: JSON, kind: str, api_version: str) -> JSON:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": owner["metadata"]["name"],
        "uid": owner["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def selector_matches(selector: JSON, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels and matchExpressions) against labels."""
    if not selector:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_ready(pod: JSON) -> bool:
    return has_condition(pod, "Ready")


def pod_active(pod: JSON) -> bool:
    return (pod.get("status") or {}).get("phase") not in TERMINAL and not pod["metadata"].get(
        "deletionTimestamp"
    )


def template_hash(template: JSON, collisions: int = 0) -> str:
    """pod-template-hash: FNV-1a of the template, safe-encoded like the deployment controller."""
    data = json.dumps(template, sort_keys=True).encode() + str(collisions).encode()
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return "".join(SAFE_ALPHABET[int(d) % len(SAFE_ALPHABET)] for d in str(value))


def event(cluster: Cluster, obj: JSON, kind: str, api_version: str, *args: str) -> None:
    """record_event(obj, kind, apiVersion, type, reason, message, component)."""
    cluster.record_event(obj, kind, api_version, *args)


# -- startup ------------------------------------------------------------------------------
def service_network(cluster: Cluster) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    first = str(cluster.cfg.get("service_subnet") or "10.96.0.0/16").split(",")[0].strip()
    return ipaddress.ip_network(first, strict=False)


def start_cluster(cluster: Cluster) -> None:
    """The `kubernetes` Service, its Endpoints and EndpointSlice in `default`."""
    network = service_network(cluster)
    ip = str(network[1])
    labels = {"component": "apiserver", "provider": "kubernetes"}
    service: JSON = {
        "kind": "Service",
        "apiVersion": "v1",
        "metadata": cluster.new_metadata({"name": "kubernetes", "labels": labels}, "default"),
        "spec": {
            "ports": [{"name": "https", "protocol": "TCP", "port": 443, "targetPort": 6443}],
            "clusterIP": ip,
            "clusterIPs": [ip],
            "type": "ClusterIP",
            "sessionAffinity": "None",
            "ipFamilies": ["IPv6" if network.version == 6 else "IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
        },
        "status": {"loadBalancer": {}},
    }
    cluster.put("services", "default", service)
    address = cluster.cfg["node_ip"]
    cluster.put(
        "endpoints",
        "default",
        {
            "kind": "Endpoints",
            "apiVersion": "v1",
            "metadata": cluster.new_metadata(
                {
                    "name": "kubernetes",
                    "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"},
                },
                "default",
            ),
            "subsets": [
                {
                    "addresses": [{"ip": address}],
                    "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
                }
            ],
        },
    )
    cluster.put(
        "endpointslices.discovery.k8s.io",
        "default",
        {
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": cluster.new_metadata(
                {
                    "name": "kubernetes",
                    "labels": {"kubernetes.io/service-name": "kubernetes"},
                },
                "default",
            ),
            "addressType": "IPv6" if ":" in address else "IPv4",
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
        },
    )


# -- services -----------------------------------------------------------------------------
def service_defaults(cluster: Cluster, svc: JSON, old: JSON | None) -> None:
    spec = svc.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        if "targetPort" not in port and "port" in port:
            port["targetPort"] = port["port"]
    if spec["type"] in ("NodePort", "LoadBalancer"):
        spec.setdefault("externalTrafficPolicy", "Cluster")
    if spec["type"] == "LoadBalancer":
        spec.setdefault("allocateLoadBalancerNodePorts", True)
    if spec["type"] != "ExternalName":
        family = "IPv6" if service_network(cluster).version == 6 else "IPv4"
        spec.setdefault("ipFamilies", [family])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
        spec.setdefault("internalTrafficPolicy", "Cluster")
    if old is not None:
        old_spec = old.get("spec") or {}
        if not spec.get("clusterIP") and old_spec.get("clusterIP"):
            spec["clusterIP"] = old_spec["clusterIP"]
            spec["clusterIPs"] = list(old_spec.get("clusterIPs") or [old_spec["clusterIP"]])
        old_ports = {
            (p.get("port"), p.get("protocol")): p.get("nodePort")
            for p in old_spec.get("ports") or []
        }
        if spec["type"] in ("NodePort", "LoadBalancer"):
            for port in spec.get("ports") or []:
                previous = old_ports.get((port.get("port"), port.get("protocol")))
                if "nodePort" not in port and previous:
                    port["nodePort"] = previous
    svc.setdefault("status", {"loadBalancer": {}})


def service_errors(cluster: Cluster, svc: JSON, old: JSON | None) -> list[podspec.FieldError]:
    errors: list[podspec.FieldError] = []
    spec = svc.get("spec") or {}
    kind = spec.get("type")
    types = ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"]
    if kind not in types:
        supported = ", ".join(f'"{t}"' for t in types)
        errors.append(
            podspec.FieldError("NotSupported", "spec.type", kind, f"supported values: {supported}")
        )
    ports = spec.get("ports") or []
    if not ports and kind != "ExternalName" and spec.get("clusterIP") != "None":
        errors.append(podspec.FieldError("Required", "spec.ports"))
    names: set[str] = set()
    for index, port in enumerate(ports):
        where = f"spec.ports[{index}]"
        name = port.get("name", "")
        if len(ports) > 1 and not name:
            errors.append(podspec.FieldError("Required", f"{where}.name"))
        elif name and name in names:
            errors.append(podspec.FieldError("Duplicate", f"{where}.name", name))
        names.add(name)
        number = port.get("port")
        if not isinstance(number, int) or not 1 <= number <= 65535:
            errors.append(
                podspec.FieldError(
                    "Invalid", f"{where}.port", number, "must be between 1 and 65535, inclusive"
                )
            )
        if port.get("protocol") not in ("TCP", "UDP", "SCTP"):
            errors.append(
                podspec.FieldError(
                    "NotSupported",
                    f"{where}.protocol",
                    port.get("protocol"),
                    'supported values: "SCTP", "TCP", "UDP"',
                )
            )
        target = port.get("targetPort")
        if isinstance(target, int) and not 1 <= target <= 65535:
            errors.append(
                podspec.FieldError(
                    "Invalid",
                    f"{where}.targetPort",
                    target,
                    "must be between 1 and 65535, inclusive",
                )
            )
        if port.get("nodePort") and kind == "ClusterIP":
            errors.append(
                podspec.FieldError(
                    "Forbidden",
                    f"{where}.nodePort",
                    detail="may not be used when `type` is 'ClusterIP'",
                )
            )
    if old is not None:
        before = (old.get("spec") or {}).get("clusterIP")
        after = spec.get("clusterIP")
        if before and after and before != after and kind != "ExternalName":
            errors.append(
                podspec.FieldError(
                    "Invalid",
                    "spec.clusterIPs[0]",
                    go_strings(spec.get("clusterIPs") or [after]),
                    "may not change once set",
                )
            )
    return errors


def allocate_service(
    cluster: Cluster, svc: JSON, old: JSON | None, dry_run: bool
) -> list[podspec.FieldError]:
    """ClusterIP from the service subnet, NodePorts from 30000-32767 (or check the given)."""
    errors: list[podspec.FieldError] = []
    spec = svc["spec"]
    me = (svc["metadata"].get("namespace"), svc["metadata"].get("name"))
    others = [
        s
        for s in cluster.items("services")
        if (s["metadata"].get("namespace"), s["metadata"]["name"]) != me
    ]
    if spec["type"] != "ExternalName":
        network = service_network(cluster)
        used = {s["spec"].get("clusterIP") for s in others}
        wanted = spec.get("clusterIP") or ""
        if wanted == "None":
            spec["clusterIPs"] = ["None"]
        elif wanted and not (old and (old.get("spec") or {}).get("clusterIP") == wanted):
            message = ""
            try:
                inside = ipaddress.ip_address(wanted) in network
            except ValueError:
                inside = False
            if not inside:
                message = (
                    f"failed to allocate IP {wanted}: the provided IP ({wanted}) is not in the "
                    f"valid range. The range of valid IPs is {network}"
                )
            elif wanted in used:
                message = f"failed to allocate IP {wanted}: provided IP is already allocated"
            if message:
                errors.append(
                    podspec.FieldError("Invalid", "spec.clusterIPs", go_strings([wanted]), message)
                )
            spec["clusterIPs"] = [wanted]
        elif not wanted:
            size = min(network.num_addresses - 2, 1 << 16)
            for _ in range(1000):
                candidate = str(network[random.randint(2, size)])
                if candidate not in used:
                    spec["clusterIP"], spec["clusterIPs"] = candidate, [candidate]
                    break
    if spec["type"] in ("NodePort", "LoadBalancer") and spec.get(
        "allocateLoadBalancerNodePorts", True
    ):
        used_ports = {
            p.get("nodePort") for s in others for p in (s.get("spec") or {}).get("ports") or []
        }
        low, high = NODE_PORT_RANGE
        mine: set[int] = set()
        old_ports = {p.get("nodePort") for p in ((old or {}).get("spec") or {}).get("ports") or []}
        for index, port in enumerate(spec.get("ports") or []):
            given = port.get("nodePort")
            if given:
                if given in old_ports:
                    mine.add(given)
                    continue
                if not low <= given <= high:
                    message = (
                        "provided port is not in the valid range. The range of valid ports is "
                        f"{low}-{high}"
                    )
                elif given in used_ports or given in mine:
                    message = "provided port is already allocated"
                else:
                    mine.add(given)
                    continue
                errors.append(
                    podspec.FieldError("Invalid", f"spec.ports[{index}].nodePort", given, message)
                )
            else:
                while True:
                    number = random.randint(low, high)
                    if number not in used_ports and number not in mine:
                        port["nodePort"] = number
                        mine.add(number)
                        break
    return errors


# -- workloads ----------------------------------------------------------------------------
POD_TEMPLATE_DEFAULTS = (
    "restartPolicy",
    "terminationGracePeriodSeconds",
    "dnsPolicy",
    "securityContext",
    "schedulerName",
)


def _template_defaults(template: JSON, restart_default: bool) -> None:
    spec = template.setdefault("spec", {})
    defaulted = copy.deepcopy({"spec": spec})
    podspec.apply_defaults(defaulted)
    for key in POD_TEMPLATE_DEFAULTS:
        if key == "restartPolicy" and not restart_default:
            continue
        spec.setdefault(key, defaulted["spec"][key])
    spec["containers"] = defaulted["spec"].get("containers") or spec.get("containers") or []
    template.setdefault("metadata", {})


def workload_defaults(group_resource: str, obj: JSON) -> None:
    spec = obj.setdefault("spec", {})
    if not isinstance(spec, dict):
        return
    template = spec.get("template")
    if isinstance(template, dict):
        _template_defaults(template, group_resource != "jobs.batch")
    if group_resource in ("deployments.apps", "replicasets.apps", "statefulsets.apps"):
        spec.setdefault("replicas", 1)
        spec.setdefault("revisionHistoryLimit", 10)
    if group_resource == "deployments.apps":
        spec.setdefault(
            "strategy",
            {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"},
            },
        )
        spec.setdefault("progressDeadlineSeconds", 600)
    if group_resource == "statefulsets.apps":
        spec.setdefault("podManagementPolicy", "OrderedReady")
        spec.setdefault(
            "updateStrategy", {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}}
        )
    if group_resource == "daemonsets.apps":
        spec.setdefault(
            "updateStrategy",
            {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 0}},
        )
    if group_resource == "jobs.batch":
        spec.setdefault("parallelism", 1)
        spec.setdefault("completions", 1)
        spec.setdefault("backoffLimit", 6)
        spec.setdefault("completionMode", "NonIndexed")
        spec.setdefault("suspend", False)
        spec.setdefault("podReplacementPolicy", "TerminatingOrFailed")


def job_selector(job: JSON) -> None:
    """The Job's generated selector and pod labels (they need the Job's uid)."""
    spec = job["spec"]
    if spec.get("manualSelector"):
        return
    uid, name = job["metadata"]["uid"], job["metadata"]["name"]
    labels = {"batch.kubernetes.io/controller-uid": uid}
    spec["selector"] = {"matchLabels": dict(labels)}
    template_labels = spec["template"].setdefault("metadata", {}).setdefault("labels", {})
    template_labels.update(
        {
            "batch.kubernetes.io/controller-uid": uid,
            "batch.kubernetes.io/job-name": name,
            "controller-uid": uid,
            "job-name": name,
        }
    )


def workload_errors(group_resource: str, obj: JSON, old: JSON | None) -> list[podspec.FieldError]:
    errors: list[podspec.FieldError] = []
    spec = obj.get("spec") or {}
    template = spec.get("template")
    if not isinstance(template, dict):
        errors.append(podspec.FieldError("Required", "spec.template"))
        return errors
    labels = (template.get("metadata") or {}).get("labels") or {}
    selector = spec.get("selector")
    is_job = group_resource == "jobs.batch"
    if not is_job:
        if selector is None:
            errors.append(podspec.FieldError("Required", "spec.selector"))
        elif not (selector.get("matchLabels") or selector.get("matchExpressions")):
            errors.append(
                podspec.FieldError(
                    "Invalid",
                    "spec.selector",
                    GoValue(
                        "v1.LabelSelector{MatchLabels:map[string]string(nil), "
                        "MatchExpressions:[]v1.LabelSelectorRequirement(nil)}"
                    ),
                    f"empty selector is invalid for {group_resource.partition('.')[0][:-1]}",
                )
            )
        elif not selector_matches(selector, labels):
            errors.append(
                podspec.FieldError(
                    "Invalid",
                    "spec.template.metadata.labels",
                    go_map(labels),
                    "`selector` does not match template `labels`",
                )
            )
        if old is not None and (old.get("spec") or {}).get("selector") != selector:
            errors.append(
                podspec.FieldError(
                    "Invalid",
                    "spec.selector",
                    GoValue("v1.LabelSelector{...}"),
                    "field is immutable",
                )
            )
    for key in ("replicas", "parallelism", "completions", "backoffLimit"):
        value = spec.get(key)
        if value is not None and (not isinstance(value, int) or value < 0):
            errors.append(
                podspec.FieldError(
                    "Invalid", f"spec.{key}", value, "must be greater than or equal to 0"
                )
            )
    pod = {"metadata": {"name": "template", "labels": labels}, "spec": template.get("spec") or {}}
    restart = pod["spec"].get("restartPolicy")
    if is_job:
        if restart is None:
            errors.append(
                podspec.FieldError(
                    "Required",
                    "spec.template.spec.restartPolicy",
                    detail='valid values: "OnFailure", "Never"',
                )
            )
        elif restart not in ("OnFailure", "Never"):
            errors.append(
                podspec.FieldError(
                    "NotSupported",
                    "spec.template.spec.restartPolicy",
                    restart,
                    'supported values: "OnFailure", "Never"',
                )
            )
        pod["spec"] = {**pod["spec"], "restartPolicy": restart or "Never"}
    elif restart not in (None, "Always"):
        errors.append(
            podspec.FieldError(
                "NotSupported",
                "spec.template.spec.restartPolicy",
                restart,
                'supported values: "Always"',
            )
        )
        pod["spec"] = {**pod["spec"], "restartPolicy": "Always"}
    for error in podspec.validate_pod(pod):
        if error.path == "metadata.name":
            continue
        error.path = "spec.template." + error.path
        errors.append(error)
    return errors


# -- the control loops ------------------------------------------------------------------------
def reconcile(cluster: Cluster) -> None:
    """One pass of every controller (called when the store changed)."""
    node_lifecycle(cluster)
    collect_garbage(cluster)
    deployments(cluster)
    replicasets(cluster)
    jobs(cluster)
    schedule(cluster)
    endpoints(cluster)


def node_lifecycle(cluster: Cluster) -> None:
    """node.kubernetes.io/not-ready:NoSchedule while a node is not Ready."""
    for node in cluster.items("nodes", ""):
        ready = has_condition(node, "Ready")
        taints = node.setdefault("spec", {}).get("taints") or []
        tainted = any(t.get("key") == "node.kubernetes.io/not-ready" for t in taints)
        if ready and tainted:
            node["spec"]["taints"] = [
                t for t in taints if t.get("key") != "node.kubernetes.io/not-ready"
            ]
            if not node["spec"]["taints"]:
                del node["spec"]["taints"]
            cluster.touch(node)
        elif not ready and not tainted:
            node["spec"]["taints"] = [
                *taints,
                {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
            ]
            cluster.touch(node)


def collect_garbage(cluster: Cluster) -> None:
    """Delete objects whose owners are all gone (background propagation)."""
    while True:
        uids = {obj["metadata"].get("uid") for obj in cluster.objects.values()}
        doomed = [
            key
            for key, obj in cluster.objects.items()
            if (refs := obj["metadata"].get("ownerReferences"))
            and all(ref.get("uid") not in uids for ref in refs)
        ]
        if not doomed:
            return
        for key in doomed:
            cluster.remove(*key)


def _tolerates(pod: JSON, taint: JSON) -> bool:
    for tol in (pod.get("spec") or {}).get("tolerations") or []:
        if tol.get("effect") and tol["effect"] != taint.get("effect"):
            continue
        if tol.get("operator") == "Exists":
            if not tol.get("key") or tol["key"] == taint.get("key"):
                return True
        elif tol.get("key") == taint.get("key") and tol.get("value", "") == taint.get("value", ""):
            return True
    return False


def _unfit(pod: JSON, node: JSON) -> str:
    spec = pod.get("spec") or {}
    selector = spec.get("nodeSelector") or {}
    labels = node["metadata"].get("labels") or {}
    if any(labels.get(k) != v for k, v in selector.items()):
        return "node(s) didn't match Pod's node affinity/selector"
    if (node.get("spec") or {}).get("unschedulable"):
        return "node(s) were unschedulable"
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(pod, taint):
            return f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"
    return ""


def schedule(cluster: Cluster) -> None:
    nodes = cluster.items("nodes", "")
    pods = cluster.items("pods")
    load = Counter(p["spec"].get("nodeName") for p in pods if pod_active(p))
    for pod in pods:
        spec = pod.get("spec") or {}
        if spec.get("nodeName") or not pod_active(pod):
            continue
        if spec.get("schedulerName", "default-scheduler") != "default-scheduler":
            continue
        reasons: Counter[str] = Counter()
        fits = []
        for node in nodes:
            reason = _unfit(pod, node)
            if reason:
                reasons[reason] += 1
            else:
                fits.append(node)
        meta = pod["metadata"]
        if fits:
            node = min(fits, key=lambda n: (load[n["metadata"]["name"]], n["metadata"]["name"]))
            name = node["metadata"]["name"]
            spec["nodeName"] = name
            load[name] += 1
            set_condition(
                pod,
                {
                    "type": "PodScheduled",
                    "status": "True",
                    "lastProbeTime": None,
                    "lastTransitionTime": now(),
                },
            )
            cluster.touch(pod)
            event(
                cluster,
                pod,
                "Pod",
                "v1",
                "Normal",
                "Scheduled",
                f"Successfully assigned {meta['namespace']}/{meta['name']} to {name}",
                "default-scheduler",
            )
            continue
        total = len(nodes)
        if total:
            listed = ", ".join(f"{count} {reason}" for reason, count in sorted(reasons.items()))
            message = (
                f"0/{total} nodes are available: {listed}. preemption: 0/{total} nodes are "
                f"available: {total} Preemption is not helpful for scheduling."
            )
        else:
            message = "no nodes available to schedule pods"
        cond = {
            "type": "PodScheduled",
            "status": "False",
            "lastProbeTime": None,
            "lastTransitionTime": now(),
            "reason": "Unschedulable",
            "message": message,
        }
        if set_condition(pod, cond):
            cluster.touch(pod)
            event(
                cluster,
                pod,
                "Pod",
                "v1",
                "Warning",
                "FailedScheduling",
                message,
                "default-scheduler",
            )


def _create_pods(  # noqa: PLR0917 - positional like the request's parts
    cluster: Cluster,
    owner: JSON,
    kind: str,
    api_version: str,
    template: JSON,
    count: int,
    component: str,
    extra_labels: dict[str, str] | None = None,
) -> None:
    key = ("create", owner["metadata"]["uid"])
    backoff: dict[Any, float] = cluster.__dict__.setdefault("controller_backoff", {})
    if backoff.get(key, 0.0) > time.monotonic():
        return
    meta = owner["metadata"]
    for _ in range(count):
        labels = dict((template.get("metadata") or {}).get("labels") or {})
        labels.update(extra_labels or {})
        body: JSON = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": f"{meta['name']}-",
                "labels": labels,
                "ownerReferences": [owner_reference(owner, kind, api_version)],
            },
            "spec": copy.deepcopy(template.get("spec") or {}),
        }
        annotations = (template.get("metadata") or {}).get("annotations")
        if annotations:
            body["metadata"]["annotations"] = dict(annotations)
        try:
            pod = cluster.api.system_create("pods", meta["namespace"], body, component)
        except Exception as exc:  # an ApiError, reported as the controller reports it
            message = getattr(exc, "message", str(exc))
            event(
                cluster,
                owner,
                kind,
                api_version,
                "Warning",
                "FailedCreate",
                f"Error creating: {message}",
                component,
            )
            backoff[key] = time.monotonic() + FAILED_CREATE_BACKOFF
            cluster.later(FAILED_CREATE_BACKOFF, cluster.next_revision)
            return
        event(
            cluster,
            owner,
            kind,
            api_version,
            "Normal",
            "SuccessfulCreate",
            f"Created pod: {pod['metadata']['name']}",
            component,
        )


def deployments(cluster: Cluster) -> None:
    for deploy in cluster.items("deployments.apps"):
        meta, spec = deploy["metadata"], deploy["spec"]
        ns, uid = meta["namespace"], meta["uid"]
        desired = spec.get("replicas", 1)
        template = copy.deepcopy(spec["template"])
        digest = template_hash(template)
        owned = [rs for rs in cluster.items("replicasets.apps", ns) if controlled_by(rs, uid)]
        new_name = f"{meta['name']}-{digest}"
        new = next((rs for rs in owned if rs["metadata"]["name"] == new_name), None)
        revisions = [
            int(
                (rs["metadata"].get("annotations") or {}).get(
                    "deployment.kubernetes.io/revision", "0"
                )
            )
            for rs in owned
        ]
        progressing: JSON | None = None
        if spec.get("paused"):
            continue
        if new is None:
            revision = str(max(revisions, default=0) + 1)
            rs_template = copy.deepcopy(template)
            rs_template.setdefault("metadata", {}).setdefault("labels", {})["pod-template-hash"] = (
                digest
            )
            selector = copy.deepcopy(spec["selector"])
            selector.setdefault("matchLabels", {})["pod-template-hash"] = digest
            body = {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": new_name,
                    "labels": dict(rs_template["metadata"]["labels"]),
                    "annotations": {
                        "deployment.kubernetes.io/desired-replicas": str(desired),
                        "deployment.kubernetes.io/max-replicas": str(
                            desired + _surge(spec, desired)
                        ),
                        "deployment.kubernetes.io/revision": revision,
                    },
                    "ownerReferences": [owner_reference(deploy, "Deployment", "apps/v1")],
                },
                "spec": {
                    "replicas": desired,
                    "minReadySeconds": spec.get("minReadySeconds", 0),
                    "selector": selector,
                    "template": rs_template,
                },
            }
            new = cluster.api.system_create("replicasets.apps", ns, body, "deployment-controller")
            new = cluster.get("replicasets.apps", ns, new_name)
            meta.setdefault("annotations", {})["deployment.kubernetes.io/revision"] = revision
            cluster.touch(deploy)
            event(
                cluster,
                deploy,
                "Deployment",
                "apps/v1",
                "Normal",
                "ScalingReplicaSet",
                f"Scaled up replica set {new_name} from 0 to {desired}",
                "deployment-controller",
            )
            progressing = condition(
                "Progressing",
                "True",
                "NewReplicaSetCreated",
                f'Created new replica set "{new_name}"',
                update=True,
            )
            owned.append(new)
        elif new["spec"].get("replicas") != desired:
            before = new["spec"].get("replicas", 0)
            new["spec"]["replicas"] = desired
            new["metadata"].setdefault("annotations", {})[
                "deployment.kubernetes.io/desired-replicas"
            ] = str(desired)
            cluster.touch(new)
            verb = "up" if desired > before else "down"
            event(
                cluster,
                deploy,
                "Deployment",
                "apps/v1",
                "Normal",
                "ScalingReplicaSet",
                f"Scaled {verb} replica set {new_name} from {before} to {desired}",
                "deployment-controller",
            )
        new_available = (new.get("status") or {}).get("availableReplicas", 0)
        recreate = (spec.get("strategy") or {}).get("type") == "Recreate"
        for rs in owned:
            if rs is new:
                continue
            target = 0 if recreate else max(0, desired - new_available)
            before = rs["spec"].get("replicas", 0)
            if before > target:
                rs["spec"]["replicas"] = target
                cluster.touch(rs)
                event(
                    cluster,
                    deploy,
                    "Deployment",
                    "apps/v1",
                    "Normal",
                    "ScalingReplicaSet",
                    f"Scaled down replica set {rs['metadata']['name']} from {before} to {target}",
                    "deployment-controller",
                )
        _deployment_status(cluster, deploy, owned, new, desired, progressing)


def _percent(value: Any, total: int, round_up: bool) -> int:
    if isinstance(value, str) and value.endswith("%"):
        scaled = int(value[:-1]) * total
        return -(-scaled // 100) if round_up else scaled // 100
    return int(value or 0)


def _surge(spec: JSON, desired: int) -> int:
    rolling = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    return _percent(rolling.get("maxSurge", "25%"), desired, True)


def _deployment_status(  # noqa: PLR0917 - positional like the request's parts
    cluster: Cluster,
    deploy: JSON,
    owned: list[JSON],
    new: JSON,
    desired: int,
    progressing: JSON | None,
) -> None:
    def total(key: str, sets: list[JSON]) -> int:
        return sum((rs.get("status") or {}).get(key, 0) for rs in sets)

    replicas = total("replicas", owned)
    updated = (new.get("status") or {}).get("replicas", 0)
    ready, available = total("readyReplicas", owned), total("availableReplicas", owned)
    spec_total = sum(rs["spec"].get("replicas", 0) for rs in owned)
    status = copy.deepcopy(deploy.get("status") or {})
    status["observedGeneration"] = deploy["metadata"].get("generation", 1)
    for key, value in (
        ("replicas", replicas),
        ("updatedReplicas", updated),
        ("readyReplicas", ready),
        ("availableReplicas", available),
        ("unavailableReplicas", max(spec_total - available, 0)),
    ):
        if value:
            status[key] = value
        else:
            status.pop(key, None)
    probe = {"status": status}
    rolling = (deploy["spec"].get("strategy") or {}).get("rollingUpdate") or {}
    max_unavailable = _percent(rolling.get("maxUnavailable", "25%"), desired, False)
    if max_unavailable == 0 and _surge(deploy["spec"], desired) == 0:
        max_unavailable = 1
    if available >= desired - max_unavailable:
        set_condition(
            probe,
            condition(
                "Available",
                "True",
                "MinimumReplicasAvailable",
                "Deployment has minimum availability.",
                update=True,
            ),
        )
    else:
        set_condition(
            probe,
            condition(
                "Available",
                "False",
                "MinimumReplicasUnavailable",
                "Deployment does not have minimum availability.",
                update=True,
            ),
        )
    name = new["metadata"]["name"]
    if progressing is not None:
        set_condition(probe, progressing)
    elif updated == desired and available >= desired and replicas == desired:
        set_condition(
            probe,
            condition(
                "Progressing",
                "True",
                "NewReplicaSetAvailable",
                f'ReplicaSet "{name}" has successfully progressed.',
                update=True,
            ),
        )
    elif not has_condition(probe, "Progressing") or not any(
        c.get("reason") == "NewReplicaSetCreated" and name in c.get("message", "")
        for c in status.get("conditions") or []
    ):
        set_condition(
            probe,
            condition(
                "Progressing",
                "True",
                "ReplicaSetUpdated",
                f'ReplicaSet "{name}" is progressing.',
                update=True,
            ),
        )
    order = {"Available": 0, "Progressing": 1}
    status["conditions"] = sorted(
        status.get("conditions") or [], key=lambda c: order.get(c["type"], 2)
    )
    if status != deploy.get("status"):
        deploy["status"] = status
        cluster.touch(deploy)


def replicasets(cluster: Cluster) -> None:
    for rs in cluster.items("replicasets.apps"):
        meta, spec = rs["metadata"], rs["spec"]
        ns, uid = meta["namespace"], meta["uid"]
        pods = [p for p in cluster.items("pods", ns) if controlled_by(p, uid) and pod_active(p)]
        want = spec.get("replicas", 1)
        if len(pods) < want:
            _create_pods(
                cluster,
                rs,
                "ReplicaSet",
                "apps/v1",
                spec["template"],
                want - len(pods),
                "replicaset-controller",
            )
        elif len(pods) > want:
            ranked = sorted(
                pods,
                key=lambda p: (
                    bool(p["spec"].get("nodeName")),
                    pod_ready(p),
                    p["metadata"]["creationTimestamp"],
                ),
            )
            for pod in ranked[: len(pods) - want]:
                cluster.remove("pods", ns, pod["metadata"]["name"])
                event(
                    cluster,
                    rs,
                    "ReplicaSet",
                    "apps/v1",
                    "Normal",
                    "SuccessfulDelete",
                    f"Deleted pod: {pod['metadata']['name']}",
                    "replicaset-controller",
                )
        pods = [p for p in cluster.items("pods", ns) if controlled_by(p, uid) and pod_active(p)]
        ready = sum(1 for p in pods if pod_ready(p))
        status: JSON = {"replicas": len(pods)}
        if pods:
            status["fullyLabeledReplicas"] = len(pods)
        if ready:
            status["readyReplicas"] = ready
            status["availableReplicas"] = ready
        status["observedGeneration"] = meta.get("generation", 1)
        if status != rs.get("status"):
            rs["status"] = status
            cluster.touch(rs)


def jobs(cluster: Cluster) -> None:
    for job in cluster.items("jobs.batch"):
        meta, spec = job["metadata"], job["spec"]
        ns, uid = meta["namespace"], meta["uid"]
        if has_condition(job, "Complete") or has_condition(job, "Failed") or spec.get("suspend"):
            continue
        pods = [p for p in cluster.items("pods", ns) if controlled_by(p, uid)]
        phases = Counter((p.get("status") or {}).get("phase") for p in pods)
        succeeded, failed = phases["Succeeded"], phases["Failed"]
        restarts = sum(
            c.get("restartCount", 0)
            for p in pods
            for c in (p.get("status") or {}).get("containerStatuses") or []
        )
        active = [p for p in pods if pod_active(p)]
        status = copy.deepcopy(job.get("status") or {})
        status.setdefault("startTime", now())
        completions = spec.get("completions", 1)
        if failed + restarts > spec.get("backoffLimit", 6):
            for pod in active:
                cluster.remove("pods", ns, pod["metadata"]["name"])
            active = []
            message = "Job has reached the specified backoff limit"
            set_condition(
                {"status": status},
                condition("FailureTarget", "True", "BackoffLimitExceeded", message),
            )
            set_condition(
                {"status": status}, condition("Failed", "True", "BackoffLimitExceeded", message)
            )
            event(
                cluster,
                job,
                "Job",
                "batch/v1",
                "Warning",
                "BackoffLimitExceeded",
                message,
                "job-controller",
            )
        elif succeeded >= completions:
            status["completionTime"] = now()
            set_condition(
                {"status": status},
                condition(
                    "SuccessCriteriaMet",
                    "True",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                ),
            )
            set_condition(
                {"status": status},
                condition(
                    "Complete",
                    "True",
                    "CompletionsReached",
                    "Reached expected number of succeeded pods",
                ),
            )
            event(
                cluster,
                job,
                "Job",
                "batch/v1",
                "Normal",
                "Completed",
                "Job completed",
                "job-controller",
            )
        else:
            want = min(spec.get("parallelism", 1), completions - succeeded) - len(active)
            if want > 0:
                _create_pods(
                    cluster, job, "Job", "batch/v1", spec["template"], want, "job-controller"
                )
                active = [
                    p for p in cluster.items("pods", ns) if controlled_by(p, uid) and pod_active(p)
                ]
        for key, value in (("active", len(active)), ("succeeded", succeeded), ("failed", failed)):
            if value:
                status[key] = value
            else:
                status.pop(key, None)
        status["ready"] = sum(1 for p in active if pod_ready(p))
        status["terminating"] = 0
        status.setdefault("uncountedTerminatedPods", {})
        if status != job.get("status"):
            job["status"] = status
            cluster.touch(job)


# -- endpoints ----------------------------------------------------------------------------------
def _resolve_ports(service: JSON, pod: JSON) -> tuple[tuple[str, int, str], ...] | None:
    resolved = []
    for port in (service.get("spec") or {}).get("ports") or []:
        target = port.get("targetPort", port.get("port"))
        if isinstance(target, str) and not target.isdigit():
            number = next(
                (
                    p.get("containerPort")
                    for c in (pod.get("spec") or {}).get("containers") or []
                    for p in c.get("ports") or []
                    if p.get("name") == target
                    and p.get("protocol", "TCP") == port.get("protocol", "TCP")
                ),
                None,
            )
            if number is None:
                continue
        else:
            number = int(target)
        resolved.append((port.get("name", ""), number, port.get("protocol", "TCP")))
    return tuple(resolved) if resolved else None


def endpoints(cluster: Cluster) -> None:
    live = set()
    for svc in cluster.items("services"):
        meta, spec = svc["metadata"], svc.get("spec") or {}
        selector = spec.get("selector") or {}
        if not selector or spec.get("type") == "ExternalName":
            continue
        ns, name = meta["namespace"], meta["name"]
        live.add((ns, name))
        groups: dict[tuple[tuple[str, int, str], ...], list[JSON]] = {}
        for pod in cluster.items("pods", ns):
            status = pod.get("status") or {}
            if not labels_match(selector, pod["metadata"].get("labels") or {}):
                continue
            if not status.get("podIP") or not pod_active(pod):
                continue
            ports = _resolve_ports(svc, pod)
            if ports is not None:
                groups.setdefault(ports, []).append(pod)
        _sync_endpoints(cluster, svc, groups)
        _sync_slices(cluster, svc, groups)
    for ep in cluster.items("endpoints"):
        key = (ep["metadata"]["namespace"], ep["metadata"]["name"])
        managed = "endpoints.kubernetes.io/last-change-trigger-time" in (
            ep["metadata"].get("annotations") or {}
        )
        if managed and key not in live and cluster.get("services", *key) is None:
            cluster.remove("endpoints", *key)


def _target(pod: JSON) -> JSON:
    meta = pod["metadata"]
    return {"kind": "Pod", "namespace": meta["namespace"], "name": meta["name"], "uid": meta["uid"]}


def _sync_endpoints(cluster: Cluster, svc: JSON, groups: dict[Any, list[JSON]]) -> None:
    meta = svc["metadata"]
    ns, name = meta["namespace"], meta["name"]
    subsets = []
    for ports, pods in sorted(groups.items()):
        subset: JSON = {}
        ready = [p for p in pods if pod_ready(p)]
        waiting = [p for p in pods if not pod_ready(p)]
        for key, chosen in (("addresses", ready), ("notReadyAddresses", waiting)):
            if chosen:
                subset[key] = [
                    {
                        "ip": p["status"]["podIP"],
                        **(
                            {"nodeName": p["spec"]["nodeName"]} if p["spec"].get("nodeName") else {}
                        ),
                        "targetRef": _target(p),
                    }
                    for p in sorted(chosen, key=lambda p: p["status"]["podIP"])
                ]
        subset["ports"] = [
            {**({"name": n} if n else {}), "port": port, "protocol": proto}
            for n, port, proto in ports
        ]
        subsets.append(subset)
    existing = cluster.get("endpoints", ns, name)
    labels = dict(meta.get("labels") or {})
    if existing is None:
        body: JSON = {
            "kind": "Endpoints",
            "apiVersion": "v1",
            "metadata": cluster.new_metadata(
                {
                    "name": name,
                    "labels": labels,
                    "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": now()},
                },
                ns,
            ),
        }
        if subsets:
            body["subsets"] = subsets
        cluster.put("endpoints", ns, body)
        return
    if (
        existing.get("subsets", []) != subsets
        or (existing["metadata"].get("labels") or {}) != labels
    ):
        if subsets:
            existing["subsets"] = subsets
        else:
            existing.pop("subsets", None)
        existing["metadata"]["labels"] = labels
        existing["metadata"].setdefault("annotations", {})[
            "endpoints.kubernetes.io/last-change-trigger-time"
        ] = now()
        cluster.touch(existing)


def _sync_slices(cluster: Cluster, svc: JSON, groups: dict[Any, list[JSON]]) -> None:
    meta = svc["metadata"]
    ns, name = meta["namespace"], meta["name"]
    gr = "endpointslices.discovery.k8s.io"
    mine = [
        s
        for s in cluster.items(gr, ns)
        if (s["metadata"].get("labels") or {}).get("kubernetes.io/service-name") == name
        and controlled_by(s, meta["uid"])
    ]
    wanted = groups or {(): []}
    used = set()
    for ports, pods in sorted(wanted.items()):
        endpoints_list = [
            {
                "addresses": [p["status"]["podIP"]],
                "conditions": {
                    "ready": pod_ready(p),
                    "serving": pod_ready(p),
                    "terminating": False,
                },
                **({"nodeName": p["spec"]["nodeName"]} if p["spec"].get("nodeName") else {}),
                "targetRef": _target(p),
            }
            for p in sorted(pods, key=lambda p: p["status"]["podIP"])
        ]
        port_list = [{"name": n, "port": port, "protocol": proto} for n, port, proto in ports]
        content: JSON = {"endpoints": endpoints_list, "ports": port_list}
        current = next(
            (s for s in mine if s["metadata"]["name"] not in used and s.get("ports") == port_list),
            None,
        ) or next((s for s in mine if s["metadata"]["name"] not in used), None)
        if current is None:
            labels = dict(meta.get("labels") or {})
            labels |= {
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": name,
            }
            slice_name = f"{name}-{''.join(random.choices(SAFE_ALPHABET, k=5))}"
            body = {
                "kind": "EndpointSlice",
                "apiVersion": "discovery.k8s.io/v1",
                "metadata": cluster.new_metadata(
                    {
                        "name": slice_name,
                        "generateName": f"{name}-",
                        "labels": labels,
                        "ownerReferences": [owner_reference(svc, "Service", "v1")],
                    },
                    ns,
                ),
                "addressType": "IPv6" if service_network(cluster).version == 6 else "IPv4",
                **content,
            }
            cluster.put(gr, ns, body)
            used.add(slice_name)
            continue
        used.add(current["metadata"]["name"])
        if current.get("endpoints") != endpoints_list or current.get("ports") != port_list:
            current.update(content)
            cluster.touch(current)
    for stale in mine:
        if stale["metadata"]["name"] not in used:
            cluster.remove(gr, ns, stale["metadata"]["name"])
