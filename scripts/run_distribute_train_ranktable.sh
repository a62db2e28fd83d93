#!/usr/bin/env bash
# Data-parallel training on older Ascend clusters that use an HCCL rank table instead of msrun:
# one process per device, as MindSpore's model zoo starts them. See docs/distributed.md.
#
# HCCL through a rank table needs Ascend NPUs, which the project's CI machines do not have: only this
# script's process handling is tested (tests/test_distributed.py, with a stand-in TRAIN_SCRIPT on CPU).
# A rank table is JSON written by hccl_tools.py or the cluster's scheduler. What the script relies on:
#   * ms_diffusion.training.distributed.init_data_parallel treats a process with RANK_TABLE_FILE,
#     RANK_ID and RANK_SIZE > 1 (and no msrun MS_ROLE) as a rank-table worker and calls init() (HCCL);
#   * every process sees exactly one NPU (ASCEND_RT_VISIBLE_DEVICES=<its device>), so MindSpore's
#     default device 0 is that NPU; DEVICE_ID keeps the physical id, as the rank table lists it.
# Prefer scripts/run_distribute_train.sh (msrun) wherever MindSpore >= 2.3 and msrun are available.
set -euo pipefail

PROG=$(basename "$0")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: bash scripts/$PROG RANK_TABLE_FILE NUM_DEVICES CONFIG [train.py arguments ...]

Starts NUM_DEVICES training processes on this node (Ascend only), one per NPU, with
RANK_TABLE_FILE, RANK_ID, RANK_SIZE and DEVICE_ID set for each; waits for them; if one fails,
stops the others and exits non-zero naming that rank and its log.

  RANK_TABLE_FILE  the HCCL rank table (JSON) describing every device of the job
  NUM_DEVICES      processes (NPUs) on this node
  CONFIG           a YAML config path or the name of a shipped config (configs/NAME.yaml)

Environment:
  RANK_SIZE     ranks in the whole job                    [number of devices in the rank table]
  RANK_START    global rank of this node's first process (node index x NUM_DEVICES)       [0]
  DEVICE_START  physical id of this node's first NPU; process i uses DEVICE_START + i       [0]
  LOG_DIR       one log per rank: rank_<RANK_ID>.log [runs/logs/ranktable_<date>_<time>]
  TRAIN_SCRIPT  the Python entry each process runs                                [train.py of this repo]

Example (2 nodes x 8 NPUs; the same rank table on both):
  node 0: bash scripts/$PROG /path/hccl_16p.json 8 cifar10 --out-dir /shared/runs/c10
  node 1: RANK_START=8 bash scripts/$PROG /path/hccl_16p.json 8 cifar10 --out-dir /shared/runs/c10
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 2; }
is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

case ${1:-} in
    -h|--help) usage; exit 0 ;;
