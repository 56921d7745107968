#!/usr/bin/env bash
# The embedded demo, which `bash run.sh` runs when DATA is unset: a generated 10-class dataset (demo/synthetic.py);
# a ResNet-18 teacher trained on it WITH LABELS (demo/train_teacher.py: a stand-in for a self-supervised teacher,
# made once and reused; DEMO_TEACHER_WEIGHTS names another); timm's smaller ResNet-10-T distilled from it with the
# paper's recipe at 32 px, its online k-NN logged every epoch; then k-NN, the linear probe and a held-out imitation
# check with the same scripts and output layout as a real run, and a report (a table, report.json, report.png).
# DEMO_DENSE=1: the dense demo (docs/demo.md): the images' masks too, a teacher whose feature map segments them, the
# student distilled with --dense_weight as well, and the segmentation probe (eval_dense.py) of all three.
# NGPUS, BASE_DIR and N_MLP_LAYERS are run.sh's; started on its own, demo.sh goes through run.sh.
set -euo pipefail
cd "$(dirname "$0")/.."  # the project root, where the scripts below run

DEMO_DENSE=${DEMO_DENSE:-0}
DEMO_DENSE_WEIGHT=${DEMO_DENSE_WEIGHT:-4}         # the dense demo's --dense_weight (0: the global loss alone)
if [ "$DEMO_DENSE" = 1 ]; then  # the dense demo's own defaults: a map with a grid (3x3 at 96 px) and its time
  [ "$DEMO_DENSE_WEIGHT" = 4 ] && : "${DEMO_EXP:=demo_dense}" || : "${DEMO_EXP:=demo_dense_weight$DEMO_DENSE_WEIGHT}"
  : "${DEMO_IMAGE_SIZE:=96}" "${DEMO_TEACHER_EPOCHS:=4}" "${DEMO_EPOCHS:=5}"
fi

DEMO_DIR=${DEMO_DIR:-./demo_data}                 # the generated dataset (and its teacher, in it)
DEMO_EXP=${DEMO_EXP:-demo}                        # outputs: $BASE_DIR/exp/$DEMO_EXP
DEMO_TEACHER_ARCH=${DEMO_TEACHER_ARCH:-resnet18}
DEMO_TEACHER_WEIGHTS=${DEMO_TEACHER_WEIGHTS:-}    # empty: demo/train_teacher.py's supervised teacher
DEMO_TEACHER_EPOCHS=${DEMO_TEACHER_EPOCHS:-12}    # epochs of its supervised training
DEMO_STUDENT_ARCH=${DEMO_STUDENT_ARCH:-resnet10t} # smaller than the teacher, as in the paper
DEMO_EPOCHS=${DEMO_EPOCHS:-10}
DEMO_KNN_PER_CLASS=${DEMO_KNN_PER_CLASS:-50}      # train images per class of the online k-NN (every epoch)
DEMO_IMAGE_SIZE=${DEMO_IMAGE_SIZE:-32}
DEMO_TRAIN_PER_CLASS=${DEMO_TRAIN_PER_CLASS:-150}
DEMO_VAL_PER_CLASS=${DEMO_VAL_PER_CLASS:-50}
DEMO_BATCH_SIZE=${DEMO_BATCH_SIZE:-16}
DEMO_LR=${DEMO_LR:-0.2}                           # run.sh's LR (0.05) is the paper's, for ImageNet
DEMO_WORKERS=${DEMO_WORKERS:-0}                   # data loading processes of the distillation
DEMO_LINEAR_EPOCHS=${DEMO_LINEAR_EPOCHS:-40}
DEMO_SEED=${DEMO_SEED:-0}                         # the teacher's and the student's training (not the data)

for setting in NGPUS BASE_DIR N_MLP_LAYERS; do  # run.sh's; not all set: demo.sh was started on its own
  [ -n "${!setting:-}" ] || exec env -u DATA bash run.sh
done

