#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine, for `dorat compare --launcher slurm` and its
# tests: installs Debian's slurm-wlm and munge when missing (needs root), writes a slurm.conf
# for this node (no cgroups: proctrack/linuxproc, task/none; the node's CPUs and memory from
# `slurmd -C`), starts munged, slurmctld and slurmd, and waits until `sinfo` shows the node
# idle. Idempotent: a cluster that is already up is left as it is. Called by .ci/run and by
# the test fixture (tests/test_slurm.py); prints one line on success.
set -euo pipefail
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
STATE=/var/spool/dorat-slurm

up() { sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; }
if up; then echo "slurm: already up ($(sinfo -h -o '%P %D %T' | head -1))"; exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "slurm-up: needs root (to install packages and start the daemons)" >&2; exit 2
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq slurm-wlm munge >/dev/null 2>&1 || {
    apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null; }
fi

# munge: a key, its run directory, the daemon
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge /var/log/munge /var/lib/munge
if ! munge -n </dev/null >/dev/null 2>&1; then
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n </dev/null >/dev/null 2>&1 && break; sleep 0.1; done
fi

# slurm.conf for this node
node=$(slurmd -C | head -1)                    # NodeName=... CPUs=... RealMemory=...
name=$(sed 's/^NodeName=\([^ ]*\).*/\1/' <<<"$node")
host=$(hostname -s)
mkdir -p "$(dirname "$CONF")" "$STATE/ctld" "$STATE/d" /var/log/slurm
cat >"$CONF" <<EOF
# written by dorat's scripts/slurm-up.sh: one node, no cgroups, no accounting
ClusterName=dorat
SlurmctldHost=$host
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=30
$node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF

pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 120); do
  if up; then echo "slurm: up ($(sinfo -h -o '%P %D %T %c CPUs' | head -1))"; exit 0; fi
  scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true
  sleep 0.5
done
echo "slurm-up: the node did not become idle in 60 s; see /var/log/slurm/slurmctld.log and" \
     "slurmd.log" >&2
sinfo >&2 || true
exit 1
