# Sourced by run.sh: how training starts, and stops on a signal, on this machine or in a SLURM job.
#   SRUN                      1 in a SLURM job's batch script (or salloc's shell): one task per GPU of every node,
#                             started with srun; empty elsewhere and in a task of a step (srun --pty bash): torchrun
#   NGPUS, NNODES             under srun, default to the GPUs SLURM gave this node and the job's nodes
#   launch_training ARGS...   starts train_student.py (ARGS: its path and flags) on every GPU, passes SIGTERM,
#                             SIGINT, SIGHUP and SIGUSR1 on to every training process, and sets rc to the exit
#                             code (scripts/launch.sh exit_code): 2 bad input, 3 a lost peer, 75 when rank 0
#                             checkpointed after a signal (run again to resume); torchrun's report of them is left out
SRUN=; if [ -n "${SLURM_JOB_ID:-}" ] && [ -z "${SLURM_STEP_ID:-}" ]; then SRUN=1; fi
if [ -n "$SRUN" ]; then NGPUS=${NGPUS:-${SLURM_GPUS_ON_NODE:-}} NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-}}; fi
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"  # exit codes, quiet_launcher, exit_code
launcher= caught= rc=

forward() {  # the trap of signal $1: pass it on to the training processes
  caught=$1
  echo "run.sh: got SIG$1, passing it on to the training processes" >&2
  if [ -n "$SRUN" ]; then
    # to the tasks themselves: srun answers SIGTERM by killing its tasks at once, with no time to checkpoint
    scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null || kill -s "$1" "$launcher" 2>/dev/null || true
  else
    kill -s "$1" "$launcher" 2>/dev/null || true  # torchrun passes it on to its workers, and waits for them
  fi
}

# The launcher runs in the background so that bash can pass on signals while waiting for it: a launcher in the
# foreground would let bash die of SIGTERM (and torchrun of SIGUSR1) and leave the training processes behind.
start_and_wait() {  # run "$@" in the background, forward the signals run.sh gets, wait for it; its exit code in rc
  quiet_launcher "$exit_codes"
  set -x
  SIMREG_EXIT_CODES=$exit_codes "$@" 2> "$exit_codes/stderr" &
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
  while kill -0 "$quiet" 2>/dev/null; do wait "$quiet" || true; done  # the last of the processes' stderr
}

launch_training() {
  exit_codes=$(mktemp -d)  # each training process of this node leaves its exit code here (utils/errors.py)
  trap 'rm -rf "$exit_codes"' EXIT
  if [ -n "$SRUN" ]; then
    # one task per GPU on every node; the tasks take rank, world size and address from SLURM
    # (utils/distributed.py); srun does not pass sbatch's --cpus-per-task on by itself
    start_and_wait srun --kill-on-bad-exit=1 --nodes="$NNODES" --ntasks="$((NNODES * NGPUS))" \
      --ntasks-per-node="$NGPUS" ${SLURM_CPUS_PER_TASK:+--cpus-per-task="$SLURM_CPUS_PER_TASK"} python "$@"
  else
    # torchrun passes on the signals named here (recent torch reads PET_SIGNALS_TO_HANDLE, older versions
    # TORCHELASTIC_SIGNALS_TO_HANDLE) and dies of the others, leaving its workers running. setsid gives it a
    # session of its own, so that a signal sent to run.sh's process group reaches it once, from run.sh.
    local signals=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
    export PET_SIGNALS_TO_HANDLE=$signals TORCHELASTIC_SIGNALS_TO_HANDLE=$signals
    start_and_wait $(command -v setsid || true) torchrun --nnodes="$NNODES" --node_rank="$NODE_RANK" \
      --nproc_per_node="$NGPUS" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" "$@"
  fi
  rc=$(exit_code "$rc" "$exit_codes")  # torchrun exits 1 and srun 137 whatever the processes did
}
