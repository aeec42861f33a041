#!/usr/bin/env bash
# Make sure a Docker engine answers, the way .ci/run and the README's commands need it.
#
# - An engine that already answers (DOCKER_HOST, the default socket) is used as it is.
# - Otherwise, as root on Debian: install docker.io (and jq) when dockerd is missing and start
#   dockerd in the background, logging to /var/log/kipik-dockerd.log.
# - Where the kernel's capability bounding set lacks CAP_SYS_RESOURCE, privileged containers fail
#   ("unable to apply caps"); then register image/runc-capfix as the engine's default runtime.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
log() { printf 'engine: %s\n' "$*" >&2; }

engine_answers() { timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

cap_sys_resource_missing() {
    local bnd
    bnd=$(awk '/^CapBnd:/ {print $2}' /proc/self/status)
    # CAP_SYS_RESOURCE is capability 24
    (( (16#$bnd >> 24 & 1) == 0 ))
}

install_wrapper() {
    install -m 0755 "$here/image/runc-capfix" /usr/local/bin/kipik-runc-capfix
    mkdir -p /etc/docker
    local cfg=/etc/docker/daemon.json
    [[ -s $cfg ]] || echo '{}' >"$cfg"
    jq '.runtimes["kipik-runc-capfix"] = {"path": "/usr/local/bin/kipik-runc-capfix"}
        | .["default-runtime"] = "kipik-runc-capfix"' "$cfg" >"$cfg.new"
    mv "$cfg.new" "$cfg"
    log "CAP_SYS_RESOURCE is missing here: registered the runc-capfix runtime as default"
}

if engine_answers; then
    if cap_sys_resource_missing && [[ $(id -u) == 0 ]] && ! grep -q kipik-runc-capfix /etc/docker/daemon.json 2>/dev/null; then
        install_wrapper
        pkill -HUP -x dockerd || true
    fi
    log "a Docker engine answers: $(docker version --format '{{.Server.Version}}')"
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    log "no Docker engine answers and this is not root: start Docker (or set DOCKER_HOST) and run again"
    exit 1
fi
if ! command -v dockerd >/dev/null || ! command -v jq >/dev/null; then
    log "installing Debian's docker.io"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io jq >/dev/null
fi
if cap_sys_resource_missing; then
    install_wrapper
fi
log "starting dockerd"
nohup dockerd >/var/log/kipik-dockerd.log 2>&1 &
for _ in $(seq 1 120); do
    if engine_answers; then
        log "dockerd is ready: $(docker version --format '{{.Server.Version}}')"
        exit 0
    fi
    sleep 0.5
done
log "dockerd did not answer within 60 s; its log:"
tail -n 50 /var/log/kipik-dockerd.log >&2
exit 1
