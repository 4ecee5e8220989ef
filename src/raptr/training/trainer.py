"""The training loop: one method (standard, RaPTr, ...) acting on one model, exact FLOPs, exact resume.

Everything a step depends on is a pure function of (seed, step) or lives in the checkpoint:
the batch (``PackedTokens.batch``), the objective's randomness (a per-step generator), the
learning rate (a function of the step), and the method's path (``core.step_generator``). So a
run killed at any step and resumed gives bitwise-identical losses on CPU.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from raptr.ranks import EVAL_STREAM, OBJECTIVE_STREAM, step_generator
from raptr.errors import Preempted, RaptrError
from raptr.flops import ModelFlops
from raptr.methods.base import Method, decay_groups
from raptr.methods.host import Host
from raptr.models.registry import find_layer_stack
from raptr.training import distributed as D
from raptr.training.provenance import code_diff, git_commit, machine
from raptr.training.checkpoint import checkpoint_dirs, load_state, load_weights, save_checkpoint, set_aside, verify_checkpoint
from raptr.training.config import OptimConfig, RunConfig, flatten, to_dict
from raptr.training.runfiles import RunLock, append_jsonl, read_json, read_jsonl, truncate_jsonl, write_json_atomic

# Streams of step_generator: keep the objective's and the evaluation's randomness apart.

# Keys that may differ from the checkpoint's config when resuming: the recovery from a divergence
# (learning rate and its schedule), bookkeeping intervals, and where the run lives. ``train.steps``
# may change too when the method's schedule does not depend on it (``Method.extendable``).
SAFE_ON_RESUME = {
    "optim.lr", "optim.warmup_steps", "optim.decay", "optim.min_lr_ratio", "optim.grad_clip",
    "train.eval_every", "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints", "train.log_every",
    "train.out_dir", "train.path_check_every", "train.threads", "train.max_nonfinite_steps",
}
DIVERGENCE_WINDOW, DIVERGENCE_RISE = 20, 1.0  # mean loss of 20 steps 1 nat above its best: diverging


def lr_at(step: int, total: int, opt: OptimConfig) -> float:
    """Linear warm-up, then cosine / linear decay to lr * min_lr_ratio (a pure function)."""
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    progress = min(1.0, (step - opt.warmup_steps) / max(1, total - opt.warmup_steps))
    shape = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)), "linear": 1 - progress, "constant": 1.0}[opt.decay]
    return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * shape)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RaptrError(f"train.device={name} but no CUDA GPU is visible: use train.device=cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise RaptrError(f"unknown train.device {name!r}: use auto, cpu, cuda or cuda:N") from None


def make_optimizer(model: nn.Module, opt: OptimConfig) -> torch.optim.AdamW:
    decay, no_decay = decay_groups(model)  # no weight decay on biases and norms
    groups = [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)


@dataclass
class Batches:
    """Where batches come from: ``train(index) -> tokens`` and fixed validation token batches."""

    train: Callable[[int], torch.Tensor]
    val: list[torch.Tensor]


class Trainer:
    def __init__(self, cfg: RunConfig, model: nn.Module, method: Method, batches: Batches,
                 objective: Callable, flops: ModelFlops, out_dir: Path | None = None, progress: bool = True):
        self.cfg, self.model, self.method, self.batches, self.objective = cfg, model, method, batches, objective
        self.flops_model = flops
        self.out_dir = Path(out_dir or cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.progress = progress
        self.device = resolve_device(cfg.train.device)
        self.dist = D.init_distributed(self.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if cfg.train.batch_size % self.dist.world:
            raise RaptrError(f"train.batch_size={cfg.train.batch_size} (the global batch) must divide among {self.dist.world} ranks")
        self.model.to(self.device)
        self.total_steps = cfg.train.steps
        path_seed = cfg.train.path_seed if cfg.train.path_seed >= 0 else cfg.train.seed
        # One host for every loop (raptr.methods.host): lr factor, rank agreement, FLOPs, resume rule.
        self.host = Host(method, seed=path_seed, check_every=cfg.train.path_check_every)
        self.host.attach(model, self.total_steps, seq_len=cfg.data.seq_len, layers=find_layer_stack(model), flops=flops)
        self.context = self.host.context
        if self.dist.enabled and cfg.train.parallel == "fsdp" and not self.method.supports_fsdp:
            raise RaptrError(f"{self.method.name} changes the model, which FSDP2 shards once: use train.parallel=ddp")
        if cfg.train.compile:
            for layer in self.context.layers:  # per block, as torchtitan: paths never recompile
                layer.compile()
        self.forward_model = self._wrap()
        self.optimizer = make_optimizer(model, cfg.optim)
        self.context.optimizer = self.optimizer
        self.step = 0
        self.git_commit = git_commit()  # of the code this run imported
        self.counters = {"flops": 0.0, "full_flops": 0.0, "tokens": 0, "train_seconds": 0.0, "layer_passes": 0,
                         "nonfinite_steps": 0}
        self.warnings: list[str] = []
        self._tb = None
        self._changes: dict = {}
        self._signal: int | None = None

    def _wrap(self) -> nn.Module:
        return D.wrap_model(self.model, self.context.layers, self.dist, self.cfg.train.parallel,
                            may_skip=self.method.skips_layers)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, batches: Iterable[torch.Tensor] | None = None) -> float:
        """Full-model loss on the held-out batches (eval mode: every layer, unscaled)."""
        was_training = self.model.training
        self.model.eval()
        losses = []
        for i, tokens in enumerate(self.batches.val if batches is None else batches):
            batch = self.objective(tokens, step_generator(self.cfg.train.seed, i, EVAL_STREAM))
            with self._autocast():
                losses.append(self.model(**self._model_inputs(batch)).item())
        self.model.train(was_training)
        if not losses:
            raise RaptrError("no validation batches: the validation split is empty; raise data.val_fraction or add data")
        return sum(losses) / len(losses)

    def _model_inputs(self, batch: dict) -> dict:
        return {k: batch[k].to(self.device, non_blocking=True) for k in ("input_ids", "labels", "prefix_len") if k in batch}

    def _autocast(self):
        enabled = self.cfg.train.precision == "bf16"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ---------------------------------------------------------------- checkpoints
    def _full_states(self) -> tuple[dict | None, dict]:
        """Model weights (None: take them from the module) and optimizer state, unsharded."""
        if self.dist.enabled and self.cfg.train.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            return (get_model_state_dict(self.model, options=options),
                    get_optimizer_state_dict(self.model, self.optimizer, options=options))
        return None, self.optimizer.state_dict()

    def _save(self) -> Path | None:
        bad = [n for n, p in self.model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
        if bad:  # never write (or call good) a checkpoint with NaN/inf weights
            last = checkpoint_dirs(self.ckpt_dir)
            raise RaptrError(f"weights became non-finite by step {self.step} ({len(bad)} tensors, e.g. {bad[0]}); no checkpoint "
                             f"was written from them and {'the last good one ' + str(last[-1]) + ' is kept' if last else 'none exists yet'}: "
                             "lower optim.lr (allowed on resume) and run the same command again")
        weights, optimizer_state = self._full_states()
        if not self.is_main:
            D.barrier(self.dist)
            return None
        state = {
            "step": self.step,
            "optimizer": optimizer_state,
            "method": self.method.state_dict(),
            "counters": dict(self.counters),
            "torch_rng": torch.get_rng_state(),
            "config": to_dict(self.cfg),
            "warnings": list(self.warnings),
        }
        path = save_checkpoint(self.ckpt_dir, self.step, self.model, state, self.cfg.train.keep_checkpoints, weights)
        D.barrier(self.dist)
        return path

    def _resume(self) -> bool:
        found = checkpoint_dirs(self.ckpt_dir)
        if not found:
            return False
        path, state, damaged = None, None, []
        for candidate in reversed(found):  # newest first; a damaged one is set aside, the one before used
            try:
                verify_checkpoint(candidate)
                path, state = candidate, load_state(candidate)
                break
            except RaptrError as e:
                damaged.append((candidate, e))
        if path is None:
            raise RaptrError(f"every checkpoint under {self.ckpt_dir} is damaged ({damaged[0][1]}): "
                             "pass --fresh to start the run over")
        set_aside_as = [(set_aside(bad).name, e) for bad, e in damaged] if self.is_main else []
        D.barrier(self.dist)
        self.method.load_state_dict(state["method"])  # may reshape the model (stacking) first
        if self.dist.enabled and self.cfg.train.parallel == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

            options = StateDictOptions(full_state_dict=True, strict=False)  # tied weights are stored once
            set_model_state_dict(self.model, load_weights(path), options=options)
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        else:
            load_weights(path, self.model)
            if self.dist.enabled and self.method.changes_model:
                self.forward_model = self._wrap()  # the method may have regrown the model
            # Rebuild in the model's (possibly regrown) parameter order, then load the moments.
            self.optimizer = make_optimizer(self.model, self.cfg.optim)
            self.context.optimizer = self.optimizer
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.counters = state["step"], {"nonfinite_steps": 0, **state["counters"]}
        self.warnings = list(state.get("warnings", [])) + self.warnings
        for name, e in set_aside_as:  # logged at the step training resumes from
            self._warn(f"{e}: set aside as {name}; resuming from {path.name}")
        return True

    def _check_config(self, fresh: bool) -> None:
        """Refuse to mix two different runs in one directory (that would lose the first); allow the
        SAFE_ON_RESUME changes, which are recorded in the log."""
        saved = self.out_dir / "config.json"
        mine = to_dict(self.cfg)
        if fresh:
            for name in ("checkpoints", "metrics.jsonl", "tb", "summary.json", "config.json"):
                target = self.out_dir / name
                shutil.rmtree(target, ignore_errors=True) if target.is_dir() else target.unlink(missing_ok=True)
        elif checkpoint_dirs(self.ckpt_dir):
            old = read_json(saved)
            if not isinstance(old, dict):  # truncated or damaged: the checkpoint holds the config too
                old = load_state(checkpoint_dirs(self.ckpt_dir)[-1]).get("config", {})
                self._warn(f"{saved} was damaged; rewritten from the newest checkpoint's config")
            before, now = flatten(old), flatten(mine)
            for flat in (before, now):  # compare the path seed in effect (runs before it existed used train.seed)
                if flat.get("train.path_seed", -1) in (-1, None):
                    flat["train.path_seed"] = flat.get("train.seed")
            diff = [k for k in now if before.get(k) != now[k]]
            allowed = SAFE_ON_RESUME | ({"train.steps"} if self.method.extendable else set())
            unsafe = [k for k in diff if k not in allowed]
            if unsafe:
                shown = ", ".join(f"{k}: {before.get(k)!r} -> {now[k]!r}" for k in unsafe[:3])
                why = (f"; {self.method.name}'s schedule depends on train.steps, so it cannot be extended"
                       if unsafe == ["train.steps"] else "")
                raise RaptrError(
                    f"{self.out_dir} holds a run with a different config ({shown}){why}: resume with its config "
                    f"(changes allowed on resume: {', '.join(sorted(allowed))}), pick another train.out_dir, "
                    "or pass --fresh to discard it"
                )
            self._changes = {k: [before.get(k), now[k]] for k in diff}
        write_json_atomic(saved, mine)

    # ---------------------------------------------------------------- logging
    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        append_jsonl(self.out_dir / "metrics.jsonl", record)
        if self._tb is not None and record["kind"] in ("train", "eval") and (
                record["kind"] == "eval" or record["step"] % self.cfg.train.log_every == 0):
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def _warn(self, message: str) -> None:
        """A warning for the log, the progress bar's stream and the summary."""
        if message not in self.warnings:
            self.warnings.append(message)
        if self.is_main:
            tqdm.write(f"warning: {message}", file=sys.stderr)
            if (self.out_dir / "metrics.jsonl").parent.is_dir():
                append_jsonl(self.out_dir / "metrics.jsonl", {"kind": "warning", "step": self.step, "message": message})

    def _truncate_log(self) -> None:
        """After a resume, drop log lines written after the checkpoint (they will be redone)."""
        path = self.out_dir / "metrics.jsonl"
        if not path.is_file():
            if self.step:
                self._warn(f"{path} was missing: the log of steps 1-{self.step} is lost (training resumes from the "
                           f"checkpoint of step {self.step}; the model and optimizer are intact)")
            return
        torn = truncate_jsonl(path, self.step)
        if torn:
            self._warn(f"{path} had {torn} unreadable line(s) (a torn write): dropped")
        logged = {r["step"] for r in read_jsonl(path)[0] if r["kind"] == "train"}
        lost = [s for s in range(1, self.step + 1) if s not in logged]
        if lost:
            self._warn(f"{path} lacks the train records of {len(lost)} of the {self.step} steps before the checkpoint "
                       f"(steps {_ranges(lost)}): that part of the log is lost (the model and optimizer are intact)")

    def _open_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tb"))
        except ImportError:  # tensorboard is a dependency, but training must not die without it
            self._tb = None

    # ---------------------------------------------------------------- the loop
    def _train_step(self, step: int) -> tuple[float, int]:
        """Forward/backward of every micro-batch of one optimizer step; returns (loss, labelled)."""
        accum, seed, d = self.cfg.optim.grad_accum, self.cfg.train.seed, self.dist
        loss_value, labelled = 0.0, 0
        for micro in range(accum):
            index = step * accum + micro
            # The objective sees the global batch, then each rank keeps its rows: the data and the
            # masking are the same for any number of ranks.
            batch = self.objective(self.batches.train(index), step_generator(seed, index, OBJECTIVE_STREAM))
            total = int((batch["labels"] != -100).sum())
            if d.enabled:
                rows = batch["input_ids"].shape[0] // d.world
                batch = {k: v[d.rank * rows:(d.rank + 1) * rows] for k, v in batch.items()}
            mine = int((batch["labels"] != -100).sum())
            # Weight each rank's mean by its share of the labelled positions, so that DDP's average
            # is the global batch's mean loss (exactly 1.0 on one process).
            weight = mine * d.world / total if total else 0.0
            sync = contextlib.nullcontext()
            if d.enabled and micro < accum - 1 and hasattr(self.forward_model, "no_sync"):
                sync = self.forward_model.no_sync()
            with sync:
                with self._autocast():
                    loss = self.forward_model(**self._model_inputs(batch))
                (loss * weight / accum).backward()
            loss_value += loss.item() * (mine / total if total else 0.0) / accum
            labelled += total
        return D.all_sum([loss_value], d)[0], labelled

    def fit(self, resume: bool = True, fresh: bool = False, stop_after: int | None = None,
            deadline: float | None = None) -> dict:
        """Train to ``train.steps`` (or stop after ``stop_after`` more steps, or at the first step boundary
        after the ``time.time()`` ``deadline``, with a checkpoint to resume from); returns the summary."""
        lock, problem = None, None
        if self.is_main:
            try:
                if self.out_dir.exists() and not self.out_dir.is_dir():
                    raise RaptrError(f"train.out_dir {self.out_dir} is a file: give a directory path")
                self.out_dir.mkdir(parents=True, exist_ok=True)
                lock = RunLock(self.out_dir).acquire()
            except RaptrError as e:
                problem = e
        # Under torchrun every rank learns that rank 0 cannot start (instead of waiting for it).
        if D.all_sum([float(problem is not None)], self.dist)[0] > 0:
            raise problem or RaptrError(f"rank 0 could not start the run in {self.out_dir}: see its error")
        handlers = self._catch_signals()
        try:
            return self._fit(resume, fresh, stop_after, deadline)
        finally:
            for signum, old in handlers.items():
                signal.signal(signum, old)
            if lock is not None:
                lock.release()

    def _catch_signals(self) -> dict:
        """SIGTERM (what SLURM/Kubernetes send before a kill) and SIGINT: finish the step, checkpoint, stop."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, frame):
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now
            self._signal = signum

        return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}

    def _fit(self, resume: bool, fresh: bool, stop_after: int | None, deadline: float | None) -> dict:
        cfg = self.cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        if not resume and not fresh and checkpoint_dirs(self.ckpt_dir):
            raise RaptrError(f"{self.out_dir} has checkpoints and --no-resume would overwrite them: drop --no-resume to "
                             "continue that run, pass --fresh to discard it, or pick another train.out_dir")
        if self.is_main:
            self._check_config(fresh)
            diff = self.out_dir / "code.diff"  # code that is not in history: kept so the run can be rebuilt
            diff.write_text(code_diff()) if str(self.git_commit).endswith("+dirty") else diff.unlink(missing_ok=True)
        D.barrier(self.dist)
        resumed = resume and self._resume()
        if self.is_main:
            self._truncate_log() if resumed else (self.out_dir / "metrics.jsonl").unlink(missing_ok=True)
            self._open_tensorboard()
            if resumed and self._changes:
                self._log({"kind": "resume", "step": self.step, "changed": self._changes})
                tqdm.write(f"resuming at step {self.step} with changed " + ", ".join(
                    f"{k}: {a!r} -> {b!r}" for k, (a, b) in self._changes.items()), file=sys.stderr)
        boundaries = set(self.method.stage_boundaries())
        if not resumed:
            self._log({"kind": "eval", "step": 0, "val_loss": self.evaluate(), "stage": 0, **self.counters})
        end = self.total_steps if stop_after is None else min(self.total_steps, self.step + stop_after)
        bar = tqdm(total=self.total_steps, initial=self.step, desc=cfg.name, disable=not (self.progress and self.is_main),
                   dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
        self.model.train()
        recent: deque = deque(maxlen=DIVERGENCE_WINDOW)
        best_mean, bad_in_row, first_val, preempted, streak_start = math.inf, 0, None, False, 0
        warned = set()  # each kind of divergence is warned about once per session
        while self.step < end:
            step = self.step
            started = time.perf_counter()
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(step, self.total_steps, cfg.optim)
            info = self.host.step(step, self.optimizer)  # the step's subnetwork; lr × the method's factor
            if self.dist.enabled and info.model_changed:
                self.forward_model = self._wrap()  # the model grew: DDP must see the new layers
            lr = self.optimizer.param_groups[0]["lr"]
            loss_value, labelled = self._train_step(step)
            # The norm is measured even without clipping (max_norm=inf multiplies by exactly 1.0):
            # a step with a non-finite loss or gradient is not applied (GradScaler-style).
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip or math.inf).item()
            finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
            if finite:
                self.optimizer.step()
                bad_in_row = 0
            else:
                self.counters["nonfinite_steps"] += 1
                bad_in_row += 1
                streak_start = step if bad_in_row == 1 else streak_start
            self.host.after_optimizer_step(self.optimizer)
            self.optimizer.zero_grad(set_to_none=True)  # skipped layers keep grad=None: AdamW leaves them alone

            self.step += 1
            sequences = cfg.train.batch_size * cfg.optim.grad_accum
            self.counters["flops"] += self.host.step_flops(sequences, labelled)
            self.counters["full_flops"] += self.host.full_flops(sequences, labelled)
            self.counters["tokens"] += sequences * self.flops_model.seq_len
            self.counters["layer_passes"] += info.layers_run
            self.counters["train_seconds"] += time.perf_counter() - started
            extra = {k: v for k, v in info.extra.items() if isinstance(v, (int, float))}  # e.g. PLD's theta
            self._log({"kind": "train", "step": self.step, "loss": loss_value, "lr": lr, "stage": info.stage,
                       "layers_run": info.layers_run, "grad_norm": grad_norm, **extra, **self.counters,
                       **({} if finite else {"skipped": True})})
            if not finite:
                if bad_in_row >= cfg.train.max_nonfinite_steps:
                    raise RaptrError(
                        f"{bad_in_row} non-finite steps in a row from step {streak_start + 1} (loss {loss_value}, grad norm "
                        f"{grad_norm}), none applied; the run stopped and {self._drop_checkpoint_at(streak_start)}: lower "
                        "optim.lr or raise optim.warmup_steps (both allowed on resume) and run the same command again")
                self._warn(f"step {self.step}: non-finite loss or gradient (loss {loss_value}, grad norm {grad_norm}); "
                           "the update was not applied")
            else:
                recent.append(loss_value)
                if len(recent) == recent.maxlen:
                    mean = sum(recent) / len(recent)
                    if mean > best_mean + DIVERGENCE_RISE and "train" not in warned:
                        warned.add("train")
                        self._warn(f"diverging: mean training loss of the last {len(recent)} steps is {mean:.3f} at step "
                                   f"{self.step}, {mean - best_mean:.2f} above its best ({best_mean:.3f}); lower optim.lr")
                    best_mean = min(best_mean, mean)
            saved = 1 - self.counters["flops"] / self.counters["full_flops"]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", stage=info.stage, path=f"{info.layers_run}/{len(self.context.layers)}",
                            saved=f"{saved:.0%}", **({"warn": len(self.warnings)} if self.warnings else {}), refresh=False)

            # Full-model eval every N steps, at the end, and at each stage boundary (= the loss
            # just before the transition; the next stage starts from these very weights).
            if self.step % cfg.train.eval_every == 0 or self.step in boundaries or self.step == self.total_steps:
                val = self.evaluate()
                self._log({"kind": "eval", "step": self.step, "val_loss": val, "stage": info.stage,
                           "boundary": self.step in boundaries, **self.counters})
                first_val = first_val or self._first_val()
                if first_val is not None and (not math.isfinite(val) or val > first_val) and "val" not in warned:
                    warned.add("val")
                    self._warn(f"diverged: full-model val loss {val:.4g} at step {self.step} is above the untrained "
                               f"model's {first_val:.4g}; lower optim.lr")
            # Stop here (with a checkpoint) on SIGTERM/SIGINT or when out of time; under torchrun one
            # small all-reduce makes every rank stop at the same step, or the collectives would hang.
            flags = [float(self._signal is not None), float(deadline is not None and time.time() > deadline)]
            signalled, out_of_time = (v > 0 for v in D.all_sum(flags, self.dist))
            if (signalled or out_of_time) and self.step < end:
                end, preempted = self.step, signalled
            # No checkpoint inside a run of non-finite steps: the weights have not changed, and
            # keeping the older checkpoints is what makes a recovery possible.
            if bad_in_row == 0 and (self.step % cfg.train.checkpoint_every == 0 or self.step == end):
                self._save()
        bar.close()
        if self._tb is not None:
            self._tb.close()
        summary = self.summary()
        if preempted:
            signum = self._signal or signal.SIGTERM
            last = checkpoint_dirs(self.ckpt_dir)
            where = (f"with a checkpoint in {last[-1]}" if last and last[-1].name == f"step_{self.step:07d}" else
                     f"(inside non-finite steps: it resumes from {last[-1].name if last else 'the start'})")
            raise Preempted(f"stopped by {signal.Signals(signum).name} at step {self.step}/{self.total_steps} {where}: "
                            "run the same command again to resume", signum)
        return summary

    def _drop_checkpoint_at(self, step: int) -> str:
        """Set aside the checkpoint whose weights gave the first non-finite step (finite, but ruined);
        returns where the run now resumes from."""
        found = checkpoint_dirs(self.ckpt_dir)
        note = ""
        if found and found[-1].name == f"step_{step:07d}" and self.is_main:
            note = f"the checkpoint whose weights gave it was set aside as {set_aside(found[-1], 'nonfinite').name}; "
            found = found[:-1]
        return note + (f"it resumes from {found[-1].name}, the last checkpoint with finite losses" if found
                       else "no good checkpoint exists (it starts over)")

    def _first_val(self) -> float | None:
        rows, _ = read_jsonl(self.out_dir / "metrics.jsonl") if self.is_main else ([], 0)
        first = next((r["val_loss"] for r in rows if r["kind"] == "eval" and r["step"] == 0), None)
        return first if isinstance(first, float) and math.isfinite(first) else None

    def summary(self) -> dict:
        if not self.is_main:  # the log and summary live on rank 0
            D.barrier(self.dist)
            return {}
        evals = [r for r in read_jsonl(self.out_dir / "metrics.jsonl")[0] if r["kind"] == "eval"]
        c = self.counters
        summary = {
            "name": self.cfg.name, "method": self.method.name, "steps": self.step, "total_steps": self.total_steps,
            "final_val_loss": evals[-1]["val_loss"] if evals else None,
            "flops": c["flops"], "full_model_flops": c["full_flops"],
            "relative_flops": c["flops"] / c["full_flops"] if c["full_flops"] else None,
            "expected_relative_layer_flops": self.method.expected_relative_flops(),
            "tokens": c["tokens"], "train_seconds": c["train_seconds"],
            "git_commit": self.git_commit, "machine": machine(self.device),
            "nonfinite_steps": c.get("nonfinite_steps", 0),
            "diverged": any(w.startswith(("diverg", "diverged")) for w in self.warnings),
            "warnings": list(self.warnings),
        }
        write_json_atomic(self.out_dir / "summary.json", summary)
        D.barrier(self.dist)
        return summary


def _ranges(steps: list[int]) -> str:
    """1,2,3,7,9,10 -> '1-3, 7, 9-10' (at most five ranges shown)."""
    out: list[str] = []
    start = prev = steps[0]
    for s in steps[1:] + [None]:
        if s is not None and s == prev + 1:
            prev = s
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if s is not None:
            start = prev = s
    return ", ".join(out[:5]) + (f", ... ({len(out) - 5} more)" if len(out) > 5 else "")
