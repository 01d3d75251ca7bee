#!/usr/bin/env bash
# make test-docker: the integration suite (tests/integration) against the containerised set-up.
#
#  1. base image: debootstrap Debian 12 (minbase) from Debian's mirror, `podman import` it as
#     localhost/authmilter-base:bookworm (no image registry needed; kept and reused once made);
#  2. images: authmilter (docker/Dockerfile, its Python dependencies from a wheelhouse the host's pip
#     fills), Postfix and Knot, all FROM that base (podman's layer cache makes a rebuild quick);
#  3. one pod with --network none: its containers (sink, authmilter, Postfix, Knot) share one
#     loopback and nothing else, as the tests' 127.0.0.1 addresses assume;
#  4. docker/trial.py in the pod's network namespace (nsenter): the compose trial as documented,
#     and the readiness check;
#  5. Knot container stopped (the tests run their own Knot on its port 5353, AUTHMILTER_DNS_PORT),
#     then pytest tests/integration in the pod's network namespace with AUTHMILTER_SMTP & co.
# Everything it started is removed on exit, also after a failure or Ctrl-C.
#
# Needs root (debootstrap, rootful podman, nsenter) and the venv (`make deps`). Installs podman, runc
# and debootstrap from Debian when missing. Environment:
#   AUTHMILTER_DOCKER_CACHE  work folder (default /var/tmp/authmilter-docker)
#   DEBIAN_MIRROR            for debootstrap (default http://deb.debian.org/debian)
#   REBUILD_BASE=1           debootstrap again even if the base image exists
#   PYTEST_ARGS              passed to pytest, e.g. "-x -k spoof"
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
VENV_PYTHON=${VENV_PYTHON:-$REPO/.venv/bin/python}
CACHE=${AUTHMILTER_DOCKER_CACHE:-/var/tmp/authmilter-docker}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
BASE_IMAGE=localhost/authmilter-base:bookworm
IMAGE=localhost/authmilter
POD=authmilter-test
# Fixed by docker/postfix/main.cf, docker/authmilter.toml and docker/knot/knot.conf.
SMTP=127.0.0.1:2525
DNS_PORT=5353
MILTER_PORT=8990
SUBMISSION_PORT=2527
BARE_SMTP=127.0.0.1:2528
# The containerised Sendmail (docker/sendmail): its two daemons; it relays to the sink on 2526.
SENDMAIL_SMTP=127.0.0.1:2535
SENDMAIL_SUBMISSION_PORT=2537
# runc: the runtime that works on these machines; the limits: podman's defaults exceed what the
# unprivileged parts of CI may set.
PODMAN=(podman --runtime runc)
LIMITS=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
# The same for the containers podman creates itself (the pod's infra container takes no --ulimit):
# a containers.conf of our own, read instead of the system's for this script and its children.
export CONTAINERS_CONF="$CACHE/containers.conf"

TIMINGS=()
SINK_DIR=""
# authmilter's config file, state directory and log on the host, for the tests to drive it.
RUN_DIR=""
log() { echo "test-docker: $*" >&2; }

timed() {
    local name=$1 start=$SECONDS
    shift
    "$@"
    TIMINGS+=("$name: $((SECONDS - start)) s")
}

require_tools() {
    [ "$(id -u)" = 0 ] || { log "needs root (debootstrap, rootful podman, nsenter)"; exit 1; }
    [ -x "$VENV_PYTHON" ] || { log "no venv at $VENV_PYTHON: run \`make deps\` first"; exit 1; }
    local missing="" package
    for package in podman runc debootstrap; do
        dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
    done
    [ -z "$missing" ] && return 0
    log "installing Debian packages:$missing"
    # As the Makefile's apt target: no service may start while installing.
    local blocker=""
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && blocker=1
    fi
    local status=0
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing || status=$?
    [ -z "$blocker" ] || rm -f /usr/sbin/policy-rc.d
    return $status
}

build_base() {
    if [ -z "${REBUILD_BASE:-}" ] && "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
        log "base image $BASE_IMAGE exists (REBUILD_BASE=1 to make it again)"
        return
    fi
    local rootfs="$CACHE/rootfs"
    rm -rf "$rootfs"
    log "debootstrap bookworm from $MIRROR"
    debootstrap --variant=minbase bookworm "$rootfs" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE/debootstrap.log" >&2; return 1; }
    cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
EOF
    # debootstrap's downloads and package lists are not part of an image.
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | "${PODMAN[@]}" import --quiet --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
}

