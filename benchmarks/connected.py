"""Several connected clusters in one DinD host next to a single cluster, measured in one run.

``create_connected(3)`` starts one host, moves the node image into it once and runs the three
``kind create`` at the same time; the issue's target is at most 1.5 times one ``create()``.
Rounds alternate between one cluster and three (this machine is noisy; the ratio of medians
taken in one run is the figure).

    python3 benchmarks/connected.py --rounds 3
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from time_to_ready import bench_arguments

from pytest_kipik import ClusterFactory, KipikConfig


def _quiet(line: str) -> None:
    del line


def main() -> int:
    parser = bench_arguments(__doc__)
    parser.add_argument("--count", type=int, default=3, help="connected clusters (default 3)")
    args = parser.parse_args()
    config = KipikConfig(image=args.image, node_image=args.node_image, timeout=600, snapshots=False)
    times: dict[str, list[float]] = {"one": [], "connected": []}
    for round_ in range(args.rounds):
        for what in ("one", "connected"):
            with ClusterFactory(config, report=_quiet) as factory:
                start = time.monotonic()
                if what == "one":
                    factory.create()
                else:
                    factory.create_connected(args.count)
                times[what].append(time.monotonic() - start)
            print(f"round {round_ + 1}: {what}: {times[what][-1]:.2f}s", flush=True)
    one, many = statistics.median(times["one"]), statistics.median(times["connected"])
    print(f"one cluster:            median {one:.2f}s")
    print(f"{args.count} connected clusters: median {many:.2f}s")
    print(f"ratio {many / one:.2f} (target <= 1.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
