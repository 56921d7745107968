#!/usr/bin/env bash
# The checks only a CUDA machine can run, in one go (CI has no GPU):
#   1. tests/test_gpu.py: nvjpeg decoding, bf16 + channels_last step, torch.compile, NCCL run + resume;
#   2. a --compile distillation run and a cached linear probe on the GPU;
#   3. the GPU benchmarks (train_step, linear_cached at full size).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]     (default outputs/gpu_check; logs land there)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_check}
mkdir -p "$out"
log=$out/gpu_check.log
export PYTHONUNBUFFERED=1
failed=()

step() {  # step <name> <command...>: run, log, remember a failure and go on
  local name=$1; shift
  echo "== $name: $*" | tee -a "$log"
  "$@" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("$name")
}

nvidia-smi -L | tee -a "$log"
python3 -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "torch", torch.__version__,
"torchvision", torchvision.__version__, torch.cuda.get_device_name())' | tee -a "$log"

SIMREG_TEST_GPU=1 step gpu_tests python3 -m pytest -q -rs tests/test_gpu.py

work=$(mktemp -d)
python3 -m data.synthetic "$work/data" --train_per_class 100 --val_per_class 20 --image_size 128 >/dev/null
python3 -c 'import sys, torch; from models.backbones import build_backbone; torch.manual_seed(0);
torch.save(build_backbone("resnet50").state_dict(), sys.argv[1])' "$work/teacher.pth"
step compile_run torchrun --standalone --nproc_per_node=1 train_student.py "$work/data" --base_dir "$work" \
  --exp compile --arch_teacher resnet50 --teacher_weights "$work/teacher.pth" --arch_student resnet18 --epochs 3 --batch_size 100 \
  --image_size 112 --num_workers 8 --print_freq 5 --single_aug --weak_weak --channels_last --compile
if grep -q 'torch.compile failed' "$work/exp/compile/logs/train.log"; then failed+=(compile_fell_back); fi
step linear_probe python3 eval_linear.py --weights "$work/exp/compile/checkpoints/ckpt_epoch_3.pth" \
  --save "$work/linear" --use_cache --epochs 10 --eval-freq 5 --batch-size 50 --image_size 112 -j 8 "$work/data"

step bench_train_step python3 benchmarks/run.py --only train_step
step bench_linear_cached python3 benchmarks/run.py --only linear_cached

echo "== summary" | tee -a "$log"
grep -E '^(train_step|linear_cached):|epoch [0-9]+  lr|backend|val_acc1|passed|failed' "$log" | tail -n 30
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "all GPU checks passed"
