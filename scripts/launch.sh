# Sourced by the launchers (knn_eval.sh, lin_eval.sh, transfer_eval.sh, demo/demo.sh; run.sh through cluster.sh):
# sets NGPUS, unless given, to one process per GPU torch sees (so CUDA_VISIBLE_DEVICES counts), or one CPU process
# without GPUs, and `launch`, the command that starts them: torchrun for several, plain python for one (no torchrun
# start-up). `launched PROGRAM ARGS...` runs them and returns the code that says what happened (docs/clusters.md).
NGPUS=${NGPUS:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
launch=(torchrun --standalone --nproc_per_node="$NGPUS"); [ "$NGPUS" -gt 1 ] 2>/dev/null || launch=(python)

# utils/errors.py: 2 bad input (the process printed one line saying how to fix it), 3 a peer was lost, 75
# checkpointed after a signal (run again to resume); each process leaves its code in $SIMREG_EXIT_CODES/rank<RANK>
USER_ERROR_EXIT_CODE=2 DIST_ERROR_EXIT_CODE=3 RESUME_EXIT_CODE=75

# stdin to stderr, less torchrun's report of a run that ended with one of the codes above (its ChildFailedError
# or SignalException traceback, "failed (exitcode: 2)", "Sending process ... closing signal"): the processes' one
# line says it all, and is said once, not once per process. argv[1]: the exit codes folder. A crash's traceback,
# and torchrun's report of it, pass unchanged.
QUIET_LAUNCHER='
import os, re, sys
OURS = {"2", "3", "75"}
NOISE = re.compile(r"elastic/(multiprocessing/api\.py.*(Sending process \d+ closing signal|failed \(exitcode: "
                   r"(2|3|75)\))|agent/server/api\.py.*Received \d+ death signal)")

def ours(folder=sys.argv[1]):  # whether a process ended with one of our codes
    for name in os.listdir(folder) if os.path.isdir(folder) else ():
        try:
            if name.startswith("rank") and open(os.path.join(folder, name)).read().strip() in OURS:
                return True
        except OSError:
            pass
    return False

def out(lines):
    sys.stderr.writelines(lines)
    sys.stderr.flush()

def lines():  # as they come, with the "\r" updates of progress bars (reading by "\n" would hold them back)
    rest = b""
    while chunk := os.read(0, 65536):
        *done, rest = re.split(rb"(?<=[\r\n])", rest + chunk)
        yield from (part.decode(errors="replace") for part in done)
    if rest:
        yield rest.decode(errors="replace")

seen, held, report, rules = set(), [], False, 0
for line in lines():
    if held:  # a traceback: the launcher one (its report then follows between two rules of "="), or a process one
        held.append(line)
        report = report or "ChildFailedError" in line
        rules += report and bool(line.strip()) and set(line.strip()) == {"="}
        if rules == 2 or not report and not line[:1].isspace():
            if not ((report or "SignalException" in line) and ours()):
                out(held)
            held, report, rules = [], False, 0
    elif line.rstrip("\n") == "Traceback (most recent call last):":
        held = [line]
    elif not NOISE.search(line) and not (line.startswith("error: ") and line in seen):
        seen.add(line)
        out([line])
out(held)
'

# quiet_launcher FOLDER: the filter above, deaf to the signals meant for training (its death would cut the
# processes' stderr), reading FOLDER/stderr, a FIFO it makes; the caller starts the launcher with 2> that FIFO
quiet_launcher() {
  mkfifo "$1/stderr"
  (trap '' INT TERM HUP QUIT USR1; exec python -u -c "$QUIET_LAUNCHER" "$1" < "$1/stderr" >&2) &
  quiet=$!
}

# exit_code RC FOLDER: the code a launcher script ends with, from the launcher's RC (torchrun exits 1, srun 137
# after --kill-on-bad-exit, whatever the processes did) and the processes' codes in FOLDER: 2 when any process had
# bad input (running it again cannot help), else rank 0's 3 or 75, else RC
exit_code() {
  if [ "$1" = 0 ]; then echo 0; return; fi
  if grep -qsx "$USER_ERROR_EXIT_CODE" "$2"/rank*; then echo "$USER_ERROR_EXIT_CODE"; return; fi
  case $(cat "$2/rank0" 2>/dev/null) in
    "$DIST_ERROR_EXIT_CODE") echo "$DIST_ERROR_EXIT_CODE" ;;
    "$RESUME_EXIT_CODE") echo "$RESUME_EXIT_CODE" ;;
    *) echo "$1" ;;
  esac
}

# launched PROGRAM ARGS...: "${launch[@]}" PROGRAM ARGS, its stderr through quiet_launcher; returns exit_code's code
launched() {
  local codes rc
  codes=$(mktemp -d)
  quiet_launcher "$codes"
  SIMREG_EXIT_CODES=$codes "${launch[@]}" "$@" 2> "$codes/stderr" && rc=0 || rc=$?
  wait "$quiet" || true
  rc=$(exit_code "$rc" "$codes")
  rm -rf "$codes"
  return "$rc"
}
