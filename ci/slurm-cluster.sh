#!/usr/bin/env bash
# A real single-host Slurm cluster (Debian 12, Slurm 22.05) for the tests in tests/test_slurm.py.
#
#   ci/slurm-cluster.sh start [1|2]   install if missing, configure, start; 2 = two simulated nodes
#                                     n1, n2 on this host (default 2). Same layout again: no-op;
#                                     another layout: restart.
#   ci/slurm-cluster.sh stop          stop the daemons this script started (by their pid files)
#   ci/slurm-cluster.sh status        daemons and nodes; exit 1 if the cluster is not up
#
# Needs root and no systemd (daemons are started directly). Non-interactive: safe in CI.
# Env: CLUSTER_START_TIMEOUT (s, default 30) bounds the wait for idle nodes.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
CGROUP_CONF=/etc/slurm/cgroup.conf
GRES_CONF=/etc/slurm/gres.conf
FAKE_GPUS=/run/slurm-fake-gpu  # gpu0, gpu1: symlinks to /dev/null, so jobs get CUDA_VISIBLE_DEVICES
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurmctld.pid
# slurmd pid files are /run/slurmd-<node>.pid (SlurmdPidFile=/run/slurmd-%n.pid)

die() { echo "slurm-cluster: $*" >&2; exit 1; }
say() { echo "slurm-cluster: $*" >&2; }

# A pid file's process, if it is alive and still the named program (guards against pid reuse).
# A killed daemon whose parent never reaped it is a zombie that still has its name: not alive.
live_pid() {  # <pidfile> <comm>
    local pid state
    [[ -r $1 ]] || return 1
    pid=$(tr -dc 0-9 <"$1")
    [[ -n $pid && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]] || return 1
    state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
    [[ -n $state && $state != Z ]] || return 1
    echo "$pid"
}

# SIGTERM to every daemon at once (each takes ~2 s to exit), then wait for all; SIGKILL after 10 s.
stop_pidfiles() {  # <pidfile:comm>...
    local entry pid alive pids=()
    for entry in "$@"; do
        if pid=$(live_pid "${entry%%:*}" "${entry##*:}"); then
            kill "$pid"
            pids+=("$pid")
        fi
        rm -f "${entry%%:*}"
    done
    for _ in $(seq 100); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || return 0
        sleep 0.1
    done
    say "daemons ${pids[*]} ignored SIGTERM for 10 s; sending SIGKILL"
    kill -9 "${pids[@]}" 2>/dev/null || true
}

# The cores this host gives us. Plain `nproc` obeys OMP_NUM_THREADS (and OMP_THREAD_LIMIT): with
# OMP_NUM_THREADS=1 in the environment every node would get CPUs=1 and multi-task jobs could not start.
host_cpus() {
    env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc
}

nodes_of() {  # <layout>
    if [[ $1 == 1 ]]; then echo n1; else echo n1 n2; fi
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sinfo >/dev/null &&
        command -v munged >/dev/null && return 0
    say "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null
    # "invoke-rc.d: policy-rc.d denied execution" is expected: there is no init system to start them.
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge </dev/null >/dev/null
}

# The slurm.conf for a layout, on stdout. Every node is this host, told apart by its port.
render_conf() {  # <layout>
    local host cpus mem proctrack port=6818 nodes
    host=$(uname -n)
    cpus=$(host_cpus)
    # Claim a bit less memory than slurmd measures so the node is never drained for it.
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$(( mem * 9 / 10 ))
    # cgroup proctrack kills a job's whole process tree and signals like real clusters do;
    # linuxproc (the fallback without cgroup v1) can leak orphans.
    if [[ -d /sys/fs/cgroup/freezer ]]; then proctrack=cgroup; else proctrack=linuxproc; fi
    nodes=$(nodes_of "$1")
    cat <<EOF
# Written by ci/slurm-cluster.sh (layout: $1 node(s)).
ClusterName=localcluster
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/$proctrack
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
GresTypes=gpu
KillWait=10
MinJobAge=300
EOF
    for n in $nodes; do
        echo "NodeName=$n NodeHostname=$host NodeAddr=127.0.0.1 Port=$port CPUs=$cpus RealMemory=$mem Gres=gpu:2 State=UNKNOWN"
        port=$((port + 1))
    done
    echo "PartitionName=debug Nodes=${nodes// /,} Default=YES MaxTime=INFINITE State=UP"
}

render_gres_conf() {
    echo "Name=gpu File=$FAKE_GPUS/gpu[0-1]"
}

