#!/usr/bin/env bash
# `sbatch run.sh` reads these #SBATCH lines (edit them like the variables below; flags given to sbatch win):
# the job's name in squeue, and %x in --output
#SBATCH --job-name=simreg
# nodes; each runs one training process per GPU
#SBATCH --nodes=1
# = --gpus-per-node: one training process (task) per GPU
#SBATCH --ntasks-per-node=8
# GPUs per node (on some clusters --gres=gpu:8)
#SBATCH --gpus-per-node=8
# per training process: NUM_WORKERS data-loading processes (8) plus itself and one spare
#SBATCH --cpus-per-task=10
# wall-clock limit; before it the job checkpoints, requeues itself and later resumes
#SBATCH --time=24:00:00
# SIGUSR1 to the training processes 120 s before the time limit: time to checkpoint and requeue
#SBATCH --signal=USR1@120
# the job may return to the queue (preempted, or requeued at the time limit) and resume (--resume auto)
#SBATCH --requeue
# the job's stdout and stderr, in the folder sbatch ran in (%j: job id); a requeued job appends to it
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#
# SimReg distillation with the paper's settings. Edit the defaults below or override any of them from the
# environment, e.g.  DATA=/data/imagenet TEACHER_WEIGHTS=moco_v2_800ep.pth NGPUS=4 bash run.sh
# With DATA unset it runs the demo instead (demo/demo.sh: generated data, a few epochs, k-NN, probe, a table).
# DEMO_DENSE=1 (DATA unset): the dense demo, a feature map distilled with --dense_weight and its segmentation probe.
# In a SLURM job (sbatch run.sh, or bash run.sh inside salloc) srun starts one process per GPU of every node,
# elsewhere torchrun. SIGTERM, SIGINT, SIGHUP and SIGUSR1 sent to run.sh reach every training process; on
# SIGTERM or SIGUSR1 they checkpoint and exit 75, and so does run.sh: run it again to resume (scripts/cluster.sh).
set -euo pipefail
# sbatch runs a copy of this script in slurmd's spool folder: then the project is the submitted run.sh's folder
project=$(dirname "$0")
if [ -n "${SLURM_JOB_ID:-}" ] && [ ! -f "$project/scripts/cluster.sh" ]; then
  submitted=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1) || true
  for candidate in "$(dirname "${submitted:-.}")" "${SLURM_SUBMIT_DIR:-.}"; do
    if [ -f "$candidate/scripts/cluster.sh" ]; then project=$candidate; break; fi
  done
fi
cd "$project"
source scripts/cluster.sh  # SRUN, launch_training; under srun, NGPUS and NNODES default to SLURM's

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
KNN_EVERY=${KNN_EVERY:-10}              # online k-NN of the student every N epochs (0: off)
KNN_PER_CLASS=${KNN_PER_CLASS:-20}      # train images per class of the online k-NN, against all of val
# processes per node: the GPUs torch sees, so CUDA_VISIBLE_DEVICES counts (none: one CPU process)
NGPUS=${NGPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
EXTRA_ARGS=${EXTRA_ARGS:-}              # any other train_student.py flags
# A ViT-S student with the ViT recipe (AdamW, warm-up, clipping) instead of the paper's SGD: uncomment these
# EXP=moco_r50_to_vit_small
# STUDENT_ARCH=vit_small_patch16
# LR=5e-4
# EXTRA_ARGS="--optimizer adamw --weight_decay 0.05 --warmup_epochs 10 --clip_grad 3.0 $EXTRA_ARGS"
# and on one GPU, BATCH_SIZE 256 in 4 micro-batches of 64 (a BatchNorm group each, as on the paper's 4 GPUs):
# NGPUS=1
# EXTRA_ARGS="--accum_steps 4 $EXTRA_ARGS"

[ "$NGPUS" -ge 1 ] 2>/dev/null || NGPUS=1
if [ -z "$DATA" ]; then
  echo "run.sh: DATA is unset, running the embedded demo, demo/demo.sh (set DATA=/path/to/imagenet and TEACHER_WEIGHTS=... for a real run)"
  export NGPUS BASE_DIR N_MLP_LAYERS  # the demo's settings that are run.sh's (its lr is DEMO_LR)
  exec bash demo/demo.sh
fi

# shellcheck disable=SC2086  # AUG and EXTRA_ARGS are lists of flags
train=(train_student.py "$DATA"
  --base_dir "$BASE_DIR" --exp "$EXP"
  --arch_teacher "$TEACHER_ARCH" --teacher_weights "$TEACHER_WEIGHTS"
  --arch_student "$STUDENT_ARCH" --n_mlp_layers "$N_MLP_LAYERS"
  --learning_rate "$LR" --epochs "$EPOCHS" --batch_size "$BATCH_SIZE"
  --save_freq "$SAVE_FREQ" --image_size "$IMAGE_SIZE" --num_workers "$NUM_WORKERS"
  --knn_every "$KNN_EVERY" --knn_train_per_class "$KNN_PER_CLASS"
  $AUG --resume auto $EXTRA_ARGS)

launch_training "${train[@]}"  # srun in a SLURM job, else torchrun; signals passed on (scripts/cluster.sh)
exit "$rc"                     # 75 after a checkpointed signal: run it again to resume
