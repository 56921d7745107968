#!/usr/bin/env bash
# k-NN evaluation (1-NN and 20-NN majority vote, weighted 20/200-NN) of a trained student.
# Every variable can be overridden from the environment, e.g. EXP=r50_to_r18 EPOCH=100 bash knn_eval.sh;
# extra arguments are passed to eval_knn.py (e.g. --use_pred, --stage layer3, --load_cache).
set -euo pipefail

EXP=${EXP:-moco_r50_to_r18}                            # experiment name used by run.sh
EPOCH_GIVEN=${EPOCH:+1}                                # --epoch is passed when EPOCH is set or picks WEIGHTS
EPOCH=${EPOCH:-130}                                    # checkpoint epoch to evaluate
BASE_DIR=${BASE_DIR:-.}                                # folder that holds exp/
DATA=${DATA:-path/to/imagenet/dataset/root}            # holds train/ and val/
if [ -z "${WEIGHTS:-}" ]; then EPOCH_GIVEN=1; fi
WEIGHTS=${WEIGHTS:-$BASE_DIR/exp/$EXP/checkpoints/ckpt_epoch_$EPOCH.pth}
SAVE=${SAVE:-$BASE_DIR/exp/$EXP/features}              # cached features, logs and results
ARCH=${ARCH:-}                                         # only for plain backbone/teacher files
BATCH_SIZE=${BATCH_SIZE:-512}
NGPUS=${NGPUS:-}                                       # processes; empty: one per visible GPU (or one on CPU)
source "$(dirname "$0")/scripts/launch.sh"             # launched: torchrun for several processes, else python

launched "$(dirname "$0")/eval_knn.py" \
    ${ARCH:+--arch "$ARCH"} \
    --batch-size "$BATCH_SIZE" \
    ${EPOCH_GIVEN:+--epoch "$EPOCH"} \
    --weights "$WEIGHTS" \
    --save "$SAVE" \
    "$@" \
    "$DATA"

echo "$EXP"
echo "epoch: $EPOCH"
