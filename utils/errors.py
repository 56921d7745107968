"""One exception type for bad input, printed as one line by every command."""
import sys


class SimRegError(Exception):
    """A problem the user can fix; the message says what it is and how to fix it."""


def one_line(exc):
    """The user-facing line of a SimRegError, also when a DataLoader worker re-raised it
    with the worker's traceback folded into the message."""
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if 'SimRegError: ' in ln:
            return ln.split('SimRegError: ', 1)[1]
    return lines[-1] if lines else type(exc).__name__


def exit_on_user_error(main):
    """Run ``main()``; a SimRegError ends the process with ``error: <message>`` and exit code 2."""
    try:
        return main()
    except SimRegError as exc:
        print(f'error: {one_line(exc)}', file=sys.stderr, flush=True)
        sys.exit(2)