started=$SECONDS
# the dataset and the teacher, both reused when they exist
dense_data=$DEMO_DIR/synthetic_dense  # the dense demo's: the same images, with masks (class 10: the background)
dense_flags=(); [ "$DEMO_DENSE" != 1 ] || dense_flags=(--dense "$dense_data")
python -m demo.synthetic "$DEMO_DIR/synthetic" --train_per_class "$DEMO_TRAIN_PER_CLASS" \
  --val_per_class "$DEMO_VAL_PER_CLASS" "${dense_flags[@]}"
seed_suffix=; [ "$DEMO_SEED" = 0 ] || seed_suffix=_seed$DEMO_SEED
if [ -z "$DEMO_TEACHER_WEIGHTS" ] && [ "$DEMO_DENSE" = 1 ]; then
  DEMO_TEACHER_WEIGHTS=$DEMO_DIR/synthetic/teacher_${DEMO_TEACHER_ARCH}_dense_${DEMO_IMAGE_SIZE}px_${DEMO_TEACHER_EPOCHS}ep${seed_suffix}.pth
  echo "demo.sh: the dense demo teacher is a $DEMO_TEACHER_ARCH trained WITH PER-PIXEL LABELS on the generated data for $DEMO_TEACHER_EPOCHS epochs ($DEMO_TEACHER_WEIGHTS, made once and reused): its feature map segments the images; set DEMO_TEACHER_WEIGHTS to use another"
  python -m demo.train_teacher "$dense_data" --dense --num_classes 11 --output "$DEMO_TEACHER_WEIGHTS" \
    --arch "$DEMO_TEACHER_ARCH" --image_size "$DEMO_IMAGE_SIZE" --epochs "$DEMO_TEACHER_EPOCHS" --workers 2 \
    --seed "$DEMO_SEED"
elif [ -z "$DEMO_TEACHER_WEIGHTS" ]; then
  # kept inside the dataset folder, so that a regenerated dataset also gets a new teacher
  DEMO_TEACHER_WEIGHTS=$DEMO_DIR/synthetic/teacher_${DEMO_TEACHER_ARCH}_supervised_${DEMO_IMAGE_SIZE}px_${DEMO_TEACHER_EPOCHS}ep${seed_suffix}.pth
  echo "demo.sh: the demo teacher is a $DEMO_TEACHER_ARCH trained WITH LABELS on the generated data for $DEMO_TEACHER_EPOCHS epochs ($DEMO_TEACHER_WEIGHTS, made once and reused): it stands in for a self-supervised teacher; set DEMO_TEACHER_WEIGHTS to use another"
  python -m demo.train_teacher "$DEMO_DIR/synthetic" --output "$DEMO_TEACHER_WEIGHTS" --arch "$DEMO_TEACHER_ARCH" \
    --image_size "$DEMO_IMAGE_SIZE" --epochs "$DEMO_TEACHER_EPOCHS" --workers 2 --seed "$DEMO_SEED"
fi

# the distillation, then the evaluations of the teacher and of the student before and after it
exp_dir=$BASE_DIR/exp/$DEMO_EXP
ckpt_dir=$exp_dir/checkpoints
source scripts/launch.sh  # "${launch[@]}": torchrun for NGPUS > 1, else python
# the dense demo: the dense loss too, and no online k-NN (the final one is there): its maps cost the time
train_flags=(--knn_every 1); [ "$DEMO_DENSE" != 1 ] || train_flags=(--knn_every 0 --dense_weight "$DEMO_DENSE_WEIGHT")
set -x
"${launch[@]}" train_student.py "$DEMO_DIR/synthetic" \
  --base_dir "$BASE_DIR" --exp "$DEMO_EXP" \
  --arch_teacher "$DEMO_TEACHER_ARCH" --teacher_weights "$DEMO_TEACHER_WEIGHTS" \
  --arch_student "$DEMO_STUDENT_ARCH" --n_mlp_layers "$N_MLP_LAYERS" --learning_rate "$DEMO_LR" \
  --epochs "$DEMO_EPOCHS" --batch_size "$DEMO_BATCH_SIZE" --save_freq "$DEMO_EPOCHS" \
  --image_size "$DEMO_IMAGE_SIZE" --num_workers "$DEMO_WORKERS" --print_freq 50 --single_aug --weak_weak --resume auto \
  "${train_flags[@]}" --knn_train_per_class "$DEMO_KNN_PER_CLASS" --seed "$DEMO_SEED"
