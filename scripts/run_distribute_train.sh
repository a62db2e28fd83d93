#!/usr/bin/env bash
# Data-parallel training through MindSpore's launcher, msrun. See docs/distributed.md.
set -euo pipefail

PROG=$(basename "$0")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: bash scripts/$PROG [launcher options] NUM_WORKERS CONFIG [train.py arguments ...]

Starts NUM_WORKERS data-parallel training processes on this node with msrun (plus msrun's
scheduler process on the master node), waits for them, and exits non-zero if any worker fails,
naming the worker and its log. Everything after CONFIG goes to train.py unchanged
(e.g. --out-dir runs/x --steps 1000 --resume --set train.lr=4e-4).

  NUM_WORKERS   workers (devices) on this node; the job has NUM_WORKERS x NNODES workers.
  CONFIG        a YAML config path or the name of a shipped config (configs/NAME.yaml).

Launcher options (or the environment variable in brackets; options win):
  --device-target T   auto | Ascend | GPU | CPU                                      [DEVICE_TARGET, auto]
                      auto: Ascend if npu-smi or /dev/davinci* exists, GPU if nvidia-smi lists a GPU,
                      else CPU. Passed to train.py as --device unless you pass --device yourself.
  --devices LIST      devices of this node to use, e.g. 0,1,2,3; exported as ASCEND_RT_VISIBLE_DEVICES
                      (Ascend) or CUDA_VISIBLE_DEVICES (GPU); ignored on CPU          [DEVICES, all]
  --nnodes N          number of nodes (one launcher per node, same arguments)        [NNODES, 1]
  --node-rank R       this node's index, 0 on the master node                        [NODE_RANK, 0]
  --master-addr A     IP address of the master node (required when N > 1)            [MASTER_ADDR, 127.0.0.1]
  --master-port P     msrun scheduler port; a free port is picked on a single node
                      when not given, 8118 on several nodes                          [MASTER_PORT]
  --log-dir D         msrun log folder: scheduler.log, worker_<rank>.log, msrun.log
                                                    [LOG_DIR, runs/logs/msrun_<date>_<time>_node<R>]
  --bind-core B       auto | true | false: msrun --bind_core (pin each worker to its own CPU cores);
                      auto = true on Ascend/GPU, false on CPU                        [BIND_CORE, auto]
  --cluster-timeout S seconds to wait for all workers to join                        [CLUSTER_TIME_OUT, 600]
  --tail R            ranks whose log is echoed to this console: 0 (default), -1 for all, or a
                      comma list; every log is always written to the log folder      [TAIL_WORKER_LOG, 0]
  -h, --help          this text

Other environment: TRAIN_SCRIPT (the Python entry msrun starts, default train.py of this repo),
GLOG_v (MindSpore's log level in the workers; set to 3 = errors only unless you set it).

Examples:
  # one 8-device Ascend node
  bash scripts/$PROG 8 configs/cifar10.yaml --out-dir runs/cifar8
  # two nodes with 8 devices each (run on both; node 1 with --node-rank 1)
  bash scripts/$PROG --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 8118 8 cifar10
  # two CPU workers on this machine, then continue the same run after an interruption
  DEVICE_TARGET=CPU bash scripts/$PROG 2 fashion_mnist_fast --out-dir runs/fm2
  DEVICE_TARGET=CPU bash scripts/$PROG 2 fashion_mnist_fast --out-dir runs/fm2 --resume
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 2; }

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

# ------------------------------------------------------------------ arguments
DEVICE_TARGET=${DEVICE_TARGET:-auto}
DEVICES=${DEVICES:-}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-}
LOG_DIR=${LOG_DIR:-}
BIND_CORE=${BIND_CORE:-auto}
CLUSTER_TIME_OUT=${CLUSTER_TIME_OUT:-600}
TAIL_WORKER_LOG=${TAIL_WORKER_LOG:-0}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-$REPO/train.py}

