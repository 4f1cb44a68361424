#!/usr/bin/env bash
# Provision a Debian 12 machine (bare metal, Vagrant VM or CI) for NFActor-XDP.
# Idempotent; run as root.  Usage: vm/provision.sh [PROJECT_DIR]
set -euo pipefail

PROJECT_DIR=$(cd "${1:-$(dirname "$0")/..}" && pwd)
VENV=${NFACTOR_VENV:-$PROJECT_DIR/.venv}

if [ "$(id -u)" -ne 0 ]; then
    echo "provision.sh: must run as root (it installs packages and mounts bpffs)" >&2
    exit 1
fi

log() { printf '[provision] %s\n' "$*"; }

# 1. Debian packages.  python3-bpfcc is built for /usr/bin/python3 only.
PKGS=(python3-bpfcc bpfcc-tools linux-headers-amd64 python3-venv python3-pip
      iproute2 iputils-ping bpftool tcpdump ethtool procps curl git
      systemd util-linux   # systemd-analyze (the unit's check), setpriv (its sandbox in the tests)
      etcd-server)         # --store etcd; the tests start their own members on free ports
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# 2. Kernel headers for BCC.  When the running kernel has none, point BCC at the
#    distribution's headers: XDP programs only use UAPI structs, so a version
#    mismatch is harmless for them.
KDIR=/lib/modules/$(uname -r)
if [ ! -e "$KDIR/build/include" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$hdr" ] || [ -z "$common" ]; then
        echo "provision.sh: no kernel headers under /usr/src" >&2
        exit 1
    fi
    log "linking $KDIR/{build,source} -> $hdr, $common"
    mkdir -p "$KDIR"
    ln -sfn "$hdr" "$KDIR/build"
    ln -sfn "$common" "$KDIR/source"
fi

# 3. bpffs, where the node pins its maps.
if ! mountpoint -q /sys/fs/bpf; then
    log "mounting bpffs on /sys/fs/bpf"
    mount -t bpf bpf /sys/fs/bpf
fi

# 3b. tracefs, so the node can count redirects the kernel failed after XDP.
if [ ! -d /sys/kernel/tracing/events ]; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || log "warning: cannot mount tracefs"
fi

# 4. A venv on the system Python (the one BCC is built for) that sees bcc.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
    log "creating venv $VENV"
    rm -rf "$VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
if ! "$VENV/bin/python" -c 'import nfactor_xdp, pytest, scapy, pyroute2, msgpack, click, prometheus_client, matplotlib' 2>/dev/null \
   || [ "$PROJECT_DIR/pyproject.toml" -nt "$VENV/.installed" ]; then
    log "installing the project (editable, with the test and plot extras)"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q -e "$PROJECT_DIR[test,plot]"
    touch "$VENV/.installed"
fi
ln -sfn "$VENV/bin/nfactorctl" /usr/local/bin/nfactorctl 2>/dev/null || true
log "ready: $VENV (nfactorctl on PATH)"