knn() {  # knn <weights> <save> <epoch> [extra flags]
  WEIGHTS=$1 SAVE=$2 EPOCH=$3 EXP=$DEMO_EXP DATA=$DEMO_DIR/synthetic NGPUS=$NGPUS \
    bash knn_eval.sh --image_size "$DEMO_IMAGE_SIZE" -j 2 "${@:4}"
}
knn "$DEMO_TEACHER_WEIGHTS" "$exp_dir/features_teacher" 0 --arch "$DEMO_TEACHER_ARCH"
knn "$ckpt_dir/ckpt_epoch_0.pth" "$exp_dir/features_init" 0
knn "$ckpt_dir/ckpt_epoch_$DEMO_EPOCHS.pth" "$exp_dir/features" "$DEMO_EPOCHS"
if [ "$DEMO_DENSE" = 1 ]; then  # the segmentation probe of each, instead of the imitation and the linear probe
  dense() {  # dense <weights> <save> <epoch> [extra flags]
    WEIGHTS=$1 SAVE=$2 EPOCH=$3 EXP=$DEMO_EXP DATA=$dense_data NGPUS=$NGPUS IMAGE_SIZE=$DEMO_IMAGE_SIZE \
      bash dense_eval.sh --num_classes 11 -j 2 --epochs 3 --probe_batch_size 64 --lr 1e-2 "${@:4}"
  }
  dense "$DEMO_TEACHER_WEIGHTS" "$exp_dir/dense_teacher" 0 --arch "$DEMO_TEACHER_ARCH"
  dense "$ckpt_dir/ckpt_epoch_0.pth" "$exp_dir/dense_init" 0
  dense "$ckpt_dir/ckpt_epoch_$DEMO_EPOCHS.pth" "$exp_dir/dense" "$DEMO_EPOCHS"
else
  for epoch in 0 "$DEMO_EPOCHS"; do
    python eval_imitation.py --weights "$ckpt_dir/ckpt_epoch_$epoch.pth" --image_size "$DEMO_IMAGE_SIZE" \
      -j 2 --save "$exp_dir/imitation" "$DEMO_DIR/synthetic"
  done
  WEIGHTS=$ckpt_dir/ckpt_epoch_$DEMO_EPOCHS.pth SAVE=$exp_dir/linear DATA=$DEMO_DIR/synthetic NGPUS=$NGPUS \
    EXP=$DEMO_EXP EPOCH=$DEMO_EPOCHS \
    USE_CACHE=1 EVAL_FREQ=5 bash lin_eval.sh --image_size "$DEMO_IMAGE_SIZE" -j 2 --epochs "$DEMO_LINEAR_EPOCHS"
fi
set +x
python -m evaluation.report "$exp_dir" --wall_time $((SECONDS - started))
# what the table shows, said from its numbers rather than assumed
python - "$exp_dir/report.json" "$DEMO_TEACHER_WEIGHTS" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
teacher, before, after = (report[k]['1'] for k in ('teacher_knn', 'student_knn_before', 'student_knn_after'))
gap = teacher - before
closed = f'{100 * (after - before) / gap:.0f}%' if gap > 0 else 'none (the teacher is not ahead)'
print(f'The demo teacher is {sys.argv[2]} (a supervised stand-in for a self-supervised teacher); the student never '
      f'saw a label. Its 1-NN went {before:.1f} -> {after:.1f} against the teacher\'s {teacher:.1f}: it closed {closed} '
      f'of the gap.')
if report['dense_miou']:
    teacher, before, after = report['dense_miou'].values()
    gap = teacher - before
    closed = f'{100 * (after - before) / gap:.0f}%' if gap > 0 else 'none (the teacher is not ahead)'
    print(f'Its segmentation probe\'s mIoU went {before:.1f} -> {after:.1f} against the teacher\'s {teacher:.1f}: it '
          f'closed {closed} of the gap.')
PY
