#!/usr/bin/env bash
# The project's two entry points, from a fresh machine:
#   bash tests/run.sh examples   set up, then run examples/ against a nested cluster
#   bash tests/run.sh tests      set up, then run the test suite, lint and type checks
# Setting up means: a Docker engine that answers (tests/engine.sh), tox, real kind images where
# ../shared/realkind is beside the checkout (its build.sh: kind v0.32.0, a Kubernetes v1.22.3 node
# image, and the host's own kind and kubectl), and the test images (tests/images/build.py, cached
# by content hash). Without ../shared/realkind the real-kind tier takes its images from
# KIPIK_E2E_IMAGE / KIPIK_E2E_NODE_IMAGE, or skips saying why (never under CI=true), and the
# examples run on kipik's and kind's defaults (which need a registry). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-tests}
shift || true

step() { printf '\n== %s\n' "$*" >&2; }

step "Docker engine"
bash tests/engine.sh

# mmdebstrap builds the test images' root filesystems; docker-registry is a real local registry
# for the test of digest-pinned node images (started on 127.0.0.1 by that test, never as a service);
# busybox-static's /bin/busybox is the whole test app image (kipik-test/app:dev)
if ! command -v mmdebstrap >/dev/null || ! command -v docker-registry >/dev/null || [[ ! -x /bin/busybox ]]; then
    if [[ $(id -u) == 0 ]]; then
        step "installing mmdebstrap, docker-registry and busybox-static"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap docker-registry busybox-static >/dev/null
        # Debian starts the registry as a service on :5000; the tests start their own
        if command -v systemctl >/dev/null; then systemctl disable --now docker-registry >/dev/null 2>&1 || :; fi
        pkill -x docker-registry || :
    else
        echo "mmdebstrap, docker-registry or busybox-static is missing: sudo apt-get install mmdebstrap docker-registry busybox-static" >&2
        exit 1
    fi
fi
if ! python3 -m tox --version >/dev/null 2>&1; then
    step "installing tox"
    python3 -m pip install --quiet --disable-pip-version-check 'tox>=4.11'
fi
if ! python3 -c 'import docker' >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check 'docker>=7.1'
fi

build_args=()
realkind=$(cd .. && pwd)/shared/realkind
if [[ -f $realkind/build.sh ]]; then
    step "real kind images ($realkind)"
    bash "$realkind/build.sh"
    kind_bin=$(bash "$realkind/build.sh" bin)
    export PATH="$kind_bin:$PATH"  # the host's own kind and kubectl (the outer cluster's)
    export KIPIK_E2E_IMAGE=${KIPIK_E2E_IMAGE:-kipik-test/dind:dev}
    export KIPIK_E2E_NODE_IMAGE=${KIPIK_E2E_NODE_IMAGE:-kipik.local/kind-node:v1.22.3}
    build_args=(--kind-bin "$kind_bin")
elif [[ ${CI:-} == true ]]; then
    echo "CI=true but $realkind is missing: the real-kind tier cannot run" >&2
    exit 1
fi

step "test images"
python3 tests/images/build.py "${build_args[@]}"

images=()
[[ -n ${KIPIK_E2E_IMAGE:-} ]] && images+=("--kipik-image=$KIPIK_E2E_IMAGE")
[[ -n ${KIPIK_E2E_NODE_IMAGE:-} ]] && images+=("--kipik-node-image=$KIPIK_E2E_NODE_IMAGE")

case $what in
    examples)
        step "example suite against a nested cluster"
        exec python3 -m tox -e examples -- examples "${images[@]}" "$@"
        ;;
    tests)
        step "lint, types and the documentation site"
        python3 -m tox -e lint,type,docs
        step "test suite"
        exec python3 -m tox -e py -- tests "$@"
        ;;
    *)
        echo "usage: bash tests/run.sh examples|tests [pytest args]" >&2
        exit 2
        ;;
esac
