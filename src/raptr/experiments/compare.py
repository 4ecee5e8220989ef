"""``raptr compare``: several methods on the same data, seeds, model and budget, then a report.

A comparison config names a base run config (a preset) and a list of arms; each arm is a set of
overrides on top of it, trained for each of its seeds. Seed k gives every arm the same initial
weights, data order and masking (a paired design); the method's own randomness (paths, drop
masks) has its own seed, ``train.path_seed``, set to k as well unless an arm overrides it.

Runs go to ``<results>/<name>/runs/<label>/`` and each resumes on its own, so an interrupted
comparison continues where it stopped and finished runs are skipped: a suite can be run in pieces
(``--only ARM``, ``--seeds 0,1``, ``--budget MINUTES``) across sessions. An arm with
``match_flops_of: other`` gets, for each seed, the number of steps that spends that seed's run of
the other arm's measured FLOPs (the "equi-FLOP" baseline).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from tqdm.auto import tqdm

from raptr.errors import Preempted, RaptrError
from raptr.training.build import build_trainer, prepare_data, tokenizer_kind
from raptr.training.config import RunConfig, flatten, from_dict, load_config, load_yaml, resolve_config_path, to_dict
from raptr.training.runfiles import read_jsonl, write_json_atomic

console = Console()


@dataclass
class Arm:
    name: str
    set: list[str] = field(default_factory=list)  # key=value overrides for this arm
    seeds: list[int] = field(default_factory=list)  # empty: the comparison's seeds
    match_flops_of: str = ""  # run as many steps as spend this arm's FLOPs (per seed)


@dataclass
class CompareConfig:
    name: str
    base: str  # preset or YAML of the shared run config
    overrides: list[str] = field(default_factory=list)  # applied to every arm
    seeds: list[int] = field(default_factory=lambda: [0])
    baseline: str = "baseline"  # standard training: FLOPs ratios and time-to-target are taken against it
    references: list[str] = field(default_factory=list)  # arms every arm is compared with (paired); default [baseline]
    arms: list[Arm] = field(default_factory=list)
    reuse: list[str] = field(default_factory=list)  # other comparisons (same results root) whose finished runs of an identical config are copied, not retrained
    horizon_of: str = ""  # another comparison (same results root) of these arms at another training length: the report says how each paired gap changed


@dataclass
class PlannedRun:
    arm: Arm
    seed: int
    label: str
    overrides: list[str]
    match_label: str = ""  # the run whose FLOPs this one spends


def load_compare_config(path: str, overrides: list[str] = ()) -> CompareConfig:
    data = load_yaml(resolve_config_path(path))
    arms = data.pop("arms", None)
    if not arms or not isinstance(arms, list):
        raise RaptrError(f"{path} has no 'arms': list the methods to compare, each with a name and overrides")
    for i, a in enumerate(arms):
        if not isinstance(a, dict):
            raise RaptrError(f"{path}: arms[{i}] is {a!r}: write each arm as a mapping, e.g. "
                             "{name: raptr, set: [method.name=raptr]}")
    cfg = from_dict(CompareConfig, data)
    cfg.arms = [from_dict(Arm, a, f"arms[{i}].") for i, a in enumerate(arms)]
    cfg.overrides = list(cfg.overrides) + list(overrides)
    names = [a.name for a in cfg.arms]
    if len(set(names)) != len(names):
        raise RaptrError(f"arm names must be unique, got {names}")
    by_name = {a.name: a for a in cfg.arms}
    for arm in cfg.arms:
        if arm.match_flops_of and arm.match_flops_of not in names:
            raise RaptrError(f"arm '{arm.name}' matches the FLOPs of unknown arm '{arm.match_flops_of}': use one of {names}")
        if arm.match_flops_of and by_name[arm.match_flops_of].match_flops_of:
            raise RaptrError(f"arm '{arm.name}' matches the FLOPs of '{arm.match_flops_of}', which itself matches another "
                             "arm's: match the FLOPs of an arm with its own step count")
    cfg.references = cfg.references or [cfg.baseline]
    for ref in [cfg.baseline] + cfg.references:
        if ref not in names:
            raise RaptrError(f"reference arm '{ref}' is not among the arms {names}")
    return cfg


def arm_seeds(cfg: CompareConfig, arm: Arm) -> list[int]:
    return arm.seeds or cfg.seeds


def run_label(arm: Arm, seed: int, cfg: CompareConfig | None = None) -> str:
    """``arm`` for the arm's first seed, ``arm-seedK`` for the others (the run directory's name)."""
    seeds = arm_seeds(cfg, arm) if cfg is not None else arm.seeds
    return arm.name if not seeds or seed == seeds[0] else f"{arm.name}-seed{seed}"


def parse_label(label: str, cfg: CompareConfig) -> tuple[str, int] | None:
    """(arm, seed) of a run directory name, or None if it belongs to no arm of ``cfg``."""
    for arm in cfg.arms:
        for seed in arm_seeds(cfg, arm):
            if run_label(arm, seed, cfg) == label:
                return arm.name, seed
    return None


def arm_overrides(cfg: CompareConfig, arm: Arm, seed: int, root: Path) -> list[str]:
    label = run_label(arm, seed, cfg)
    return (cfg.overrides + [f"train.seed={seed}", f"train.path_seed={seed}"] + arm.set
            + [f"name={label}", f"train.out_dir={root}/runs/{label}"])


def plan_runs(cfg: CompareConfig, root: Path, only: list[str] | None = None, seeds: list[int] | None = None) -> list[PlannedRun]:
    """Every (arm, seed) to run, seed by seed (all arms of seed 0 first), matched arms after their target."""
    names = [a.name for a in cfg.arms]
    for name in only or []:
        if name not in names:
            raise RaptrError(f"--only {name}: no such arm; the arms are {', '.join(names)}")
    by_name = {a.name: a for a in cfg.arms}
    ordered = [a for a in cfg.arms if not a.match_flops_of] + [a for a in cfg.arms if a.match_flops_of]
    depth = max(len(arm_seeds(cfg, a)) for a in cfg.arms)
    planned = []
    for rank in range(depth):
        for arm in ordered:
            own = arm_seeds(cfg, arm)
            if rank >= len(own) or (only and arm.name not in only) or (seeds is not None and own[rank] not in seeds):
                continue
            seed = own[rank]
            match = ""
            if arm.match_flops_of:
                target = by_name[arm.match_flops_of]
                match = run_label(target, seed if seed in arm_seeds(cfg, target) else arm_seeds(cfg, target)[0], cfg)
            planned.append(PlannedRun(arm, seed, run_label(arm, seed, cfg), arm_overrides(cfg, arm, seed, root), match))
    if not planned:
        raise RaptrError(f"nothing to run: no arm has the seeds {seeds}; the comparison's seeds are {cfg.seeds}")
    return planned


def finished_summary(run_dir: Path) -> dict | None:
    """The summary of a run that reached its last step, else None."""
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return s if s.get("steps") is not None and s.get("steps") == s.get("total_steps") else None


def _finished_at(run_dir: Path | None, steps: int | None, summary: dict | None = None) -> dict | None:
    """The summary of a run (read from ``run_dir`` unless given) that finished exactly ``steps`` steps, else None."""
    done = summary if summary is not None else finished_summary(run_dir)
    return done if done is not None and steps is not None and done.get("total_steps") == steps else None


def last_step(run_dir: Path) -> int:
    """The last logged step of a run in progress (reads only the end of metrics.jsonl)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return 0


