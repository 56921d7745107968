#!/usr/bin/env bash
# SimReg distillation with the paper's settings. Edit the defaults here or override any of them
# from the environment, e.g.  DATA=/data/imagenet TEACHER_WEIGHTS=moco_v2_800ep.pth NGPUS=4 bash run.sh
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

# The embedded demo, run when DATA is unset: a generated 10-class dataset, a teacher with RANDOM
# weights (unless DEMO_TEACHER_WEIGHTS names a checkpoint), a few epochs at a small resolution, then
# k-NN and the linear probe. It proves the pipeline works, not the paper's numbers.
DEMO_DIR=${DEMO_DIR:-./demo_data}
DEMO_EXP=${DEMO_EXP:-demo}
DEMO_TEACHER_ARCH=${DEMO_TEACHER_ARCH:-resnet18}
DEMO_TEACHER_WEIGHTS=${DEMO_TEACHER_WEIGHTS:-}
DEMO_STUDENT_ARCH=${DEMO_STUDENT_ARCH:-resnet18}
DEMO_EPOCHS=${DEMO_EPOCHS:-10}
DEMO_IMAGE_SIZE=${DEMO_IMAGE_SIZE:-32}
DEMO_TRAIN_PER_CLASS=${DEMO_TRAIN_PER_CLASS:-150}
DEMO_VAL_PER_CLASS=${DEMO_VAL_PER_CLASS:-50}
DEMO_BATCH_SIZE=${DEMO_BATCH_SIZE:-64}
DEMO_LINEAR_EPOCHS=${DEMO_LINEAR_EPOCHS:-40}

[ "$NGPUS" -ge 1 ] 2>/dev/null || NGPUS=1

if [ -z "$DATA" ]; then
  started=$SECONDS
  echo "run.sh: DATA is unset, running the embedded demo (set DATA=/path/to/imagenet and TEACHER_WEIGHTS=... for a real run)"
  python -m data.synthetic "$DEMO_DIR/synthetic" --train_per_class "$DEMO_TRAIN_PER_CLASS" \
    --val_per_class "$DEMO_VAL_PER_CLASS"
  if [ -z "$DEMO_TEACHER_WEIGHTS" ]; then
    DEMO_TEACHER_WEIGHTS=$DEMO_DIR/teacher_${DEMO_TEACHER_ARCH}_random.pth
    echo "run.sh: the demo teacher is a $DEMO_TEACHER_ARCH with RANDOM weights ($DEMO_TEACHER_WEIGHTS); set DEMO_TEACHER_WEIGHTS to use a trained one"
    python -c "import sys, torch; from models.backbones import build_backbone; torch.manual_seed(2021); torch.save(build_backbone(sys.argv[1]).state_dict(), sys.argv[2])" \
      "$DEMO_TEACHER_ARCH" "$DEMO_TEACHER_WEIGHTS"
  fi
  exp_dir=$BASE_DIR/exp/$DEMO_EXP
  ckpt_dir=$exp_dir/checkpoints
  set -x
  torchrun --standalone --nproc_per_node="$NGPUS" train_student.py "$DEMO_DIR/synthetic" \
    --base_dir "$BASE_DIR" --exp "$DEMO_EXP" \
    --arch_teacher "$DEMO_TEACHER_ARCH" --teacher_weights "$DEMO_TEACHER_WEIGHTS" \
    --arch_student "$DEMO_STUDENT_ARCH" --n_mlp_layers "$N_MLP_LAYERS" --learning_rate "$LR" \
    --epochs "$DEMO_EPOCHS" --batch_size "$DEMO_BATCH_SIZE" --save_freq "$DEMO_EPOCHS" \
    --image_size "$DEMO_IMAGE_SIZE" --num_workers 2 --print_freq 10 --single_aug --weak_weak --resume auto
  knn() {  # knn <weights> <save> <epoch> [extra flags]
    WEIGHTS=$1 SAVE=$2 EPOCH=$3 EXP=$DEMO_EXP DATA=$DEMO_DIR/synthetic NGPUS=$NGPUS \
      bash knn_eval.sh --image_size "$DEMO_IMAGE_SIZE" -j 2 "${@:4}"
  }
  knn "$DEMO_TEACHER_WEIGHTS" "$exp_dir/features_teacher" 0 --arch "$DEMO_TEACHER_ARCH"
  knn "$ckpt_dir/ckpt_epoch_0.pth" "$exp_dir/features_init" 0
  knn "$ckpt_dir/ckpt_epoch_$DEMO_EPOCHS.pth" "$exp_dir/features" "$DEMO_EPOCHS"
  for epoch in 0 "$DEMO_EPOCHS"; do
    python eval_imitation.py --weights "$ckpt_dir/ckpt_epoch_$epoch.pth" --image_size "$DEMO_IMAGE_SIZE" \
      -j 2 --save "$exp_dir/imitation" "$DEMO_DIR/synthetic"
  done
  WEIGHTS=$ckpt_dir/ckpt_epoch_$DEMO_EPOCHS.pth SAVE=$exp_dir/linear DATA=$DEMO_DIR/synthetic NGPUS=$NGPUS \
    EXP=$DEMO_EXP EPOCH=$DEMO_EPOCHS \
    USE_CACHE=1 EVAL_FREQ=5 bash lin_eval.sh --image_size "$DEMO_IMAGE_SIZE" -j 2 --epochs "$DEMO_LINEAR_EPOCHS"
  set +x
  python -m evaluation.report "$exp_dir" --wall_time $((SECONDS - started))
  echo "The demo teacher is $DEMO_TEACHER_WEIGHTS: with random weights the k-NN numbers say little; the cosine rising on held-out images shows the student learnt to imitate it."
  exit 0
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
