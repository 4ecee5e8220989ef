"""``raptr experiment stability``: the paper's stability argument (§3-4), measured.

(a) Stability at initialisation. Ψ_ℓ = E‖F(x) − F_{−ℓ}(x)‖ / E‖F(x)‖, where F_{−ℓ} is the network
    with layer ℓ skipped (identity), averaged over ℓ, versus depth L, for residual + LN, residual
    without LN, and LN without residual:
    (i)  linear blocks (the paper's Lemma): y ← y + W·LN(y) / y ← y + W·y / y ← LN(W·y), W ~ N(0, 1/d),
         output LN(y_L) / y_L / y_L (PAPER_TABLE below is a numpy simulation to compare with);
    (ii) our reference transformer blocks (``models.reference.TransformerLM`` with its
         ``layer_norm`` / ``residual`` switches), output = the final-LN hidden states.
    Claim: Ψ decays like O(1/√L) only with both residual connections and LayerNorm.
(b) A trained RaPTr run (``bert-tiny-raptr-paper``, 6-8-10-12, on a small model): at each stage boundary, on fixed
    held-out batches, the full-model loss and the Monte-Carlo loss of (p_s, I)-subnetworks of the
    stage that just ended and of the next one, plus the training-loss jump across the transition
    (mean of the last k steps before vs the first k after). Claim: no spike, and the full-model
    loss at the transition is not higher than the subnetwork loss before it (L_2(F) ≤ L_1(F)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from raptr.core import PathSampler, branch_scale
from raptr.errors import RaptrError
from raptr.experiments.presets import prepare_run, preset_config
from raptr.models.reference import TransformerConfig, TransformerLM
from raptr.ranks import step_generator
from raptr.typed import from_dict

ARCHS = ("res+LN", "res, no LN", "LN, no res")
_SWITCHES = {"res+LN": (True, True), "res, no LN": (True, False), "LN, no res": (False, True)}  # (residual, layer_norm)


@dataclass
class StabilityConfig:
    # (a)(i) linear networks at initialisation
    linear_dim: int = 256
    linear_depths: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64, 128])
    linear_inputs: int = 64
    linear_draws: int = 4  # independent weight draws per depth
    # (a)(ii) reference transformer at initialisation
    tf_depths: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    # the model's own config: n_layers comes from tf_depths, layer_norm / residual from each architecture;
    # max_seq_len is the length of the random token sequences
    tf_model: TransformerConfig = field(default_factory=lambda: TransformerConfig(
        vocab_size=1024, d_model=64, n_heads=2, d_ff=256, max_seq_len=32))
    tf_batch: int = 8  # random sequences per draw
    tf_draws: int = 2
    max_skips: int = 32  # at most this many layers ℓ (evenly spaced) per network in the average over ℓ
    # (b) a trained RaPTr run
    train: bool = True
    train_preset: str = "bert-tiny-raptr-paper"
    # the paper's 12 layers and 6-8-10-12 schedule (equal stages) on a small model; causal LM (every token a target) rather
    # than MLM, which at this budget is still on its unigram plateau, where no subnetwork differs from another
    train_overrides: list[str] = field(default_factory=lambda: [
        "model.d_model=64", "model.d_ff=256", "model.n_heads=2", "data.sources=austen", "data.vocab_size=1024",
        "objective.name=causal", "data.tokenizer=bpe", "data.seq_len=64", "train.batch_size=16", "train.steps=400",
        "optim.warmup_steps=20", "train.eval_every=100", "train.checkpoint_every=1000"])
    cache_dir: str = "data"  # data cache (corpus, tokenizer, tokens) of the trained run
    heldout_batches: int = 4  # fixed held-out batches (the trainer's validation batches)
    mc_paths: int = 8  # Monte-Carlo subnetworks per keep probability
    jump_window: int = 20  # k: training-loss mean of the last k steps before vs the first k after a boundary
    seed: int = 0
    threads: int = 1


PRESETS: dict[str, StabilityConfig] = {
    "cpu": StabilityConfig(),
    "tiny": StabilityConfig(
        linear_dim=16, linear_depths=[2, 4, 8], linear_inputs=8, linear_draws=1,
        tf_depths=[2, 4], tf_model=TransformerConfig(vocab_size=64, d_model=16, n_heads=2, d_ff=32, max_seq_len=8),
        tf_batch=2, tf_draws=1,
        train_overrides=["model.d_model=32", "model.d_ff=64", "model.n_heads=2", "model.n_layers=4", "data.sources=austen",
                         "data.vocab_size=1024", "data.seq_len=32", "train.batch_size=4", "train.steps=12",
                         "optim.warmup_steps=2", "train.eval_every=100", "train.checkpoint_every=1000",
                         "method.raptr.schedule=3-4"],
        heldout_batches=2, mc_paths=2, jump_window=2),
}


# ---------------------------------------------------------------------------------------- Ψ
def skip_indices(num_layers: int, max_skips: int | None) -> list[int]:
    """All layers, or ``max_skips`` evenly spaced ones (always the first and the last)."""
    if max_skips is None or num_layers <= max_skips:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / (max_skips - 1)) for i in range(max_skips)})


@torch.no_grad()
def stability(blocks: Sequence[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
              output: Callable[[torch.Tensor], torch.Tensor] = lambda y: y,
              layers: Sequence[int] | None = None) -> dict[int, dict[str, float]]:
    """Ψ_ℓ for the network ``output(block_L(...block_1(x)))``; skipping ℓ makes block ℓ the identity.

    Returns, per 0-based ℓ, ``psi`` = E‖F − F_{−ℓ}‖ / E‖F‖ (norms over all but the first dim of x,
    expectations over its rows) and ``psi_ratio`` = E[‖F − F_{−ℓ}‖ / ‖F‖] (the form of the PAPER_TABLE simulation).
    Prefix states are cached, so the cost is that of running the suffixes.
    """
    states = [x]
    for block in blocks:
        states.append(block(states[-1]))
    full = output(states[-1]).flatten(1)
    full_norm = full.norm(dim=1)
    out = {}
    for ell in (range(len(blocks)) if layers is None else layers):
        z = states[ell]  # input of block ℓ, passed on unchanged
        for block in blocks[ell + 1:]:
            z = block(z)
        diff = (full - output(z).flatten(1)).norm(dim=1)
        out[ell] = {"psi": float(diff.mean() / full_norm.mean()),
                    "psi_ratio": float((diff / full_norm.clamp_min(1e-30)).mean())}
    return out


def mean_psi(per_layer: dict[int, dict[str, float]], key: str = "psi") -> float:
    return sum(v[key] for v in per_layer.values()) / len(per_layer)


def _ln(y: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(y, y.shape[-1:])


def linear_network(arch: str, depth: int, dim: int, gen: torch.Generator):
    """(blocks, output) of the paper's linear networks with W ~ N(0, 1/d)."""
    if arch not in _SWITCHES:
        raise RaptrError(f"unknown architecture {arch!r}: use one of {', '.join(ARCHS)}")
    # float64: without LN the residual stream grows like 2^(L/2) and its squared norm overflows float32 by L = 128
    weights = [torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim) for _ in range(depth)]
    if arch == "res+LN":
        return [lambda y, W=W: y + _ln(y) @ W.T for W in weights], _ln
    if arch == "res, no LN":
        return [lambda y, W=W: y + y @ W.T for W in weights], (lambda y: y)
    return [lambda y, W=W: _ln(y @ W.T) for W in weights], (lambda y: y)


