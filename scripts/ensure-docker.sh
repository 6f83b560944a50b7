#!/bin/sh
# Make sure a Docker engine is installed and running, so that `docker info` works.
#
# Safe to run again: it installs Debian's docker.io and debootstrap only when `docker`,
# `dockerd` or `debootstrap` is missing, and starts dockerd only when `docker info` fails.
# A dockerd started here runs in the background and logs to $UPDATELAB_DOCKERD_LOG
# (default /var/log/updatelab-dockerd.log).
#
# Environment:
#   UPDATELAB_DOCKERD_WAIT  seconds to wait for a started dockerd to respond (default 60)
#   UPDATELAB_DOCKERD_LOG   log file of a dockerd started by this script
set -eu

wait_seconds=${UPDATELAB_DOCKERD_WAIT:-60}
dockerd_log=${UPDATELAB_DOCKERD_LOG:-/var/log/updatelab-dockerd.log}

script_name=ensure-docker
# shellcheck source=scripts/common.sh
. "$(dirname "$0")/common.sh"

install_packages() {
    if ! command -v apt-get >/dev/null 2>&1; then
        fail "missing: $*; apt-get was not found, so install them with this system's package manager"
    fi
    echo "ensure-docker: installing $* with apt-get"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

missing=""
command -v docker >/dev/null 2>&1 || missing="$missing docker.io"
if ! command -v dockerd >/dev/null 2>&1 && [ ! -x /usr/sbin/dockerd ]; then
    case "$missing" in *docker.io*) ;; *) missing="$missing docker.io" ;; esac
fi
if ! command -v debootstrap >/dev/null 2>&1 && [ ! -x /usr/sbin/debootstrap ]; then
    missing="$missing debootstrap"
fi
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    install_packages $missing
fi

if docker info >/dev/null 2>&1; then
    echo "ensure-docker: Docker engine is running"
    exit 0
fi

# `docker info` fails: either dockerd is not running, or this user may not use its socket.
if pgrep -x dockerd >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ] && ! as_root docker info >/dev/null 2>&1; then
        fail "dockerd is running but does not respond to 'docker info'; see its log"
    fi
    if [ "$(id -u)" -ne 0 ]; then
        fail "dockerd is running but user $(id -un) may not use /var/run/docker.sock; add the user to the 'docker' group or run the lab as root"
    fi
else
    dockerd_path=$(command -v dockerd || echo /usr/sbin/dockerd)
    echo "ensure-docker: starting $dockerd_path in the background, log in $dockerd_log"
    # A systemd-managed host would normally run `systemctl start docker`; this script also
    # works on hosts and CI runners without a service manager, so it starts dockerd directly.
    as_root sh -c "nohup '$dockerd_path' >>'$dockerd_log' 2>&1 &"
fi

wait_for "$wait_seconds" "$dockerd_log" dockerd docker info
echo "ensure-docker: Docker engine is running (waited $elapsed s)"