need_value() { [[ $# -ge 2 && -n $2 ]] || die "option $1 needs a value (see --help)"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        -h|--help) usage; exit 0 ;;
        --device-target) need_value "$@"; DEVICE_TARGET=$2; shift 2 ;;
        --devices) need_value "$@"; DEVICES=$2; shift 2 ;;
        --nnodes) need_value "$@"; NNODES=$2; shift 2 ;;
        --node-rank) need_value "$@"; NODE_RANK=$2; shift 2 ;;
        --master-addr) need_value "$@"; MASTER_ADDR=$2; shift 2 ;;
        --master-port) need_value "$@"; MASTER_PORT=$2; shift 2 ;;
        --log-dir) need_value "$@"; LOG_DIR=$2; shift 2 ;;
        --bind-core) need_value "$@"; BIND_CORE=$2; shift 2 ;;
        --cluster-timeout) need_value "$@"; CLUSTER_TIME_OUT=$2; shift 2 ;;
        --tail) need_value "$@"; TAIL_WORKER_LOG=$2; shift 2 ;;
        --) shift; break ;;
        -*) die "unknown launcher option $1 (launcher options go before NUM_WORKERS; see --help)" ;;
        *) break ;;
    esac
done
if [[ $# -lt 2 ]]; then
    usage >&2
    exit 2
fi
NUM_WORKERS=$1
CONFIG=$2
shift 2

is_uint "$NUM_WORKERS" && (( NUM_WORKERS >= 1 )) || die "NUM_WORKERS must be a positive integer, got '$NUM_WORKERS'"
is_uint "$NNODES" && (( NNODES >= 1 )) || die "the number of nodes must be a positive integer, got '$NNODES'"
is_uint "$NODE_RANK" && (( NODE_RANK < NNODES )) || die "the node rank must lie in [0, $((NNODES - 1))], got '$NODE_RANK'"
is_uint "$CLUSTER_TIME_OUT" || die "the cluster timeout must be a number of seconds, got '$CLUSTER_TIME_OUT'"
[[ $TAIL_WORKER_LOG =~ ^(-1|[0-9]+(,[0-9]+)*)$ ]] || die "--tail takes -1 or a comma list of ranks, got '$TAIL_WORKER_LOG'"
command -v msrun >/dev/null 2>&1 || die "msrun not found on PATH: install MindSpore (pip install mindspore) in this environment"
command -v python >/dev/null 2>&1 || die "'python' not found on PATH (msrun starts the workers with 'python')"
[[ -f $TRAIN_SCRIPT ]] || die "training script $TRAIN_SCRIPT not found (TRAIN_SCRIPT)"
if [[ ! -f $CONFIG && ! -f $REPO/configs/$CONFIG && ! -f $REPO/configs/$CONFIG.yaml ]]; then
    die "config '$CONFIG' not found (neither a file nor configs/$CONFIG[.yaml])"
fi
[[ -f $CONFIG ]] && CONFIG=$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")

# ------------------------------------------------------------------ device
detect_device() {
    if command -v npu-smi >/dev/null 2>&1 || compgen -G "/dev/davinci[0-9]*" >/dev/null; then
        echo Ascend
    elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        echo GPU
    else
        echo CPU
    fi
}
case ${DEVICE_TARGET,,} in
    auto) DEVICE_TARGET=$(detect_device) ;;
    ascend|npu) DEVICE_TARGET=Ascend ;;
    gpu|cuda) DEVICE_TARGET=GPU ;;
    cpu) DEVICE_TARGET=CPU ;;
    *) die "unknown device target '$DEVICE_TARGET'; choose auto, Ascend, GPU or CPU" ;;
esac

