#!/usr/bin/env bash
# Install what launch/dev_cluster.sh needs, from Debian 12's own packages. Run as root; idempotent
# (a few seconds when everything is already there); `apt-get update` only when apt has to.
#
#   Slurm + accounting: slurmctld slurmd slurm-client munge slurmdbd mariadb-server, plus curl and a C
#                       compiler (installed normally; no daemon is started: dev_cluster.sh starts its
#                       own, by hand).
#   Ceph (radosgw):     ceph-mon ceph-osd radosgw and whatever they need that is not installed yet are
#                       downloaded and unpacked with `dpkg -x` into $TSVAE_CEPH_ROOT (default
#                       /opt/tsvae-dist/ceph) rather than installed: no maintainer scripts, no system
#                       users or units, nothing outside that folder changes.
#
# Usage: bash launch/install_cluster_deps.sh [--no-slurm] [--no-s3]
set -euo pipefail

CEPH_ROOT="${TSVAE_CEPH_ROOT:-/opt/tsvae-dist/ceph}"
WANT_SLURM=1
WANT_S3=1
for arg in "$@"; do
    case "$arg" in
        --no-slurm) WANT_SLURM=0 ;;
        --no-s3) WANT_S3=0 ;;
        -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
        *) echo "install_cluster_deps.sh: unknown argument '$arg' (use --no-slurm, --no-s3)" >&2; exit 2 ;;
    esac
done

# gcc + libc6-dev: dev_cluster.sh compiles a 40-line bind() shim that keeps slurmctld and slurmdbd
# on loopback.
SLURM_PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server curl gcc libc6-dev iproute2)
# The commands dev_cluster.sh runs; all present means nothing to install.
SLURM_CMDS=(slurmctld slurmd sbatch srun sacct sacctmgr scontrol munged munge unmunge slurmdbd
    mariadbd mariadb-install-db mariadb curl cc setpriv flock ss)
CEPH_PKGS=(ceph-mon ceph-osd radosgw ceph-common ceph-base)
# Bump when the set of unpacked packages changes, so an older unpacked tree is redone.
CEPH_LAYOUT=1

export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0

log() { echo "install_cluster_deps: $*" >&2; }

need_root() {
    if [[ $(id -u) -ne 0 ]]; then
        log "must run as root (it installs Debian packages); try: sudo bash $0 $*"
        exit 1
    fi
}

apt_update_once() {
    if [[ $APT_UPDATED -eq 0 ]]; then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=1
    fi
}

# Package lists missing (fresh image) or stale (a candidate cannot be found): update first.
apt_ready_for() {
    local p out
    for p in "$@"; do
        out=$(apt-cache policy "$p" 2>/dev/null || true)
        [[ $out == *"Candidate: "[0-9]* ]] || return 1
    done
}

# Run an apt-get command; when it fails on stale lists, update once and retry.
apt_retry() {
    if ! "$@"; then
        [[ $APT_UPDATED -eq 1 ]] && return 1
        apt_update_once
        "$@"
    fi
}

install_slurm() {
    local missing=()
    local c
    for c in "${SLURM_CMDS[@]}"; do
        command -v "$c" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin" command -v "$c" >/dev/null 2>&1 \
            || missing+=("$c")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "slurm, munge, mariadb: already installed"
        return
    fi
    log "installing ${SLURM_PKGS[*]} (missing: ${missing[*]})"
    apt_ready_for "${SLURM_PKGS[@]}" || apt_update_once
    # policy-rc.d keeps maintainer scripts from starting daemons on a machine that has an init system.
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        created_policy=1
    fi
    apt_retry apt-get install -y -qq --no-install-recommends "${SLURM_PKGS[@]}" >&2
    [[ $created_policy -eq 1 ]] && rm -f "$policy"
    return 0
}

ceph_env_ok() {
    [[ -f $CEPH_ROOT/.layout && $(cat "$CEPH_ROOT/.layout") == "$CEPH_LAYOUT" ]] || return 1
    local lib="$CEPH_ROOT/usr/lib/x86_64-linux-gnu"
    local ldp="$lib:$lib/ceph:$CEPH_ROOT/lib/x86_64-linux-gnu"
    local b out
    for b in ceph-mon ceph-osd radosgw radosgw-admin ceph-authtool monmaptool osdmaptool; do
        [[ -x $CEPH_ROOT/usr/bin/$b ]] || return 1
        out=$(LD_LIBRARY_PATH="$ldp" ldd "$CEPH_ROOT/usr/bin/$b" 2>&1) || return 1
        [[ $out != *"not found"* ]] || return 1
    done
}

install_ceph() {
    if ceph_env_ok; then
        log "ceph (unpacked in $CEPH_ROOT): already there"
        return
    fi
    apt_ready_for "${CEPH_PKGS[@]}" || apt_update_once
    # What apt would install on this machine: the packages plus their missing dependencies.
    local pkgs
    pkgs=$(apt-get install -s --no-install-recommends "${CEPH_PKGS[@]}" 2>/dev/null | awk '/^Inst /{print $2}') \
        || true
    if [[ -z $pkgs ]]; then
        apt_update_once
        pkgs=$(apt-get install -s --no-install-recommends "${CEPH_PKGS[@]}" | awk '/^Inst /{print $2}')
    fi
    # Installed already (e.g. ceph from another source): still unpack ours, so the folder is complete.
    pkgs=$(printf '%s\n' $pkgs "${CEPH_PKGS[@]}" librados2 librgw2 libradosstriper1 | sort -u)
    local dl
    dl=$(mktemp -d)
    # apt downloads as its sandbox user when that user can write the folder.
    if id _apt >/dev/null 2>&1; then chown _apt "$dl"; fi
    log "downloading $(echo "$pkgs" | wc -l) packages for ceph into $dl"
    (cd "$dl" && apt_retry apt-get download -qq $pkgs >&2)
    local tmp_root="$CEPH_ROOT.tmp.$$"
    rm -rf "$tmp_root"
    mkdir -p "$tmp_root"
    local f
    for f in "$dl"/*.deb; do
        dpkg -x "$f" "$tmp_root"
    done
    rm -rf "$dl"
    echo "$CEPH_LAYOUT" >"$tmp_root/.layout"
    rm -rf "$CEPH_ROOT"
    mkdir -p "$(dirname "$CEPH_ROOT")"
    mv "$tmp_root" "$CEPH_ROOT"
    if ! ceph_env_ok; then
        log "unpacked ceph in $CEPH_ROOT but its binaries miss libraries:"
        LD_LIBRARY_PATH="$CEPH_ROOT/usr/lib/x86_64-linux-gnu:$CEPH_ROOT/usr/lib/x86_64-linux-gnu/ceph:$CEPH_ROOT/lib/x86_64-linux-gnu" \
            ldd "$CEPH_ROOT/usr/bin/radosgw" "$CEPH_ROOT/usr/bin/ceph-osd" | grep 'not found' >&2 || true
        exit 1
    fi
    log "ceph unpacked in $CEPH_ROOT"
}

need_root "$@"
[[ $WANT_SLURM -eq 1 ]] && install_slurm
[[ $WANT_S3 -eq 1 ]] && install_ceph
exit 0