esac
if [[ $# -lt 3 ]]; then
    usage >&2
    exit 2
fi
TABLE=$1
NUM_DEVICES=$2
CONFIG=$3
shift 3

[[ -f $TABLE ]] || die "rank table '$TABLE' not found"
TABLE=$(cd "$(dirname "$TABLE")" && pwd)/$(basename "$TABLE")
is_uint "$NUM_DEVICES" && (( NUM_DEVICES >= 1 )) || die "NUM_DEVICES must be a positive integer, got '$NUM_DEVICES'"
if [[ ! -f $CONFIG && ! -f $REPO/configs/$CONFIG && ! -f $REPO/configs/$CONFIG.yaml ]]; then
    die "config '$CONFIG' not found (neither a file nor configs/$CONFIG[.yaml])"
fi
command -v python >/dev/null 2>&1 || die "'python' not found on PATH"
TRAIN_SCRIPT=${TRAIN_SCRIPT:-$REPO/train.py}
[[ -f $TRAIN_SCRIPT ]] || die "training script $TRAIN_SCRIPT not found (TRAIN_SCRIPT)"

TABLE_SIZE=$(python - "$TABLE" <<'PY'
import json, sys
try:
    table = json.load(open(sys.argv[1]))
    print(sum(len(server.get("device", [])) for server in table["server_list"]))
except Exception as err:  # not JSON, or not a rank table
    print(f"ERROR {type(err).__name__}: {err}")
PY
)
[[ $TABLE_SIZE =~ ^[0-9]+$ ]] || die "cannot read the device list of rank table $TABLE ($TABLE_SIZE)"
RANK_SIZE=${RANK_SIZE:-$TABLE_SIZE}
RANK_START=${RANK_START:-0}
DEVICE_START=${DEVICE_START:-0}
is_uint "$RANK_SIZE" && is_uint "$RANK_START" && is_uint "$DEVICE_START" || \
    die "RANK_SIZE, RANK_START and DEVICE_START must be non-negative integers"
(( RANK_SIZE > 1 )) || die "RANK_SIZE is $RANK_SIZE: for one device use scripts/run_standalone_train.sh"
(( RANK_START + NUM_DEVICES <= RANK_SIZE )) || \
    die "ranks $RANK_START..$((RANK_START + NUM_DEVICES - 1)) do not fit in RANK_SIZE=$RANK_SIZE"
(( RANK_SIZE == TABLE_SIZE )) || echo "$PROG: warning: RANK_SIZE=$RANK_SIZE but the rank table lists $TABLE_SIZE devices" >&2

LOG_DIR=${LOG_DIR:-$REPO/runs/logs/ranktable_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$LOG_DIR" || die "cannot create the log folder $LOG_DIR"

has_device=0
for arg in "$@"; do
    [[ $arg == --device || $arg == --device=* ]] && has_device=1
done
ARGS=(--config "$CONFIG")
(( has_device )) || ARGS+=(--device Ascend)
ARGS+=("$@")

unset MS_ROLE MS_WORKER_NUM MS_SCHED_HOST MS_SCHED_PORT
export RANK_TABLE_FILE=$TABLE RANK_SIZE
echo "$PROG: ranks $RANK_START..$((RANK_START + NUM_DEVICES - 1)) of $RANK_SIZE on NPUs $DEVICE_START..$((DEVICE_START + NUM_DEVICES - 1)); logs in $LOG_DIR"
echo "$PROG: python $TRAIN_SCRIPT ${ARGS[*]}"

declare -A RANK_OF=()
PIDS=()
for (( i = 0; i < NUM_DEVICES; i++ )); do
    rank=$(( RANK_START + i ))
    device=$(( DEVICE_START + i ))
    (
        export RANK_ID=$rank DEVICE_ID=$device ASCEND_RT_VISIBLE_DEVICES=$device
        exec python "$TRAIN_SCRIPT" "${ARGS[@]}"
    ) >"$LOG_DIR/rank_$rank.log" 2>&1 &
    PIDS+=($!)
    RANK_OF[$!]=$rank
done

stop_all() {  # SIGTERM every rank still running, SIGKILL what is left after 5 s
    local pid tries alive
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for (( tries = 0; tries < 10; tries++ )); do
        alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        (( alive )) || return 0
        sleep 0.5
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
}
trap 'echo "$PROG: interrupted: stopping every rank" >&2; stop_all; exit 130' INT TERM

remaining=("${PIDS[@]}")
while (( ${#remaining[@]} > 0 )); do
    still=()
    for pid in "${remaining[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            still+=("$pid")
            continue
        fi
        status=0
        wait "$pid" || status=$?
        if (( status != 0 )); then
            rank=${RANK_OF[$pid]}
            if (( status > 128 )); then
                why="was killed by signal $(( status - 128 )) (SIG$(kill -l $(( status - 128 )) 2>/dev/null || echo '?'))"
            else
                why="exited with status $status"
            fi
            echo "$PROG: FAILED: rank $rank (pid $pid) $why; stopping the other ranks" >&2
            echo "$PROG: its log: $LOG_DIR/rank_$rank.log" >&2
            grep -v -E '^\[(INFO|WARNING|DEBUG)\]' "$LOG_DIR/rank_$rank.log" | tail -n 15 | sed 's/^/    | /' >&2 || true
            stop_all
            echo "$PROG: to continue from the last checkpoint, run the same command with --resume" >&2
            exit 1
        fi
    done
    remaining=("${still[@]+"${still[@]}"}")
    (( ${#remaining[@]} == 0 )) || sleep 2
done
echo "$PROG: all $NUM_DEVICES rank(s) on this node finished; logs in $LOG_DIR"
