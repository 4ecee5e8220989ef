"""``python -m raptr`` and the ``raptr`` command. Ctrl-C at any moment, while importing too, is one
line and exit code 130 (a started run has already written what it can resume from)."""

import sys

INTERRUPTED = "interrupted: nothing lost (a started run resumes from its last checkpoint)"


def run() -> int:
    try:
        from raptr.cli import main
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    return main()


if __name__ == "__main__":
    sys.exit(run())
