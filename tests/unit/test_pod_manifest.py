from pathlib import Path
from typing import Any

import pytest
import yaml

from pytest_kipik.errors import ConfigError
from pytest_kipik.hosts import pod_manifest
from pytest_kipik.hosts.transfer import inner_reference, split_reference

DIGEST = "sha256:" + "0123456789abcdef" * 4


def _pod(**extra: Any) -> dict[str, Any]:
    return pod_manifest.build_pod(
        name="kipik-1-dind",
        namespace="ci",
        image="reg/dind:1",
        args=["--bip=100.99.0.1/24"],
        labels={"kipik.io/run-id": "1"},
        deadline_seconds=900,
        **extra,
    )


def test_build_pod_is_privileged_tokenless_and_self_stopping() -> None:
    assert _pod() == {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "kipik-1-dind", "namespace": "ci", "labels": {"kipik.io/run-id": "1"}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "activeDeadlineSeconds": 900,
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": "dind",
                    "image": "reg/dind:1",
                    "args": ["--bip=100.99.0.1/24"],
                    "securityContext": {"privileged": True},
                    "resources": {
                        "requests": {"cpu": "1", "memory": "2Gi"},
                        "limits": {"memory": "8Gi"},
                    },
                    "volumeMounts": [
                        {"name": "docker", "mountPath": "/var/lib/docker"},
                        {"name": "modules", "mountPath": "/lib/modules", "readOnly": True},
                    ],
                }
            ],
            "volumes": [
                {"name": "docker", "emptyDir": {}},
                {"name": "modules", "hostPath": {"path": "/lib/modules", "type": "Directory"}},
            ],
        },
    }


def test_build_pod_options_and_template() -> None:
    template = pod_manifest.validate_template(
        {
            "metadata": {"labels": {"team": "a"}, "annotations": {"note": "x"}},
            "spec": {
                "runtimeClassName": "sysbox-runc",
                "tolerations": [{"key": "ci", "operator": "Exists"}],
                "containers": [
                    {"name": "dind", "securityContext": {"privileged": False},
                     "resources": {"requests": {"cpu": "2"}}}
                ],
            },
        }
    )  # fmt: skip
    pod = _pod(
        service_account="dind",
        storage_limit="20Gi",
        owner={"name": "runner", "uid": "u-1"},
        template=template,
    )
    assert pod["metadata"]["labels"] == {"team": "a", "kipik.io/run-id": "1"}
    assert pod["metadata"]["annotations"] == {"note": "x"}
    assert pod["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "runner", "uid": "u-1"}
    ]
    spec = pod["spec"]
    assert (spec["serviceAccountName"], spec["runtimeClassName"]) == ("dind", "sysbox-runc")
    assert spec["automountServiceAccountToken"] is False
    assert spec["volumes"][0] == {"name": "docker", "emptyDir": {"sizeLimit": "20Gi"}}
    assert spec["containers"][0]["securityContext"] == {"privileged": False}
    assert spec["containers"][0]["resources"] == {"requests": {"cpu": "2"}}
    assert spec["tolerations"] == [{"key": "ci", "operator": "Exists"}]


@pytest.mark.parametrize(
    ("template", "problem"),
    [
        ([], "a pod template must be a YAML mapping"),
        ({"kind": "Deployment"}, "a pod template must be apiVersion v1, kind Pod"),
        ({"spec": {"hostNetwork": True}}, "spec fields ['hostNetwork'] cannot be set"),
        ({"spec": {"volumes": []}}, "spec fields ['volumes'] cannot be set"),
        ({"metadata": {"labels": {"kipik.io/run-id": "x"}}}, "metadata key 'kipik.io/run-id'"),
        ({"spec": {"containers": [{"name": "other"}]}}, "spec.containers[0] must be named"),
        ({"spec": {"containers": [{"name": "dind", "command": ["sh"]}]}},
         "spec.containers[0] must be named 'dind' and may set only env"),
    ],
)  # fmt: skip
def test_templates_may_not_take_over_what_kipik_owns(template: Any, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        pod_manifest.validate_template(template)
    assert str(info.value).startswith(problem)


def test_load_template_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pod.yaml"
    path.write_text(yaml.safe_dump({"spec": {"hostPID": True}}))
    with pytest.raises(ConfigError, match=rf"^pod template {path}: spec fields \['hostPID'\]"):
        pod_manifest.load_template(path)


@pytest.mark.parametrize(
    ("image", "parts", "inner"),
    [
        ("kindest/node:v1.31.0", ("kindest/node", "v1.31.0", None), "kindest/node:v1.31.0"),
        (f"kindest/node:v1.31.0@{DIGEST}", ("kindest/node", "v1.31.0", DIGEST),
         "kindest/node:v1.31.0"),
        (f"127.0.0.1:5000/k/node@{DIGEST}", ("127.0.0.1:5000/k/node", None, DIGEST),
         "127.0.0.1:5000/k/node:sha256-0123456789abcdef"),
        ("127.0.0.1:5000/k/node", ("127.0.0.1:5000/k/node", None, None), "127.0.0.1:5000/k/node"),
    ],
)  # fmt: skip
def test_image_references(
    image: str, parts: tuple[str, str | None, str | None], inner: str
) -> None:
    assert split_reference(image) == parts
    assert inner_reference(image) == inner