# The authmilter image's build context: what the Dockerfile copies, plus the wheelhouse (the
# image's pip reaches no index here; the host's pip does, with the host's own settings).
stage_context() {
    local context="$CACHE/context"
    rm -rf "$context"
    mkdir -p "$context/docker/wheels" "$CACHE/wheels"
    cp -a pyproject.toml README.md milter conf "$context/"
    find "$context" \( -name __pycache__ -o -name '*.egg-info' \) -prune -exec rm -rf {} +
    "$VENV_PYTHON" -m pip wheel -q --wheel-dir "$CACHE/wheels" "$context" 'setuptools>=68' wheel \
        >"$CACHE/wheels.log" 2>&1 || { tail -n 30 "$CACHE/wheels.log" >&2; return 1; }
    # Dependencies only (authmilter itself is built from the copied source), timestamps kept: the
    # image's pip layer is then rebuilt only when a dependency changes.
    find "$CACHE/wheels" -name '*.whl' ! -name 'authmilter-*' -exec cp -p -t "$context/docker/wheels/" {} +
}

# The Sendmail image's build context: its Dockerfile and the config the tests' harness writes
# (tests/integration/sendmail.py), so both Sendmails run the same .mc.
stage_sendmail_context() {
    local context="$CACHE/sendmail-context"
    rm -rf "$context"
    mkdir -p "$context"
    cp docker/sendmail/Dockerfile "$context/"
    PYTHONPATH="$REPO/tests:$REPO/tests/integration" "$VENV_PYTHON" tests/integration/sendmail.py \
        --dir "$context" --smtp-port "${SENDMAIL_SMTP##*:}" --submission-port "$SENDMAIL_SUBMISSION_PORT" \
        --sink-port 2526 --milter-port "$MILTER_PORT"
}

build_images() {
    local build=("${PODMAN[@]}" build -q --network host "${LIMITS[@]}" --build-arg "BASE=$BASE_IMAGE")
    # --network host for the builds only: apt-get reaches Debian's mirror. Containers get none.
    "${build[@]}" --build-arg PIP_OPTIONS=--no-index --ignorefile docker/Dockerfile.dockerignore \
        -f docker/Dockerfile -t "$IMAGE:latest" "$CACHE/context" >/dev/null
    "${build[@]}" -t "$IMAGE-postfix:latest" docker/postfix >/dev/null
    "${build[@]}" -t "$IMAGE-knot:latest" docker/knot >/dev/null
    "${build[@]}" -t "$IMAGE-sendmail:latest" "$CACHE/sendmail-context" >/dev/null
}

run_in_pod() {
    local name=$1
    shift
    "${PODMAN[@]}" run -d --pod "$POD" --name "$POD-$name" "${LIMITS[@]}" "$@" >/dev/null
}

start_pod() {
    "${PODMAN[@]}" pod rm -f "$POD" >/dev/null 2>&1 || true
    # Sendmail wants a qualified host name of its own (it waits a minute per retry otherwise).
    "${PODMAN[@]}" pod create --name "$POD" --network none --hostname mx.receiver.example >/dev/null
    SINK_DIR=$(mktemp -d /tmp/authmilter-docker-sink.XXXXXX)
    run_in_pod sink --user 0 --entrypoint /opt/authmilter/bin/python \
        -v "$REPO/tests/integration/sink.py:/opt/sink/sink.py:ro" -v "$SINK_DIR:/var/sink" \
        "$IMAGE:latest" /opt/sink/sink.py --listen 127.0.0.1:2526 --dir /var/sink
    # A copy of the config the tests may rewrite (then SIGHUP), the state directory (history file)
    # owned by the image's authmilter user, and the output in a file: all on the host.
    # "shared" is mounted at the same path, so file names the tests write into the config (signing
    # keys) mean the same inside.
    RUN_DIR=$(mktemp -d /tmp/authmilter-docker-run.XXXXXX)
    cp docker/authmilter.toml "$RUN_DIR/authmilter.toml"
    mkdir "$RUN_DIR/state" "$RUN_DIR/shared"
    chown "$("${PODMAN[@]}" run --rm "${LIMITS[@]}" --entrypoint id "$IMAGE:latest" -u)" \
        "$RUN_DIR/state" "$RUN_DIR/shared"
    run_in_pod authmilter -v "$RUN_DIR/authmilter.toml:/etc/authmilter/authmilter.toml:ro" \
        -v "$RUN_DIR/state:/var/lib/authmilter" -v "$RUN_DIR/shared:$RUN_DIR/shared:ro" \
        --log-driver k8s-file --log-opt "path=$RUN_DIR/authmilter.log" "$IMAGE:latest"
    run_in_pod knot "$IMAGE-knot:latest"
    run_in_pod postfix "$IMAGE-postfix:latest"
    # Its hosts file names the test clients' loopback addresses (Sendmail has no XCLIENT).
    run_in_pod sendmail -v "$CACHE/sendmail-context/hosts:/etc/hosts:ro" "$IMAGE-sendmail:latest"
}