_NOT_NUMERICS = ("name", "train.out_dir", "data.cache_dir")  # config keys that do not change what a run computes


def _numerics(cfg: RunConfig) -> dict:
    flat = flatten(to_dict(cfg))
    return {k: v for k, v in flat.items() if k not in _NOT_NUMERICS}


def reuse_finished(cfg: RunConfig, results_dir: Path, suites: list[str]) -> dict | None:
    """Copy into ``cfg.out_dir`` the logs of a finished run of another comparison whose config is
    identical but for its name and paths (runs are deterministic: training it again would give the
    same numbers); return its summary (``reused_from`` names the source), or None."""
    out = cfg.out_dir
    if out.exists() and any(out.iterdir()):
        return None  # a run of this suite started here (e.g. stopped by --budget): it resumes instead
    want = _numerics(cfg)
    for suite in suites:
        runs = results_dir / suite / "runs"
        for run in sorted(runs.iterdir()) if runs.is_dir() else []:
            done = _finished_at(run, cfg.train.steps)
            if done is None:
                continue
            try:
                theirs = from_dict(RunConfig, json.loads((run / "config.json").read_text()))
            except (OSError, ValueError, RaptrError):
                continue
            if _numerics(theirs) != want or _changed_on_resume(run / "metrics.jsonl"):
                continue
            out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run / "metrics.jsonl", out / "metrics.jsonl")
            write_json_atomic(out / "config.json", to_dict(cfg))
            summary = {**done, "name": cfg.name, "reused_from": f"{suite}/runs/{run.name}"}
            write_json_atomic(out / "summary.json", summary)
            return summary
    return None


