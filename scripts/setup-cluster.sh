#!/usr/bin/env bash
# Install OpenMPI and a single-node Slurm (with munge) from Debian's packages, configure Slurm
# for this host and start its daemons. Idempotent: run it again to (re)start what is down.
# Needs root (a fresh machine's default here). Used by scripts/test.sh before the suite; also
# the quickest way to try `--executor mpi` and `slurm submit` on a laptop or a VM.
set -euo pipefail

need_packages=()
command -v mpirun >/dev/null || need_packages+=(openmpi-bin libopenmpi-dev)
command -v slurmctld >/dev/null || need_packages+=(slurm-wlm)
command -v munged >/dev/null || need_packages+=(munge)
if ((${#need_packages[@]})); then
    echo "setup-cluster: installing ${need_packages[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_packages[@]}" >/dev/null
fi
python3 -c "import mpi4py" 2>/dev/null || \
    python3 -m pip install --quiet --disable-pip-version-check mpi4py

# munge: one key, its folders owned by munge, the daemon running as munge.
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
mkdir -p /var/log/munge /run/munge /var/lib/munge
chown munge:munge /etc/munge/munge.key /var/log/munge /run/munge /var/lib/munge
chmod 400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
    su -s /bin/sh munge -c /usr/sbin/munged
fi

# Slurm: one node (this host), one partition, its spool and log folders.
host=$(hostname)
cpus=$(nproc)
memory_mib=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
conf=/etc/slurm/slurm.conf
wanted=$(cat <<EOF
# Written by distributed-downloader's scripts/setup-cluster.sh: a single-node Slurm.
ClusterName=dd
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
MinJobAge=600
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$memory_mib State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
)
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$wanted" ]; then
    echo "$wanted" > "$conf"
    pkill -x slurmctld 2>/dev/null || true
    pkill -x slurmd 2>/dev/null || true
    for _ in $(seq 30); do
        pgrep -x 'slurmctld|slurmd' >/dev/null || break
        sleep 0.5
    done
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd

for _ in $(seq 30); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        echo "setup-cluster: OpenMPI $(mpirun --version 2>/dev/null | head -1 | awk '{print $NF}'),"\
             "Slurm $(sinfo -V | awk '{print $2}') node $host idle"
        exit 0
    fi
    sleep 1
done
echo "setup-cluster: Slurm did not come up; see /var/log/slurm/" >&2
sinfo >&2 || true
exit 1
