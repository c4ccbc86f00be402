# shellcheck shell=bash
# Start, check and stop a Ray cluster from a batch script; sourced by slurm_ray.sbatch.
#
# The functions run on any machine, with or without Slurm (tests/test_cluster_slurm.py runs a
# head and a worker on 127.0.0.1 with them). With RR_LAUNCH_NODE set to a host name and
# Slurm present, each `ray start` runs on that host through `srun`; otherwise it runs here.
#
#   rr_job_dirs ID            per-job temp and spill folders: RR_TMP, RR_SPILL
#   rr_gpu_count SPEC         GPUs in a Slurm GPU spec: 4, a100:4, a100:2,v100:1 -> 4 4 3
#   rr_start_head IP PORT     `ray start --head --block` in the background (RR_PIDS)
#   rr_start_worker ADDRESS   `ray start --address --block` in the background (RR_PIDS)
#   rr_wait_gcs IP PORT SECS  until the head's GCS port accepts connections (or fail)
#   rr_wait_nodes ADDR N SECS until `ray status` lists N alive nodes (or fail)
#   rr_wait_dashboard URL SECS until the job API answers (or fail)
#   rr_start_attempts N CMD   run CMD (start + waits) up to N times, cleaning up in between
#   rr_submit URL ID -- CMD   `ray job submit` and check that the job SUCCEEDED
#   rr_cleanup                stop what rr_start_* started (by PID), remove RR_TMP
#
# Each `ray start` runs inside a small wrapper on its node that creates that node's temp
# folder and removes it when Ray stops (TERM from rr_cleanup, srun or scancel): every node
# cleans up after itself, not only the one running this script. Under Slurm each step asks
# for the job's CPUs per task (`srun -c`): Slurm >= 22.05 srun no longer reads
# SLURM_CPUS_PER_TASK, and a step without -c would pin Ray to 1 CPU while Ray is told more.
#
# Settings (environment): RR_NUM_CPUS, RR_NUM_GPUS, RR_DASHBOARD_PORT (8265),
# RR_HEAD_ARGS / RR_WORKER_ARGS (extra `ray start` arguments, e.g. ports when several nodes
# share one machine), RR_TMP_ROOT (/tmp), RR_KEEP_TMP=1 (keep logs after the job).
# Readiness is polled, never a fixed sleep: every wait fails with a message after its timeout
# or as soon as the process it waits for has died.

RR_PIDS=()
# Ray gives its dashboard (the job API) 60 s and its node agents 30 s to start; busy nodes
# (or a busy shared file system) need longer.
export RAY_DASHBOARD_STARTUP_TIMEOUT_S=${RAY_DASHBOARD_STARTUP_TIMEOUT_S:-300}
export RAY_agent_register_timeout_ms=${RAY_agent_register_timeout_ms:-300000}

rr_log() { echo "[reid-ray $(date -u +%H:%M:%S)] $*" >&2; }

rr_job_dirs() {
    # Ray's socket paths must stay short (< 108 bytes): keep the root short too.
    local id=${1:?job id}
    RR_JOB_ID=$id
    RR_TMP="${RR_TMP_ROOT:-/tmp}/rr-$id"
    RR_SPILL="$RR_TMP/spill"
    mkdir -p "$RR_TMP" "$RR_SPILL"
    export RR_TMP RR_SPILL
}