def _changed_on_resume(metrics: Path) -> bool:
    """Did the run change settings when it resumed (its final config.json is then not what it ran)?"""
    records, _ = read_jsonl(metrics)
    return any(r.get("kind") == "resume" and r.get("changed") for r in records)


def unigram_plateau(data) -> dict:
    """Cross-entropy of the val tokens under the train split's token frequencies (add-½ smoothing).

    A model that has learned only token frequencies sits at this loss (the "unigram plateau");
    a report states how far below it every arm ended.
    """
    vocab = data.tokenizer.get_vocab_size()
    counts = np.bincount(np.asarray(data.train.tokens, dtype=np.int64), minlength=vocab).astype(np.float64) + 0.5
    logp = np.log(counts / counts.sum())
    val = np.asarray(data.val.tokens, dtype=np.int64)
    return {"unigram_val_loss": float(-logp[val].mean()), "train_tokens": int(data.train.num_tokens),
            "val_tokens": int(data.val.num_tokens), "vocab_size": vocab}


def _steps_for(run: PlannedRun, summaries: dict[str, dict]) -> list[str]:
    if not run.match_label:
        return run.overrides
    target = summaries[run.match_label]
    return run.overrides + [f"train.steps={max(1, round(target['total_steps'] * target['relative_flops']))}"]


# Worker-process state (--workers > 1): the compare process's pid, a signal received outside a run,
# and whether a run is in progress.
_PARENT: int | None = None
_STOP: int | None = None
_RUNNING = False


def _init_worker(parent: int) -> None:
    """Pool-worker initializer. Outside a run a signal only marks the worker as stopping (default
    handlers would kill it and break the pool for the runs that are checkpointing); inside one the
    trainer's own handlers take over. If the compare process dies without passing a signal on
    (SIGKILL, or a SIGTERM to it alone), a running run stops as on SIGTERM (finish the step,
    checkpoint) and an idle worker exits, instead of living on as an orphan holding a run's lock."""
    global _PARENT
    _PARENT = parent

    def mark(signum, frame):
        global _STOP
        _STOP = signum

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, mark)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        if not _RUNNING:
            os._exit(0)
        os.kill(os.getpid(), signal.SIGTERM)  # _fit_run exits the process once the run has stopped

    threading.Thread(target=watch, daemon=True, name="raptr-parent-watch").start()


def _fit_run(base: str, overrides: list[str], progress: bool, deadline: float | None) -> dict:
    """One run, start to finish (or resumed); in a worker process with --workers > 1."""
    global _RUNNING
    _RUNNING, code = True, 1
    try:
        if _STOP is not None:
            raise Preempted(f"stopped by {signal.Signals(_STOP).name} before it started", _STOP)
        trainer = build_trainer(load_config(base, overrides), progress=progress)
        if _STOP is not None:  # a signal while it was being built: stop at the first step boundary
            trainer._signal = _STOP
        summary = trainer.fit(deadline=deadline)
        code = 0
        return summary
    except Preempted as e:
        code = e.exit_code
        raise
    finally:
        _RUNNING = False
        if _PARENT is not None and os.getppid() != _PARENT:
            os._exit(code)  # orphaned: the run has stopped (with a checkpoint); nobody is left to take the result