# Runs a host command inside the pod's network namespace (that of its infra container).
in_pod() {
    local infra pid
    infra=$("${PODMAN[@]}" pod inspect --format '{{.InfraContainerID}}' "$POD")
    pid=$("${PODMAN[@]}" inspect --format '{{.State.Pid}}' "$infra")
    nsenter --target "$pid" --net -- "$@"
}

run_trial() {
    in_pod "$VENV_PYTHON" docker/trial.py --smtp "$SMTP" --sink-dir "$SINK_DIR" --timeout 60
    # The tests find messages by Message-ID, but start them from an empty sink all the same.
    find "$SINK_DIR" -mindepth 1 -delete
}

run_tests() {
    # The tests' own Knot takes port 5353 (AUTHMILTER_DNS_PORT) and serves the zones they write.
    "${PODMAN[@]}" stop -t 5 "$POD-knot" >/dev/null
    # shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
    # Rootful podman: the container's authmilter has a host pid the tests can signal.
    local pid
    pid=$("${PODMAN[@]}" inspect --format '{{.State.Pid}}' "$POD-authmilter")
    in_pod env AUTHMILTER_SMTP="$SMTP" AUTHMILTER_SINK_DIR="$SINK_DIR" \
        AUTHMILTER_POSTFIX_EXEC="${PODMAN[*]} exec $POD-postfix" AUTHMILTER_DNS_PORT="$DNS_PORT" \
        AUTHMILTER_PID="$pid" AUTHMILTER_CONFIG="$RUN_DIR/authmilter.toml" \
        AUTHMILTER_STATE_DIR="$RUN_DIR/state" AUTHMILTER_SHARED_DIR="$RUN_DIR/shared" \
        AUTHMILTER_LOG="$RUN_DIR/authmilter.log" AUTHMILTER_MILTER_PORT="$MILTER_PORT" \
        AUTHMILTER_SUBMISSION_PORT="$SUBMISSION_PORT" AUTHMILTER_BARE_SMTP="$BARE_SMTP" \
        AUTHMILTER_SENDMAIL_SMTP="$SENDMAIL_SMTP" AUTHMILTER_SENDMAIL_SUBMISSION_PORT="$SENDMAIL_SUBMISSION_PORT" \
        AUTHMILTER_SENDMAIL_EXEC="${PODMAN[*]} exec $POD-sendmail" \
        "$VENV_PYTHON" -m pytest tests/integration ${PYTEST_ARGS:-}
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ "$status" -ne 0 ] && "${PODMAN[@]}" pod exists "$POD" 2>/dev/null; then
        local name
        for name in sink authmilter knot postfix sendmail; do
            log "--- last log lines of $POD-$name"
            "${PODMAN[@]}" logs --tail 40 "$POD-$name" 2>&1 | sed 's/^/    /' >&2 || true
        done
    fi
    "${PODMAN[@]}" pod rm -f -t 5 "$POD" >/dev/null 2>&1 || true
    [ -z "$SINK_DIR" ] || rm -rf "$SINK_DIR"
    [ -z "$RUN_DIR" ] || rm -rf "$RUN_DIR"
    local timing
    for timing in "${TIMINGS[@]}"; do log "$timing"; done
    exit "$status"
}

write_containers_conf() {
    mkdir -p "$CACHE"
    cat >"$CONTAINERS_CONF" <<'EOF'
# Written by docker/test-docker.sh.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
runtime = "runc"
EOF
}

main() {
    require_tools
    write_containers_conf
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    timed "base image (debootstrap + import, or cached)" build_base
    timed "wheelhouse" stage_context
    timed "Sendmail config" stage_sendmail_context
    timed "image builds" build_images
    timed "pod start" start_pod
    timed "trial (readiness included)" run_trial
    timed "pytest tests/integration" run_tests
}

main "$@"