rr_gpu_count() {
    # the GPU count in a Slurm GPU spec ("4", "a100:4", "a100:2,v100:1"); empty when empty
    local spec=${1:-} part total=0
    [[ -n "$spec" ]] || return 0
    IFS=, read -r -a parts <<<"$spec"
    for part in "${parts[@]}"; do
        part=${part##*:}
        [[ "$part" =~ ^[0-9]+$ ]] || { rr_log "cannot read a GPU count from '$spec'"; return 1; }
        total=$((total + part))
    done
    echo "$total"
}

_rr_launcher() {
    # the prefix that runs a command on RR_LAUNCH_NODE: srun under Slurm, nothing here
    RR_LAUNCHER=()
    if [[ -n "${RR_LAUNCH_NODE:-}" && -n "${SLURM_JOB_ID:-}" ]]; then
        RR_LAUNCHER=(srun --nodes=1 --ntasks=1 --overlap -w "$RR_LAUNCH_NODE")
        if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
            RR_LAUNCHER+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
        fi
    fi
}

# Runs on the Ray node (through srun or here): make the node's folders, run `ray start
# --block`, pass TERM/INT/HUP on to it, wait until it has stopped its Ray processes, then
# remove what Ray wrote in the node's temp folder (unless RR_KEEP_TMP=1). The launcher's
# *.out logs there belong to the script on the first node (it shows them when a start
# fails, and rr_cleanup removes them last); on every other node the folder goes entirely.
# shellcheck disable=SC2016
_RR_NODE_STEP='
mkdir -p "$RR_TMP" "$RR_SPILL"
"$@" &
child=$!
trap "kill -TERM $child 2>/dev/null" TERM INT HUP
rc=0
wait "$child" || rc=$?
while kill -0 "$child" 2>/dev/null; do wait "$child" || rc=$?; done
if [[ "${RR_KEEP_TMP:-0}" != 1 ]]; then
    for try in 1 2; do
        find "$RR_TMP" -mindepth 1 -maxdepth 1 ! -name "*.out" -exec rm -rf {} + 2>/dev/null && break
        sleep 2
    done
    rmdir "$RR_TMP" 2>/dev/null || true
fi
exit "$rc"
'

_rr_resources() {
    local args=()
    [[ -n "${RR_NUM_CPUS:-}" ]] && args+=(--num-cpus="$RR_NUM_CPUS")
    [[ -n "${RR_NUM_GPUS:-}" ]] && args+=(--num-gpus="$RR_NUM_GPUS")
    echo "${args[@]}"
}

rr_start_head() {
    local ip=${1:?head ip} port=${2:?gcs port}
    : "${RR_TMP:?call rr_job_dirs first}"
    _rr_launcher
    # shellcheck disable=SC2046,SC2086
    "${RR_LAUNCHER[@]}" bash -c "$_RR_NODE_STEP" rr-node \
        ray start --head --block --node-ip-address="$ip" --port="$port" \
        --temp-dir="$RR_TMP" --object-spilling-directory="$RR_SPILL" \
        --include-dashboard=true --dashboard-host="$ip" \
        --dashboard-port="${RR_DASHBOARD_PORT:-8265}" --disable-usage-stats \
        $(_rr_resources) ${RR_HEAD_ARGS:-} >"$RR_TMP/head.out" 2>&1 &
    RR_HEAD_PID=$!
    RR_PIDS+=("$RR_HEAD_PID")
    rr_log "Ray head starting on $ip:$port (pid $RR_HEAD_PID, temp $RR_TMP)"
}

rr_start_worker() {
    local address=${1:?head address} name=${2:-worker}
    : "${RR_TMP:?call rr_job_dirs first}"
    _rr_launcher
    # shellcheck disable=SC2046,SC2086
    "${RR_LAUNCHER[@]}" bash -c "$_RR_NODE_STEP" rr-node \
        ray start --block --address="$address" \
        --temp-dir="$RR_TMP" --object-spilling-directory="$RR_SPILL" --disable-usage-stats \
        $(_rr_resources) ${RR_WORKER_ARGS:-} >"$RR_TMP/$name.out" 2>&1 &
    RR_PIDS+=($!)
    rr_log "Ray worker $name joining $address (pid $!)"
}

_rr_alive_or_fail() {
    local pid
    for pid in "${RR_PIDS[@]}"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rr_log "a Ray process (pid $pid) exited during start-up; its output:"
            tail -n 30 "$RR_TMP"/*.out >&2 2>/dev/null || true
            return 1
        fi
    done
}

_rr_poll() {
    # _rr_poll WHAT TIMEOUT INTERVAL CMD...: until CMD succeeds; fails after TIMEOUT seconds
    # or as soon as a process started here has died
    local what=$1 timeout=$2 interval=$3 start=$SECONDS
    shift 3
    until "$@" >/dev/null 2>&1; do
        _rr_alive_or_fail || return 1
        if ((SECONDS - start >= timeout)); then
            rr_log "$what: not ready after ${timeout}s"
            return 1
        fi
        sleep "$interval"
    done
    rr_log "$what: ready after $((SECONDS - start))s"
}

rr_count_nodes() {
    # alive nodes in `ray status` ("Active:" lines such as " 1 node_ab12...")
    ray status --address="${1:?address}" 2>/dev/null |
        awk '/^Active:/{a=1;next} /^(Pending|Recent failures):/{a=0} a&&$2~/^node_/{n+=$1} END{print n+0}'
}

_rr_gcs_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }
_rr_enough_nodes() { (($(rr_count_nodes "$1") >= $2)); }

rr_wait_gcs() { _rr_poll "GCS $1:$2" "${3:-120}" 1 _rr_gcs_open "$1" "$2"; }
rr_wait_nodes() { _rr_poll "$2 Ray node(s) alive at $1" "${3:-300}" 2 _rr_enough_nodes "$1" "$2"; }
rr_wait_dashboard() { _rr_poll "job API at $1" "${2:-120}" 2 ray job list --address="$1"; }

rr_start_attempts() {
    # rr_start_attempts N CMD...: CMD starts the cluster and waits for it (returning non-zero
    # when it did not come up). A raylet gives its node's agents a fixed 15 s to report their
    # ports and aborts when they are later (a busy node, Python imported from a slow shared
    # file system): stop what was started and try again, the page cache now warm.
    local attempts=${1:?attempts} attempt=1
    shift
    until "$@"; do
        if ((attempt >= attempts)); then
            rr_log "the Ray cluster did not start in $attempt attempt(s)"
            return 1
        fi
        rr_log "the Ray cluster did not start (attempt $attempt): stopping it and starting again"
        rr_cleanup
        rr_job_dirs "$RR_JOB_ID"
        attempt=$((attempt + 1))
    done
}

rr_submit() {
    # rr_submit URL SUBMISSION_ID [ray job submit options] -- CMD...; fails unless SUCCEEDED
    local url=${1:?dashboard url} id=${2:?submission id}
    shift 2
    ray job submit --address="$url" --submission-id="$id" "$@" || true
    local status
    # `ray job status` prints "Job 'ID' succeeded" (or failed / was stopped), or the raw status
    status=$(ray job status --address="$url" "$id" 2>&1 | grep -o -i -E 'succeeded|failed|stopped' |
        tail -n 1 | tr '[:lower:]' '[:upper:]')
    rr_log "job $id: ${status:-UNKNOWN}"
    [[ "$status" == SUCCEEDED ]]
}

rr_cleanup() {
    # Stop only what this script started, by PID: `ray start --block` stops its Ray
    # processes when it is terminated (under Slurm, srun forwards the signal).
    local pid waited=0
    for pid in "${RR_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${RR_PIDS[@]}"; do
        while kill -0 "$pid" 2>/dev/null && ((waited < 60)); do
            sleep 1
            waited=$((waited + 1))
        done
        kill -KILL "$pid" 2>/dev/null || true
    done
    RR_PIDS=()
    if [[ -n "${RR_TMP:-}" && "${RR_KEEP_TMP:-0}" != 1 ]]; then
        # a Ray helper can still be writing its logs for a moment: retry, then leave the
        # folder rather than fail a job that succeeded
        rm -rf "$RR_TMP" 2>/dev/null || { sleep 2; rm -rf "$RR_TMP" 2>/dev/null; } ||
            rr_log "could not remove $RR_TMP (a Ray process still writing): left in place"
    fi
    rr_log "Ray cluster stopped"
}
