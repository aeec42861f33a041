"""The pod backend next to the docker backend: time to ready per phase, measured in one run.

The outer cluster is a real kind cluster made on this engine with the host's own ``kind``
(tests/e2e/outer.py; ``bash ../shared/realkind/build.sh bin`` puts one on PATH), with
examples/rbac.yaml applied and its ServiceAccount's token used, so the pod column shows what the
pod backend's own path costs: pod creation through the API,
the node image streamed through the exec API, kind through exec, and the nested API server
reached through a port-forward. Rounds alternate between the backends. Also prints the node-image
throughput through exec and the ratio of pod to docker time to ready.

    python3 benchmarks/pod_backend.py --rounds 3
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the outer cluster in tests/e2e

from time_to_ready import bench_arguments, phase_times  # as the docker benchmark measures

from pytest_kipik import KipikConfig
from tests.e2e import outer as real_outer


def main() -> int:
    parser = bench_arguments(__doc__)
    args = parser.parse_args()
    engine = docker.from_env()
    size_mb = engine.images.get(args.node_image).attrs["Size"] / 1e6
    engine.close()
    kind = shutil.which("kind")
    if kind is None:
        print('no kind on PATH: export PATH="$(bash ../shared/realkind/build.sh bin):$PATH"')
        return 1
    results: dict[str, list[dict[str, float]]] = {"docker": [], "pod": []}
    with (
        tempfile.TemporaryDirectory(prefix="kipik-bench-") as tmp,
        real_outer.started(kind, Path(tmp), args.node_image, [args.image]) as outer,
    ):
        namespace, account = real_outer.rbac_namespace(outer, "kipik-bench")
        configs = {
            "docker": KipikConfig(
                image=args.image, node_image=args.node_image, timeout=600, snapshots=False
            ),
            "pod": KipikConfig(
                backend="pod",
                image=args.image,
                node_image=args.node_image,
                outer_kubeconfig=account,
                namespace=namespace,
                timeout=600,
            ),
        }
        for round_ in range(1, args.rounds + 1):
            for backend, config in configs.items():
                results[backend].append(phase_times(config))
            print(
                f"round {round_}: "
                + ", ".join(f"{b} {sum(r[-1].values()):.1f}s" for b, r in results.items()),
                file=sys.stderr,
            )
    phases = list(results["pod"][0])
    print(f"{'phase':<26}{'docker':>10}{'pod':>10}")
    for phase in phases:
        medians = [statistics.median(r.get(phase, 0.0) for r in results[b]) for b in results]
        print(f"{phase:<26}" + "".join(f"{m:>9.2f}s" for m in medians))
    ready = {
        b: statistics.median(sum(v for p, v in r.items() if p != "teardown") for r in runs)
        for b, runs in results.items()
    }
    print(f"{'time to ready':<26}{ready['docker']:>9.2f}s{ready['pod']:>9.2f}s")
    for backend, runs in results.items():
        seconds = statistics.median(r["node image in"] for r in runs)
        print(f"node image throughput ({backend}): {size_mb / seconds:.1f} MB/s "
              f"({size_mb:.0f} MB in {seconds:.2f}s)")  # fmt: skip
    print(f"time to ready ratio (pod / docker): {ready['pod'] / ready['docker']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
