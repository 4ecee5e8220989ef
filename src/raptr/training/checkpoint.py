"""Checkpoints: ``step_XXXXXXX/`` with safetensors weights and a torch file of training state.

Written into a temporary directory, completed with a ``DONE`` marker, then renamed into place,
so a kill at any moment leaves the previous checkpoint whole. Only the last K are kept.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from raptr.errors import RaptrError

PREFIX = "step_"


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "DONE").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def save_checkpoint(root: Path, step: int, model: nn.Module, state: dict, keep: int, weights: dict | None = None) -> Path:
    """``weights``: an already-gathered full state dict (FSDP2); default: the module's own."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if weights is None:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights
    else:  # one name per tensor, as save_model writes: tied weights appear once in named_parameters
        names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
        save_file({k: v.detach().contiguous() for k, v in weights.items() if k in names}, str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "DONE").write_text(str(step))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. the end of a resumed, finished run)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # leftovers of runs killed mid-save
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _unreadable(path: Path, e: Exception) -> RaptrError:
    return RaptrError(
        f"checkpoint {path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]}): "
        "delete that directory to resume from the one before, or start afresh with --no-resume"
    )


def load_state(path: Path) -> dict:
    """The training state of a checkpoint (read first: a method may reshape the model from it)."""
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # corrupt or truncated file: name the checkpoint and the way out
        raise _unreadable(path, e) from None


def load_weights(path: Path, model: nn.Module | None = None) -> dict | None:
    """Load weights into ``model``; with no model, return the tensors (for FSDP2's set_model_state_dict)."""
    if model is None:
        try:
            return load_file(str(path / "model.safetensors"))
        except Exception as e:
            raise _unreadable(path, e) from None
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    except Exception as e:
        raise _unreadable(path, e) from None
    if missing or unexpected:
        raise RaptrError(
            f"checkpoint {path} does not fit this model ({len(missing)} missing, {len(unexpected)} unexpected tensors): "
            "resume with the config it was written with, or use a new train.out_dir"
        )


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
