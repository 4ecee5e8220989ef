"""``raptr`` command line: train, data, plan (and the comparison/experiment commands).

User mistakes print one line ``error: ...`` and exit with code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from rich.console import Console
from rich.table import Table

from raptr.errors import INTERRUPTED, Preempted, RaptrError

console = Console(stderr=False)


# ------------------------------------------------------------------------------------ train
def _config_help() -> str:
    from raptr.training.config import describe_fields

    rows = [f"  {key} ({kind}, default {default!r})" for key, kind, default in describe_fields()]
    return "config keys (override any with key=value):\n" + "\n".join(rows)


def cmd_train(args: argparse.Namespace) -> int:
    from raptr.training.build import build_trainer
    from raptr.training.config import load_config

    if args.stop_after is not None and args.stop_after < 1:
        raise RaptrError(f"--stop-after {args.stop_after}: give a number of steps >= 1")
    cfg = load_config(args.config, args.overrides)
    _code_in_history(args)
    trainer = build_trainer(cfg, progress=not args.quiet)
    if trainer.is_main:
        console.print(f"[bold]{cfg.name}[/]: method={cfg.method.name}, {cfg.train.steps} steps -> {trainer.out_dir}")
    try:
        summary = trainer.fit(resume=not args.no_resume, fresh=args.fresh, stop_after=args.stop_after)
    except KeyboardInterrupt:
        console.print(f"interrupted at step {trainer.step}: run the same command again to resume from the last checkpoint")
        return 130
    finally:
        from raptr.training.distributed import shutdown

        info, out_dir = trainer.dist, trainer.out_dir
        del trainer  # FSDP2 holds the process group as long as the model lives: let shutdown free both
        shutdown(info)
    if summary:  # rank 0 only under torchrun
        print_summary(summary)
        if summary.get("diverged"):
            print(f"warning: the run diverged ({summary['warnings'][-1]}): see {out_dir / 'metrics.jsonl'}",
                  file=sys.stderr)
            return 3
    return 0


def _code_in_history(args: argparse.Namespace) -> None:
    """Results must trace to committed code: refuse a dirty src/raptr unless --allow-dirty (or
    RAPTR_ALLOW_DIRTY=1, which the test suite sets); each run then keeps the diff as code.diff."""
    import os

    from raptr.training.provenance import refuse_dirty

    refuse_dirty(args.allow_dirty or os.environ.get("RAPTR_ALLOW_DIRTY") == "1")


def print_summary(s: dict) -> None:
    table = Table(title=f"{s['name']} ({s['method']})", show_header=False)
    table.add_row("steps", f"{s['steps']} / {s['total_steps']}")
    table.add_row("full-model val loss", f"{s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else "-")
    table.add_row("FLOPs used", f"{s['flops']:.3e}")
    table.add_row("vs full model, equal steps", f"{s['relative_flops']:.3f}  (layers only, expected: {s['expected_relative_layer_flops']:.3f})")
    table.add_row("tokens", f"{s['tokens']:,}")
    table.add_row("wall-clock (training)", f"{s['train_seconds']:.1f} s")
    console.print(table)


# ------------------------------------------------------------------------------------ data
def cmd_data(args: argparse.Namespace) -> int:
    from raptr.data.corpus import build_corpus

    from pathlib import Path

    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise RaptrError(f"--out {args.out} is a file: give a directory for the corpus")
    if not 0 <= args.val_fraction < 0.5:
        raise RaptrError(f"--val-fraction {args.val_fraction} must be in [0, 0.5)")
    sources = [s for chunk in (args.sources or ["default"]) for s in chunk.split(",") if s]
    manifest = build_corpus(args.out, sources=sources, val_fraction=args.val_fraction, seed=args.seed)
    table = Table(title=f"corpus in {args.out}")
    for col in ("source", "split", "docs", "MB"):
        table.add_column(col)
    for row in _manifest_rows(manifest):
        table.add_row(*row)
    console.print(table)
    return 0


def _manifest_rows(manifest: dict) -> list[tuple[str, ...]]:
    rows = []
    for name, info in manifest.get("sources", {}).items():
        for split in ("train", "val"):
            part = info.get(split, {}) if isinstance(info, dict) else {}
            if part:
                rows.append((name, split, str(part.get("docs", "")), f"{part.get('bytes', 0) / 1e6:.2f}"))
    return rows


# ------------------------------------------------------------------------------------ plan
def cmd_plan(args: argparse.Namespace) -> int:
    from raptr.core import Schedule
    from raptr.flops import LayerShape, ModelFlops, schedule_relative_flops
    from raptr.methods.raptr import RaPTrOptions

    for flag, value, low in (("--layers", args.layers, 1), ("--steps", args.steps, 1), ("--seq-len", args.seq_len, 1),
                             ("--vocab", args.vocab, 1), ("--d-model", args.d_model, 0), ("--heads", args.heads, 0),
                             ("--d-ff", args.d_ff, 0), ("--top", args.top, 1)):
        if value < low:
            raise RaptrError(f"{flag} {value} must be >= {low}" + (" (0 = not given)" if low == 0 else ""))
    if not 0 < args.head_positions <= 1 or args.tolerance <= 0 or args.full_warmup < 0:
        raise RaptrError("--head-positions must be in (0, 1], --tolerance > 0 and --full-warmup >= 0")
    if args.d_model and args.heads and args.d_model % args.heads:
        raise RaptrError(f"--d-model {args.d_model} is not divisible by --heads {args.heads}")
    model = None
    if args.d_model:
        model = ModelFlops(LayerShape(args.d_model, args.heads or max(1, args.d_model // 64), args.d_ff or 4 * args.d_model),
                           args.layers, args.seq_len, args.vocab, head_positions=args.head_positions)
    common = dict(count_fixed=not args.no_count_fixed, fixed=args.fixed)
    if args.target is not None:
        return _propose(args, model, common)
    default = RaPTrOptions()
    args.schedule = args.schedule or default.schedule
    common["stage_lengths"] = args.stages or default.stage_lengths
    schedule = Schedule.parse(args.schedule, args.layers, args.steps, full_warmup=args.full_warmup, **common)
    table = Table(title=f"RaPTr {args.schedule} ({common['stage_lengths']} stages) on {args.layers} layers, "
                        f"fixed {list(schedule.fixed)}, {args.steps} steps")
    for col in ("stage", "steps", "keep prob p", "expected path", "layer FLOPs vs full"):
        table.add_column(col, justify="right")
    for s in schedule.stages:
        table.add_row(str(s.index), f"{s.start}-{s.end - 1}", f"{s.keep_prob:.3f}", f"{s.path_length:.2f}",
                      f"{s.path_length / args.layers:.3f}")
    console.print(table)
    rel = schedule_relative_flops(schedule, model)
    console.print(f"relative FLOPs (layers only): [bold]{rel['layers']:.4f}[/]  = {1 / rel['layers']:.2f}x fewer")
    if model is not None:
        console.print(f"relative FLOPs (whole model, d={args.d_model}, seq={args.seq_len}, vocab={args.vocab}): "
                      f"[bold]{rel['model']:.4f}[/]  = {1 / rel['model']:.2f}x fewer")
    return 0


def _propose(args: argparse.Namespace, model, common: dict) -> int:
    """Enumerate growing schedules ending at the full model; keep those near the target ratio. Ranked by
    distance to the target, then evenly spaced paths, then Prop-1 stage lengths before equal ones
    (Prop-1 won on our suites: docs/results.md §6.5), then more stages (ours and the paper's have four). --stages limits the kinds."""
    from raptr.core import Schedule
    from raptr.flops import schedule_relative_flops

    L, target = args.layers, args.target
    if not 0 < target <= 1:
        raise RaptrError(f"--target {target} must be in (0, 1]: it is FLOPs relative to full-model training")
    step = max(1, L // 12)
    lengths = list(range(L - step, 1, -step))
    found = []
    for n_stages in range(2, 6):
        for firsts in itertools.combinations(sorted(lengths), n_stages - 1):
            spec = "-".join(str(x) for x in firsts + (L,))
            for stages in ((args.stages,) if args.stages else ("prop:1", "equal")):
                try:
                    sched = Schedule.parse(spec, L, 1000, **{**common, "stage_lengths": stages})
                except RaptrError:
                    continue
                rel = schedule_relative_flops(sched, model)
                key = rel.get("model", rel["layers"])
                if abs(key - target) <= args.tolerance:
                    steps = [b - a for a, b in zip(firsts + (L,), (firsts + (L,))[1:])]
                    uneven = max(steps) - min(steps) if steps else 0  # prefer evenly spaced paths
                    found.append(((round(abs(key - target), 2), uneven, stages != "prop:1", -n_stages), spec, stages, rel))
    if not found:
        raise RaptrError(f"no schedule within {args.tolerance} of {target}: raise --tolerance")
    found.sort(key=lambda r: r[0])
    table = Table(title=f"schedules for {L} layers near relative FLOPs {target}")
    for col in ("schedule", "stages", "layer FLOPs", "whole-model FLOPs"):
        table.add_column(col, justify="right")
    for _, spec, stages, rel in found[: args.top]:
        table.add_row(spec, stages, f"{rel['layers']:.4f}", f"{rel['model']:.4f}" if "model" in rel else "-")
    console.print(table)
    return 0


# ------------------------------------------------------------------------------------ compare / report
def cmd_compare(args: argparse.Namespace) -> int:
    from raptr.experiments.compare import load_compare_config, run_compare
    from raptr.experiments.report import make_report

    cfg = load_compare_config(args.config, args.overrides)
    _code_in_history(args)
    only = [a for chunk in args.only or [] for a in chunk.split(",") if a] or None
    root = run_compare(cfg, args.results, progress=not args.quiet, workers=args.workers, only=only,
                       seeds=_int_list(args.seeds, "--seeds"), budget_minutes=args.budget)
    try:
        report = make_report(root)
    except RaptrError as e:  # e.g. the baseline has not finished yet: the runs themselves went fine
        console.print(f"no report yet ({e})")
        return 0
    print_comparison(root / "evidence.json")
    console.print(f"report: {report} (plots beside it)")
    return 0


def print_comparison(evidence_path) -> None:
    """The comparison at a glance: final loss at equal steps, FLOPs, wall-clock, and who is ahead at
    equal FLOPs (the baseline's loss at each arm's FLOPs, from its evaluations); seed means."""
    import json

    ev = json.loads(evidence_path.read_text())
    base = ev["baseline"]
    table = Table(title=f"{ev['name']}: full-model val loss (unigram plateau {ev['unigram_val_loss']:.3f})"
                  if ev.get("unigram_val_loss") else ev["name"])
    table.caption = (f"val loss: after equal steps; FLOPs: relative to {base}; seconds: training time as logged; "
                     f"at equal FLOPs: the arm's loss against {base}'s at the FLOPs the arm spent")
    for col in ("arm", "seeds", "val loss", "FLOPs", "seconds", "at equal FLOPs"):
        table.add_column(col, justify="left" if col in ("arm", "at equal FLOPs") else "right")
    n_seeds = 0
    for a in ev["arms"]:
        n_seeds = max(n_seeds, len(a["seeds"]))
        leads = [x for x in a.get("lead_at_equal_flops_per_seed", []) if x is not None]
        lead = sum(leads) / len(leads) if leads else None
        ahead = "-" if a["arm"] == base or lead is None else (
            f"{a['arm']} ahead by {-lead:.3f}" if lead < 0 else f"{base} ahead by {lead:.3f}")
        if a["arm"] == base:
            ahead = "-"
        rel = "-" if a["rel_flops"] is None else f"{a['rel_flops']:.2f}×"
        secs = a.get("train_seconds_per_seed") or []
        table.add_row(a["arm"], str(len(a["seeds"])), f"{a['final_val_loss_mean']:.4f}", rel,
                      f"{sum(secs) / len(secs):.0f}" if secs else "-", ahead)
    console.print(table)
    if n_seeds < 2:
        console.print("One seed shows what each method does, not which is better: a gap between two runs can be seed "
                      "noise. The multi-seed evidence (paired seeds, intervals) is in docs/results.md.")


def _int_list(text: str | None, flag: str) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise RaptrError(f"{flag} {text!r}: give comma-separated integers, e.g. {flag} 0,1,2") from None


def cmd_report(args: argparse.Namespace) -> int:
    from raptr.experiments.protocol import report_dir

    console.print(f"report: {report_dir(args.results_dir)}")
    return 0


def cmd_depth(args: argparse.Namespace) -> int:
    from raptr.experiments.depth import depth_report

    layers = _int_list(args.layers, "--layers") or []
    command = "raptr depth " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else ""
    console.print(f"report: {depth_report(args.runs, args.out, layers, args.keep or [], args.device, not args.quiet, command)}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from raptr.experiments.protocol import run

    overrides = list(args.overrides)
    if args.runs is not None:  # shorthands of the probes' and schedules' config keys
        overrides.append(f"runs={args.runs}")
    if args.workers is not None:
        overrides.append(f"workers={args.workers}")
    console.print(f"report: {run(args.name, args.out, args.preset, overrides)}")
    return 0


# ------------------------------------------------------------------------------------ main
class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error:`` line (with where to look), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="raptr", description="Progressive subnetwork pretraining (RaPTr).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="pretrain a model with a method", epilog=_config_help(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", help="YAML file or preset name (e.g. bert-tiny-raptr)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.steps=200 method.raptr.schedule=4-8-12")
    p.add_argument("--fresh", action="store_true", help="discard checkpoints and logs in the output dir first")
    p.add_argument("--no-resume", action="store_true", help="don't resume from the last checkpoint")
    p.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resume later)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.add_argument("--allow-dirty", action="store_true",
                   help="run although src/raptr has uncommitted changes (the diff is kept in each run directory)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="run several methods on the same data and budget, then write a report")
    p.add_argument("--config", "-c", required=True, help="comparison YAML or preset (e.g. compare/bert-tiny)")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every arm, e.g. train.steps=100")
    p.add_argument("--results", default="results", help="results root; the comparison goes to RESULTS/<name>/")
    p.add_argument("--workers", type=int, default=1, help="arms trained at once, one process each (use with train.threads=1)")
    p.add_argument("--only", action="append", help="run only these arms (repeat or comma-separate)")
    p.add_argument("--seeds", default=None, help="run only these seeds, e.g. 0,1")
    p.add_argument("--budget", type=float, default=None,
                   help="minutes to spend: no run starts after it, running ones checkpoint and stop (resume later)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.add_argument("--allow-dirty", action="store_true",
                   help="run although src/raptr has uncommitted changes (the diff is kept in each run directory)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="regenerate the report and plots of a comparison or experiment from its files")
    p.add_argument("results_dir", help="e.g. docs/results/clm-tiny, docs/results/polynomial")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("depth", help="evaluate trained runs served with k of their L layers (the rest skipped)")
    p.add_argument("runs", nargs="+", help="run directories with a checkpoint (train.out_dir of each)")
    p.add_argument("--layers", default="4,6,8,10,12", help="layer counts k; first and last kept, the rest evenly")
    p.add_argument("--keep", action="append", help="a list of layers to keep instead, e.g. --keep 0,3,6,11 (repeatable)")
    p.add_argument("--out", default="results/depth", help="where depth.md, depth.json and depth.png go")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_depth)

    from raptr.experiments.protocol import EXPERIMENTS

    p = sub.add_parser("experiment", help="paper experiments: " + ", ".join(EXPERIMENTS),
                       formatter_class=argparse.RawDescriptionHelpFormatter)

    def experiment_help(p=p, format_help=p.format_help) -> str:  # imports the experiments only when asked
        from raptr.training.config import describe_fields

        p.epilog = "\n".join(f"  {n}: {e.summary}; keys: " + ", ".join(key for key, _, _ in describe_fields(e.config))
                             for n, e in EXPERIMENTS.items())
        return format_help()

    p.format_help = experiment_help
    p.add_argument("name", choices=sorted(EXPERIMENTS))
    p.add_argument("overrides", nargs="*", help="key=value overrides of the experiment's config, e.g. steps=50 seeds=0,1")
    p.add_argument("--preset", default="cpu", help="config preset (cpu, tiny where the experiment has one)")
    p.add_argument("--out", default=None, help="output directory (default results/NAME)")
    p.add_argument("--runs", default=None, help="(probes) shorthand for runs=DIR: the finished runs to probe")
    p.add_argument("--workers", type=int, default=None, help="(schedules) shorthand for workers=N")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("data", help="build a text corpus (default: ~100 MB of English from Debian packages)")
    p.add_argument("--sources", "--source", action="append", help="names (default, lit, tech, austen, ...) or local paths; repeat or comma-separate")
    p.add_argument("--out", default="data/corpus/default", help="output directory")
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("plan", help="keep probabilities and FLOPs of a schedule, or schedules for a FLOPs target")
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--schedule", default=None, help="path lengths per stage, e.g. 6-8-10-12, or depth fractions f:0.25-0.5-0.75-1 "
                                                   "(default: RaPTr's own, 3-6-9-12 of 12 layers)")
    p.add_argument("--target", type=float, default=None, help="propose schedules with this relative FLOPs")
    p.add_argument("--tolerance", type=float, default=0.02)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--stages", default=None, help="equal | prop:ALPHA | relative lengths (default: RaPTr's own, prop:1; "
                                                    "--target ranks both, Prop-1 first)")
    p.add_argument("--fixed", default="first,last")
    p.add_argument("--no-count-fixed", action="store_true", help="fixed layers don't count towards the path length")
    p.add_argument("--full-warmup", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--d-model", type=int, default=0, help="model width, for whole-model FLOPs")
    p.add_argument("--heads", type=int, default=0)
    p.add_argument("--d-ff", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--head-positions", type=float, default=1.0, help="fraction of positions with logits (MLM: 0.15)")
    p.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a user error (one ``error:`` line), 3 finished but diverged, 128+N stopped
    by signal N with a checkpoint, 1 a bug (one line; the traceback goes to a file)."""
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
        if stray:
            parser.error(f"unrecognized arguments: {' '.join(stray)}")
        if extra:  # key=value overrides placed after an option: accepted anywhere on the line
            args.overrides = list(args.overrides) + extra
        return args.func(args)
    except Preempted as e:  # stopped by a signal after writing a checkpoint
        print((str(e).splitlines() or [""])[0], file=sys.stderr)
        return e.exit_code
    except RaptrError as e:
        print(f"error: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as e:  # last resort: never a raw traceback on the user's screen
        return _unexpected(e)


def _unexpected(e: Exception) -> int:
    import os
    import tempfile
    import traceback

    if os.environ.get("RAPTR_TRACEBACK"):
        traceback.print_exc()
        return 1
    fd, path = tempfile.mkstemp(prefix="raptr-traceback-", suffix=".txt")
    with os.fdopen(fd, "w") as f:
        traceback.print_exc(file=f)
    detail = (str(e).splitlines() or [""])[0][:200]
    print(f"error: unexpected {type(e).__name__}: {detail} (a bug in raptr: the traceback is in {path}; "
          "set RAPTR_TRACEBACK=1 to print it)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
