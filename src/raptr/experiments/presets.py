"""Presets of the experiments' typed configs and their runs' set-up (shared by every experiment; imports none of them)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from raptr.errors import RaptrError


def preset_config(kind: str, presets: dict, preset: str, overrides: dict) -> Any:
    """``dataclasses.replace(presets[preset], **overrides)`` with one error line for an unknown preset or key."""
    if preset not in presets:
        raise RaptrError(f"unknown {kind} preset {preset!r}: use one of {', '.join(presets)}")
    names = {f.name for f in dataclasses.fields(presets[preset])}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise RaptrError(f"unknown {kind} option(s) {', '.join(unknown)}: valid options are {', '.join(sorted(names))}")
    return dataclasses.replace(presets[preset], **overrides)


def prepare_run(out_dir: str | Path, threads: int) -> Path:
    """An experiment's output directory (created) and its torch thread count (0: torch's default)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    return out
