#!/usr/bin/env bash
# A throwaway two-node SLURM cluster on this one machine, for the job-template tests.
#
#   .ci/slurm_cluster.sh start    start it (again: a no-op when it already answers)
#   .ci/slurm_cluster.sh stop     stop the daemons this script started, remove its state
#   .ci/slurm_cluster.sh status   show the nodes; exit 1 when the cluster does not answer
#
# Needs root and Debian's packages `slurm-wlm` and `munge`. One slurmctld and two slurmd
# daemons run on this host; `slurmd -N n1` and `slurmd -N n2` each pretend to be a node,
# each in its own UTS namespace where the host name is n1 or n2.
# Both nodes are declared with the cores and memory of a typical GPU node (32 cores,
# 256 GB) so the templates' requests for those are accepted as written; slurmd takes the
# declared sizes on trust. There are no GPUs: the tests override the templates' GPU
# request on the sbatch command line (--gpus-per-node=0) and train on the CPU.
#
# It writes /etc/slurm/slurm.conf (where client commands such as sbatch look for it),
# adds n1 and n2 to /etc/hosts, and keeps logs and state in $STATE_DIR.
# It never overwrites a slurm.conf that it did not write itself.
set -euo pipefail

STATE_DIR=${LESSON_SLURM_STATE:-/var/tmp/lesson-slurm}
CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
MARKER="# Written by the lesson's .ci/slurm_cluster.sh: a throwaway test cluster."
HOSTS_MARKER="# lesson-slurm-test-nodes"
NODES=(n1 n2)

die() { echo "slurm_cluster.sh: $*" >&2; exit 1; }

# Poll until a command succeeds, or give up after $1 seconds.
wait_for() {
    local timeout=$1; shift
    local deadline=$((SECONDS + timeout))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

nodes_idle() {
    # Both nodes registered and ready for work (idle, or already running jobs).
    local states
    states=$(sinfo --noheader --nodes=n1,n2 --format='%N %t' --Node 2>/dev/null) || return 1
    [[ $(grep -cE ' (idle|mix|alloc)$' <<<"$states") -eq ${#NODES[@]} ]]
}

pid_alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
    local host
    host=$(hostname -s)
    if [[ -f $CONF ]] && ! grep -qxF "$MARKER" "$CONF"; then
        die "$CONF exists and was not written by this script; not touching a real cluster's configuration"
    fi
    mkdir -p "$CONF_DIR" "$STATE_DIR/ctld"
    cat >"$CONF" <<EOF
$MARKER
# Delete it with: .ci/slurm_cluster.sh stop
ClusterName=lesson
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Daemon files under one folder; %n is the node name, so the two slurmd do not collide.
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd-%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/slurmctld.log
SlurmdLogFile=$STATE_DIR/slurmd-%n.log
# No cgroups in a test machine or container: track processes through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# Resources are scheduled per core; the declared node sizes below are taken as given.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
# No accounting daemon: sacct and seff have nothing to report here.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Batch jobs may be requeued (Lightning runs scontrol requeue on SIGUSR1).
JobRequeue=1
# A node that comes back is usable again at once; a killed job is cleaned up quickly.
ReturnToService=2
KillWait=5
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=17001 CPUs=32 Boards=1 SocketsPerBoard=1 CoresPerSocket=32 ThreadsPerCore=1 RealMemory=262144 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=17002 CPUs=32 Boards=1 SocketsPerBoard=1 CoresPerSocket=32 ThreadsPerCore=1 RealMemory=262144 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
}

add_hosts() {
    # Lightning takes the first node of SLURM_NODELIST (n1) as the master address.
    if ! grep -qF "$HOSTS_MARKER" /etc/hosts; then
        echo "127.0.0.1 ${NODES[*]} $HOSTS_MARKER" >>/etc/hosts
    fi
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # already running (ours or the system's)
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        chown munge:munge /etc/munge/munge.key 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
    fi
    mkdir -p /run/munge
    chown munge:munge /run/munge 2>/dev/null || true
    # munged refuses to run as root; the Debian package creates the munge user.
    if id munge >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    else
        /usr/sbin/munged --force
    fi
    touch "$STATE_DIR/munged-started-here"
    wait_for 10 bash -c 'munge -n | unmunge' || die "munged did not start"
}

start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    command -v slurmctld >/dev/null || die "slurmctld not found: apt-get install slurm-wlm munge"
    if nodes_idle; then
        echo "the test cluster is already running"
        sinfo
        return
    fi
    write_config
    add_hosts
    start_munge
    if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
        # -c: start clean, forgetting jobs and node states from any earlier run.
        slurmctld -c
    fi
    wait_for 20 scontrol ping || die "slurmctld does not answer; see $STATE_DIR/slurmctld.log"
    for node in "${NODES[@]}"; do
        mkdir -p "$STATE_DIR/slurmd-$node"
        pid_alive "$STATE_DIR/slurmd-$node.pid" && continue
        if unshare --uts true 2>/dev/null; then
            # Its own host name, so a job step on n2 sees itself as n2 (as on a real
            # cluster) and the scripts' rank lines name the two nodes apart.
            # shellcheck disable=SC2016  # $1 is expanded by the inner shell
            unshare --uts sh -c 'hostname "$1" && exec slurmd -N "$1"' sh "$node"
        else
            # Without CAP_SYS_ADMIN (an unprivileged container) there is no UTS
            # namespace: both slurmd report this machine's host name, and
            # test_slurm.py's multi-node test, which wants ranks "on n1" and "on n2",
            # fails. It needs a VM, or a container started with --privileged.
            echo "slurm_cluster.sh: warning: 'unshare --uts' is not allowed here," \
                "so $node runs under this machine's host name, $(hostname);" \
                "the multi-node test of tests/test_slurm.py will fail." \
                "Run the cluster in a VM or a privileged container." >&2
            slurmd -N "$node"
        fi
    done
    # A node left DOWN or DRAINED by an earlier run is put back into service.
    scontrol update NodeName=n1,n2 State=RESUME >/dev/null 2>&1 || true
    wait_for 30 nodes_idle || die "the nodes did not come up; see $STATE_DIR/slurmd-n*.log"
    sinfo
}

stop() {
    local pidfile pid
    for pidfile in "$STATE_DIR"/slurmd-n*.pid "$STATE_DIR/slurmctld.pid"; do
        [[ -f $pidfile ]] || continue
        pid=$(cat "$pidfile")
        if kill "$pid" 2>/dev/null; then
            wait_for 20 bash -c "! kill -0 $pid" || kill -9 "$pid" 2>/dev/null || true
        fi
    done
    if [[ -f $STATE_DIR/munged-started-here ]]; then
        pid=$(cat /run/munge/munged.pid 2>/dev/null || true)
        if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; fi
    fi
    if [[ -f $CONF ]] && grep -qxF "$MARKER" "$CONF"; then
        rm -f "$CONF"
    fi
    if grep -qF "$HOSTS_MARKER" /etc/hosts; then
        # Rewrite in place: /etc/hosts may be a bind mount that cannot be replaced.
        local kept
        kept=$(grep -vF "$HOSTS_MARKER" /etc/hosts)
        printf '%s\n' "$kept" >/etc/hosts
    fi
    rm -rf "$STATE_DIR"
    echo "the test cluster is stopped"
}

status() {
    if nodes_idle; then
        sinfo
        squeue
    else
        echo "the test cluster does not answer"
        return 1
    fi
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
