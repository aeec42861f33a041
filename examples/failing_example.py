"""A test that fails on purpose, to show what kipik adds to a failed test's report.

Not collected with the example suite (its name does not start with ``test_``); run it by name::

    pytest examples/failing_example.py --kipik-image=... --kipik-node-image=...

The report gets a section for the namespace (pods not running, with their containers' states,
and recent warning events) and one for the cluster (nodes, troubled pods, warning events, and
the last log lines of containers that failed).
"""

import os
from typing import Any

from pytest_kipik import NestedNamespace

APP_IMAGE = os.environ.get("KIPIK_EXAMPLE_APP_IMAGE", "kipik-test/app:dev")


def restarted(pod: dict[str, Any]) -> bool:
    return any(s["restartCount"] for s in pod["status"].get("containerStatuses") or [])


def test_a_pod_that_never_starts(nested_namespace: NestedNamespace) -> None:
    nested_namespace.cluster.load_image(APP_IMAGE)
    # a registry that is never there: the node's own loopback (nothing leaves the machine)
    lost = {"name": "app", "image": "127.0.0.1:9/never-pushed:1"}
    crash = {"name": "app", "image": APP_IMAGE, "command": ["sh", "-c", "echo boom; exit 3"]}
    nested_namespace.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "lost"},
                "spec": {"containers": [lost]},
            },
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "crash"},
                "spec": {"containers": [crash]},
            },
        ]
    )
    nested_namespace.wait_for("Pod", "crash", condition=restarted, timeout=120)
    nested_namespace.wait_for("Pod", "lost", condition="Ready", timeout=5)  # fails: no such image
