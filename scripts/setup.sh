#!/bin/sh
# Install everything updatelab needs on a Debian machine, as root, and start Docker.
#
# Safe to run again. It installs Debian packages: Node.js and npm for fetching the agents,
# Python's venv module, Docker and debootstrap for the container lab. It then installs the
# Python package with its test dependencies into .venv, starts the Docker engine, and fetches
# the real MeshAgent binaries of meshcentral 1.1.55 and 0.7.99.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
# The package goes into a virtual environment in the checkout: Debian's own Python refuses
# `pip install` outside one (PEP 668), and other checkouts on the machine stay untouched.
base_python=${BASE_PYTHON:-python3}
venv="$here/.venv"
python="$venv/bin/python"

need=""
command -v npm >/dev/null 2>&1 || need="$need npm"
command -v node >/dev/null 2>&1 || need="$need nodejs"
command -v "$base_python" >/dev/null 2>&1 || need="$need python3"
if command -v "$base_python" >/dev/null 2>&1 && ! "$base_python" -c "import ensurepip, venv" >/dev/null 2>&1; then
    need="$need python3-venv"
fi
if [ -n "$need" ]; then
    echo "setup: installing$need with apt-get"
    apt-get update
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $need
fi

if [ ! -x "$python" ]; then
    echo "setup: creating the virtual environment $venv"
    "$base_python" -m venv "$venv"
fi
echo "setup: installing the updatelab Python package into $venv"
"$python" -m pip install --quiet --upgrade pip
"$python" -m pip install --quiet -e "$here[test]"

sh "$here/scripts/ensure-docker.sh"

echo "setup: fetching the real agents from the meshcentral npm package"
"$python" -m lab agents fetch --version 1.1.55 >/dev/null
"$python" -m lab agents fetch --version 0.7.99 >/dev/null
echo "setup: done. Put updatelab on PATH with: . .venv/bin/activate"
echo "setup: then try: updatelab run --cycles 3, make test or make lab-linux"
