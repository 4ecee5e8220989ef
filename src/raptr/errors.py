"""One exception type for mistakes a user can fix, and one for a run stopped by a signal.

The CLI prints ``RaptrError`` as one line (``error: <problem>. <fix>``) and exits with code 2,
``Preempted`` as one line with exit code 128 + the signal; anything else is a bug (one line, the
traceback in a file).
"""


class RaptrError(Exception):
    """A problem in the user's input (config, schedule, path, data) with a hint how to fix it."""


class Preempted(Exception):
    """SIGTERM/SIGINT stopped the run at a step boundary, after writing a checkpoint (not a user error)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, 128 + signum

    def __reduce__(self):  # crosses process boundaries (compare --workers)
        return Preempted, (str(self), self.signum)


# What Ctrl-C prints, wherever it lands (the entry point, the CLI, a run before its signal handler).
INTERRUPTED = "interrupted: nothing lost (a started run resumes from its last checkpoint)"
