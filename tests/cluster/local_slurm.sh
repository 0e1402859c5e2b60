#!/usr/bin/env bash
# Run as: tests/cluster/local_slurm.sh up|down|env [STATE_DIR]
#
# A real SLURM cluster on this machine, for the cluster tests (needs root):
#   up    installs Debian's slurm-wlm and munge when missing, starts munged (own socket and key),
#         slurmctld (partitions `debug`, the default, and `urgent`, which preempts it), and two slurmd nodes, each in its own network namespace (own hostname and
#         address on a private bridge), then waits until `sinfo` shows both nodes idle;
#   env   prints the variables a client needs (SLURM_CONF=...);
#   down  stops everything `up` started, by PID (and whatever jobs left in the node namespaces),
#         and removes the namespaces, the bridge and the state directory.
# STATE_DIR defaults to /tmp/launcher-slurm. LOCAL_SLURM_SUBNET (default 10.77.0) picks the /24.
set -euo pipefail

cmd=${1:-}
dir=${2:-/tmp/launcher-slurm}
subnet=${LOCAL_SLURM_SUBNET:-10.77.0}
nodes=(node1 node2)
bridge=lslurm0

log() { printf 'local_slurm: %s\n' "$*" >&2; }
die() {
	log "error: $*"
	exit 1
}

