"""One line on stderr and a documented exit code for what ends a command: bad input, or a lost peer."""
import contextlib
import os
import re
import sys

USER_ERROR_EXIT_CODE = 2   # a SimRegError: bad input or setup, the message says how to fix it
DIST_ERROR_EXIT_CODE = 3   # the process group failed: a peer died or stopped answering within --dist_timeout
RESUME_EXIT_CODE = 75      # checkpointed after SIGTERM/SIGUSR1 (preemption, time limit): rerun to resume
# Set by run.sh: a folder where each process leaves its exit code, since the launcher's does not tell a run
# that checkpointed and exited RESUME_EXIT_CODE from one that crashed (torchrun exits 1 either way).
EXIT_CODES_ENV = 'SIMREG_EXIT_CODES'


class SimRegError(Exception):
    """A problem the user can fix; the message says what it is and how to fix it."""


class DistributedError(Exception):
    """The processes of a run could not start or go on together; the message says what happened."""


def one_line(exc):
    """The user-facing line of a SimRegError, also when a DataLoader worker folded its traceback into the message."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if 'SimRegError: ' in ln:
            return ln.split('SimRegError: ', 1)[1]
    return lines[-1] if lines else type(exc).__name__


def short_message(exc):
    """The first line of a torch.distributed error without gloo's source location and advice: '[.../pair.cc:545] Read
    error [127.0.0.1]:5545: Connection reset by peer. This is typically caused by ...' -> 'Read error ... by peer'."""
    line = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
    line = re.sub(r'^\[[^\]]*\]\s*', '', line).split('. This is typically caused')[0].rstrip('.')
    return line if len(line) <= 300 else line[:297] + '...'


def is_lost_peer(exc):
    """Whether ``exc`` is torch.distributed failing mid-run: NCCL raises a DistError, gloo a RuntimeError from its
    transport ('Connection reset/closed by peer' when a peer died, 'Timed out waiting ...' when one hangs)."""
    dist = sys.modules.get('torch.distributed')  # not imported: not a torch error
    if dist is None:
        return False
    return isinstance(exc, getattr(dist, 'DistError', ())) or (isinstance(exc, RuntimeError) and '/gloo/' in str(exc))


def exit_on_user_error(main):
    """Run ``main()``. A SimRegError ends the process with ``error: <message>`` and USER_ERROR_EXIT_CODE, a failed
    process group (a peer died or timed out, or the group never formed) with one line and DIST_ERROR_EXIT_CODE, not
    a traceback. Under run.sh the exit code is also left in $SIMREG_EXIT_CODES."""
    code = 1
    try:
        result = main()
        code = 0
        return result
    except SimRegError as exc:
        code = USER_ERROR_EXIT_CODE
        print(f'error: {one_line(exc)}', file=sys.stderr, flush=True)
        sys.exit(code)
    except DistributedError as exc:
        code = DIST_ERROR_EXIT_CODE
        print(f'error: {exc}', file=sys.stderr, flush=True)
        end_broken_group(code)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        raise
    except Exception as exc:
        if not is_lost_peer(exc):
            raise
        code = DIST_ERROR_EXIT_CODE
        what = 'timed out waiting for a peer' if 'timed out' in str(exc).lower() else 'lost a peer'
        print(f"error: the process group {what} (rank {os.environ.get('RANK', '?')} of "
              f"{os.environ.get('WORLD_SIZE', '?')}): {short_message(exc)}; the last checkpoint is kept; "
              'rerun with --resume auto', file=sys.stderr, flush=True)
        end_broken_group(code)
    finally:
        record_exit_code(code)


def end_broken_group(code):
    """Exit with ``code`` where the process group may be broken (a peer failed, or a stop signal before training):
    with os._exit (the code recorded, the streams flushed) while the group is initialised, since at interpreter exit
    gloo's destructors can abort the process (exit -6 instead of ``code``) or block on a dead peer."""
    dist = sys.modules.get('torch.distributed')
    if dist is not None and dist.is_available() and dist.is_initialized():
        record_exit_code(code)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    sys.exit(code)


def record_exit_code(code):
    """Leave this process's exit code in $SIMREG_EXIT_CODES/rank<RANK>, for run.sh; nothing when it is unset
    (or, under srun, on a node other than the batch script's, where that folder does not exist)."""
    folder = os.environ.get(EXIT_CODES_ENV)
    if folder:
        with contextlib.suppress(OSError), open(os.path.join(folder, f"rank{os.environ.get('RANK', '0')}"), 'w') as f:
            f.write(f'{code}\n')
