#!/usr/bin/env bash
# Zero-shot top-1/top-5 of a student distilled from an open_clip (CLIP, SigLIP) teacher, and of that teacher, with
# the teacher's text tower; results in $SAVE/zeroshot.json, beside the k-NN results of knn_eval.sh.
# Every variable can be overridden from the environment, e.g. EXP=clip_b32_to_r18 EPOCH=100 bash zeroshot_eval.sh;
# extra arguments are passed to eval_zeroshot.py (e.g. --class_names names.txt, --teacher_weights FILE).
set -euo pipefail

EXP=${EXP:-clip_b32_to_r18}                            # experiment name used by run.sh
EPOCH=${EPOCH:-130}                                    # checkpoint epoch to evaluate
BASE_DIR=${BASE_DIR:-.}                                # folder that holds exp/
DATA=${DATA:-path/to/imagenet/dataset/root}            # holds val/
WEIGHTS=${WEIGHTS:-$BASE_DIR/exp/$EXP/checkpoints/ckpt_epoch_$EPOCH.pth}
SAVE=${SAVE:-$BASE_DIR/exp/$EXP/features}              # where knn_eval.sh writes knn_results.json
BATCH_SIZE=${BATCH_SIZE:-512}
NGPUS=${NGPUS:-}                                       # processes; empty: one per visible GPU (or one on CPU)
source "$(dirname "$0")/scripts/launch.sh"             # launched: torchrun for several processes, else python

launched "$(dirname "$0")/eval_zeroshot.py" \
    --batch-size "$BATCH_SIZE" \
    --weights "$WEIGHTS" \
    --save "$SAVE" \
    "$@" \
    "$DATA"

echo "$EXP"
echo "epoch: $EPOCH"
