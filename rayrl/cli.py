"""What the recipes' command lines share."""

import signal
import sys


def exit_status(main, argv: list[str]) -> int:
    """main(argv)'s exit status. A config error found at run time (a missing path, a run that
    cannot be resumed) is one line and status 2, as at load. A stop (Ctrl-C, `ray job stop`) that
    gets here has already said what it saved; it ends with one line and the shell's status for the
    signal, 128 + its number (130 for SIGINT, 143 for SIGTERM), instead of a traceback."""
    from rayrl.config import ConfigError
    try:
        return main(argv)
    except ConfigError as err:   # found once the run looked at its files (a path, a run to resume)
        print(f"config error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt as stop:
        name = str(stop) if str(stop) in ("SIGINT", "SIGTERM") else "SIGINT"   # a bare one is Ctrl-C
        print(f"stopped by {name}", file=sys.stderr, flush=True)
        return 128 + signal.Signals[name].value
