"""Where a run's numbers came from: the code (git commit, and the diff when it ran uncommitted)
and the machine (CPU/GPU model, threads, library versions).

Runs are bitwise reproducible only on the same machine and software (see README, "Determinism"),
so every summary.json records both.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

from raptr.errors import RaptrError

PACKAGE = Path(__file__).resolve().parent.parent  # src/raptr: only the package's own files count as code


def _git(*args: str) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(["git", *args], cwd=PACKAGE, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None


def code_diff() -> str:
    """Uncommitted changes to the package's tracked files (empty when clean or outside git)."""
    out = _git("diff", "HEAD", "--", str(PACKAGE))
    return out.stdout if out is not None and out.returncode == 0 else ""


def git_commit() -> str | None:
    """The commit of the code that ran (with ``+dirty`` for uncommitted changes to ``src/raptr``),
    or None outside git. Results a comparison writes beside the code are not code."""
    rev = _git("rev-parse", "HEAD")
    if rev is None or rev.returncode:
        return None
    status = _git("status", "--porcelain", "--untracked-files=no", "--", str(PACKAGE))
    dirty = status is not None and status.stdout.strip()
    return rev.stdout.strip() + ("+dirty" if dirty else "")


def refuse_dirty(allow: bool) -> str | None:
    """Refuse to start a run whose code is not in history, unless ``allow`` (the trainer then
    keeps the diff as ``code.diff`` in the run directory); returns the commit."""
    commit = git_commit()
    if commit is None or not commit.endswith("+dirty"):
        return commit
    if not allow:
        raise RaptrError(f"src/raptr has uncommitted changes (commit {commit}): commit them first, so the run's "
                         "numbers can be traced to code, or pass --allow-dirty (the diff is then kept in the run directory)")
    return commit


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | None = None) -> dict:
    """The machine and software a run computed on: what bitwise reproducibility depends on."""
    import transformers

    info = {"cpu": _cpu_model(), "threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "os": platform.platform()}
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
