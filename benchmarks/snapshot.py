"""Snapshots: a cold cluster against clusters restored from its snapshot, in one run.

Measures, on the same machine in one run: a cold create (with its phases), the cost of saving
the snapshot, the time to a ready restored cluster, five fresh clusters restored one after
another and five restored at the same time. Prints every phase and the ratios the snapshot
issue names (restore / cold, five one after another / cold). Everything it makes is removed,
the snapshot included.

    python3 benchmarks/snapshot.py --image kipik-test/dind:dev \
        --node-image kipik.local/kind-node:v1.22.3
"""

from __future__ import annotations

import argparse
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor

from pytest_kipik import ClusterFactory, KipikConfig, NestedCluster

PHASE = re.compile(r"^kipik (\S+): (.+) \((\d+\.\d+)s\)$")


class Phases:
    """Progress lines of the factory, as (cluster, phase, seconds)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, float]] = []

    def __call__(self, line: str) -> None:
        """Take one progress line (others are printed)."""
        found = PHASE.match(line)
        if found:
            self.lines.append((found[1], found[2], float(found[3])))
        else:
            print(f"    {line}")

    def of(self, cluster: str) -> list[tuple[str, float]]:
        """The phases of one cluster."""
        return [(phase, seconds) for name, phase, seconds in self.lines if name == cluster]


def timed_create(factory: ClusterFactory) -> tuple[NestedCluster, float]:
    start = time.monotonic()
    cluster = factory.create()
    return cluster, time.monotonic() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="the DinD image")
    parser.add_argument("--node-image", required=True, help="the kind node image")
    parser.add_argument("--count", type=int, default=5, help="fresh clusters per series")
    args = parser.parse_args()
    prefix = f"kbench{secrets.token_hex(3)}"  # a configuration, and a snapshot, of its own
    config = KipikConfig(
        image=args.image, node_image=args.node_image, timeout=900, name_prefix=prefix
    )
    phases = Phases()
    with ClusterFactory(config, report=phases) as factory:
        cold, cold_total = timed_create(factory)
        saved = dict(phases.of(cold.name)).get("snapshot saved", 0.0)
        cold_ready = cold_total - saved  # the snapshot is saved after the cluster was ready
        print(f"cold create: {cold_ready:.1f}s to ready, then snapshot saved in {saved:.1f}s")
        for phase, seconds in phases.of(cold.name):
            print(f"  {phase}: {seconds:.1f}s")
        factory.remove(cold)

        one, one_total = timed_create(factory)
        assert one.status == "restored", one.status
        print(f"restore of one: {one_total:.1f}s")
        for phase, seconds in phases.of(one.name):
            print(f"  {phase}: {seconds:.1f}s")
        factory.remove(one)

        start = time.monotonic()
        for _ in range(args.count):
            cluster, seconds = timed_create(factory)
            assert cluster.status == "restored", cluster.status
            print(f"  one after another: {cluster.name} ready in {seconds:.1f}s")
            factory.remove(cluster)
        series = time.monotonic() - start

        start = time.monotonic()
        with ThreadPoolExecutor(args.count) as pool:
            made = list(pool.map(lambda _: timed_create(factory), range(args.count)))
        together = time.monotonic() - start
        for cluster, seconds in made:
            print(f"  at once: {cluster.name} ready in {seconds:.1f}s ({cluster.status})")
            factory.remove(cluster)
        for resource in factory.backend.list_owned():  # the snapshot goes too
            if resource.name.startswith(f"{prefix}-snapshot-"):
                factory.backend.remove_owned(resource)
    print(f"restore / cold create (time to ready): {one_total / cold_ready:.2f} (target <= 0.25)")
    print(
        f"{args.count} fresh one after another / one cold create: {series / cold_ready:.2f} "
        "(target <= 2)"
    )
    print(f"{args.count} fresh at once: {together:.1f}s in all, {together / cold_ready:.2f} x cold")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
