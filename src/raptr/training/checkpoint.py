"""Checkpoints: ``step_XXXXXXX/`` with safetensors weights and a torch file of training state.

Written into a temporary directory, completed with a ``DONE`` marker, then renamed into place,
so a kill at any moment leaves the previous checkpoint whole. Only the last K are kept. Each
checkpoint carries the SHA-256 of its files (``checksums.json``), verified before loading, so
flipped bits are found instead of loaded; a damaged checkpoint can be set aside (renamed to
``corrupt-step_N``, never deleted) and the one before it used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from raptr.errors import RaptrError

PREFIX = "step_"
FILES = ("model.safetensors", "state.pt")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(path: Path) -> None:
    """Raise a RaptrError naming the damage if a file of the checkpoint differs from its checksum
    (checkpoints written before checksums existed are checked by parsing their weights)."""
    sums_file = path / "checksums.json"
    if not sums_file.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path / "model.safetensors"), "pt") as f:
                f.keys()
        except Exception as e:
            raise _unreadable(path, e) from None
        return
    try:
        sums = json.loads(sums_file.read_text())
    except (OSError, ValueError) as e:
        raise _unreadable(path, e) from None
    for name in FILES:
        if not (path / name).is_file():
            raise RaptrError(f"checkpoint {path} is damaged: {name} is missing")
        if _sha256(path / name) != sums.get(name):
            raise RaptrError(f"checkpoint {path} is damaged: {name} does not match its checksum")


def set_aside(path: Path, why: str = "corrupt") -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, never deleted)."""
    target = path.with_name(f"{why}-{path.name}")
    n = 1
    while target.exists():
        target, n = path.with_name(f"{why}-{path.name}.{n}"), n + 1
    os.replace(path, target)
    return target


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint directory (``step_0000100``) was saved at."""
    return int(path.name[len(PREFIX):])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / "DONE").is_file()]
    return sorted(done, key=checkpoint_step)


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
    sums = {name: _sha256(tmp / name) for name in FILES}
    (tmp / "checksums.json").write_text(json.dumps(sums, indent=1))
    (tmp / "DONE").write_text(str(step))
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. the end of a resumed, finished run)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(root)[:-keep]:  # renamed first (atomic): a kill mid-delete never leaves a
        gone = root / f".tmp-old-{old.name}-{os.getpid()}"  # "complete" checkpoint with files missing
        os.replace(old, gone)
        shutil.rmtree(gone, ignore_errors=True)
    for stale in root.glob(".tmp-*"):  # leftovers of runs killed mid-save
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _unreadable(path: Path, e: Exception) -> RaptrError:
    detail = (str(e).splitlines() or [""])[0][:120]
    return RaptrError(f"checkpoint {path} is unreadable ({type(e).__name__}: {detail})")


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
