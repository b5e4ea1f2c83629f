#!/usr/bin/env bash
# A real local cluster for tests and development, on loopback only, without docker or systemd:
#
#   Slurm   munged, mariadb + slurmdbd (accounting: sacct works), slurmctld, and four slurmd
#           emulating node1..node4 on this machine; partitions `debug` (default) and `urgent`
#           (higher priority tier: its jobs requeue `debug` jobs).
#   S3      a one-node Ceph cluster (1 monitor, 1 bluestore OSD on a sparse file) and its S3 gateway
#           (radosgw), a user with access keys and a bucket.
#
# Usage: launch/dev_cluster.sh up|down|status [--no-slurm] [--no-s3]  |  gateway stop|start|pause|resume
#   up      start what is not running yet (idempotent), wait until the 4 nodes are idle and the S3
#           endpoint answers, then print the environment as `export` lines on stdout (progress goes
#           to stderr) and write it to $STATE/env.sh. So: eval "$(launch/dev_cluster.sh up)".
#   down    stop the daemons this script started, by the pids it recorded. State is kept: the next
#           `up` restarts the same cluster (job ids, accounting, bucket contents survive).
#   status  say what is running.
#   gateway stop|start|pause|resume
#           the S3 gateway (radosgw) alone, for outage tests; the Ceph daemons and Slurm keep running.
#           stop/start: a server that refuses connections, then comes back (start waits until it
#           answers); pause/resume: SIGSTOP/SIGCONT, a server that accepts connections but hangs.
#
# State: $TSVAE_DEV_CLUSTER_DIR (default: .dev_cluster/ in the repository root). Delete that folder
# after `down` to start from nothing. Needs root (munged runs as user munge, /etc/hosts gets
# node1..node4) and the packages from launch/install_cluster_deps.sh.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
TEMPLATES="$HERE/cluster"
STATE="${TSVAE_DEV_CLUSTER_DIR:-$REPO/.dev_cluster}"
CEPH_ROOT="${TSVAE_CEPH_ROOT:-/opt/tsvae-dist/ceph}"
PIDS="$STATE/pids"

# Ports, all on 127.0.0.1.
SLURMCTLD_PORT=17817
SLURMDBD_PORT=17819
SLURMD_PORTS=17001-17004
MARIADB_PORT=17306
CEPH_MON_PORT=17300
CEPH_MSGR_PORTS=(17400 17479)   # OSD and gateway messengers
RGW_PORT_FIRST=17480            # the gateway takes the first free port from here, kept across restarts

NODES=(node1 node2 node3 node4)
NODE_CPUS=4                     # emulated: oversubscribes the real cores, on purpose
NODE_MEM_MB=4096
BUCKET="${TSVAE_DEV_BUCKET:-tsvae}"
S3_REGION=us-east-1
OSD_SIZE=$((16 * 1024 * 1024 * 1024))   # sparse

CEPH_LIB="$CEPH_ROOT/usr/lib/x86_64-linux-gnu"
CEPH_BIN="$CEPH_ROOT/usr/bin"
CEPH_CONF="$STATE/ceph/ceph.conf"
CEPH_S3_CREDENTIALS="$STATE/ceph/s3_credentials"   # "access secret"; goes with the cluster it was made in
export SLURM_CONF="$STATE/slurm/slurm.conf"
PATH="$PATH:/usr/sbin:/sbin"

log() { echo "dev_cluster: $*" >&2; }
die() { echo "dev_cluster: error: $*" >&2; exit 1; }

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# ---------------------------------------------------------------------------------------------
# Daemons: started detached (own session), pid and binary recorded; stopped only if both match.