def linear_psi(arch: str, depth: int, dim: int, inputs: int, draws: int, seed: int = 0,
               max_skips: int | None = None) -> dict[str, float]:
    """Ψ averaged over ℓ (and weight draws) for one linear architecture and depth; x ~ N(0, I)."""
    psis, ratios = [], []
    for draw in range(draws):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + depth * 1009 + draw)
        blocks, output = linear_network(arch, depth, dim, gen)
        x = torch.randn(inputs, dim, generator=gen, dtype=torch.float64)
        per = stability(blocks, x, output, skip_indices(depth, max_skips))
        psis.append(mean_psi(per))
        ratios.append(mean_psi(per, "psi_ratio"))
    return {"psi": statistics.fmean(psis), "psi_ratio": statistics.fmean(ratios),
            "psi_std": statistics.pstdev(psis) if len(psis) > 1 else 0.0}


def transformer_psi(arch: str, depth: int, cfg: StabilityConfig, draw: int) -> dict[str, float]:
    """Ψ averaged over ℓ for a freshly initialised reference TransformerLM (output: final-LN states)."""
    residual, layer_norm = _SWITCHES[arch]
    torch.manual_seed(cfg.seed * 1_000_003 + depth * 1009 + draw)
    model_cfg = dataclasses.replace(cfg.tf_model, n_layers=depth, layer_norm=layer_norm, residual=residual)
    model = TransformerLM(model_cfg).eval()
    gen = torch.Generator().manual_seed(cfg.seed + 17 * draw)
    tokens = torch.randint(0, model_cfg.vocab_size, (cfg.tf_batch, model_cfg.max_seq_len), generator=gen)
    return model_psi(model, tokens, cfg.max_skips)


@torch.no_grad()
def model_psi(model, tokens: torch.Tensor, max_skips: int | None = None) -> dict[str, float]:
    """Ψ of a reference TransformerLM on token ids, measured on its final-LN hidden states."""
    causal = model.config.causal
    x = model.tok(tokens) + model.pos(torch.arange(tokens.shape[1]))
    blocks = [lambda h, b=b: b(h, None, causal) for b in model.blocks]
    per = stability(blocks, x, model.ln_f, skip_indices(len(blocks), max_skips))
    h = x
    for block in blocks:
        h = block(h)
    out = model.ln_f(h)  # [B, T, D]
    # token diversity: how far each position's output is from its sequence's mean (0 = rank collapse)
    diversity = float((out - out.mean(dim=1, keepdim=True)).norm(dim=-1).mean() / out.norm(dim=-1).mean())
    return {"psi": mean_psi(per), "psi_ratio": mean_psi(per, "psi_ratio"), "diversity": diversity,
            "per_layer": {k: v["psi"] for k, v in per.items()}}


