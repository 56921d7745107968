#!/usr/bin/env bash
# Transfer evaluation (L-BFGS logistic regression with the L2 strength chosen on a held-out split,
# plus k-NN) of a trained student, or of any backbone, on a dataset laid out as folders:
# DATASET/train/<class>/<image>, DATASET/val/... and/or DATASET/test/... (see README).
# Every variable can be overridden from the environment, e.g.
#   EXP=r50_to_r18 EPOCH=100 DATASET=/data/transfer/cifar10 bash transfer_eval.sh
# extra arguments are passed to eval_transfer.py (e.g. --use_pred, --stage layer3, --load_cache).
#
# Teacher vs student on several datasets is one loop; a plain teacher file needs ARCH, and
# EXP only names the folder its results go to (exp/<EXP>/transfer/<dataset>/):
#   for DATASET in /data/transfer/{cifar10,cifar100,flowers102}; do
#     DATASET=$DATASET EXP=moco_r50_to_r18 bash transfer_eval.sh
#     DATASET=$DATASET EXP=teacher_moco_r50 ARCH=resnet50 \
#       WEIGHTS=/weights/moco_v2_800ep_pretrain.pth.tar bash transfer_eval.sh
#   done
set -euo pipefail

EXP=${EXP:-moco_r50_to_r18}                            # experiment name used by run.sh
EPOCH=${EPOCH:-130}                                    # checkpoint epoch to evaluate
BASE_DIR=${BASE_DIR:-.}                                # folder that holds exp/
DATASET=${DATASET:-path/to/transfer/dataset}           # holds train/ and val/ and/or test/
DATASET_NAME=${DATASET_NAME:-$(basename "$DATASET")}   # name in the results and the output folder
WEIGHTS=${WEIGHTS:-$BASE_DIR/exp/$EXP/checkpoints/ckpt_epoch_$EPOCH.pth}
SAVE=${SAVE:-$BASE_DIR/exp/$EXP/transfer/$DATASET_NAME}   # cached features, logs and results
ARCH=${ARCH:-}                                         # only for plain backbone/teacher files
IMAGE_SIZE=${IMAGE_SIZE:-224}
BATCH_SIZE=${BATCH_SIZE:-512}
NGPUS=${NGPUS:-}                                       # processes; empty: one per visible GPU (or one on CPU)
source "$(dirname "$0")/scripts/launch.sh"             # launched: torchrun for several processes, else python

launched "$(dirname "$0")/eval_transfer.py" \
    ${ARCH:+--arch "$ARCH"} \
    --name "$DATASET_NAME" \
    --image_size "$IMAGE_SIZE" \
    --batch-size "$BATCH_SIZE" \
    --weights "$WEIGHTS" \
    --save "$SAVE" \
    "$@" \
    "$DATASET"

echo "$EXP"
echo "dataset: $DATASET_NAME"
