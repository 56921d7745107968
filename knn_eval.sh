#!/usr/bin/env bash
# k-NN evaluation (1-NN and 20-NN majority vote, weighted 20/200-NN) of a trained student.
# Every variable can be overridden from the environment, e.g. EXP=r50_to_r18 EPOCH=100 bash knn_eval.sh;
# extra arguments are passed to eval_knn.py (e.g. --use_pred, --stage layer3, --load_cache).
set -euo pipefail

EXP=${EXP:-moco_r50_to_r18}                            # experiment name used by run.sh
EPOCH=${EPOCH:-130}                                    # checkpoint epoch to evaluate
BASE_DIR=${BASE_DIR:-.}                                # folder that holds exp/
DATA=${DATA:-path/to/imagenet/dataset/root}            # holds train/ and val/
WEIGHTS=${WEIGHTS:-$BASE_DIR/exp/$EXP/checkpoints/ckpt_epoch_$EPOCH.pth}
SAVE=${SAVE:-$BASE_DIR/exp/$EXP/features}              # cached features, logs and results
ARCH=${ARCH:-}                                         # only for plain backbone/teacher files
BATCH_SIZE=${BATCH_SIZE:-512}
# one process per visible GPU (respects CUDA_VISIBLE_DEVICES); one CPU process without GPUs
NGPUS=${NGPUS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
# several processes through torchrun; one is started directly (torchrun would only add ~3 s of start-up)
launch=(torchrun --standalone --nproc_per_node="$NGPUS"); [ "$NGPUS" -gt 1 ] || launch=(python)

"${launch[@]}" "$(dirname "$0")/eval_knn.py" \
    ${ARCH:+--arch "$ARCH"} \
    --batch-size "$BATCH_SIZE" \
    --epoch "$EPOCH" \
    --weights "$WEIGHTS" \
    --save "$SAVE" \
    "$@" \
    "$DATA"

echo "$EXP"
echo "epoch: $EPOCH"