render_cgroup_conf() {
    printf '%s\n' CgroupPlugin=cgroup/v1 CgroupMountpoint=/sys/fs/cgroup ConstrainCores=no \
        ConstrainRAMSpace=no ConstrainSwapSpace=no ConstrainDevices=no
}

daemons_up() {  # <layout>
    live_pid "$MUNGE_PID" munged >/dev/null && live_pid "$CTLD_PID" slurmctld >/dev/null || return 1
    for n in $(nodes_of "$1"); do
        live_pid "/run/slurmd-$n.pid" slurmd >/dev/null || return 1
    done
}

wait_idle() {  # <layout>
    local want deadline=$((SECONDS + ${CLUSTER_START_TIMEOUT:-30}))
    want=$(nodes_of "$1" | wc -w)
    until [[ $(sinfo -h -N -o '%T' 2>/dev/null | grep -cxE 'idle|mixed|allocated') -ge $want ]]; do
        ((SECONDS < deadline)) || { sinfo -N >&2 || true; die "nodes not idle after ${CLUSTER_START_TIMEOUT:-30} s; see /var/log/slurm/"; }
        sleep 0.3
    done
}

stop() {
    local daemons=("$CTLD_PID:slurmctld" "$MUNGE_PID:munged") f
    for f in /run/slurmd-*.pid; do
        [[ -e $f ]] && daemons+=("$f:slurmd")
    done
    stop_pidfiles "${daemons[@]}"
}

start() {
    local layout=${1:-2} conf
    [[ $layout == 1 || $layout == 2 ]] || die "layout must be 1 or 2 nodes, got '$layout'"
    [[ $(id -u) == 0 ]] || die "must run as root (it writes /etc/slurm and starts daemons)"
    install_packages
    conf=$(render_conf "$layout")
    if [[ -r $CONF && "$(cat "$CONF")" == "$conf" && -e $FAKE_GPUS/gpu1 ]] && daemons_up "$layout"; then
        wait_idle "$layout"
        say "already up ($layout node(s))"
        return 0
    fi
    stop
    mkdir -p /etc/slurm /run/munge /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    chown munge:munge /run/munge
    printf '%s\n' "$conf" >"$CONF"
    render_cgroup_conf >"$CGROUP_CONF"
    render_gres_conf >"$GRES_CONF"
    # A device file is required: a plain file or a count-only gres line drains the node.
    mkdir -p "$FAKE_GPUS"
    ln -sf /dev/null "$FAKE_GPUS/gpu0"
    ln -sf /dev/null "$FAKE_GPUS/gpu1"
    # Node names must resolve (jobs use the first one as MASTER_ADDR). Append, not sed -i:
    # /etc/hosts can be a bind mount, which cannot be replaced.
    for n in $(nodes_of 2); do
        grep -qE "^127\.0\.0\.1([[:space:]].*)?[[:space:]]$n([[:space:]]|$)" /etc/hosts ||
            echo "127.0.0.1 $n" >>/etc/hosts
    done
    start-stop-daemon --start --quiet --oknodo --chuid munge --pidfile "$MUNGE_PID" \
        --exec /usr/sbin/munged -- --pid-file="$MUNGE_PID"
    munge -n | unmunge >/dev/null || die "munge self-test failed"
    /usr/sbin/slurmctld -c -i  # -c: clean state, so a restart never revives old jobs or nodes
    for n in $(nodes_of "$layout"); do
        /usr/sbin/slurmd -N "$n"
    done
    wait_idle "$layout"
    say "up: $(nodes_of "$layout") (partition debug, $(host_cpus) CPUs each)"
}

status() {
    local ok=0 f pid
    for f in "$MUNGE_PID:munged" "$CTLD_PID:slurmctld" /run/slurmd-*.pid; do
        [[ $f == *:* ]] || f="$f:slurmd"
        [[ -e ${f%%:*} ]] || continue
        if pid=$(live_pid "${f%%:*}" "${f##*:}"); then echo "${f##*:} running (pid $pid, ${f%%:*})"
        else echo "${f##*:} not running (stale ${f%%:*})"; ok=1; fi
    done
    sinfo -N 2>/dev/null || { echo "slurmctld not reachable"; ok=1; }
    return $ok
}

# Sourced (the tests do): define the functions only.
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

case ${1:-} in
    start) start "${2:-2}" ;;
    stop) stop ;;
    status) status ;;
    *) die "usage: $0 start [1|2] | stop | status" ;;
esac
