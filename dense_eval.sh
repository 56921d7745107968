#!/usr/bin/env bash
# Segmentation probe (a linear 1x1 classifier on the frozen feature map, mIoU) of a trained student.
# Every variable can be overridden from the environment, e.g. EXP=r50_to_r18 DATA=/data/VOCdevkit bash dense_eval.sh;
# extra arguments are passed to eval_dense.py (e.g. --load_cache, --epochs 20, --num_classes 5 for a plain folder).
set -euo pipefail

EXP=${EXP:-moco_r50_to_r18}                            # experiment name used by run.sh
EPOCH=${EPOCH:-130}                                    # checkpoint epoch to evaluate
BASE_DIR=${BASE_DIR:-.}                                # folder that holds exp/
DATA=${DATA:-path/to/VOCdevkit}                        # VOCdevkit, ADEChallengeData2016, or train/ + val/ folders
WEIGHTS=${WEIGHTS:-$BASE_DIR/exp/$EXP/checkpoints/ckpt_epoch_$EPOCH.pth}
SAVE=${SAVE:-$BASE_DIR/exp/$EXP/dense}                 # cached feature maps, logs and results
ARCH=${ARCH:-}                                         # only for plain backbone/teacher files
IMAGE_SIZE=${IMAGE_SIZE:-224}
NGPUS=${NGPUS:-}                                       # processes; empty: one per visible GPU (or one on CPU)
source "$(dirname "$0")/scripts/launch.sh"             # launched: torchrun for several processes, else python

launched "$(dirname "$0")/eval_dense.py" \
    ${ARCH:+--arch "$ARCH"} \
    --image_size "$IMAGE_SIZE" \
    --weights "$WEIGHTS" \
    --save "$SAVE" \
    "$@" \
    "$DATA"

echo "$EXP"
echo "epoch: $EPOCH"