def run_compare(cfg: CompareConfig, results_dir: str | Path = "results", progress: bool = True, workers: int = 1,
                only: list[str] | None = None, seeds: list[int] | None = None, budget_minutes: float | None = None) -> Path:
    """Run the planned arms (``workers`` at a time, each in its own process); return the results dir.

    With ``budget_minutes``, no run starts after the budget is spent and running ones checkpoint and
    stop at their next step; the same command later resumes them.
    """
    if workers < 1:
        raise RaptrError(f"--workers {workers}: use 1 or more")
    if budget_minutes is not None and budget_minutes <= 0:
        raise RaptrError(f"--budget {budget_minutes}: give the minutes to spend, a positive number")
    root = Path(results_dir) / cfg.name
    for d in (Path(results_dir), root):
        if d.exists() and not d.is_dir():
            raise RaptrError(f"{d} is a file: pick another --results directory")
    root.mkdir(parents=True, exist_ok=True)
    (root / "compare.json").write_text(json.dumps({**asdict(cfg), "arms": [asdict(a) for a in cfg.arms]}, indent=2))
    deadline = time.time() + 60 * budget_minutes if budget_minutes else None
    planned = plan_runs(cfg, root, only, seeds)
    # Validate every run's config before spending compute, and build the shared data once.
    configs = {r.label: load_config(cfg.base, r.overrides) for r in planned}
    first = configs[planned[0].label]
    data = prepare_data(first, progress)
    if not (root / "data.json").is_file():
        info = {"tokenizer": tokenizer_kind(first), "sources": first.data.sources, **unigram_plateau(data)}
        (root / "data.json").write_text(json.dumps(info, indent=2))

    summaries: dict[str, dict] = {}
    # A FLOP-matched run whose target is outside --only/--seeds may still use it if it finished.
    targets = {r.match_label for r in planned if r.match_label} - {r.label for r in planned}
    for r in plan_runs(cfg, root, None, None):
        if r.label in targets:
            target = load_config(cfg.base, r.overrides)
            done = _finished_at(target.out_dir, target.train.steps)
            if done is not None:
                summaries[r.label] = done
    todo: list[PlannedRun] = []
    for r in planned:  # matched runs after their targets, so the expected step count is known
        expected = _expected_steps(r, configs, summaries)
        done = finished_summary(configs[r.label].out_dir)
        if done is None and cfg.reuse and not r.match_label:
            done = reuse_finished(configs[r.label], Path(results_dir), cfg.reuse)
            if done is not None:
                console.print(f"  {r.label}: the same run as {done['reused_from']}, logs copied")
        if done is not None and _finished_at(None, expected, done) is not None:
            summaries[r.label] = done
        else:
            todo.append(r)
    for r in planned:
        if r.match_label and r.match_label not in summaries and r.match_label not in {t.label for t in todo}:
            raise RaptrError(f"{r.label} spends the FLOPs of {r.match_label}, which has not run: "
                             f"run arm '{r.arm.match_flops_of}' for seed {r.seed} first (or drop --only/--seeds)")
    console.print(f"{cfg.name}: {len(planned)} runs planned, {len(planned) - len(todo)} done already, "
                  f"{len(todo)} to run{' now' if todo else ''}")
    for r in planned:
        if r.label in summaries:
            console.print(f"  {r.label}: done already, skipping")
    failed = _execute(cfg, todo, configs, summaries, progress, workers, deadline) if todo else {}
    missing = [r.label for r in planned if r.label not in summaries and r.label not in failed]
    if missing:
        console.print(f"not finished (run the same command again to continue): {', '.join(missing)}")
    if failed:
        raise RaptrError(f"{len(failed)} run(s) failed, the others are kept: " + "; ".join(
            f"{label}: {msg}" for label, msg in failed.items()))
    return root


def _expected_steps(run: PlannedRun, configs: dict, summaries: dict) -> int | None:
    """The steps a finished run must have: its config's, or (matched) those of its target's FLOPs."""
    if not run.match_label:
        return configs[run.label].train.steps
    if run.match_label not in summaries:
        return None
    return int(_steps_for(run, summaries)[-1].split("=")[1])


