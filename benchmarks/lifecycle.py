"""Time to a ready session cluster: cold, in a warm host, and reused, side by side in one run.

Each mode first makes what it keeps (a warm host, a cluster kept for reuse) in a separate
session, then measures a second session, as the next pytest run would see it. Per-user state
goes to a private temporary directory; everything made is removed at the end.

    python3 benchmarks/lifecycle.py --image kipik-test/dind:dev \
        --node-image kipik.local/kind-node:v1.22.3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import tempfile
import time

from pytest_kipik import ClusterFactory, KipikConfig
from pytest_kipik.hosts.docker import DockerBackend
from pytest_kipik.sharing.session import Session, WarmSlot


def session_ready(config: KipikConfig, lines: list[str], slot: int | None = None) -> float:
    """Seconds from nothing to the ready session cluster of a fresh session."""
    factory = ClusterFactory(config, report=lines.append, session=Session.new(warm_slot=slot))
    start = time.monotonic()
    try:
        factory.shared()
        return time.monotonic() - start
    finally:
        factory.close()


def kind_create(lines: list[str]) -> float:
    """The last ``kind create`` phase among the progress lines."""
    found = [float(m[1]) for m in re.finditer(r": kind create \((\d+\.\d+)s\)", "\n".join(lines))]
    return found[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default="kipik-test/dind:dev")
    parser.add_argument("--node-image", default="kipik.local/kind-node:v1.22.3")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kipik-bench-") as home:
        os.environ["XDG_STATE_HOME"] = f"{home}/state"
        os.environ["XDG_CACHE_HOME"] = f"{home}/cache"
        base = KipikConfig(
            image=args.image, node_image=args.node_image, timeout=300, snapshots=False
        )
        warm = dataclasses.replace(base, warm=True)
        reuse = dataclasses.replace(base, reuse=True)
        slot = WarmSlot.acquire(base.name_prefix)
        times: dict[str, list[float]] = {"cold": [], "warm": [], "reused": []}
        kind_times: list[float] = []
        try:
            session_ready(warm, [], slot.index)  # makes the warm host
            session_ready(reuse, [])  # makes the cluster kept for reuse
            for _ in range(args.rounds):
                times["cold"].append(session_ready(base, []))
                lines: list[str] = []
                times["warm"].append(session_ready(warm, lines, slot.index))
                kind_times.append(kind_create(lines))
                times["reused"].append(session_ready(reuse, []))
        finally:
            slot.release()
            backend = DockerBackend(args.image, print)
            for resource in backend.list_owned():  # the kept hosts this benchmark made
                if resource.labels.get("kipik.io/owner-pid") == str(os.getpid()):
                    backend.remove_owned(resource)
            backend.close()
    cold = statistics.median(times["cold"])
    print(f"time to ready, median of {args.rounds} round(s), node image {args.node_image}")
    print(f"{'mode':<8} {'seconds':>8} {'/ cold':>8}")
    for mode, values in times.items():
        value = statistics.median(values)
        print(f"{mode:<8} {value:8.2f} {value / cold:8.2f}")
    kind = statistics.median(kind_times)
    extra = statistics.median(times["warm"]) - kind
    print(f"warm - kind create = {extra:.2f}s (kind create {kind:.2f}s)")


if __name__ == "__main__":
    main()