def loglog_slope(depths: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of log(value) against log(depth)."""
    if len(depths) < 2:
        return float("nan")
    lx, ly = [math.log(d) for d in depths], [math.log(max(v, 1e-300)) for v in values]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def stability_verdict(slopes: dict[str, float], values: dict[str, list[float]]) -> tuple[str, str]:
    """Reproduced: res+LN decays (slope ≤ −0.25) while both ablations stay flat (|slope| < 0.1)."""
    decays = slopes["res+LN"] <= -0.25
    flat = {a: abs(slopes[a]) < 0.1 for a in ARCHS[1:]}
    detail = ", ".join(f"{a}: slope {slopes[a]:+.2f}" for a in ARCHS)
    if decays and all(flat.values()):
        return "reproduced", detail
    if not decays:
        return "not reproduced", detail + " (res+LN does not decay)"
    others = [a for a, ok in flat.items() if not ok]
    return "partly reproduced", detail + f" (res+LN decays, but {', '.join(others)} is not flat)"


# ---------------------------------------------------------------------------------------- (b) trained run
def _loss(trainer, n_batches: int) -> float:
    """The trainer's held-out loss with the model as it is now (train mode: gates act)."""
    from raptr.ranks import EVAL_STREAM

    losses = []
    for i, tokens in enumerate(trainer.batches.val[:n_batches]):
        batch = trainer.objective(tokens, step_generator(trainer.cfg.train.seed, i, EVAL_STREAM))
        inputs = {k: batch[k].to(trainer.device) for k in ("input_ids", "labels", "prefix_len") if k in batch}
        losses.append(trainer.model(**inputs).item())
    return statistics.fmean(losses)


@torch.no_grad()
def subnetwork_losses(trainer, keep_prob: float, n_paths: int, n_batches: int, seed: int = 12345) -> list[float]:
    """Held-out loss of ``n_paths`` random (p, I)-subnetworks (Bernoulli(p) on the non-fixed layers).

    Uses the run's own gates, fixed set and branch scaling; paths come from a sampler with its own
    seed, so they are not the training paths. The model is left running every layer.
    """
    raptr = trainer.method.raptr
    fixed = set(raptr.schedule.fixed)
    sampler = PathSampler(raptr.schedule.num_layers, raptr.schedule.fixed, seed=seed)
    scale = branch_scale(keep_prob, raptr.scaling)
    was_training = trainer.model.training
    trainer.model.train()  # gates only act in train mode; the reference model has no dropout
    out = []
    try:
        for i in range(n_paths):
            active = sampler.sample(i, keep_prob)
            raptr.gates.set_path(active, [1.0 if j in fixed else scale for j in range(len(active))])
            out.append(_loss(trainer, n_batches))
    finally:
        raptr.gates.run_all()
        trainer.model.train(was_training)
    return out


@torch.no_grad()
def full_loss(trainer, n_batches: int) -> float:
    trainer.method.raptr.gates.run_all()
    was_training = trainer.model.training
    trainer.model.eval()
    try:
        return _loss(trainer, n_batches)
    finally:
        trainer.model.train(was_training)


def loss_jumps(rows: list[dict], window: int) -> list[dict]:
    """Training loss: mean of the last ``window`` steps of each stage vs the first ``window`` of the next.

    ``trend`` is the same difference taken at every other point inside the stages (same windows, no
    transition): the jump is a spike only if it stands out against it.
    """
    train = [r for r in rows if r["kind"] == "train"]
    losses, stages = [r["loss"] for r in train], [r["stage"] for r in train]
    out = []
    for i in range(1, len(train)):
        if stages[i] != stages[i - 1] and i >= window and i + window <= len(train):
            before, after = losses[i - window:i], losses[i:i + window]
            out.append({"step": train[i]["step"] - 1, "from_stage": stages[i - 1], "to_stage": stages[i],
                        "before": statistics.fmean(before), "after": statistics.fmean(after),
                        "jump": statistics.fmean(after) - statistics.fmean(before)})
    inside = [statistics.fmean(losses[i:i + window]) - statistics.fmean(losses[i - window:i])
              for i in range(window, len(train) - window + 1)
              if len(set(stages[i - window:i + window])) == 1]
    for o in out:
        o["trend_mean"] = statistics.fmean(inside) if inside else float("nan")
        o["trend_std"] = statistics.pstdev(inside) if len(inside) > 1 else float("nan")
    return out


def trained_run(cfg: StabilityConfig, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Train the RaPTr preset stage by stage; measure at every boundary and at the end."""
    from raptr.training.build import build_trainer
    from raptr.training.config import load_config

    overrides = list(cfg.train_overrides) + [f"data.cache_dir={cfg.cache_dir}", f"train.out_dir={run_dir}",
                                             f"train.threads={cfg.threads}", f"train.seed={cfg.seed}",
                                             f"train.eval_batches={cfg.heldout_batches}"]
    from raptr.methods.raptr import RaPTrMethod
    from raptr.methods.registry import method_class

    run_cfg = load_config(cfg.train_preset, overrides)
    # This part studies RaPTr's own subnetworks (its schedule, sampler and gates): the method's type says
    # whether the preset trains with them.
    if not issubclass(method_class(run_cfg.method.name), RaPTrMethod):
        raise RaptrError(f"preset {cfg.train_preset} trains with {run_cfg.method.name}, not raptr: use a RaPTr preset, e.g. bert-tiny-raptr")
    if run_cfg.model.family != "reference":
        raise RaptrError("the trained-model part measures the reference TransformerLM: set model.family=reference")
    trainer = build_trainer(run_cfg, progress=progress)
    schedule = trainer.method.raptr.schedule
    model = trainer.model
    val_tokens = trainer.batches.val[0]
    psi_init = model_psi(model, val_tokens)
    measurements = []
    started = time.perf_counter()
    stops = schedule.boundaries + [schedule.total_steps]
    for stop in stops:
        trainer.fit(stop_after=stop - trainer.step)
        ended = schedule.stage_at(stop - 1)
        nxt = schedule.stage_at(stop) if stop < schedule.total_steps else None
        m = {"step": stop, "stage_ended": ended.index, "p_ended": ended.keep_prob,
             "full": full_loss(trainer, cfg.heldout_batches)}
        if ended.keep_prob < 1.0:
            m["sub_ended"] = subnetwork_losses(trainer, ended.keep_prob, cfg.mc_paths, cfg.heldout_batches)
        if nxt is not None:
            m["p_next"] = nxt.keep_prob
            m["sub_next"] = (subnetwork_losses(trainer, nxt.keep_prob, cfg.mc_paths, cfg.heldout_batches, seed=54321)
                             if nxt.keep_prob < 1.0 else [m["full"]])
        measurements.append(m)
    seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
    psi_trained = model_psi(model, val_tokens)
    return {"config": {"preset": cfg.train_preset, "overrides": overrides}, "schedule": repr(schedule),
            "stages": [(s.start, s.end, s.keep_prob, s.path_length) for s in schedule.stages],
            "scaling": trainer.method.raptr.scaling, "fixed": list(schedule.fixed),
            "measurements": measurements, "jumps": loss_jumps(rows, cfg.jump_window),
            "train": [(r["step"], r["loss"], r["stage"]) for r in rows if r["kind"] == "train"],
            "psi_init": psi_init, "psi_trained": psi_trained, "seconds": seconds,
            "n_layers": run_cfg.model.n_layers, "d_model": run_cfg.model.d_model, "objective": run_cfg.objective.name,
            "vocab_size": model.config.vocab_size}


def transition_verdict(measurements: list[dict], jumps: list[dict]) -> tuple[str, list[str]]:
    """Claim: no spike at a transition, and full-model loss ≤ the ended stage's subnetwork loss.

    Differences within two standard errors of the Monte-Carlo means count as equal; a training-loss
    jump is a spike when it exceeds the inside-stage trend by more than two of its standard deviations.
    """
    notes, ok_full, ok_spike = [], True, True
    for m in measurements:
        if "sub_ended" not in m:
            continue
        sub, se = statistics.fmean(m["sub_ended"]), _se(m["sub_ended"])
        ok_full &= m["full"] <= sub + 2 * se
        notes.append(f"step {m['step']}: full {m['full']:.3f} vs (p={m['p_ended']:.2f})-subnetworks {sub:.3f}")
        if "sub_next" in m:
            nxt = statistics.fmean(m["sub_next"])
            ok_spike &= nxt <= sub + 2 * math.hypot(se, _se(m["sub_next"]))
    for j in jumps:
        tol = (j["trend_std"] if math.isfinite(j["trend_std"]) else 0.0) * 2
        ok_spike &= j["jump"] <= (j["trend_mean"] if math.isfinite(j["trend_mean"]) else 0.0) + tol
    if not notes:
        return "inconclusive", ["no stage with p < 1 ended"]
    notes.append(("no spike" if ok_spike else "a spike") + "; " +
                 ("full ≤ subnetwork at every boundary" if ok_full else "full > subnetwork at some boundary"))
    if ok_full and ok_spike:
        return "reproduced", notes
    if not ok_full and not ok_spike:
        return "not reproduced", notes
    return "partly reproduced", notes


# ---------------------------------------------------------------------------------------- entry point
def make_config(preset: str = "cpu", **overrides: Any) -> StabilityConfig:
    cfg = preset_config("stability", PRESETS, preset, overrides)
    validate(cfg)
    return cfg


def validate(cfg: StabilityConfig) -> None:
    for key in ("linear_depths", "tf_depths"):
        depths = getattr(cfg, key)
        if len(depths) < 2 or any(d < 1 for d in depths):
            raise RaptrError(f"{key} needs at least two positive depths to fit a slope, got {depths}")
    model = cfg.tf_model
    sizes = {f"tf_model.{k}": getattr(model, k) for k in ("vocab_size", "d_model", "n_heads", "d_ff", "max_seq_len")}
    sizes.update({k: getattr(cfg, k) for k in ("linear_dim", "linear_inputs", "linear_draws", "tf_batch", "tf_draws",
                                               "max_skips", "heldout_batches", "mc_paths", "jump_window")})
    for key, value in sizes.items():
        if value < 1:
            raise RaptrError(f"{key} must be positive, got {value}")
    if cfg.max_skips < 2:
        raise RaptrError(f"max_skips={cfg.max_skips} must be at least 2 (first and last layer)")
    if model.d_model % model.n_heads:
        raise RaptrError(f"tf_model.d_model={model.d_model} is not divisible by tf_model.n_heads={model.n_heads}: "
                         "pick a head count that divides it")
    measured = {"n_layers": "tf_depths", "layer_norm": "the architectures", "residual": "the architectures"}
    changed = [k for k in measured if getattr(model, k) != getattr(TransformerConfig(), k)]
    if changed:
        raise RaptrError(f"tf_model.{changed[0]} is set by {measured[changed[0]]} in this experiment: leave it out")


def run_config(cfg: StabilityConfig, out_dir: str | Path, progress: bool = True, preset: str = "custom") -> Path:
    """Measure (a) Ψ vs depth at init and (b) a trained run's transitions; write ``report.md`` and plots."""
    validate(cfg)
    out = prepare_run(out_dir, cfg.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    timings = {}

    t0 = time.perf_counter()
    linear: dict[str, dict[int, dict]] = {a: {} for a in ARCHS}
    jobs = [(a, L) for a in ARCHS for L in cfg.linear_depths]
    for arch, L in tqdm(jobs, desc="stability: linear", disable=not progress, dynamic_ncols=True):
        linear[arch][L] = linear_psi(arch, L, cfg.linear_dim, cfg.linear_inputs, cfg.linear_draws, cfg.seed, cfg.max_skips)
    timings["linear"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    transformer: dict[str, dict[int, dict]] = {a: {} for a in ARCHS}
    jobs = [(a, L) for a in ARCHS for L in cfg.tf_depths]
    for arch, L in tqdm(jobs, desc="stability: transformer", disable=not progress, dynamic_ncols=True):
        draws = [transformer_psi(arch, L, cfg, d) for d in range(cfg.tf_draws)]
        transformer[arch][L] = {key: statistics.fmean(d[key] for d in draws) for key in ("psi", "psi_ratio", "diversity")}
    timings["transformer"] = time.perf_counter() - t0

    trained = None
    if cfg.train:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="raptr-stability-") as tmp:
            trained = trained_run(cfg, Path(tmp) / "run", progress)
        timings["trained"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    timings["cpu"] = time.process_time() - cpu_started

    results = {"experiment": "stability", "preset": preset, "config": dataclasses.asdict(cfg), "linear": linear,
               "transformer": transformer, "trained": trained, "timings": timings}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return rebuild(out)


def rebuild(out_dir: str | Path) -> Path:
    """``report.md`` and the plots again, from ``results.json`` alone (no measuring)."""
    out = Path(out_dir)
    results = json.loads((out / "results.json").read_text())
    for part in ("linear", "transformer"):  # JSON made the depth keys strings
        results[part] = {a: {int(k): v for k, v in by_depth.items()} for a, by_depth in results[part].items()}
    cfg = from_dict(StabilityConfig, results["config"])
    _plots(results, cfg, out)
    report = out / "report.md"
    report.write_text(_report(results, cfg, results.get("preset", "cpu")))
    return report


# ---------------------------------------------------------------------------------------- report
PAPER_TABLE = {  # our numpy simulation of the lemma (mean of per-input ratios), not the paper's own numbers
    "res+LN": {4: 0.596, 8: 0.486, 16: 0.379, 32: 0.292, 64: 0.219, 128: 0.159, 256: 0.115},
    "res, no LN": {4: 0.707, 8: 0.711, 16: 0.714, 32: 0.713, 64: 0.738},
    "LN, no res": {4: 1.414, 8: 1.414, 16: 1.410, 32: 1.407, 64: 1.389},
}


def _slopes(table: dict[str, dict[int, dict]]) -> dict[str, float]:
    return {a: loglog_slope(list(table[a]), [v["psi"] for v in table[a].values()]) for a in ARCHS}


def _report(results: dict, cfg: StabilityConfig, preset: str) -> str:
    linear, transformer, trained, timings = results["linear"], results["transformer"], results["trained"], results["timings"]
    m = cfg.tf_model
    lin_slopes, tf_slopes = _slopes(linear), _slopes(transformer)
    lin_status, lin_detail = stability_verdict(lin_slopes, {a: [v["psi"] for v in linear[a].values()] for a in ARCHS})
    tf_status, tf_detail = stability_verdict(tf_slopes, {a: [v["psi"] for v in transformer[a].values()] for a in ARCHS})
    L = ["# Stability experiment: Ψ vs depth, and losses at RaPTr's stage transitions", "",
         f"Preset `{preset}`, seed {cfg.seed}, {cfg.threads} CPU thread(s); run time {timings['total']:.0f} s wall-clock, {timings['cpu']:.0f} s CPU time "
         f"(linear {timings['linear']:.0f} s, transformer {timings['transformer']:.0f} s"
         + (f", trained run {timings['trained']:.0f} s" if "trained" in timings else "") + "). "
         f"Regenerate with `raptr experiment stability --preset {preset}`.", "",
         "## Summary", "",
         f"- **(a)(i) Linear networks at init** (claim: Ψ = O(1/√L) only with residual + LN; Ω(1) otherwise): "
         f"**{lin_status}** — log-log slopes {lin_detail}.",
         f"- **(a)(ii) Reference transformer at init**, same claim: **{tf_status}** — slopes {tf_detail}."
         + _collapse_note(transformer, cfg.tf_depths) + _ablation_notes(transformer, cfg.tf_depths)]
    if trained:
        status, notes = transition_verdict(trained["measurements"], trained["jumps"])
        gaps = [abs(m["full"] - statistics.fmean(m["sub_ended"])) for m in trained["measurements"] if "sub_ended" in m]
        weak = f" A weak test at this scale: every held-out gap is ≤ {max(gaps):.4f} nats (see Reading)." if gaps and max(gaps) < 0.01 else ""
        L.append(f"- **(b) Trained RaPTr run** (claim: no loss spike at a transition; full-model loss at the transition ≤ the "
                 f"ended stage's subnetwork loss): **{status}** — " + "; ".join(notes) + "." + weak)
    L += ["", "Ψ here is E_x‖F(x) − F_{−ℓ}(x)‖ / E_x‖F(x)‖ (F_{−ℓ}: layer ℓ replaced by the identity), averaged over ℓ "
          f"(all layers, or {cfg.max_skips} evenly spaced ones for deeper networks) and over weight draws. "
          "ψ_ratio = E_x[‖F − F_{−ℓ}‖ / ‖F‖] is the form of the numpy simulation table (stability.PAPER_TABLE); the two coincide when ‖F(x)‖ "
          "is constant (any network ending in LN).", "",
          "## (a)(i) Linear networks at initialisation", "",
          f"d = {cfg.linear_dim}, W_ℓ ~ N(0, 1/d), x ~ N(0, I), {cfg.linear_inputs} inputs, {cfg.linear_draws} weight draws per depth. "
          "res+LN: y ← y + W·LN(y), output LN(y_L); res, no LN: y ← y + W·y; LN, no res: y ← LN(W·y). LN has no affine part.", "",
          "| L | " + " | ".join(f"{a}: Ψ (§3.4 table)" for a in ARCHS) + " |", "|---|" + "---|" * len(ARCHS)]
    for depth in cfg.linear_depths:
        cells = []
        for a in ARCHS:
            v = linear[a][depth]
            ref = PAPER_TABLE[a].get(depth)
            cells.append(f"{v['psi']:.3f} ({'–' if ref is None else f'{ref:.3f}'}; ψ_ratio {v['psi_ratio']:.3f})")
        L.append(f"| {depth} | " + " | ".join(cells) + " |")
    L += ["| slope | " + " | ".join(f"{lin_slopes[a]:+.3f}" for a in ARCHS) + " |", "",
          "Slope: least-squares fit of log Ψ on log L over all depths (−0.5 = 1/√L). "
          + _local_slope_note(linear, cfg.linear_depths), "",
          "![Ψ vs L, linear](psi_linear.png)", "",
          "## (a)(ii) Reference transformer blocks at initialisation", "",
          f"`TransformerLM` (pre-LN blocks: attention + GELU MLP), d_model {m.d_model}, {m.n_heads} heads, d_ff {m.d_ff}, "
          f"init N(0, {m.init_std:g}²), {'causal' if m.causal else 'bidirectional'}; {cfg.tf_batch} random sequences of "
          f"{m.max_seq_len} tokens (vocab {m.vocab_size}); "
          f"{cfg.tf_draws} draws per depth. Output: the final-LN hidden states (without LN: the last block's output). "
          "The switches remove every block LN and the final LN (`layer_norm=False`) or both residual adds (`residual=False`).", "",
          "| L | " + " | ".join(f"{a}: Ψ (token diversity)" for a in ARCHS) + " |", "|---|" + "---|" * len(ARCHS)]
    for depth in cfg.tf_depths:
        L.append(f"| {depth} | " + " | ".join(f"{transformer[a][depth]['psi']:.3f} ({transformer[a][depth]['diversity']:.2f})"
                                             for a in ARCHS) + " |")
    L += ["| slope | " + " | ".join(f"{tf_slopes[a]:+.3f}" for a in ARCHS) + " |", "",
          "*Token diversity* = E‖F_t − mean_t F‖ / E‖F_t‖ over the positions t of a sequence: 0 means every position "
          "outputs the same vector (rank collapse), i.e. the output no longer depends on the input tokens' order and "
          "identity, so skipping a layer cannot change it much either.", "",
          "![Ψ vs L, transformer](psi_transformer.png)", ""]
    if trained:
        L += _trained_section(trained, cfg)
    return "\n".join(L) + "\n"


def _ablation_notes(table, depths) -> str:
    """Facts that qualify the slope of each ablation: local slope at the deep end, collapsed or tiny outputs."""
    notes, shallow, deep = [], min(depths), max(depths)
    slopes = _slopes(table)
    prev = sorted(depths)[-2]
    for a in ARCHS[1:]:
        local = math.log(table[a][deep]["psi"] / table[a][prev]["psi"]) / math.log(deep / prev)
        if abs(slopes[a]) >= 0.1:
            notes.append(f"{a}: Ψ goes {table[a][shallow]['psi']:.3f} → {table[a][deep]['psi']:.3f}, local slope between "
                         f"L = {prev} and {deep} {local:+.2f}")
        diversity = [table[a][d].get("diversity") for d in depths]
        if all(v is not None and v < 0.05 for v in diversity):
            notes.append(f"{a}: every position outputs the same vector at every depth (token diversity ≤ {max(diversity):.2f}): "
                         "without residual connections the near-uniform attention of the N(0, 0.02²) init averages the "
                         "sequence away in the first block, so Ψ measures a degenerate network")
        if max(table[a][d]["psi"] for d in depths) < 0.1:
            notes.append(f"{a}: Ψ is flat but small ({table[a][deep]['psi']:.3f}): with the N(0, 0.02²) init each block "
                         "adds only a few % to the residual stream, so dropping one changes little at any depth")
    return "" if not notes else " Notes: " + "; ".join(notes) + "."


def _collapse_note(table, depths) -> str:
    """Explain a Ψ that falls because the output collapses (every position the same), not because of stability."""
    shallow, deep = min(depths), max(depths)
    slopes = _slopes(table)
    collapsed = [a for a in ARCHS if slopes[a] < -0.1 and table[a][shallow]["diversity"] > 0.1
                 and table[a][deep]["diversity"] < 0.5 * table[a][shallow]["diversity"]]
    if not collapsed:
        return ""
    return (" Token diversity of the output falls with depth for " + ", ".join(
        f"{a} ({table[a][shallow]['diversity']:.2f} at L={shallow} → {table[a][deep]['diversity']:.2f} at L={deep})"
        for a in collapsed) + ": the output stops depending on the input (rank collapse), which also makes it "
        "insensitive to skipping a layer, so that falling Ψ is not stability in the paper's sense.")


def _local_slope_note(table, depths) -> str:
    if len(depths) < 3:
        return ""
    a, b = depths[-2], depths[-1]
    s = math.log(table["res+LN"][b]["psi"] / table["res+LN"][a]["psi"]) / math.log(b / a)
    return f"Local res+LN slope between L = {a} and {b}: {s:+.3f}."


def _trained_section(t: dict, cfg: StabilityConfig) -> list[str]:
    L = ["## (b) Loss at the stage transitions of a trained RaPTr run", "",
         f"`{t['config']['preset']}` with overrides `{' '.join(o for o in t['config']['overrides'] if not o.startswith(('data.cache_dir', 'train.out_dir')))}`: "
         f"{t['n_layers']} layers, d_model {t['d_model']}, {t['objective']} objective on Jane Austen (Debian `r-cran-janeaustenr`)"
         + (f", vocab {t['vocab_size']} (initial loss ≈ ln {t['vocab_size']} = {math.log(t['vocab_size']):.2f})" if t.get("vocab_size") else "")
         + ". Stages "
         + ", ".join(f"[{a}, {b}) p={p:.2f} (path {pl:g})" for a, b, p, pl in t["stages"])
         + f"; fixed layers {t['fixed']} (0-based), branch scaling `{t['scaling']}`. Training time {t['seconds']:.0f} s.", "",
         f"At each boundary the run stops (`Trainer.fit(stop_after=...)`), and on the same {cfg.heldout_batches} held-out "
         f"batches (the trainer's validation batches and masks) we measure the full model and {cfg.mc_paths} Monte-Carlo "
         "(p, I)-subnetworks for the p of the stage that just ended and of the next stage (the run's own gates, fixed set "
         "and scaling; paths from a separate sampler seed); then training resumes from the checkpoint.", "",
         "| boundary step | p ended → next | subnetwork loss, ended stage (mean ± s.e.) | subnetwork loss, next stage | "
         "full-model loss | full − sub(ended) |", "|---|---|---|---|---|---|"]
    for m in t["measurements"]:
        sub = m.get("sub_ended")
        nxt = m.get("sub_next")
        sub_s = f"{statistics.fmean(sub):.4f} ± {_se(sub):.4f}" if sub else "– (full model)"
        nxt_s = (f"{statistics.fmean(nxt):.4f} ± {_se(nxt):.4f}" if nxt and len(nxt) > 1 else
                 (f"{nxt[0]:.4f} (full)" if nxt else "– (end of training)"))
        diff = f"{m['full'] - statistics.fmean(sub):+.4f}" if sub else "–"
        arrow = f"{m['p_ended']:.2f} → {m['p_next']:.2f}" if "p_next" in m else f"{m['p_ended']:.2f} (end)"
        L.append(f"| {m['step']} | {arrow} | {sub_s} | {nxt_s} | {m['full']:.4f} | {diff} |")
    L += ["", f"Training loss across each transition (mean of the last {cfg.jump_window} steps of a stage vs the first "
          f"{cfg.jump_window} of the next; each step has its own batch and path). *Trend*: the same difference at every "
          "point inside a stage (mean ± std), the jump a transition should be compared with.", "",
          "| boundary step | stage | loss before | loss after | jump | trend inside stages |", "|---|---|---|---|---|---|"]
    for j in t["jumps"]:
        L.append(f"| {j['step']} | {j['from_stage']} → {j['to_stage']} | {j['before']:.4f} | {j['after']:.4f} | "
                 f"{j['jump']:+.4f} | {j['trend_mean']:+.4f} ± {j['trend_std']:.4f} |")
    pi, pt = t["psi_init"], t["psi_trained"]
    ms = [m for m in t["measurements"] if "sub_ended" in m]
    if ms:
        gaps = [abs(m["full"] - statistics.fmean(m["sub_ended"])) for m in ms]
        drop = t["train"][0][1] - t["measurements"][-1]["full"] if t["train"] else float("nan")
        per = list(pt["per_layer"].values())
        L += ["", f"**Reading.** The largest |full − subnetwork| gap at a boundary is {max(gaps):.4f} nats, against a "
              f"{drop:.2f}-nat fall of the loss over the run: at this length the full model and its subnetworks compute "
              f"nearly the same function (trained Ψ_ℓ of the non-fixed layers {min(per[1:-1]):.2f}–{max(per[1:-1]):.2f}, "
              f"fixed first/last {per[0]:.2f}/{per[-1]:.2f}), so the comparison is consistent with the claim but a weak test of it. "
              "Training-loss jumps mix the transition with the fast early fall of the loss (the trend is averaged over all stages)."]
    L += ["", f"Ψ of this {t['n_layers']}-layer model (final-LN states, one held-out batch): {pi['psi']:.3f} at initialisation, "
          f"{pt['psi']:.3f} after training.", "",
          "![losses at the transitions](transitions.png)  \n*Left: training loss (grey, and mean of "
          f"{cfg.jump_window} steps) with stage boundaries and the held-out full-model loss at each. Middle: held-out "
          "subnetwork loss minus full-model loss at each boundary (±2 s.e. of the Monte-Carlo mean; above 0 = the full "
          "model is better). Right: per-layer Ψ_ℓ of the model at initialisation and after training.*", ""]
    return L


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def _plots(results: dict, cfg: StabilityConfig, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    colors = dict(zip(ARCHS, ("tab:blue", "tab:orange", "tab:green")))
    for key, name, title in (("linear", "psi_linear.png", f"linear networks at init (d={cfg.linear_dim})"),
                             ("transformer", "psi_transformer.png", f"reference transformer at init (d_model={cfg.tf_model.d_model})")):
        table = results[key]
        slopes = _slopes(table)
        fig, ax = plt.subplots(figsize=(6.5, 4.3))
        for a in ARCHS:
            depths = list(table[a])
            values = [table[a][d]["psi"] for d in depths]
            ax.plot(depths, values, "o-", color=colors[a], label=f"{a} (slope {slopes[a]:+.2f})")
            lx = [math.log(d) for d in depths]
            icept = statistics.fmean(math.log(v) for v in values) - slopes[a] * statistics.fmean(lx)
            ax.plot(depths, [math.exp(icept) * d ** slopes[a] for d in depths], ":", color=colors[a], lw=1)
            if key == "linear":
                ref = {d: v for d, v in PAPER_TABLE[a].items() if d <= max(depths)}
                ax.plot(list(ref), list(ref.values()), "x", color=colors[a], ms=5, alpha=0.7)
        first = results[key]["res+LN"]
        d0 = min(first)
        ax.plot(list(first), [first[d0]["psi"] * (d / d0) ** -0.5 for d in first], "k--", lw=0.8, label="∝ 1/√L")
        ax.set(xscale="log", yscale="log", xlabel="depth L", ylabel="Ψ (mean over ℓ)", title=title)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xticks(list(first), [str(d) for d in first])
        if key == "linear":
            ax.plot([], [], "x", color="k", label="numpy simulation (PAPER_TABLE)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)

    t = results["trained"]
    if not t:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3), gridspec_kw={"width_ratios": [2, 1.2, 1]})
    ax = axes[0]
    steps, losses = [s for s, _, _ in t["train"]], [l for _, l, _ in t["train"]]
    ax.plot(steps, losses, color="gray", lw=0.5, alpha=0.5, label="training loss")
    k = cfg.jump_window
    ax.plot(steps, [statistics.fmean(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))], color="k", lw=1.2,
            label=f"mean of {k} steps")
    for a, _, _, _ in t["stages"][1:]:
        ax.axvline(a, color="red", ls="--", lw=0.8)
    ms = t["measurements"]
    ax.plot([m["step"] for m in ms], [m["full"] for m in ms], "D", color="tab:blue", label="held-out: full model")
    tail = losses[len(losses) // 5:] or losses
    ax.set_ylim(min(tail + [m["full"] for m in ms]) - 0.2, max(tail) + 0.3)
    ax.set(xlabel="step", ylabel="loss", title="RaPTr run: training loss (red: stage boundaries)")
    ax.legend(fontsize=7)

    ax = axes[1]  # the held-out differences are far smaller than the training-loss noise: plot them alone
    sub = [m for m in ms if "sub_ended" in m]
    ax.errorbar([m["step"] - 3 for m in sub], [statistics.fmean(m["sub_ended"]) - m["full"] for m in sub],
                yerr=[2 * _se(m["sub_ended"]) for m in sub], fmt="o", color="tab:orange", capsize=3,
                label="subnetworks of the ended stage − full")
    nxt = [m for m in ms if "sub_next" in m and len(m["sub_next"]) > 1]
    ax.errorbar([m["step"] + 3 for m in nxt], [statistics.fmean(m["sub_next"]) - m["full"] for m in nxt],
                yerr=[2 * _se(m["sub_next"]) for m in nxt], fmt="s", color="tab:green", capsize=3,
                label="subnetworks of the next stage − full")
    ax.axhline(0, color="tab:blue", lw=1, label="full model (0)")
    ax.set_xticks([m["step"] for m in sub])
    ax.set(xlabel="stage boundary (step)", ylabel="held-out loss − full-model loss",
           title="held-out losses at each boundary (±2 s.e.)")
    ax.legend(fontsize=7, loc="lower right", framealpha=0.6)

    ax = axes[2]
    for key, label, color in (("psi_init", "at init", "tab:gray"), ("psi_trained", "trained", "tab:blue")):
        per = t[key]["per_layer"]
        ax.plot([int(i) + 1 for i in per], list(per.values()), "o-", color=color, label=f"{label} (mean {t[key]['psi']:.2f})")
    ax.set_xticks(range(1, t["n_layers"] + 1, max(1, t["n_layers"] // 12)))
    ax.set(xlabel="layer ℓ (1-based)", ylabel="Ψ_ℓ", title="per-layer Ψ_ℓ of this model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "transitions.png", dpi=110)
    plt.close(fig)
