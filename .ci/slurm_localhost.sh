#!/usr/bin/env bash
# A real one-node SLURM on this machine, for tests/test_slurm.py: Debian's slurmctld, slurmd and
# munge on localhost, started as root without systemd (a container has none). Idempotent: a second
# call finds the cluster answering and returns at once. .ci/run calls it before `make test`.
#   bash .ci/slurm_localhost.sh          # install what is missing (apt), configure, start, wait until idle
#   bash .ci/slurm_localhost.sh --stop   # stop the three daemons
# Exit 0: `sinfo` lists this node up. Otherwise one line on stderr says why (not root, no apt-get,
# a daemon that would not start: its log's last lines follow) and the status is 1; the tests that
# need the cluster then skip, naming this script.
set -euo pipefail
CONF=/etc/slurm/slurm.conf
LOGS=/var/log/slurm
NODE="$(hostname -s)"

fail() { echo "slurm_localhost: $*" >&2; exit 1; }

up() {  # the controller answers and this node takes jobs (a client waits ~10 s for a dead controller)
  local ping states
  ping="$(timeout 5 scontrol ping 2>/dev/null || true)"
  states="$(timeout 5 sinfo -h -N -n "$NODE" -o "%t" 2>/dev/null || true)"
  [[ "$ping" == *"is UP"* ]] && grep -Eq "^(idle|mix|alloc)" <<< "$states"
}

stop() {  # stop() DAEMON: SIGTERM, then wait up to 20 s for it to have saved its state and exited
  local pid
  pid="$(pgrep -x "$1" || true)"
  if [[ -z "$pid" ]]; then return 0; fi
  kill $pid
  for _ in $(seq 100); do
    if ! pgrep -x "$1" > /dev/null; then return 0; fi
    sleep 0.2
  done
  fail "$1 (pid $pid) did not exit within 20 s of SIGTERM"
}

if [[ "${1:-}" == "--stop" ]]; then
  for daemon in slurmd slurmctld munged; do stop "$daemon"; done
  echo "slurm_localhost: stopped"
  exit 0
fi

if command -v scontrol > /dev/null && up; then
  echo "slurm_localhost: already running (node $NODE)"
  exit 0
fi
[[ $(id -u) -eq 0 ]] || fail "needs root (it installs and starts daemons); run it as root or skip the SLURM tests"

if ! command -v slurmctld > /dev/null || ! command -v slurmd > /dev/null || ! command -v sbatch > /dev/null ||
   ! command -v munged > /dev/null; then
  command -v apt-get > /dev/null || fail "slurmctld, slurmd, slurm-client and munge are missing and there is no apt-get"
  echo "slurm_localhost: installing slurmctld slurmd slurm-client munge (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq > /dev/null
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge > /dev/null
fi

# Settings the daemons need before they start (each line says why).
mkdir -p /run/munge /var/spool/slurmd /var/spool/slurmctld "$LOGS"
chown munge:munge /run/munge
[[ -f /etc/munge/munge.key ]] || { dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none;
                                    chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key; }
cpus="$(nproc)"
cat > "$CONF" <<EOF
# Written by .ci/slurm_localhost.sh: one node, this machine, for the tests.
ClusterName=localhost
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
# A requeued job waits this long before it starts again (default 120 s).
AuthInfo=cred_expire=5
# No cgroups in a container: processes tracked by their parent ids, tasks unconfined.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# No slurmdbd: sacct has no data; the tests read job states with scontrol (MinJobAge keeps them 10 min).
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$LOGS/jobcomp.log
MinJobAge=600
# Schedule every second (the default waits up to a minute between passes).
SchedulerParameters=sched_interval=1
MailProg=/bin/true
ReturnToService=2
KillWait=10
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

start() {  # start() NAME COMMAND...: unless NAME runs already
  if ! pgrep -x "$1" > /dev/null; then
    shift
    "$@" || fail "$* did not start"
  fi
}
start munged runuser -u munge -- /usr/sbin/munged
start slurmctld /usr/sbin/slurmctld
start slurmd /usr/sbin/slurmd
deadline=$((SECONDS + 30))
while ((SECONDS < deadline)); do
  if up; then
    echo "slurm_localhost: running (node $NODE, $cpus CPUs, partition debug; logs in $LOGS)"
    exit 0
  fi
  for daemon in munged slurmctld slurmd; do
    pgrep -x "$daemon" > /dev/null || { tail -n 5 "$LOGS/$daemon.log" >&2 2>/dev/null || true; fail "$daemon exited"; }
  done
  # A node left down by an earlier run of the daemons comes back.
  timeout 5 scontrol update nodename="$NODE" state=resume > /dev/null 2>&1 || true
  sleep 0.5
done
tail -n 5 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
fail "the node did not come up within 30 s (logs above, in $LOGS)"
