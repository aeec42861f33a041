#!/usr/bin/env bash
# The project's two entry points, from a fresh machine:
#   bash tests/run.sh examples   set up, then run examples/ against a nested cluster
#   bash tests/run.sh tests      set up, then run the test suite, lint and type checks
# Setting up means: a Docker engine that answers (tests/engine.sh), tox, and the test images
# (tests/images/build.py, cached by content hash). Extra arguments go to pytest.
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

step "test images"
python3 tests/images/build.py

case $what in
    examples)
        step "example suite against a nested cluster"
        exec python3 -m tox -e examples -- examples --kipik-image=kipik-test/dind:dev --kipik-node-image=kipik-test/node:dev "$@"
        ;;
    tests)
        step "lint and types"
        python3 -m tox -e lint,type
        step "test suite"
        exec python3 -m tox -e py -- tests "$@"
        ;;
    *)
        echo "usage: bash tests/run.sh examples|tests [pytest args]" >&2
        exit 2
        ;;
esac
