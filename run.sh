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
# SimReg distillation with the paper's settings. Edit the defaults here or override any of them
# from the environment, e.g.  DATA=/data/imagenet TEACHER_WEIGHTS=moco_v2_800ep.pth NGPUS=4 bash run.sh
# With DATA unset it runs the demo instead: demo/demo.sh (generated data, a few epochs, k-NN, probe, a table).
# In a SLURM job (sbatch run.sh, or bash run.sh inside salloc) it starts the processes with srun, one per
# GPU of every node, instead of torchrun. SIGTERM, SIGINT, SIGHUP and SIGUSR1 sent to run.sh reach every
# training process; on SIGTERM or SIGUSR1 they checkpoint and exit 75, and so does run.sh: run it again to resume.
set -euo pipefail
project=$(dirname "$0")
if [ -n "${SLURM_JOB_ID:-}" ] && [ ! -f "$project/train_student.py" ]; then
  # sbatch runs a copy of this script in slurmd's spool folder: go back to the run.sh that was submitted
  submitted=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1) || true
  for candidate in "$(dirname "${submitted:-.}")" "${SLURM_SUBMIT_DIR:-.}"; do
    if [ -f "$candidate/train_student.py" ]; then project=$candidate; break; fi
  done
fi
cd "$project"
# SLURM: a job's batch script (or salloc's shell) launches with srun; a task of a step (srun --pty bash) does not
SRUN=; if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${SLURM_STEP_ID:-}" ]; then SRUN=1; fi

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
KNN_EVERY=${KNN_EVERY:-10}              # online k-NN of the student every N epochs (0: off); on ImageNet
KNN_PER_CLASS=${KNN_PER_CLASS:-20}      # 20 per class (20k) against val (50k): ~0.2% of the run's time
# processes per node: the GPUs torch sees, so CUDA_VISIBLE_DEVICES counts (none: one CPU process)
# (with srun: the GPUs SLURM gave this node, and the job's nodes)
if [ -n "$SRUN" ]; then NGPUS=${NGPUS:-${SLURM_GPUS_ON_NODE:-}} NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-}}; fi
NGPUS=${NGPUS:-$(python -c 'import torch; print(torch.cuda.device_count())')}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
EXTRA_ARGS=${EXTRA_ARGS:-}              # any other train_student.py flags

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

# The launcher runs in the background so that bash can pass on signals while waiting for it: a launcher in the
# foreground would let bash die of SIGTERM (and torchrun of SIGUSR1) and leave the training processes behind.
RESUME_EXIT_CODE=75  # utils/errors.py: checkpointed after a signal, run again to resume
exit_codes=$(mktemp -d)  # each training process of this node leaves its exit code here (utils/errors.py)
trap 'rm -rf "$exit_codes"' EXIT
launcher= caught=
forward() {
  caught=$1
  echo "run.sh: got SIG$1, passing it on to the training processes" >&2
  if [ -n "$SRUN" ]; then
    # to the tasks themselves: srun answers SIGTERM by killing its tasks at once, with no time to checkpoint
    scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null || kill -s "$1" "$launcher" 2>/dev/null || true
  else
    kill -s "$1" "$launcher" 2>/dev/null || true  # torchrun passes it on to its workers, and waits for them
  fi
}
launch() {  # run "$@" in the background, forward the signals run.sh gets, wait for it; its exit code in rc
  set -x
  SIMREG_EXIT_CODES=$exit_codes "$@" &
  { set +x; } 2>/dev/null
  launcher=$!
  for sig in TERM INT HUP USR1; do trap "forward $sig" "$sig"; done
  rc=
  while :; do
    caught=
    wait "$launcher" && status=0 || status=$?
    if [ "$status" = 127 ] && [ -n "$rc" ]; then break; fi  # it ended before the signal, and was waited for
    rc=$status
    [ -n "$caught" ] || break  # else a signal cut the wait short: wait again
  done
}

if [ -n "$SRUN" ]; then
  # one task per GPU on every node; the tasks take rank, world size and address from SLURM
  # (utils/distributed.py); srun does not pass sbatch's --cpus-per-task on by itself
  launch srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$((NNODES * NGPUS))" --ntasks-per-node="$NGPUS" \
    ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} python "${train[@]}"
else
  # torchrun dies of the signals not named here, leaving its workers (in sessions of their own) running, and
  # passes on those named: recent torch (2.14 here) reads them from PET_SIGNALS_TO_HANDLE, its
  # --signals_to_handle, and overwrites TORCHELASTIC_SIGNALS_TO_HANDLE, which older versions read. In a session
  # of its own, torchrun gets a signal sent to run.sh's process group once, from run.sh, not twice.
  signals=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
  export PET_SIGNALS_TO_HANDLE=$signals TORCHELASTIC_SIGNALS_TO_HANDLE=$signals
  launch $(command -v setsid || true) torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" --nproc_per_node="$NGPUS" \
    --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "${train[@]}"
fi
# torchrun exits 1 whatever its workers did, and srun 128 + 9 when --kill-on-bad-exit killed the slower tasks:
# rank 0's own exit code (on this node, the first of the job) says whether the run checkpointed after a signal
if [ "$rc" != 0 ] && [ "$(cat "$exit_codes/rank0" 2>/dev/null)" = "$RESUME_EXIT_CODE" ]; then rc=$RESUME_EXIT_CODE; fi
exit "$rc"