free_port() {
	python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

stop_pid() { # stop_pid PID: TERM, wait up to 20 s, then KILL
	local pid=$1 waited=0
	kill -TERM "$pid" 2>/dev/null || return 0
	while kill -0 "$pid" 2>/dev/null && ((waited < 40)); do
		sleep 0.5
		waited=$((waited + 1))
	done
	kill -KILL "$pid" 2>/dev/null || true
}

install() {
	if command -v slurmctld >/dev/null && command -v munged >/dev/null && command -v slurmd >/dev/null; then
		return
	fi
	log "installing slurm-wlm and munge"
	export DEBIAN_FRONTEND=noninteractive
	apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || {
		apt-get update -q >/dev/null
		apt-get install -y -q slurm-wlm munge >/dev/null
	}
}

write_config() {
	local ctl_port slurmd_port index
	ctl_port=$(free_port)
	slurmd_port=$(free_port)
	mkdir -p "$dir/state" "$dir/etc"
	cat >"$dir/slurm.conf" <<EOF
ClusterName=launchertest
SlurmctldHost=$(hostname -s)($subnet.1)
MailProg=/bin/true
SlurmctldPort=$ctl_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
SchedulerType=sched/backfill
# A test cluster of two nodes: pass over pending jobs every 2 s, not every 60 s (main) / 30 s (backfill),
# so a requeued job starts as soon as its credential hold (cred_expire + 1 s) ends.
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool-%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
JobCompType=jobcomp/filetxt
JobCompLoc=$dir/jobcomp.txt
KillWait=10
MinJobAge=300
# Preemption as a site would set it up for checkpointing jobs: a job of a higher tier takes the nodes;
# the preempted job gets its own --signal (preempt_send_user_signal; PreemptParameters=send_user_signal
# from SLURM 23.02) and GraceTime seconds, then is requeued.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=60
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
	{
		echo "127.0.0.1 localhost"
		echo "$subnet.1 $(hostname -s)"
	} >"$dir/etc/hosts"
	index=10
	for node in "${nodes[@]}"; do
		index=$((index + 1))
		echo "NodeName=$node NodeAddr=$subnet.$index CPUs=2 RealMemory=8000 State=UNKNOWN" >>"$dir/slurm.conf"
		echo "$subnet.$index $node" >>"$dir/etc/hosts"
	done
	echo "nameserver 127.0.0.1" >"$dir/etc/resolv.conf"
}

network_up() {
	local index=10 node ns
	ip link add "$bridge" type bridge
	ip addr add "$subnet.1/24" dev "$bridge"
	ip link set "$bridge" up
	for node in "${nodes[@]}"; do
		index=$((index + 1))
		ns="lslurm-$node"
		ip netns add "$ns"
		ip link add "lsv-$node" type veth peer name eth0 netns "$ns"
		ip link set "lsv-$node" master "$bridge" up
		ip -n "$ns" addr add "$subnet.$index/24" dev eth0
		ip -n "$ns" link set eth0 up
		ip -n "$ns" link set lo up
	done
}

up() {
	[[ $(id -u) == 0 ]] || die "needs root"
	[[ ! -e "$dir/slurm.conf" ]] || die "$dir already holds a cluster: run down first"
	install
	mkdir -p "$dir"
	chmod 700 "$dir"
	write_config
	network_up

	dd if=/dev/urandom of="$dir/munge.key" bs=1 count=1024 status=none
	chmod 400 "$dir/munge.key"
	munged --foreground --force --socket="$dir/munge.socket" --key-file="$dir/munge.key" \
		--pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munged.seed" \
		>"$dir/munged.out" 2>&1 &
	echo $! >"$dir/munged.pidfile"
	local waited=0
	until [[ -S "$dir/munge.socket" ]]; do
		((waited++ < 100)) || die "munged did not start (see $dir/munged.log)"
		sleep 0.1
	done

	export SLURM_CONF="$dir/slurm.conf"
	slurmctld -D -f "$SLURM_CONF" >"$dir/slurmctld.out" 2>&1 &
	echo $! >"$dir/slurmctld.pidfile"
	local node
	for node in "${nodes[@]}"; do
		mkdir -p "$dir/spool-$node"
		# Own network (the namespace), hostname (UTS) and /etc/hosts (mount namespace) per node.
		# nsenter, not `ip netns exec`: the latter remounts /sys and slurmd then dies.
		# shellcheck disable=SC2016  # expanded by the node's own shell
		nsenter --net="/run/netns/lslurm-$node" unshare --uts --mount sh -c '
			hostname "$1"
			mount --bind "$2/etc/hosts" /etc/hosts
			mount --bind "$2/etc/resolv.conf" /etc/resolv.conf
			exec slurmd -D -N "$1" -f "$2/slurm.conf"' sh "$node" "$dir" >"$dir/slurmd-$node.out" 2>&1 &
		echo $! >"$dir/slurmd-$node.pidfile"
	done

	local deadline=$((SECONDS + 120)) states
	while ((SECONDS < deadline)); do
		states=$(sinfo -h -N -o '%T' 2>/dev/null | sort -u | tr '\n' ' ')
		if [[ "$states" == "idle " ]]; then
			log "up: ${nodes[*]} idle (SLURM_CONF=$SLURM_CONF)"
			return 0
		fi
		sleep 0.5
	done
	die "nodes not idle after 120 s (states: ${states:-none}); see $dir/*.log"
}

down() {
	local node ns pid
	for node in "${nodes[@]}"; do
		if [[ -f "$dir/slurmd-$node.pidfile" ]]; then stop_pid "$(cat "$dir/slurmd-$node.pidfile")"; fi
	done
	if [[ -f "$dir/slurmctld.pidfile" ]]; then stop_pid "$(cat "$dir/slurmctld.pidfile")"; fi
	# What jobs left behind in the node namespaces (steps, Ray) is ours too: it runs in our namespaces.
	for node in "${nodes[@]}"; do
		ns="lslurm-$node"
		if [[ -e "/run/netns/$ns" ]]; then
			for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
			ip netns delete "$ns" 2>/dev/null || true
		fi
		ip link delete "lsv-$node" 2>/dev/null || true
	done
	ip link delete "$bridge" 2>/dev/null || true
	if [[ -f "$dir/munged.pidfile" ]]; then stop_pid "$(cat "$dir/munged.pidfile")"; fi
	rm -rf "$dir"
	log "down"
}

case "$cmd" in
up) up ;;
down) down ;;
env) echo "SLURM_CONF=$dir/slurm.conf" ;;
*) die "usage: $0 up|down|env [STATE_DIR]" ;;
esac
