#!/usr/bin/env bash
# Training on one device (no msrun). See docs/distributed.md.
set -euo pipefail

PROG=$(basename "$0")
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() {
    cat <<EOF
Usage: bash scripts/$PROG CONFIG [train.py arguments ...]

Trains on one device: python train.py --config CONFIG [arguments], with the device chosen below.
The output goes to this console and to LOG_DIR/train.log; the exit status is train.py's.

  CONFIG      a YAML config path or the name of a shipped config (configs/NAME.yaml).

Environment:
  DEVICE_TARGET  auto | Ascend | GPU | CPU; passed as --device unless you pass --device   [auto]
                 (auto: Ascend if npu-smi or /dev/davinci* exists, GPU if nvidia-smi lists one, else CPU)
  DEVICE_ID      the device to use on Ascend/GPU; exported as ASCEND_RT_VISIBLE_DEVICES or
                 CUDA_VISIBLE_DEVICES, so the process sees exactly that one device              [0]
  LOG_DIR        folder for train.log                              [runs/logs/standalone_<date>_<time>]

Examples:
  bash scripts/$PROG fashion_mnist_fast --out-dir runs/fm
  DEVICE_ID=3 bash scripts/$PROG configs/cifar10.yaml --out-dir runs/c10 --resume
EOF
}

die() { echo "$PROG: error: $*" >&2; exit 2; }

case ${1:-} in
    -h|--help) usage; exit 0 ;;
    "") usage >&2; exit 2 ;;
esac
CONFIG=$1
shift
if [[ ! -f $CONFIG && ! -f $REPO/configs/$CONFIG && ! -f $REPO/configs/$CONFIG.yaml ]]; then
    die "config '$CONFIG' not found (neither a file nor configs/$CONFIG[.yaml])"
fi
command -v python >/dev/null 2>&1 || die "'python' not found on PATH"

DEVICE_TARGET=${DEVICE_TARGET:-auto}
DEVICE_ID=${DEVICE_ID:-0}
[[ $DEVICE_ID =~ ^[0-9]+$ ]] || die "DEVICE_ID must be a device number, got '$DEVICE_ID'"
case ${DEVICE_TARGET,,} in
    auto)
        if command -v npu-smi >/dev/null 2>&1 || compgen -G "/dev/davinci[0-9]*" >/dev/null; then DEVICE_TARGET=Ascend
        elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then DEVICE_TARGET=GPU
        else DEVICE_TARGET=CPU
        fi ;;
    ascend|npu) DEVICE_TARGET=Ascend ;;
    gpu|cuda) DEVICE_TARGET=GPU ;;
    cpu) DEVICE_TARGET=CPU ;;
    *) die "unknown DEVICE_TARGET '$DEVICE_TARGET'; choose auto, Ascend, GPU or CPU" ;;
esac
case $DEVICE_TARGET in
    Ascend) export ASCEND_RT_VISIBLE_DEVICES=$DEVICE_ID ;;
    GPU) export CUDA_VISIBLE_DEVICES=$DEVICE_ID ;;
esac
unset MS_ROLE MS_WORKER_NUM RANK_TABLE_FILE MINDSPORE_HCCL_CONFIG_PATH  # one process, whatever the shell had

ARGS=(--config "$CONFIG")
has_device=0
for arg in "$@"; do
    [[ $arg == --device || $arg == --device=* ]] && has_device=1
done
(( has_device )) || ARGS+=(--device "$DEVICE_TARGET")
ARGS+=("$@")

LOG_DIR=${LOG_DIR:-$REPO/runs/logs/standalone_$(date +%Y%m%d_%H%M%S)}
mkdir -p "$LOG_DIR" || die "cannot create the log folder $LOG_DIR"
device=$DEVICE_TARGET
[[ $DEVICE_TARGET == CPU ]] || device+=" $DEVICE_ID"
echo "$PROG: device $device, log $LOG_DIR/train.log"
echo "$PROG: python $REPO/train.py ${ARGS[*]}"
set +e
python "$REPO/train.py" "${ARGS[@]}" 2>&1 | tee "$LOG_DIR/train.log"
rc=${PIPESTATUS[0]}
set -e
if (( rc != 0 )); then
    echo "$PROG: train.py failed with status $rc; log: $LOG_DIR/train.log" >&2
fi
exit "$rc"
