#!/bin/sh
# Make sure Vagrant with the libvirt provider, QEMU and a running libvirtd are present, so that
# `virsh -c qemu:///system version` and `vagrant plugin list` work.
#
# Safe to run again: it installs Debian's packages only when a program is missing, installs the
# Python dependencies (python-vagrant, paramiko) only when an import fails, and starts
# virtlogd and libvirtd only when `virsh` cannot reach libvirtd. Daemons started here run in
# the background without a service manager, so the script also works on CI runners that have
# no systemd. Their output goes to $UPDATELAB_LIBVIRTD_LOG (default /var/log/updatelab-libvirtd.log).
#
# Environment:
#   UPDATELAB_LIBVIRTD_WAIT  seconds to wait for a started libvirtd to respond (default 60)
#   UPDATELAB_LIBVIRTD_LOG   log file of the daemons started by this script
#   PYTHON                   Python interpreter to install the dependencies for (default python3)
set -eu

wait_seconds=${UPDATELAB_LIBVIRTD_WAIT:-60}
daemon_log=${UPDATELAB_LIBVIRTD_LOG:-/var/log/updatelab-libvirtd.log}
python=${PYTHON:-python3}
connection=qemu:///system

script_name=ensure-vagrant
# shellcheck source=scripts/common.sh
. "$(dirname "$0")/common.sh"

have() {
    command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]
}

# Program -> Debian package. qemu-system-x86 brings the emulator that libvirt starts,
# qemu-utils brings qemu-img for box images, e2fsprogs brings mke2fs -d for the root filesystem.
missing=""
have vagrant || missing="$missing vagrant"
[ -d /usr/share/vagrant-plugins/plugins.d ] && ls /usr/share/vagrant-plugins/plugins.d/*libvirt* >/dev/null 2>&1 \
    || missing="$missing vagrant-libvirt"
have libvirtd || missing="$missing libvirt-daemon-system"
have virsh || missing="$missing libvirt-clients"
have qemu-system-x86_64 || missing="$missing qemu-system-x86"
have qemu-img || missing="$missing qemu-utils"
have debootstrap || missing="$missing debootstrap"
have mke2fs || missing="$missing e2fsprogs"
have ssh-keygen || missing="$missing openssh-client"
if [ -n "$missing" ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        fail "missing:$missing; apt-get was not found, so install them with this system's package manager"
    fi
    echo "ensure-vagrant: installing$missing with apt-get"
    as_root apt-get update
    # dnsmasq-base serves DHCP on the networks that vagrant-libvirt creates; ovmf is not needed
    # because boxes boot their kernel directly.
    # shellcheck disable=SC2086 # word splitting of the package list is intended
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing dnsmasq-base
fi

if ! "$python" -c "import vagrant, paramiko" >/dev/null 2>&1; then
    echo "ensure-vagrant: installing python-vagrant and paramiko with pip"
    "$python" -m pip install --quiet "python-vagrant>=1.0" "paramiko>=3.0"
fi

# udev normally gives /dev/kvm to the kvm group (mode 0660), and Debian puts libvirt-qemu, the
# user that runs QEMU, in that group. Without udev the node may stay root-only; then QEMU cannot
# use KVM, and libvirtd re-reads QEMU's capabilities on every domain start (about 40 s each).
if [ -c /dev/kvm ] && getent group kvm >/dev/null 2>&1; then
    if [ "$(stat -c %G /dev/kvm)" != kvm ] || [ "$(stat -c %a /dev/kvm)" != 660 ]; then
        echo "ensure-vagrant: giving /dev/kvm to group kvm with mode 0660, as udev does"
        as_root chgrp kvm /dev/kvm
        as_root chmod 0660 /dev/kvm
    fi
fi

if virsh -c "$connection" version >/dev/null 2>&1; then
    echo "ensure-vagrant: libvirtd is running"
    exit 0
fi

if ! pgrep -x virtlogd >/dev/null 2>&1; then
    echo "ensure-vagrant: starting virtlogd in the background"
    as_root sh -c "nohup virtlogd >>'$daemon_log' 2>&1 &"
fi
if ! pgrep -x libvirtd >/dev/null 2>&1; then
    echo "ensure-vagrant: starting libvirtd in the background, log in $daemon_log"
    # A systemd-managed host would run `systemctl start libvirtd`; starting the daemon directly
    # also works on hosts and CI runners without a service manager.
    as_root sh -c "nohup libvirtd >>'$daemon_log' 2>&1 &"
fi

wait_for "$wait_seconds" "$daemon_log" libvirtd virsh -c "$connection" version
echo "ensure-vagrant: libvirtd is running (waited $elapsed s)"
