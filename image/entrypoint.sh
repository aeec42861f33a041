#!/bin/sh
# Startup of the kipik Docker-in-Docker container (installed as /usr/local/bin/kipik-dind-entrypoint,
# run under tini as PID 1 so exited containerd shims are reaped).
#
# Prepares the container so a nested dockerd (and kind's privileged node containers under it) can
# run, starts dockerd on the unix socket only, waits until it answers, touches the ready marker,
# then waits on dockerd, forwarding SIGTERM/SIGINT to it. Exits with dockerd's status.
# Arguments given to the container are passed on to dockerd.
set -eu

SOCKET=unix:///var/run/docker.sock
LOG=/var/log/dockerd.log
READY=/run/kipik-dind-ready
DAEMON_JSON=/etc/docker/daemon.json
CAPFIX_NAME=kipik-runc-capfix
CAPFIX_PATH=/usr/local/bin/kipik-runc-capfix
READY_TIMEOUT=${KIPIK_DIND_READY_TIMEOUT:-60}

say() { printf 'kipik-dind: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# Only the unix socket is ever served, and our own CLI calls must reach it: nothing inherited from
# the environment may point either somewhere else.
unset DOCKER_HOST DOCKER_CONTEXT DOCKER_TLS_VERIFY DOCKER_CERT_PATH DOCKER_TLS_CERTDIR

for arg in "$@"; do
    case $arg in
        -H|-H*|--host|--host=*)
            die "refusing dockerd argument '$arg': this image serves only $SOCKET" ;;
    esac
done

# A marker left by a previous run (docker restart) must not announce a daemon that is not up yet.
rm -f "$READY"

# --- kernel interfaces -------------------------------------------------------------------------
is_mounted() {
    awk -v dir="$1" '$2 == dir { found = 1 } END { exit !found }' /proc/self/mounts
}

if [ -d /sys/kernel/security ] && ! is_mounted /sys/kernel/security; then
    mount -t securityfs none /sys/kernel/security \
        || say "warning: could not mount securityfs on /sys/kernel/security"
fi

# Mounts made by the nested daemon (and by kind's nodes below it) must propagate.
mount --make-rshared /

# cgroup v2: a cgroup with processes cannot delegate controllers to children ("no internal
# processes"), so move everything in the root cgroup into a leaf first. cgroup v1: nothing to do.
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    mkdir -p /sys/fs/cgroup/init
    # Processes may appear while moving (this shell forks); a few rounds settle it.
    # (cgroupfs files report size 0, so test the content, not `-s`.)
    rounds=0
    while [ -n "$(cat /sys/fs/cgroup/cgroup.procs)" ] && [ "$rounds" -lt 10 ]; do
        while read -r pid; do
            echo "$pid" >/sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
        done </sys/fs/cgroup/cgroup.procs
        rounds=$((rounds + 1))
    done
    available=
    read -r available </sys/fs/cgroup/cgroup.controllers || :
    controllers=
    for controller in $available; do
        controllers="$controllers +$controller"
    done
    if [ -n "$controllers" ]; then
        echo "$controllers" >/sys/fs/cgroup/cgroup.subtree_control \
            || say "warning: could not enable cgroup controllers:$controllers"
    fi
fi

# Debian's iptables speaks nf_tables; on a kernel without it, dockerd cannot set up its bridge.
# Fall back to the legacy backend only when that one works and nf_tables does not.
if command -v iptables-legacy >/dev/null 2>&1 && ! iptables -nL >/dev/null 2>&1 \
    && iptables-legacy -nL >/dev/null 2>&1; then
    update-alternatives --set iptables /usr/sbin/iptables-legacy >/dev/null
    update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy >/dev/null
    say "nf_tables is not usable here: switched iptables to the legacy backend"
fi

