# Sourced by the launchers (knn_eval.sh, lin_eval.sh, transfer_eval.sh, demo/demo.sh): sets NGPUS, unless
# given, to one process per GPU torch sees (so CUDA_VISIBLE_DEVICES counts), or one CPU process without GPUs,
# and `launch`, the command that starts them: torchrun for several, plain python for one (no torchrun start-up).
NGPUS=${NGPUS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
launch=(torchrun --standalone --nproc_per_node="$NGPUS"); [ "$NGPUS" -gt 1 ] || launch=(python)
