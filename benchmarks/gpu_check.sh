#!/usr/bin/env bash
# The checks only a CUDA machine can run, in one go (CI has no GPU). Steps, in this order:
#   gpu_tests        tests/test_gpu.py (nvjpeg, bf16 + channels_last, torch.compile, NCCL run + resume, the
#                    batched --gpu_decode views on CUDA against the CPU pipeline, no host sync while making
#                    them) and tests/test_gpu_views.py (the same views' CPU equivalence tests)
#   gpu_views        benchmark: --gpu_decode's decode + views per batch of 256, batched vs one image at a time
#   train_epoch      benchmark: a real epoch of train_student.py on 20,000 generated 500x375 JPEGs: CPU loader
#                    vs --gpu_decode, live vs cached teacher (img/s, data-wait share)
#   step_modes       benchmark: the step at per-GPU batch 256, eager vs compiled vs CUDA graphs, fused SGD
#                    (four torch.compile runs: the longest step, so the last of the issue-14 ones)
#   train_epoch_compile   the same with --compile
#   compile_run      a 3-epoch --compile distillation run and a cached linear probe on its checkpoint
#   bench_train_step, bench_linear_cached   the earlier GPU benchmarks
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]     (default outputs/gpu_check; logs land there)
#   GPU_CHECK_STEPS="gpu_tests train_epoch" bash benchmarks/gpu_check.sh   runs only those steps
#   STEP_TIMEOUT (seconds, default 420) ends a step that runs longer, so one step cannot take the session.
# All steps take more than one 10-minute call (estimated, not yet run: ~15 minutes on an H100); the issue-14
# figures are meant to fit in one (estimated 7-9 minutes; STEP_TIMEOUT=180 caps step_modes if it runs long):
#   GPU_CHECK_STEPS="gpu_tests gpu_views train_epoch step_modes" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-outputs/gpu_check}
mkdir -p "$out"
log=$out/gpu_check.log
export PYTHONUNBUFFERED=1
export SIMREG_BENCH_CACHE=${SIMREG_BENCH_CACHE:-${TMPDIR:-/tmp}/simreg_bench}  # generated JPEGs: not under OUT_DIR
steps=${GPU_CHECK_STEPS:-"gpu_tests gpu_views train_epoch step_modes train_epoch_compile compile_run bench_train_step bench_linear_cached"}
step_timeout=${STEP_TIMEOUT:-420}
failed=()

wanted() { [[ " $steps " == *" $1 "* ]]; }

step() {  # step <name> <command...>: run (within STEP_TIMEOUT), log, remember a failure and go on
  local name=$1; shift
  wanted "$name" || return 0
  echo "== $name: $*" | tee -a "$log"
  local start=$SECONDS
  timeout "$step_timeout" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

nvidia-smi -L | tee -a "$log"
python3 -c 'import sys, torch, torchvision; print("python", sys.version.split()[0], "torch", torch.__version__,
"torchvision", torchvision.__version__, torch.cuda.get_device_name())' | tee -a "$log"
echo "steps: $steps" | tee -a "$log"

SIMREG_TEST_GPU=1 step gpu_tests python3 -m pytest -q -rs tests/test_gpu.py tests/test_gpu_views.py
step gpu_views python3 benchmarks/run.py --only gpu_views
step train_epoch python3 benchmarks/run.py --only train_epoch
step step_modes python3 benchmarks/run.py --only step_modes
step train_epoch_compile python3 benchmarks/run.py --only train_epoch --compile

if wanted compile_run; then
  work=$(mktemp -d)
  python3 -m demo.synthetic "$work/data" --train_per_class 100 --val_per_class 20 --image_size 128 >/dev/null
  python3 -c 'import sys, torch; from models.backbones import build_backbone; torch.manual_seed(0);
torch.save(build_backbone("resnet50").state_dict(), sys.argv[1])' "$work/teacher.pth"
  step compile_run torchrun --standalone --nproc_per_node=1 train_student.py "$work/data" --base_dir "$work" \
    --exp compile --arch_teacher resnet50 --teacher_weights "$work/teacher.pth" --arch_student resnet18 --epochs 3 \
    --batch_size 100 --image_size 112 --num_workers 8 --print_freq 5 --single_aug --weak_weak --channels_last --compile
  if grep -q 'torch.compile failed' "$work/exp/compile/logs/train.log"; then failed+=(compile_fell_back); fi
  steps="$steps linear_probe"
  step linear_probe python3 eval_linear.py --weights "$work/exp/compile/checkpoints/ckpt_epoch_3.pth" \
    --save "$work/linear" --use_cache --epochs 10 --eval-freq 5 --batch-size 50 --image_size 112 -j 8 "$work/data"
fi

step bench_train_step python3 benchmarks/run.py --only train_step
step bench_linear_cached python3 benchmarks/run.py --only linear_cached

echo "== summary" | tee -a "$log"
grep -E '^(train_step|linear_cached|gpu_views[a-z_]*|step_modes\[.*\]|train_epoch[a-z_]*(\[.*\])?):|^== [a-z_]+: exit|epoch [0-9]+  lr|backend|val_acc1|passed|failed' "$log" | tail -n 60
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]}"; exit 1; fi
echo "all GPU checks passed"