def _execute(cfg: CompareConfig, todo: list[PlannedRun], configs: dict, summaries: dict, progress: bool,
             workers: int, deadline: float | None) -> dict[str, str]:
    """Start runs as their dependencies allow; one suite-wide progress bar with an ETA. A failing
    run does not stop the others; returns {label: error} of the failed ones."""
    counted = {r.label: _expected_steps(r, configs, summaries) or configs[r.label].train.steps for r in todo}
    bar = tqdm(total=sum(counted.values()), desc=f"{cfg.name} suite", unit="step", disable=not progress,
               dynamic_ncols=True, mininterval=2.0)
    shown = {r.label: last_step(configs[r.label].out_dir) for r in todo}
    bar.update(sum(shown.values()))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                               initargs=(os.getpid(),)) if workers > 1 else None
    running: dict = {}  # future -> run
    queue = list(todo)
    failed: dict[str, str] = {}

    stopped: dict[str, Preempted] = {}  # runs a signal stopped (each with its trainer's message)
    signalled: list[int] = []
    told: set[int] = set()  # workers the signal has been passed to

    def out_of_time() -> bool:
        return bool(signalled or stopped) or (deadline is not None and time.time() > deadline)

    def on_signal(signum, frame):
        """SIGTERM/SIGINT to the compare process: start nothing more; the loop passes SIGTERM on to every
        worker (Ctrl-C reaches them too; a SIGTERM from Kubernetes or `kill PID` does not)."""
        if signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        signalled.append(signum)

    def pass_on() -> None:
        for child in multiprocessing.active_children():
            if child.pid not in told:
                told.add(child.pid)
                child.terminate()  # SIGTERM; a worker that has just exited is ignored

    handlers = {}
    if pool is not None and threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while queue or running:
            while queue and len(running) < workers and not out_of_time():
                ready = next((r for r in queue if not r.match_label or r.match_label in summaries), None)
                if ready is None:
                    break  # waiting for a matched run to finish
                queue.remove(ready)
                overrides = _steps_for(ready, summaries)
                run_cfg = load_config(cfg.base, overrides)
                bar.total += run_cfg.train.steps - counted[ready.label]
                configs[ready.label] = run_cfg
                tqdm.write(f"start {ready.label}: {run_cfg.method.name}, {run_cfg.train.steps} steps, seed {ready.seed}")
                if pool is None:  # in this process, with the run's own progress bar
                    try:
                        summary = _fit_run(cfg.base, overrides, progress, deadline)
                    except Preempted as e:
                        stopped[ready.label] = e
                        break
                    except RaptrError as e:
                        _failed(ready, e, failed)
                        continue
                    _finish(ready, summary, summaries, bar, shown, configs)
                else:
                    running[pool.submit(_fit_run, cfg.base, overrides, False, deadline)] = ready
            if queue and not running and (out_of_time() or not any(
                    not r.match_label or r.match_label in summaries for r in queue)):
                break  # budget spent, or the rest waits for runs that failed
            if not running:
                continue
            if signalled:
                pass_on()
            done, _ = wait(list(running), timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                run = running.pop(future)
                try:
                    _finish(run, future.result(), summaries, bar, shown, configs)
                except Preempted as e:
                    stopped[run.label] = e
                except BrokenProcessPool:  # a worker killed outside its run: that run resumes next time
                    if not signalled:
                        raise
                    stopped[run.label] = Preempted(f"{run.label}: its worker was stopped", signalled[0])
                except RaptrError as e:
                    _failed(run, e, failed)
            for r in running.values():
                step = last_step(configs[r.label].out_dir)
                bar.update(max(0, step - shown.get(r.label, 0)))
                shown[r.label] = max(step, shown.get(r.label, 0))
            bar.set_postfix_str(" ".join(f"{r.label}:{shown.get(r.label, 0)}/{configs[r.label].train.steps}"
                                         for r in running.values()), refresh=False)
    finally:
        try:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        finally:
            for signum, old in handlers.items():
                signal.signal(signum, old)
            bar.close()
    if stopped or (signalled and queue):
        signum = (signalled or [next(iter(stopped.values())).signum])[0]
        raise Preempted(f"stopped by {signal.Signals(signum).name}: "
                        + (f"{', '.join(stopped)} stopped at a step boundary (each resumes from its last checkpoint); "
                           if stopped else "")
                        + (f"failed: {'; '.join(f'{k}: {v}' for k, v in failed.items())}; " if failed else "")
                        + "run the same command again to resume", signum)
    return failed


def _failed(run: PlannedRun, error: Exception, failed: dict) -> None:
    failed[run.label] = (str(error).splitlines() or [""])[0]
    tqdm.write(f"failed {run.label}: {failed[run.label]}")


def _finish(run: PlannedRun, summary: dict, summaries: dict, bar, shown: dict, configs: dict) -> None:
    total = configs[run.label].train.steps
    bar.update(max(0, summary["steps"] - shown.get(run.label, 0)))
    shown[run.label] = summary["steps"]
    if summary["steps"] == total:
        summaries[run.label] = summary
        loss = summary["final_val_loss"]
        tqdm.write(f"done  {run.label}: val loss {loss:.4f}" if isinstance(loss, float) and math.isfinite(loss)
                   else f"done  {run.label}")
    else:
        tqdm.write(f"stopped {run.label} at step {summary['steps']}/{total} (budget spent): it resumes next time")