# --- runtime: work around a bounding set without CAP_SYS_RESOURCE --------------------------------
# Docker asks for every capability in --privileged mode; where the kernel's bounding set lacks
# CAP_SYS_RESOURCE (24), runc fails with "unable to apply caps". kind's node containers are
# privileged, so the nested daemon then needs the wrapper as its default runtime.
capbnd=$(awk '/^CapBnd:/ { print $2 }' /proc/self/status)
if [ -n "$capbnd" ] && [ $(((0x$capbnd >> 24) & 1)) -eq 0 ]; then
    [ -x "$CAPFIX_PATH" ] || die "CAP_SYS_RESOURCE is missing and $CAPFIX_PATH is not installed"
    mkdir -p "$(dirname "$DAEMON_JSON")"
    [ -s "$DAEMON_JSON" ] || echo '{}' >"$DAEMON_JSON"
    jq --arg name "$CAPFIX_NAME" --arg path "$CAPFIX_PATH" \
        '.runtimes[$name] = {"path": $path} | .["default-runtime"] = $name' \
        "$DAEMON_JSON" >"$DAEMON_JSON.kipik.tmp" \
        || die "could not update $DAEMON_JSON (is it valid JSON?)"
    mv "$DAEMON_JSON.kipik.tmp" "$DAEMON_JSON"
    say "CAP_SYS_RESOURCE is missing from the bounding set (CapBnd $capbnd): default runtime $CAPFIX_NAME"
fi

# "hosts" in daemon.json would add listeners (or clash with --host below): drop it.
if [ -s "$DAEMON_JSON" ] && jq -e 'has("hosts")' "$DAEMON_JSON" >/dev/null 2>&1; then
    jq 'del(.hosts)' "$DAEMON_JSON" >"$DAEMON_JSON.kipik.tmp" && mv "$DAEMON_JSON.kipik.tmp" "$DAEMON_JSON"
    say "removed \"hosts\" from $DAEMON_JSON: this image serves only $SOCKET"
fi

# --- dockerd -----------------------------------------------------------------------------------
# Left over when the container was stopped hard and restarted: dockerd refuses to start with it.
rm -f /var/run/docker.pid /var/run/docker/containerd/containerd.pid

dockerd_pid=
stopping=
# shellcheck disable=SC2329  # called from the traps below
forward() {
    stopping=$1
    if [ -n "$dockerd_pid" ]; then
        kill -s "$1" "$dockerd_pid" 2>/dev/null || :
    else
        exit 143
    fi
}
trap 'forward TERM' TERM
trap 'forward INT' INT

mkdir -p "$(dirname "$LOG")"
printf '\n=== kipik-dind: dockerd starting at %s ===\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >>"$LOG"
dockerd --host="$SOCKET" "$@" >>"$LOG" 2>&1 &
dockerd_pid=$!

show_log() {
    say "last 50 lines of $LOG:"
    tail -n 50 "$LOG" >&2 || :
}

deadline=$(($(date +%s) + READY_TIMEOUT))
until timeout 5 docker --host="$SOCKET" version --format '{{.Server.Version}}' >/dev/null 2>&1; do
    if ! kill -0 "$dockerd_pid" 2>/dev/null; then
        status=0
        wait "$dockerd_pid" || status=$?
        if [ -n "$stopping" ]; then
            say "stopped by SIG$stopping before dockerd answered (status $status)"
            exit "$status"
        fi
        say "dockerd exited with status $status before it answered"
        show_log
        exit "$(( status == 0 ? 1 : status ))"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
        say "dockerd did not answer on $SOCKET within ${READY_TIMEOUT}s"
        show_log
        kill -s TERM "$dockerd_pid" 2>/dev/null || :
        exit 1
    fi
    sleep 0.1
done

touch "$READY"
driver=$(docker --host="$SOCKET" info --format '{{.Driver}}' 2>/dev/null) || driver='?'
say "dockerd is ready on $SOCKET (storage driver: ${driver:-?})"

# `wait` returns early when a trapped signal arrives; keep waiting until dockerd itself is gone.
while :; do
    status=0
    wait "$dockerd_pid" || status=$?
    if ! kill -0 "$dockerd_pid" 2>/dev/null; then
        break
    fi
done
rm -f "$READY"
say "dockerd exited with status $status"
exit "$status"
