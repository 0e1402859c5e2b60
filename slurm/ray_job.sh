#!/usr/bin/env bash
# Run as (inside a SLURM allocation; the sbatch templates exec it):
#   slurm/ray_job.sh JOB.yaml [key=value ...]
#
# The body of slurm/pretrain.sh, slurm/finetune.sh and of scripts rendered by `launcher slurm`:
#   1. find the head node (first host of the allocation) and its address, with an srun on it;
#   2. pick Ray's 100 ports: the first block in LAUNCHER_RAY_PORT_RANGE, from an offset derived from
#      SLURM_JOB_ID, that is free on every node (probed), so jobs sharing nodes do not collide; give
#      each job and node its own Ray temp dir; create a per-job auth token readable only by the user;
#   3. start the Ray head (srun, first node) and one Ray worker per other node, then poll until
#      every node has joined (error and exit 3 on timeout; no fixed sleeps);
#   4. run `launcher run JOB.yaml ...` against that cluster with the worker count of the allocation
#      (`launcher workers`: GPUs per node x nodes, or LAUNCHER_WORKERS_PER_NODE x nodes on CPUs);
#   5. on SIGUSR1 (`#SBATCH --signal=B:USR1@<grace>`), or SIGTERM with LAUNCHER_REQUEUE_ON_TERM=1:
#      ask the run to checkpoint and stop (a stop file the training loop polls every step), wait
#      for it, then `scontrol requeue` the job; the requeued job resumes from that checkpoint.
#      Preemption reaches this path where slurm.conf sends the job's --signal at preemption
#      (`PreemptParameters=send_user_signal`; `SlurmctldParameters=preempt_send_user_signal` before
#      23.02) with a GraceTime. A plain `scancel` cannot: srun answers
#      its own SIGTERM by killing its step's tasks at once (SIGKILL); the next run resumes from the
#      last committed checkpoint;
#   6. stop everything it started, by PID.
#
# Environment knobs (all optional):
#   LAUNCHER_HOME             repository root (default: the sbatch submit directory)
#   LAUNCHER_VENV             virtualenv with launcher and ray (default: $LAUNCHER_HOME/.venv if present)
#   CONTAINER_IMAGE           run every step in this image via pyxis (srun --container-image ...)
#   LAUNCHER_STATE_DIR        per-job state (token, ports, stop file); default $LAUNCHER_HOME/.slurm-state
#   LAUNCHER_RAY_PORT_RANGE   LOW-HIGH ports Ray may use, in blocks of 100 (default 20000-31999: below the
#                             ephemeral range; the cluster admin sets it where other services need ports)
#   LAUNCHER_RAY_PORT_BASE    first of the 100 ports this job uses (default: probed, see above)
#   LAUNCHER_JOIN_TIMEOUT     seconds to wait for all nodes to join Ray (default 300)
#   LAUNCHER_WORKERS_PER_NODE training workers per node without GPUs (default 1)
#   LAUNCHER_REQUEUE_ON_TERM  1: treat SIGTERM (scancel) like SIGUSR1
#   LAUNCHER_RAY_BIND         address Ray advertises on each node (default: the node's own address)
set -euo pipefail

log() { printf 'launcher-slurm: %s\n' "$*" >&2; }
die() {
	log "error: $2"
	exit "$1"
}