# start_daemon NAME LOGFILE CMD...: run CMD in the background as its own session and record its pid
# with the name of the daemon's binary (DAEMON_BIN: "daemon,wrapper" when CMD execs it through a wrapper).
start_daemon() {
    local name=$1 logfile=$2
    shift 2
    local bin=${DAEMON_BIN:-}
    if [[ -z $bin ]]; then
        bin=$(readlink -f "$(command -v "$1")")   # e.g. slurmctld -> slurmctld-wlm
        bin=${bin##*/}
    fi
    # fd 9 is the lock of this script: daemons must not inherit it.
    setsid "$@" </dev/null >>"$logfile" 2>&1 9>&- &
    echo "$! $bin" >"$PIDS/$name.pid"
}

# The binary a pid file names, when that process is alive and runs it.
daemon_pid() {
    local f="$PIDS/$1.pid" pid bin exe
    [[ -f $f ]] || return 1
    read -r pid bin <"$f" || return 1
    [[ -n $pid && -d /proc/$pid ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    # By name (a pid reused by another program is not ours); the wrapper counts until it has exec'd.
    [[ ,$bin, == *",${exe##*/},"* ]] || return 1
    echo "$pid"
}

is_running() { daemon_pid "$1" >/dev/null; }

# Weaker than is_running, for the moments after a start (a wrapper may still be exec'ing):
# the recorded process exists and is not a zombie.
is_alive() {
    local pid stat
    read -r pid _ <"$PIDS/$1.pid" 2>/dev/null || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

# stop_daemons NAME...: SIGTERM to all of them at once, then wait (SIGKILL after 15 s).
stop_daemons() {
    local name pid i
    local -A pids=()
    for name in "$@"; do
        if pid=$(daemon_pid "$name"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids[$name]=$pid
        else
            rm -f "$PIDS/$name.pid"
        fi
    done
    for ((i = 0; i < 150; i++)); do
        for name in "${!pids[@]}"; do
            if [[ ! -d /proc/${pids[$name]} ]]; then
                log "stopped $name (pid ${pids[$name]})"
                rm -f "$PIDS/$name.pid"
                unset "pids[$name]"
            fi
        done
        [[ ${#pids[@]} -eq 0 ]] && return
        sleep 0.1
    done
    for name in "${!pids[@]}"; do
        log "$name (pid ${pids[$name]}) ignored SIGTERM for 15 s: SIGKILL"
        kill -KILL "${pids[$name]}" 2>/dev/null || true
        rm -f "$PIDS/$name.pid"
    done
}

# wait_for SECONDS DAEMON CHECK...: poll CHECK every 0.2 s; give up early when DAEMON (the one
# expected to answer, "-" for none) has exited.
wait_for() {
    local limit=$1 name=$2
    shift 2
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            return 1
        fi
        if [[ $name != - ]] && ! is_alive "$name"; then
            log "$name exited"
            return 1
        fi
        sleep 0.2
    done
}

fail_with_log() {
    local msg=$1
    shift
    local f
    for f in "$@"; do
        [[ -f $f ]] && { echo "---- last lines of $f" >&2; tail -n 25 "$f" >&2; }
    done
    die "$msg"
}

port_free() { [[ -z $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }

# Before starting a daemon: a port taken by something else (e.g. daemons of a state folder that was
# deleted while they ran) would only show up later as a bind error in a log.
need_port() {  # need_port PORT DAEMON
    port_free "$1" || die "port $1 (for $2) is in use by another process: $(ss -Hltnp "sport = :$1" | head -1)"
}

random_hex() { od -An -tx1 -N"$1" /dev/urandom | tr -d ' \n'; }

render() {  # render TEMPLATE OUT KEY=VALUE...
    local tpl=$1 out=$2
    shift 2
    local args=() kv
    for kv in "$@"; do
        args+=(-e "s|@${kv%%=*}@|${kv#*=}|g")
    done
    sed "${args[@]}" "$tpl" >"$out.tmp"
    mv "$out.tmp" "$out"
}

ensure_hosts() {
    local missing=() n
    for n in "${NODES[@]}"; do
        getent hosts "$n" >/dev/null || missing+=("$n")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    [[ -w /etc/hosts ]] || die "/etc/hosts lacks ${missing[*]} -> 127.0.0.1 and is not writable (run as root)"
    echo "127.0.0.1 ${missing[*]}  # tsvae-dist dev cluster" >>/etc/hosts
    log "added ${missing[*]} to /etc/hosts"
}

# ---------------------------------------------------------------------------------------------
# Slurm: munged, mariadb, slurmdbd, slurmctld, 4 x slurmd.

# slurmctld and slurmdbd bind every interface whatever the config says: a bind() shim keeps them on
# loopback. Rebuilt when its source changes.
build_bind_shim() {
    local src="$TEMPLATES/bind_loopback.c" so="$STATE/lib/bind_loopback.so"
    if [[ ! -f $so || $src -nt $so ]]; then
        command -v cc >/dev/null || die "a C compiler is needed for $src: run launch/install_cluster_deps.sh"
        mkdir -p "$STATE/lib"
        cc -shared -fPIC -O2 -Wall -o "$so.tmp" "$src" -ldl || die "compiling $src failed"
        mv "$so.tmp" "$so"
    fi
    BIND_SHIM=$so
}

slurm_render_conf() {
    local dbpass
    dbpass=$(cat "$STATE/mysql/slurm_password")
    render "$TEMPLATES/slurm.conf.in" "$SLURM_CONF" STATE="$STATE" CTLD_PORT=$SLURMCTLD_PORT \
        DBD_PORT=$SLURMDBD_PORT SLURMD_PORTS=$SLURMD_PORTS NODE_CPUS=$NODE_CPUS NODE_MEM_MB=$NODE_MEM_MB
    render "$TEMPLATES/slurmdbd.conf.in" "$STATE/slurm/slurmdbd.conf" STATE="$STATE" \
        DBD_PORT=$SLURMDBD_PORT DB_PORT=$MARIADB_PORT DB_PASS="$dbpass"
    chmod 600 "$STATE/slurm/slurmdbd.conf"   # slurmdbd refuses a readable password file
}

munge_ok() { munge -S "$STATE/munge/munge.socket" -n </dev/null | unmunge -S "$STATE/munge/munge.socket"; }

start_munge() {
    local d="$STATE/munge"
    if is_running munged; then return; fi
    id munge >/dev/null 2>&1 || die "user 'munge' missing: run launch/install_cluster_deps.sh"
    mkdir -p "$d"
    chown munge:munge "$d"
    chmod 755 "$d"
    if [[ ! -s $d/munge.key ]]; then
        dd if=/dev/urandom of="$d/munge.key.tmp" bs=1024 count=1 status=none
        mv "$d/munge.key.tmp" "$d/munge.key"
    fi
    chown munge:munge "$d/munge.key"
    chmod 600 "$d/munge.key"
    rm -f "$d/munge.socket" "$d/munge.socket.lock"
    DAEMON_BIN=munged,setpriv start_daemon munged "$STATE/log/munged.out" setpriv --reuid=munge --regid=munge --init-groups \
        munged -F --socket="$d/munge.socket" --key-file="$d/munge.key" --pid-file="$d/munged.pid" \
        --log-file="$d/munged.log" --seed-file="$d/munged.seed"
    wait_for 15 munged munge_ok || fail_with_log "munged did not start" "$d/munged.log" "$STATE/log/munged.out"
}

mariadb_ok() { mariadb-admin --no-defaults -S "$STATE/mysql/mysqld.sock" -u root ping; }

start_mariadb() {
    local d="$STATE/mysql"
    if is_running mariadb; then return; fi
    if [[ ! -f $d/.initialized ]]; then
        rm -rf "$d"
        mkdir -p "$d/data"
        log "mariadb: creating the accounting database"
        mariadb-install-db --no-defaults --datadir="$d/data" --user=root --auth-root-authentication-method=socket \
            --skip-test-db >"$STATE/log/mariadb-install.out" 2>&1 \
            || fail_with_log "mariadb-install-db failed" "$STATE/log/mariadb-install.out"
        random_hex 16 >"$d/slurm_password"
        chmod 600 "$d/slurm_password"
    fi
    need_port $MARIADB_PORT mariadb
    # Small buffers: the accounting database of a test cluster is tiny.
    start_daemon mariadb "$STATE/log/mariadb.out" mariadbd --no-defaults --user=root --datadir="$d/data" \
        --socket="$d/mysqld.sock" --pid-file="$d/mysqld.pid" --port=$MARIADB_PORT --bind-address=127.0.0.1 \
        --skip-name-resolve --log-error="$STATE/log/mariadb.log" --innodb-buffer-pool-size=16M \
        --innodb-log-file-size=16M --innodb-lock-wait-timeout=900 --performance-schema=OFF --max-connections=50 \
        --aria-pagecache-buffer-size=8M --key-buffer-size=1M --query-cache-size=0 --table-open-cache=200
    wait_for 30 mariadb mariadb_ok || fail_with_log "mariadb did not start" "$STATE/log/mariadb.log"
    if [[ ! -f $d/.initialized ]]; then
        local pw
        pw=$(cat "$d/slurm_password")
        mariadb --no-defaults -S "$d/mysqld.sock" -u root -e "
            CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
            CREATE DATABASE IF NOT EXISTS slurm_acct_db;
            GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
            FLUSH PRIVILEGES;"
        touch "$d/.initialized"
    fi
}

slurmdbd_ok() { sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
    if is_running slurmdbd; then return; fi
    need_port $SLURMDBD_PORT slurmdbd
    # slurmdbd reads slurmdbd.conf from the folder of $SLURM_CONF.
    LD_PRELOAD=$BIND_SHIM start_daemon slurmdbd "$STATE/log/slurmdbd.out" slurmdbd -D
    wait_for 30 slurmdbd slurmdbd_ok \
        || fail_with_log "slurmdbd did not start" "$STATE/slurm/log/slurmdbd.log" "$STATE/log/slurmdbd.out"
    # Register the cluster before the controller connects, so its first jobs are accounted too.
    if [[ -z $(sacctmgr -n -P list cluster format=cluster where cluster=tsvae-dev 2>/dev/null) ]]; then
        sacctmgr -i add cluster tsvae-dev >/dev/null
    fi
}

start_slurmctld() {
    if is_running slurmctld; then return; fi
    need_port $SLURMCTLD_PORT slurmctld
    # -i: ignore state-file errors (e.g. after a crash) instead of refusing to start.
    LD_PRELOAD=$BIND_SHIM start_daemon slurmctld "$STATE/log/slurmctld.out" slurmctld -D -i -f "$SLURM_CONF"
    wait_for 30 slurmctld scontrol ping \
        || fail_with_log "slurmctld did not start" "$STATE/slurm/log/slurmctld.log" "$STATE/log/slurmctld.out"
}

start_slurmds() {
    local n i=0 first=${SLURMD_PORTS%-*}
    for n in "${NODES[@]}"; do
        i=$((i + 1))
        is_running "slurmd-$n" && continue
        need_port $((first + i - 1)) "slurmd $n"
        mkdir -p "$STATE/slurm/spool/$n"
        start_daemon "slurmd-$n" "$STATE/log/slurmd-$n.out" slurmd -D -N "$n" -f "$SLURM_CONF"
    done
}

# All four nodes idle (or allocated/mixed: they are up and usable).
nodes_ready() {
    local states
    states=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | sort -u) || return 1
    [[ $(grep -cE ' (idle|alloc|mix|comp)$' <<<"$states") -eq ${#NODES[@]} ]]
}

wait_nodes() {
    if ! wait_for 45 - slurm_nodes_settle; then
        sinfo -N >&2 || true
        fail_with_log "the 4 slurmd did not register" "$STATE/slurm/log/slurmd-node1.log" \
            "$STATE/log/slurmd-node1.out" "$STATE/slurm/log/slurmctld.log"
    fi
}

# Nodes left down/drained by an unclean stop come back without waiting for an operator.
slurm_nodes_settle() {
    local bad
    bad=$(sinfo -h -N -p debug -o '%N %t' 2>/dev/null | awk '$2 ~ /^(down|drain|drng|fail)/ {print $1}' | sort -u)
    if [[ -n $bad ]]; then
        scontrol update nodename="$(paste -sd, <<<"$bad")" state=resume >/dev/null 2>&1 || true
    fi
    nodes_ready
}

slurm_up() {
    command -v slurmctld >/dev/null || die "slurm is not installed: run launch/install_cluster_deps.sh"
    mkdir -p "$STATE/slurm/"{state,run,log,tmp,spool} "$STATE/log" "$PIDS"
    ensure_hosts
    start_munge
    start_mariadb
    slurm_render_conf
    build_bind_shim
    start_slurmdbd
    start_slurmctld
    start_slurmds
    wait_nodes
    log "slurm: 4 nodes up (partitions debug, urgent)"
}

# Jobs of this cluster outlive slurmd (their slurmstepd keep running): cancel them first.
cancel_jobs() {
    local jobs i
    is_running slurmctld || return 0
    jobs=$(squeue -h -o %i 2>/dev/null | paste -sd' ') || return 0
    [[ -n $jobs ]] || return 0
    log "cancelling jobs $jobs"
    scancel $jobs 2>/dev/null || true
    # scancel: SIGTERM, then SIGKILL after KillWait (10 s).
    for ((i = 0; i < 150; i++)); do
        [[ -z $(squeue -h -o %i 2>/dev/null) ]] && return 0
        sleep 0.1
    done
    log "jobs still ending: $(squeue -h -o '%i %T' | paste -sd' ')"
}

slurm_down() {
    cancel_jobs
    # Clients before servers: slurmd and slurmctld still report to slurmdbd, which needs mariadb.
    stop_daemons "${NODES[@]/#/slurmd-}" slurmctld
    stop_daemons slurmdbd
    stop_daemons mariadb munged
}

# ---------------------------------------------------------------------------------------------
# Ceph: monitor, OSD, gateway; the packages are unpacked in $CEPH_ROOT, not installed.

ceph() {  # run a ceph binary with the unpacked libraries
    local b=$1
    shift
    LD_LIBRARY_PATH="$CEPH_LIB:$CEPH_LIB/ceph:$CEPH_ROOT/lib/x86_64-linux-gnu" "$CEPH_BIN/$b" -c "$CEPH_CONF" "$@"
}

ceph_render_conf() {
    render "$TEMPLATES/ceph.conf.in" "$CEPH_CONF" STATE="$STATE" FSID="$(cat "$STATE/ceph/fsid")" \
        MON_PORT=$CEPH_MON_PORT MSGR_PORT_MIN="${CEPH_MSGR_PORTS[0]}" MSGR_PORT_MAX="${CEPH_MSGR_PORTS[1]}" \
        CEPH_LIB="$CEPH_LIB" OSD_SIZE=$OSD_SIZE RGW_PORT="$(cat "$STATE/ceph/rgw_port")"
}

# Keys, monitor map and an OSD map that already holds osd.0, so that no `ceph` CLI (python) is needed.
ceph_bootstrap() {
    local c="$STATE/ceph" p
    log "ceph: creating a one-node cluster"
    rm -rf "$c"
    mkdir -p "$c"/{run,log,crash}
    cat /proc/sys/kernel/random/uuid >"$c/fsid"
    p=$RGW_PORT_FIRST
    while ! port_free "$p"; do p=$((p + 1)); done
    echo "$p" >"$c/rgw_port"
    ceph_render_conf
    ceph ceph-authtool --create-keyring "$c/keyring.mon.a" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph ceph-authtool --create-keyring "$c/keyring.client.admin" --gen-key -n client.admin \
        --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' >/dev/null
    ceph ceph-authtool --create-keyring "$c/keyring.osd.0" --gen-key -n osd.0 \
        --cap mon 'allow profile osd' --cap osd 'allow *' >/dev/null
    ceph ceph-authtool --create-keyring "$c/keyring.client.rgw.gw" --gen-key -n client.rgw.gw \
        --cap mon 'allow rw' --cap osd 'allow rwx' >/dev/null
    for p in client.admin osd.0 client.rgw.gw; do
        ceph ceph-authtool "$c/keyring.mon.a" --import-keyring "$c/keyring.$p" >/dev/null
    done
    ceph monmaptool --create --fsid "$(cat "$c/fsid")" --addv a "[v2:127.0.0.1:$CEPH_MON_PORT]" "$c/monmap" >/dev/null
    ceph osdmaptool --createsimple 1 "$c/osdmap" >/dev/null 2>&1
    ceph ceph-mon --mkfs -i a --monmap "$c/monmap" --osdmap "$c/osdmap" --keyring "$c/keyring.mon.a" \
        >"$STATE/log/ceph-mkfs.out" 2>&1 || fail_with_log "ceph-mon --mkfs failed" "$STATE/log/ceph-mkfs.out"
    mkdir -p "$c/osd.0"
    cp "$c/keyring.osd.0" "$c/osd.0/keyring"
    ceph ceph-osd -i 0 --mkfs --no-mon-config --osd-uuid "$(cat /proc/sys/kernel/random/uuid)" \
        >>"$STATE/log/ceph-mkfs.out" 2>&1 || fail_with_log "ceph-osd --mkfs failed" "$STATE/log/ceph-mkfs.out"
    touch "$c/.bootstrapped"
}

rgw_url() { echo "http://127.0.0.1:$(cat "$STATE/ceph/rgw_port")"; }

rgw_ok() { curl -s --noproxy '*' -o /dev/null --max-time 2 "$(rgw_url)/"; }

# A signed S3 request: curl's SigV4 (radosgw also wants the payload hash header).
s3_request() {  # s3_request HEAD|PUT PATH
    local ak sk method=(-X "$1")
    [[ $1 == HEAD ]] && method=(-I)   # -X HEAD would wait for a body
    read -r ak sk <"$CEPH_S3_CREDENTIALS"
    curl -s --noproxy '*' --max-time 10 -o /dev/null -w '%{http_code}' "${method[@]}" \
        --aws-sigv4 "aws:amz:$S3_REGION:s3" --user "$ak:$sk" -H 'x-amz-content-sha256: UNSIGNED-PAYLOAD' \
        "$(rgw_url)$2"
}

s3_setup_user_and_bucket() {
    local code
    if [[ ! -f $CEPH_S3_CREDENTIALS ]]; then
        local ak sk
        ak=$(random_hex 10 | tr 'a-f' 'A-F')
        sk=$(random_hex 20)
        ceph radosgw-admin -n client.admin user create --uid tsvae --display-name "tsvae-dist tests" \
            --access-key "$ak" --secret-key "$sk" >"$STATE/log/rgw-user.out" 2>&1 \
            || fail_with_log "radosgw-admin user create failed" "$STATE/log/rgw-user.out"
        echo "$ak $sk" >"$CEPH_S3_CREDENTIALS.tmp"
        chmod 600 "$CEPH_S3_CREDENTIALS.tmp"
        mv "$CEPH_S3_CREDENTIALS.tmp" "$CEPH_S3_CREDENTIALS"
    fi
    code=$(s3_request HEAD "/$BUCKET") || true
    if [[ $code != 200 ]]; then
        code=$(s3_request PUT "/$BUCKET") || true
        [[ $code == 200 ]] || fail_with_log "creating bucket '$BUCKET' failed (HTTP $code)" "$STATE/ceph/log/rgw.log"
    fi
}

ceph_up() {
    [[ -x $CEPH_BIN/radosgw ]] || die "ceph is not unpacked in $CEPH_ROOT: run launch/install_cluster_deps.sh"
    mkdir -p "$STATE/log" "$PIDS"
    if [[ ! -f $STATE/ceph/.bootstrapped ]]; then
        ceph_bootstrap
    else
        ceph_render_conf
    fi
    local c="$STATE/ceph"
    # Only the ceph daemons see the unpacked libraries.
    local LD_LIBRARY_PATH="$CEPH_LIB:$CEPH_LIB/ceph:$CEPH_ROOT/lib/x86_64-linux-gnu"
    export LD_LIBRARY_PATH
    # glibc returned each freed multi-MB buffer to the kernel and faulted it back in on the next
    # request: these keep them in the heap (a 16 MB GET: ~26 -> ~17 ms of gateway + OSD CPU).
    local GLIBC_TUNABLES="glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
    export GLIBC_TUNABLES
    if ! is_running ceph-mon; then
        need_port $CEPH_MON_PORT ceph-mon
        start_daemon ceph-mon "$STATE/log/ceph-mon.out" "$CEPH_BIN/ceph-mon" -c "$CEPH_CONF" -f -i a
    fi
    if ! is_running ceph-osd; then
        start_daemon ceph-osd "$STATE/log/ceph-osd.out" "$CEPH_BIN/ceph-osd" -c "$CEPH_CONF" -f -i 0
    fi
    if ! is_running radosgw; then
        need_port "$(cat "$c/rgw_port")" radosgw
        start_daemon radosgw "$STATE/log/radosgw.out" "$CEPH_BIN/radosgw" -c "$CEPH_CONF" -f -n client.rgw.gw
    fi
    wait_for 60 radosgw rgw_ok || fail_with_log "the S3 gateway did not answer on $(rgw_url)" \
        "$c/log/rgw.log" "$STATE/log/radosgw.out" "$c/log/osd.0.log" "$c/log/mon.a.log"
    s3_setup_user_and_bucket
    log "s3: $(rgw_url) bucket '$BUCKET'"
}

ceph_down() {
    # In this order: the gateway hangs without its OSD, the OSD reports its exit to the monitor.
    stop_daemons radosgw
    stop_daemons ceph-osd
    stop_daemons ceph-mon
}

# ---------------------------------------------------------------------------------------------
# Environment for clients.

slurm_is_up() { is_running slurmctld && is_running slurmdbd; }
s3_is_up() { is_running radosgw && [[ -f $CEPH_S3_CREDENTIALS ]]; }

print_env() {
    local ak sk url
    {
        echo "# tsvae-dist dev cluster ($STATE); source this file or eval the output of 'dev_cluster.sh up'"
        echo "export TSVAE_DEV_CLUSTER_DIR=$STATE"
        if slurm_is_up; then
            echo "export SLURM_CONF=$SLURM_CONF"
        fi
        if s3_is_up; then
            read -r ak sk <"$CEPH_S3_CREDENTIALS"
            url=$(rgw_url)
            echo "export AWS_ACCESS_KEY_ID=$ak"
            echo "export AWS_SECRET_ACCESS_KEY=$sk"
            echo "export AWS_DEFAULT_REGION=$S3_REGION"
            echo "export AWS_ENDPOINT_URL=$url"
            echo "export AWS_ENDPOINT_URL_S3=$url"
            echo "export FSSPEC_S3_ENDPOINT_URL=$url"
            echo "export TSVAE_S3_ENDPOINT_URL=$url"
            echo "export TSVAE_S3_BUCKET=$BUCKET"
        fi
    } >"$STATE/env.sh.tmp"
    mv "$STATE/env.sh.tmp" "$STATE/env.sh"
    cat "$STATE/env.sh"
}

# ---------------------------------------------------------------------------------------------

cmd_up() {
    [[ $(id -u) -eq 0 ]] || die "run as root (munged runs as user munge; /etc/hosts gets node1..node4)"
    mkdir -p "$STATE/log" "$PIDS"
    local t0=$SECONDS
    if [[ $WANT_SLURM -eq 1 && $WANT_S3 -eq 1 ]]; then
        # Independent: bring both up at once, report the first failure.
        local s3_out="$STATE/log/up-s3.out" s3_pid rc=0
        ( ceph_up ) 2>"$s3_out" &
        s3_pid=$!
        slurm_up || rc=$?
        if ! wait "$s3_pid"; then
            cat "$s3_out" >&2
            die "S3 did not come up"
        fi
        cat "$s3_out" >&2
        [[ $rc -eq 0 ]] || exit "$rc"
    elif [[ $WANT_SLURM -eq 1 ]]; then
        slurm_up
    elif [[ $WANT_S3 -eq 1 ]]; then
        ceph_up
    fi
    log "up in $((SECONDS - t0)) s; environment in $STATE/env.sh"
    print_env
}

cmd_down() {
    local s3_pid=
    [[ -d $PIDS ]] || return 0
    if [[ $WANT_S3 -eq 1 ]]; then
        ceph_down &
        s3_pid=$!
    fi
    [[ $WANT_SLURM -eq 1 ]] && slurm_down
    [[ -n $s3_pid ]] && wait "$s3_pid"
    [[ -d $STATE ]] && rm -f "$STATE/env.sh"
    return 0
}

cmd_status() {
    local names=() n pid rss any=0
    [[ $WANT_SLURM -eq 1 ]] && names+=(munged mariadb slurmdbd slurmctld "${NODES[@]/#/slurmd-}")
    [[ $WANT_S3 -eq 1 ]] && names+=(ceph-mon ceph-osd radosgw)
    for n in "${names[@]}"; do
        if pid=$(daemon_pid "$n"); then
            rss=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo '?')
            printf '%-14s running  pid %-7s rss %6s MiB\n' "$n" "$pid" "$((rss / 1024))"
            any=1
        else
            printf '%-14s stopped\n' "$n"
        fi
    done
    if [[ $WANT_SLURM -eq 1 ]] && is_running slurmctld; then
        sinfo -o '%P %a %D %t %N' || true
    fi
    if [[ $WANT_S3 -eq 1 ]] && is_running radosgw; then
        if rgw_ok; then echo "s3 endpoint $(rgw_url): answering"; else echo "s3 endpoint $(rgw_url): not answering"; fi
    fi
    [[ $any -eq 1 ]]
}

cmd_gateway() {
    local pid
    case "$GATEWAY_ACTION" in
        stop) stop_daemons radosgw ;;
        start) ceph_up ;;   # starts only what is not running, then waits for the endpoint
        pause | resume)
            pid=$(daemon_pid radosgw) || die "radosgw is not running"
            if [[ $GATEWAY_ACTION == pause ]]; then kill -STOP "$pid"; else kill -CONT "$pid"; fi
            log "radosgw (pid $pid): ${GATEWAY_ACTION}d"
            ;;
        *) usage ;;
    esac
}

[[ $# -ge 1 ]] || usage
ACTION=$1
shift
GATEWAY_ACTION=
if [[ $ACTION == gateway ]]; then
    [[ $# -ge 1 ]] || usage
    GATEWAY_ACTION=$1
    shift
fi
WANT_SLURM=1
WANT_S3=1
for arg in "$@"; do
    case "$arg" in
        --no-slurm) WANT_SLURM=0 ;;
        --no-s3) WANT_S3=0 ;;
        *) usage ;;
    esac
done

# One `up` or `down` at a time (test sessions may start at once).
lock() {
    mkdir -p "$STATE"
    exec 9>"$STATE/.lock"
    flock -w 300 9 || die "another dev_cluster.sh holds $STATE/.lock"
}

case "$ACTION" in
    up) lock; cmd_up ;;
    down) lock; cmd_down ;;
    status) cmd_status ;;
    gateway) lock; cmd_gateway ;;
    *) usage ;;
esac
