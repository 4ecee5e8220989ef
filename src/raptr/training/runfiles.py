"""The files of a run directory, written so that no crash or second writer can damage them.

- ``write_json_atomic``: config.json / summary.json are replaced whole (temp file + rename).
- ``metrics.jsonl``: append-only, strict JSON (non-finite numbers as ``null``); ``read_jsonl``
  skips a torn last line; ``truncate_jsonl`` rewrites it (atomically) to the steps a resumed run
  keeps, so no step is ever duplicated or missing.
- ``RunLock``: an OS-level lock (``fcntl.flock``) on ``DIR/.lock`` holding the writer's pid and
  host; a second writer gets one clear error, and a dead writer's lock is released by the OS.
"""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path
from typing import Any

from raptr.errors import RaptrError


def strict(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(strict(data), indent=2, allow_nan=False))
    os.replace(tmp, path)


def read_json(path: Path) -> Any | None:
    """The JSON in ``path``, or None if it is missing, truncated or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(strict(record), allow_nan=False) + "\n")


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(records, number of unreadable lines skipped) of a metrics.jsonl."""
    rows, bad = [], 0
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict) and "kind" in row and "step" in row:
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def truncate_jsonl(path: Path, last_step: int) -> int:
    """Keep the records up to ``last_step`` (a resumed run redoes the rest); returns lines dropped as unreadable."""
    rows, bad = read_jsonl(path)
    keep = [r for r in rows if r["step"] <= last_step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(json.dumps(strict(r), allow_nan=False) + "\n" for r in keep))
    os.replace(tmp, path)
    return bad


class RunLock:
    """One writer per run directory."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RaptrError(f"{self.path.parent} is in use by a running raptr ({holder}): wait for it to finish, "
                             "or give this run another train.out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None
