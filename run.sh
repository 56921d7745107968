#!/usr/bin/env bash
# SimReg distillation with the paper's settings. Edit the defaults here or override any of them
# from the environment, e.g.  DATA=/data/imagenet TEACHER_WEIGHTS=moco_v2_800ep.pth NGPUS=4 bash run.sh
# With DATA unset it runs the demo instead: demo.sh (generated data, a few epochs, k-NN, probe, a table).
set -euo pipefail
cd "$(dirname "$0")"

DATA=${DATA:-}                          # ImageNet root holding train/ and val/
EXP=${EXP:-moco_r50_to_r18}             # outputs: $BASE_DIR/exp/$EXP/{checkpoints,logs}
BASE_DIR=${BASE_DIR:-./}
TEACHER_ARCH=${TEACHER_ARCH:-resnet50}  # resnet50 | sup_resnet50 | byol_resnet50 | resnet50x4 | resnet18 ...
TEACHER_WEIGHTS=${TEACHER_WEIGHTS:-}    # teacher checkpoint (MoCo, BYOL, SwAV, SimCLR, ... layouts)
STUDENT_ARCH=${STUDENT_ARCH:-resnet18}  # resnet18 | resnet50 | mobilenet | resnet34 ...
N_MLP_LAYERS=${N_MLP_LAYERS:-4}
LR=${LR:-0.05}
EPOCHS=${EPOCHS:-130}
BATCH_SIZE=${BATCH_SIZE:-256}           # total over all GPUs and nodes
SAVE_FREQ=${SAVE_FREQ:-10}
IMAGE_SIZE=${IMAGE_SIZE:-224}
NUM_WORKERS=${NUM_WORKERS:-8}           # per GPU
AUG=${AUG:---single_aug --weak_weak}    # the paper: one weak view for teacher and student
# processes per node: the GPUs torch sees, so CUDA_VISIBLE_DEVICES counts (none: one CPU process)
NGPUS=${NGPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
EXTRA_ARGS=${EXTRA_ARGS:-}              # any other train_student.py flags

[ "$NGPUS" -ge 1 ] 2>/dev/null || NGPUS=1
if [ -z "$DATA" ]; then
  echo "run.sh: DATA is unset, running the embedded demo, demo.sh (set DATA=/path/to/imagenet and TEACHER_WEIGHTS=... for a real run)"
  export NGPUS BASE_DIR N_MLP_LAYERS LR  # the demo's settings that are run.sh's
  exec bash demo.sh
fi

set -x
# shellcheck disable=SC2086  # AUG and EXTRA_ARGS are lists of flags
torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NGPUS" \
  --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
  train_student.py "$DATA" \
  --base_dir "$BASE_DIR" --exp "$EXP" \
  --arch_teacher "$TEACHER_ARCH" --teacher_weights "$TEACHER_WEIGHTS" \
  --arch_student "$STUDENT_ARCH" --n_mlp_layers "$N_MLP_LAYERS" \
  --learning_rate "$LR" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE" \
  --save_freq "$SAVE_FREQ" --image_size "$IMAGE_SIZE" --num_workers "$NUM_WORKERS" \
  $AUG --resume auto $EXTRA_ARGS
