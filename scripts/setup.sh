#!/bin/sh
# Install everything updatelab needs on a Debian machine, as root, and start Docker.
#
# Safe to run again. Steps: Debian packages (Node.js and npm for fetching the agents, Docker
# and debootstrap for the container lab), the Python package with its test dependencies,
# a running Docker engine, and the real MeshAgent binaries of meshcentral 1.1.55 and 0.7.99.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}

need=""
command -v npm >/dev/null 2>&1 || need="$need npm"
command -v node >/dev/null 2>&1 || need="$need nodejs"
if [ -n "$need" ]; then
    echo "setup: installing$need with apt-get"
    apt-get update
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need
fi

echo "setup: installing the updatelab Python package"
"$python" -m pip install --quiet -e "$here[test]"

sh "$here/scripts/ensure-docker.sh"

echo "setup: fetching the real agents from the meshcentral npm package"
"$python" -m lab agents fetch --version 1.1.55 >/dev/null
"$python" -m lab agents fetch --version 0.7.99 >/dev/null
echo "setup: done. Next: make test, or make lab-linux"
