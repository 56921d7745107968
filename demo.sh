#!/usr/bin/env bash
# The embedded demo, which `bash run.sh` runs when DATA is unset: a generated 10-class dataset, a teacher
# with RANDOM weights (unless DEMO_TEACHER_WEIGHTS names a checkpoint), a few epochs at a small
# resolution, then k-NN, the linear probe and a held-out imitation check, with the same scripts and
# output layout as a real run, and a report (a table, exp/<exp>/report.json and report.png, by
# evaluation/report.py). It proves the pipeline works, not the paper's numbers.
# NGPUS, BASE_DIR, N_MLP_LAYERS and LR are run.sh's; started on its own, demo.sh goes through run.sh.
set -euo pipefail
cd "$(dirname "$0")"

DEMO_DIR=${DEMO_DIR:-./demo_data}                 # the generated dataset and the random teacher
DEMO_EXP=${DEMO_EXP:-demo}                        # outputs: $BASE_DIR/exp/$DEMO_EXP
DEMO_TEACHER_ARCH=${DEMO_TEACHER_ARCH:-resnet18}
DEMO_TEACHER_WEIGHTS=${DEMO_TEACHER_WEIGHTS:-}    # empty: a teacher with random weights
DEMO_STUDENT_ARCH=${DEMO_STUDENT_ARCH:-resnet18}
DEMO_EPOCHS=${DEMO_EPOCHS:-10}
DEMO_IMAGE_SIZE=${DEMO_IMAGE_SIZE:-32}
DEMO_TRAIN_PER_CLASS=${DEMO_TRAIN_PER_CLASS:-150}
DEMO_VAL_PER_CLASS=${DEMO_VAL_PER_CLASS:-50}
DEMO_BATCH_SIZE=${DEMO_BATCH_SIZE:-64}
DEMO_LINEAR_EPOCHS=${DEMO_LINEAR_EPOCHS:-40}

for setting in NGPUS BASE_DIR N_MLP_LAYERS LR; do  # run.sh's; not all set: demo.sh was started on its own
  [ -n "${!setting:-}" ] || exec env -u DATA bash run.sh
done

started=$SECONDS
python -m data.synthetic "$DEMO_DIR/synthetic" --train_per_class "$DEMO_TRAIN_PER_CLASS" \
  --val_per_class "$DEMO_VAL_PER_CLASS"
if [ -z "$DEMO_TEACHER_WEIGHTS" ]; then
  DEMO_TEACHER_WEIGHTS=$DEMO_DIR/teacher_${DEMO_TEACHER_ARCH}_random.pth
  echo "demo.sh: the demo teacher is a $DEMO_TEACHER_ARCH with RANDOM weights ($DEMO_TEACHER_WEIGHTS); set DEMO_TEACHER_WEIGHTS to use a trained one"
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