[[ $# -ge 1 ]] || die 2 "usage: slurm/ray_job.sh JOB.yaml [key=value ...]"
[[ -n "${SLURM_JOB_ID:-}" ]] || die 2 "not inside a SLURM allocation: submit with sbatch"
home=${LAUNCHER_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$home"
spec=$1
shift
[[ -f "$spec" ]] || die 2 "job spec not found: $spec (relative paths are resolved in $home)"
venv=${LAUNCHER_VENV:-$home/.venv}
if [[ -x "$venv/bin/launcher" ]]; then
	export PATH="$venv/bin:$PATH"
fi

# --- the allocation -------------------------------------------------------------------------
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
num_nodes=${#nodes[@]}
head=${nodes[0]}
gpus_per_node=${SLURM_GPUS_ON_NODE:-0}
[[ "$gpus_per_node" =~ ^[0-9]+$ ]] || gpus_per_node=0
cpus_per_node=${SLURM_CPUS_PER_TASK:-$(nproc)}
restart=${SLURM_RESTART_COUNT:-0}

container=()
if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
	container=(--container-image="$CONTAINER_IMAGE" --container-mounts="$home:$home" --container-workdir="$home")
fi
step() { srun --overlap --kill-on-bad-exit=0 "${container[@]}" "$@"; }

# The worker count has one rule, in the launcher (`launcher slurm` checks the plan with the same one).
read -r workers use_gpu < <(step --nodes=1 --ntasks=1 -w "$head" launcher workers "$num_nodes" "$gpus_per_node") ||
	die 2 "launcher workers $num_nodes $gpus_per_node failed (see above)"

# --- per-job state: token, ports, stop file (on the shared file system, user-only) ----------
umask 077
state=${LAUNCHER_STATE_DIR:-$home/.slurm-state}/$SLURM_JOB_ID
mkdir -p "$state"
token="$state/ray_token"
if [[ ! -s "$token" ]]; then
	od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$token"
fi
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$token"
unset RAY_AUTH_TOKEN RAY_ADDRESS
stop_file="$state/STOP"
rm -f "$stop_file"
export LAUNCHER_STOP_FILE="$stop_file"

# 100 ports per job: the first block of LAUNCHER_RAY_PORT_RANGE, from this job's own offset, that no other
# launcher job holds (a lock folder in the shared state dir: mkdir is atomic) and that is free on every node
# (probed by binding each port: other users and services). Below Linux's ephemeral ports by default.
ports_dir=${LAUNCHER_STATE_DIR:-$home/.slurm-state}/ports
mkdir -p "$ports_dir"
probe='import socket, sys
base = int(sys.argv[1])
for port in range(base, base + 100):
    with socket.socket() as sock:
        try:
            sock.bind(("", port))
        except OSError:
            sys.exit(f"port {port} is in use on this node")'
claim() { # claim BASE: take its lock, keep our own (a requeued job), or take over one whose job has ended
	local lock="$ports_dir/$1" owner
	mkdir "$lock" 2>/dev/null && echo "$SLURM_JOB_ID" >"$lock/job" && return 0
	owner=$(cat "$lock/job" 2>/dev/null || true)
	[[ "$owner" == "$SLURM_JOB_ID" ]] && return 0
	if [[ -n "$owner" ]] && [[ -z "$(squeue -h -j "$owner" -o %T 2>/dev/null || true)" ]]; then
		rm -rf "$lock"
		mkdir "$lock" 2>/dev/null && echo "$SLURM_JOB_ID" >"$lock/job" && return 0
	fi
	return 1
}
release() { # release BASE: only our own lock
	[[ "$(cat "$ports_dir/$1/job" 2>/dev/null || true)" == "$SLURM_JOB_ID" ]] && rm -rf "${ports_dir:?}/$1"
	return 0
}
pick_base() {
	local range=${LAUNCHER_RAY_PORT_RANGE:-20000-31999} low high slots try candidate
	[[ "$range" =~ ^([0-9]+)-([0-9]+)$ ]] || die 2 "LAUNCHER_RAY_PORT_RANGE=$range: expected LOW-HIGH"
	low=${BASH_REMATCH[1]} high=${BASH_REMATCH[2]}
	slots=$(((high - low + 1) / 100))
	((slots > 0 && high <= 65535)) || die 2 "LAUNCHER_RAY_PORT_RANGE=$range: needs 100 ports or more, at most 65535"
	for ((try = 0; try < slots; try++)); do
		candidate=$((low + ((SLURM_JOB_ID + try) % slots) * 100))
		claim "$candidate" || continue
		if step --nodes="$num_nodes" --ntasks="$num_nodes" --ntasks-per-node=1 python3 -c "$probe" "$candidate" \
			>/dev/null 2>>"$state/ports.log"; then
			echo "$candidate"
			return 0
		fi
		release "$candidate"
	done
	die 3 "no block of 100 free ports in LAUNCHER_RAY_PORT_RANGE=$range on every node (see $state/ports.log)"
}
if [[ -n "${LAUNCHER_RAY_PORT_BASE:-}" ]]; then
	base=$LAUNCHER_RAY_PORT_BASE
else
	base=$(pick_base) || exit 3
fi
gcs_port=$base
ray_ports=(
	--node-manager-port=$((base + 1)) --object-manager-port=$((base + 2))
	--runtime-env-agent-port=$((base + 3)) --dashboard-agent-grpc-port=$((base + 4))
	--dashboard-agent-listen-port=$((base + 5)) --metrics-export-port=$((base + 6))
	--min-worker-port=$((base + 20)) --max-worker-port=$((base + 99))
)
head_ports=(--port="$gcs_port" --ray-client-server-port=$((base + 7)) --dashboard-port=$((base + 8)))
cat >"$state/ports.env" <<EOF
SLURM_JOB_ID=$SLURM_JOB_ID
RAY_GCS_PORT=$gcs_port
RAY_DASHBOARD_PORT=$((base + 8))
RAY_PORT_RANGE=$base-$((base + 99))
EOF

# The head's address as the head itself sees it (not the login or batch host's view).
head_ip=${LAUNCHER_RAY_BIND:-$(step --nodes=1 --ntasks=1 -w "$head" hostname --ip-address | awk '{print $1}')}
[[ -n "$head_ip" ]] || die 3 "could not find the address of head node $head"
address="$head_ip:$gcs_port"
log "job $SLURM_JOB_ID (restart $restart): $num_nodes node(s) [${nodes[*]}], head $head at $address, $workers worker(s)"

# --- start Ray ------------------------------------------------------------------------------
pids=()
requeue=0
# shellcheck disable=SC2317,SC2329  # invoked by the EXIT trap
cleanup() {
	local pid waited=0
	trap - USR1 TERM
	for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
	for pid in "${pids[@]}"; do
		while kill -0 "$pid" 2>/dev/null && ((waited < 60)); do
			sleep 1
			waited=$((waited + 1))
		done
		kill -KILL "$pid" 2>/dev/null || true
	done
	wait 2>/dev/null || true
	# shellcheck disable=SC2016  # expanded on each node
	step --nodes="$num_nodes" --ntasks="$num_nodes" --ntasks-per-node=1 \
		bash -c 'rm -rf "/tmp/ray-$SLURM_JOB_ID-$SLURMD_NODENAME"' 2>/dev/null || true
	log "stopped Ray (pids ${pids[*]})"
	if ((!requeue)); then
		rm -rf "$state" # the token dies with the job; a requeued job keeps its state (and ports)
		release "$base"
	fi
}
trap cleanup EXIT

# Each node: its own temp dir (short: Ray's socket paths are length-limited), its CPUs and GPUs. TMPDIR
# too, so what Ray's processes leave there (e.g. the dashboard's forkserver socket) goes with that dir.
# shellcheck disable=SC2016  # expanded by the bash on each node, not here
node_start='d="/tmp/ray-$SLURM_JOB_ID-$SLURMD_NODENAME"; mkdir -p "$d"; TMPDIR="$d" exec ray start --block --disable-usage-stats --temp-dir="$d" "$@"'
step --nodes=1 --ntasks=1 -w "$head" bash -c "$node_start" ray-head --head --node-ip-address="$head_ip" \
	"${head_ports[@]}" "${ray_ports[@]}" --dashboard-host=127.0.0.1 --num-cpus="$cpus_per_node" \
	--num-gpus="$gpus_per_node" &
pids+=($!)
if ((num_nodes > 1)); then
	others=$((num_nodes - 1))
	worker_ip=()
	[[ -n "${LAUNCHER_RAY_BIND:-}" ]] && worker_ip=(--node-ip-address="$LAUNCHER_RAY_BIND")
	step --nodes="$others" --ntasks="$others" --ntasks-per-node=1 --exclude="$head" bash -c "$node_start" \
		ray-worker --address="$address" "${ray_ports[@]}" "${worker_ip[@]}" --num-cpus="$cpus_per_node" \
		--num-gpus="$gpus_per_node" &
	pids+=($!)
fi

# Poll until every node has joined (or a start-up step died).
deadline=$((SECONDS + ${LAUNCHER_JOIN_TIMEOUT:-300}))
joined=0
count_nodes='import ray, sys
ray.init(address=sys.argv[1], log_to_driver=False, logging_level="ERROR")
alive = [n for n in ray.nodes() if n["Alive"]]
for n in alive:
    print("node", n["NodeManagerHostname"], n["NodeManagerAddress"], file=sys.stderr)
print(len(alive))'
while ((SECONDS < deadline)); do
	for pid in "${pids[@]}"; do
		kill -0 "$pid" 2>/dev/null || die 3 "a Ray start-up step exited early (see the log above)"
	done
	joined=$(timeout 60 srun --overlap "${container[@]}" --nodes=1 --ntasks=1 -w "$head" python3 -c "$count_nodes" \
		"$address" 2>"$state/nodes.txt" | tail -n 1) || joined=0
	[[ "$joined" =~ ^[0-9]+$ ]] || joined=0
	if ((joined >= num_nodes)); then
		break
	fi
	sleep 2
done
((joined >= num_nodes)) || die 3 "only $joined of $num_nodes node(s) joined Ray at $address within ${LAUNCHER_JOIN_TIMEOUT:-300}s"
sed 's/^/launcher-slurm: /' "$state/nodes.txt" >&2
log "Ray cluster ready: $joined node(s)"

# --- train, turning preemption into checkpoint + requeue -------------------------------------
# shellcheck disable=SC2317,SC2329  # invoked by the signal traps
preempt() {
	log "received $1: asking the run to checkpoint and stop, then requeueing"
	requeue=1
	touch "$stop_file"
}
trap 'preempt USR1' USR1
if [[ "${LAUNCHER_REQUEUE_ON_TERM:-0}" == 1 ]]; then
	trap 'preempt TERM' TERM
fi

export RAY_ADDRESS="$address"
step --nodes=1 --ntasks=1 -w "$head" launcher run "$spec" "$@" "cluster.num_workers=$workers" \
	"cluster.use_gpu=$use_gpu" &
driver=$!
rc=0
while :; do
	wait "$driver" || rc=$?
	# A trapped signal interrupts `wait` (status > 128) while the run goes on: wait again.
	if ((rc > 128)) && kill -0 "$driver" 2>/dev/null; then
		rc=0
		continue
	fi
	break
done
log "launcher run exited with $rc"
if ((requeue)) && ((rc == 75)); then
	log "checkpoint written; requeueing job $SLURM_JOB_ID"
	scontrol requeue "$SLURM_JOB_ID"
	exit 0
fi
exit "$rc"