if [[ -n $DEVICES && $DEVICE_TARGET != CPU ]]; then
    [[ $DEVICES =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--devices takes a comma list of device ids, got '$DEVICES'"
    IFS=, read -r -a device_list <<<"$DEVICES"
    (( ${#device_list[@]} >= NUM_WORKERS )) || \
        die "$NUM_WORKERS workers need $NUM_WORKERS devices but --devices lists ${#device_list[@]} ($DEVICES)"
    if [[ $DEVICE_TARGET == Ascend ]]; then
        export ASCEND_RT_VISIBLE_DEVICES=$DEVICES
    else
        export CUDA_VISIBLE_DEVICES=$DEVICES
    fi
fi

case ${BIND_CORE,,} in
    auto) [[ $DEVICE_TARGET == CPU ]] && BIND_CORE=False || BIND_CORE=True ;;
    true|1|yes) BIND_CORE=True ;;
    false|0|no) BIND_CORE=False ;;
    *) die "--bind-core takes auto, true or false, got '$BIND_CORE'" ;;
esac

# ------------------------------------------------------------------ cluster address
if (( NNODES > 1 )); then
    [[ -n $MASTER_ADDR ]] || die "with $NNODES nodes give the master node's IP address (--master-addr or MASTER_ADDR)"
    MASTER_PORT=${MASTER_PORT:-8118}
else
    MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
    if [[ -z $MASTER_PORT ]]; then
        MASTER_PORT=$(python - <<'PY'
import socket
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
PY
)
    fi
fi
is_uint "$MASTER_PORT" && (( MASTER_PORT >= 1024 && MASTER_PORT <= 65535 )) || \
    die "the master port must lie in [1024, 65535], got '$MASTER_PORT'"
TOTAL_WORKERS=$(( NUM_WORKERS * NNODES ))

# ------------------------------------------------------------------ train.py arguments
TRAIN_ARGS=(--config "$CONFIG")
has_device=0
for arg in "$@"; do
    [[ $arg == --device || $arg == --device=* ]] && has_device=1
done
(( has_device )) || TRAIN_ARGS+=(--device "$DEVICE_TARGET")
TRAIN_ARGS+=("$@")

LOG_DIR=${LOG_DIR:-$REPO/runs/logs/msrun_$(date +%Y%m%d_%H%M%S)_node$NODE_RANK}
mkdir -p "$LOG_DIR" || die "cannot create the log folder $LOG_DIR"
LOG_DIR=$(cd "$LOG_DIR" && pwd)
MSRUN_LOG=$LOG_DIR/msrun.log
export GLOG_v=${GLOG_v:-3}

MSRUN_ARGS=(--worker_num="$TOTAL_WORKERS" --local_worker_num="$NUM_WORKERS" --master_addr="$MASTER_ADDR"
            --master_port="$MASTER_PORT" --log_dir="$LOG_DIR" --join=True --cluster_time_out="$CLUSTER_TIME_OUT"
            --tail_worker_log="$TAIL_WORKER_LOG" --bind_core="$BIND_CORE")
(( NNODES > 1 )) && MSRUN_ARGS+=(--node_rank="$NODE_RANK")

echo "$PROG: $NUM_WORKERS worker(s) on this node (node $NODE_RANK of $NNODES, $TOTAL_WORKERS in all), device $DEVICE_TARGET${DEVICES:+ [$DEVICES]}, master $MASTER_ADDR:$MASTER_PORT"
echo "$PROG: logs in $LOG_DIR (worker_<rank>.log per worker, scheduler.log, msrun.log)"
echo "$PROG: msrun ${MSRUN_ARGS[*]} $TRAIN_SCRIPT ${TRAIN_ARGS[*]}"

# ------------------------------------------------------------------ run and wait
msrun "${MSRUN_ARGS[@]}" "$TRAIN_SCRIPT" "${TRAIN_ARGS[@]}" >"$MSRUN_LOG" 2>&1 &
MSRUN_PID=$!
tail -n +1 -F --pid="$MSRUN_PID" "$MSRUN_LOG" 2>/dev/null &
TAIL_PID=$!
interrupted=0
on_signal() {
    interrupted=1
    echo "$PROG: interrupted: stopping msrun and its workers" >&2
    kill -INT "$MSRUN_PID" 2>/dev/null || true
}
trap on_signal INT TERM
msrun_children() {  # this node's msrun children with MS_ROLE=$1 that still run
    local pid
    for pid in $(pgrep -P "$MSRUN_PID" 2>/dev/null); do
        if tr '\0' '\n' <"/proc/$pid/environ" 2>/dev/null | grep -qx "MS_ROLE=$1"; then
            echo "$pid"
        fi
    done
}
stop_scheduler() {
    # After a worker fails, msrun kills the other workers but then waits for its scheduler, which only
    # notices the lost workers after ~30 s. The job is over: end that scheduler so the failure is reported
    # at once. Only this node's own msrun child is touched. The scheduler serves the cluster inside
    # MindSpore's init(), where train.py's SIGTERM handler (finish the step, save) never runs, so a TERM
    # alone would leave it to that timeout; it holds no training state: still there 1 s later, it is killed.
    local pid i
    for (( i = 0; i < 20; i++ )); do   # msrun's own clean-up of the workers first (it kills them at once)
        [[ -n $(msrun_children MS_WORKER) ]] || break
        sleep 0.1
    done
    for pid in $(msrun_children MS_SCHED); do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for (( i = 0; i < 5; i++ )); do
        [[ -n $(msrun_children MS_SCHED) ]] || return 0
        sleep 0.2
    done
    for pid in $(msrun_children MS_SCHED); do
        kill -KILL "$pid" 2>/dev/null || true
    done
}
scheduler_stopped=0
while kill -0 "$MSRUN_PID" 2>/dev/null; do
    if (( ! scheduler_stopped )) && grep -q -E 'Worker process [0-9]+ exit with exception' "$MSRUN_LOG" 2>/dev/null; then
        stop_scheduler
        scheduler_stopped=1
    fi
    sleep 0.5
done
wait "$MSRUN_PID" && rc=0 || rc=$?
wait "$TAIL_PID" 2>/dev/null || true
trap - INT TERM

if (( interrupted )); then
    echo "$PROG: stopped by a signal; continue the run with the same command plus --resume" >&2
    exit 130
fi
if (( rc == 0 )); then
    echo "$PROG: all $NUM_WORKERS worker(s) on this node finished; logs in $LOG_DIR"
    exit 0
fi

# ------------------------------------------------------------------ failure report
describe_code() {  # msrun prints Popen return codes: -N = killed by signal N
    local code=$1
    if [[ $code =~ ^-[0-9]+$ ]]; then
        local sig=${code#-}
        echo "was killed by signal $sig (SIG$(kill -l "$sig" 2>/dev/null || echo '?'))"
    else
        echo "exited with status $code"
    fi
}
log_of_pid() {  # the worker log in which train.py announced this pid
    grep -l -E "data-parallel worker: pid $1( |$)" "$LOG_DIR"/worker_*.log 2>/dev/null | head -n 1 || true
}
rank_in_log() {
    sed -n -E 's/.*data-parallel worker: pid [0-9]+ is rank ([0-9]+) of.*/\1/p' "$1" | head -n 1
}
show_tail() {  # the last lines of a worker log without MindSpore's INFO/WARNING chatter
    grep -v -E '^\[(INFO|WARNING|DEBUG)\]' "$1" | tail -n 15 | sed 's/^/    | /' >&2 || true
}

echo "" >&2
echo "$PROG: FAILED: msrun exited with status $rc" >&2
failed=$(sed -n -E 's/.*Worker process ([0-9]+) exit with exception\. Error code: (-?[0-9]+).*/\1 \2/p' "$MSRUN_LOG" | head -n 1)
reported=0
if [[ -n $failed ]]; then
    read -r pid code <<<"$failed"
    log=$(log_of_pid "$pid")
    if [[ -n $log ]]; then
        rank=$(rank_in_log "$log")
        echo "$PROG: worker ${rank:+rank $rank }(pid $pid) $(describe_code "$code"); msrun then stopped the other workers." >&2
        echo "$PROG: its log: $log" >&2
        show_tail "$log"
        reported=1
    else
        echo "$PROG: worker process $pid $(describe_code "$code") before it announced its rank; msrun then stopped the other workers." >&2
    fi
fi
if (( ! reported )); then
    for log in "$LOG_DIR"/worker_*.log; do
        [[ -f $log ]] || continue
        if grep -v -E '^\[(INFO|WARNING|DEBUG)\]' "$log" | grep -q -E 'Traceback|[Ee]rror'; then
            echo "$PROG: errors in $log:" >&2
            show_tail "$log"
            reported=1
        fi
    done
fi
if (( ! reported )); then
    echo "$PROG: no worker log names the cause; see msrun's own output in $MSRUN_LOG and $LOG_DIR/scheduler.log" >&2
fi
echo "$PROG: all logs: $LOG_DIR" >&2
echo "$PROG: to continue from the last checkpoint, run the same command with --resume" >&2
exit 1
