"""What the recipes' command lines share."""

import signal
import sys


def exit_status(main, argv: list[str]) -> int:
    """main(argv)'s exit status. A stop (Ctrl-C, `ray job stop`) that gets here has already said
    what it saved; it ends with one line and the shell's status for the signal, 128 + its number
    (130 for SIGINT, 143 for SIGTERM), instead of a traceback."""
    try:
        return main(argv)
    except KeyboardInterrupt as stop:
        name = str(stop) if str(stop) in ("SIGINT", "SIGTERM") else "SIGINT"   # a bare one is Ctrl-C
        print(f"stopped by {name}", file=sys.stderr, flush=True)
        return 128 + signal.Signals[name].value
