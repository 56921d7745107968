#!/usr/bin/env bash
# Linear probe (40 epochs, SGD, lr 0.01 dropped at 15/30) of a trained student.
# Every variable can be overridden from the environment, e.g. EXP=r50_to_r18 USE_CACHE=1 bash lin_eval.sh;
# extra arguments are passed to eval_linear.py (e.g. --use_pred, --resume <save>/checkpoint.pth.tar).
set -euo pipefail

EXP=${EXP:-moco_r50_to_r18}                            # experiment name used by run.sh
EPOCH_GIVEN=${EPOCH:+1}                                # --epoch is passed when EPOCH is set or picks WEIGHTS
EPOCH=${EPOCH:-130}                                    # checkpoint epoch to evaluate
BASE_DIR=${BASE_DIR:-.}                                # folder that holds exp/
DATA=${DATA:-path/to/imagenet/dataset/root}            # holds train/ and val/
if [ -z "${WEIGHTS:-}" ]; then EPOCH_GIVEN=1; fi
WEIGHTS=${WEIGHTS:-$BASE_DIR/exp/$EXP/checkpoints/ckpt_epoch_$EPOCH.pth}
SAVE=${SAVE:-$BASE_DIR/exp/$EXP/linear}                # feature cache, probe checkpoints and results
ARCH=${ARCH:-}                                         # only for plain backbone/teacher files
EVAL_FREQ=${EVAL_FREQ:-40}
USE_CACHE=${USE_CACHE:-0}                              # 1: train on cached center-crop features
NGPUS=${NGPUS:-}                                       # processes; empty: one per visible GPU (or one on CPU)
source "$(dirname "$0")/scripts/launch.sh"             # launched: torchrun for several processes, else python

CACHE_FLAG=()
if [ "$USE_CACHE" = 1 ]; then CACHE_FLAG=(--use_cache); fi

launched "$(dirname "$0")/eval_linear.py" \
    ${ARCH:+--arch "$ARCH"} \
    --eval-freq "$EVAL_FREQ" \
    ${EPOCH_GIVEN:+--epoch "$EPOCH"} \
    --weights "$WEIGHTS" \
    --save "$SAVE" \
    "${CACHE_FLAG[@]}" \
    "$@" \
    "$DATA"

echo "$EXP"
echo "epoch: $EPOCH"
