"""``python -m raptr`` and the ``raptr`` command. Ctrl-C at any moment, while importing too, is one
line and exit code 130.

Until a command installs its own handler (a training run finishes its step and checkpoints; a
comparison stops its workers the same way), Ctrl-C ends the process at once, as a kill would: there
is nothing to save yet, and raising ``KeyboardInterrupt`` inside a third-party import can leave that
module half-imported (numpy then recursed forever) or make the interpreter end by SIGINT instead of
the exit code.
"""

import os
import signal
import sys

from raptr.errors import INTERRUPTED


def _leave(*_) -> None:
    print(INTERRUPTED, file=sys.stderr)
    sys.stderr.flush()
    os._exit(130)


def run() -> int:
    if sys.platform != "win32":
        signal.signal(signal.SIGINT, _leave)
    try:
        from raptr.cli import main

        code = main()
    except KeyboardInterrupt:  # a second Ctrl-C inside a run or a comparison: their handlers raise it
        _leave()
    if code == 130:  # stopped by SIGINT with a checkpoint written: leave with that code, whatever was interrupted
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return code


if __name__ == "__main__":
    sys.exit(run())
