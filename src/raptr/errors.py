"""One exception type for mistakes a user can fix.

The CLI prints ``RaptrError`` as one line (``error: <problem>. <fix>``) and exits with code 2;
anything else is a bug and keeps its traceback.
"""


class RaptrError(Exception):
    """A problem in the user's input (config, schedule, path, data) with a hint how to fix it."""


# What Ctrl-C prints, wherever it lands (the entry point, the CLI, a run before its signal handler).
INTERRUPTED = "interrupted: nothing lost (a started run resumes from its last checkpoint)"
