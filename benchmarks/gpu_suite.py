"""The GPU path, measured in one command: correctness on CUDA, activation memory per path length,
skip speed (eager and per-block compiled, bf16), whole-model ``torch.compile`` with changing paths,
whole-schedule wall-clock vs FLOPs per method, throughput and MFU against the HF Trainer, and
recompilations over a run with changing paths.

    PYTHONPATH=src python3 benchmarks/gpu_suite.py --out docs/results/gpu        # one CUDA GPU, <= 8 min
    python benchmarks/gpu_suite.py --dry-run --out /tmp/gpu-dry                    # CPU, tiny sizes, seconds

Writes ``OUT/gpu_suite.json`` (every measurement) and ``OUT/gpu_suite.md`` (the tables). Needs
only torch and transformers from the environment (synthetic tokens, no corpus, no internet).
Every section has a time share; a section that would overrun the budget is skipped and says so.
The files are rewritten after every section, so a run stopped from outside keeps what it finished.
Ratios are from interleaved timing in this one process, so they are comparable with each other.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (set before CUDA starts)

try:
    import torch
    import transformers  # noqa: F401  (the HF Trainer comparison)

    import raptr
    from raptr.data.objectives import CausalLMObjective
    from raptr.methods.base import TrainingContext
    from raptr.models.registry import find_layer_stack
    from raptr.training.build import build_method, build_model
    from raptr.training.config import load_config
    from raptr.training.trainer import Batches, Trainer, make_optimizer
    from raptr.width import WidthRaPTr
except ImportError as e:  # one clear line, not a traceback
    sys.exit(f"error: gpu_suite needs {e.name}: run it with PYTHONPATH=src from the repo root, in a Python that has "
             "torch and transformers")

METHODS = {  # whole-schedule wall-clock arms (12 layers; the dry run scales them to 6)
    "standard": ["method.name=standard"],
    "raptr 6-8-10-12": ["method.name=raptr", "method.raptr.schedule=6-8-10-12", "method.raptr.stage_lengths=equal"],
    "stacking 6-9-12": ["method.name=stacking", "method.stacking.schedule=6-9-12"],
    "pld (θ̄ 0.4)": ["method.name=pld", "method.pld.theta=0.4", "method.pld.gamma=0.011061"],
    "layerdrop 0.75": ["method.name=layerdrop", "method.layerdrop.keep_prob=0.75", "method.layerdrop.fixed=none"],
}
DRY_SCHEDULES = {"6-8-10-12": "3-4-5-6", "6-9-12": "3-6"}


class Suite:
    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        if not self.dry and not torch.cuda.is_available():
            sys.exit("error: no CUDA GPU is visible: run on a GPU machine, or pass --dry-run for the CPU smoke test")
        self.device = torch.device("cpu" if self.dry else "cuda")
        self.bf16 = not self.dry
        self.started = time.perf_counter()
        self.results: dict = {"device": self._device_name(), "torch": torch.__version__, "dry_run": self.dry,
                              "python": platform.python_version(), "sections": {}}
        # (d_model, heads, d_ff, layers, seq, batch, vocab)
        self.sizes = {"encoder (BERT-base-like)": (768, 12, 3072, 12, 512, 64, 30522),
                      "decoder (GPT-2-small-like)": (768, 12, 3072, 12, 512, 32, 50304)}
        if self.dry:
            self.sizes = {k: (32, 2, 64, 6, 16, 2, 256) for k in self.sizes}

    def _device_name(self) -> str:
        if not self.dry and torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
        return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"

    # ------------------------------------------------------------------ helpers
    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def overrides(self, size: str, objective: str) -> list[str]:
        d, h, ff, L, seq, batch, vocab = self.sizes[size]
        return [f"model.d_model={d}", f"model.n_heads={h}", f"model.d_ff={ff}", f"model.n_layers={L}",
                f"data.seq_len={seq}", f"data.vocab_size={vocab}", f"train.batch_size={batch}",
                f"objective.name={objective}", f"train.device={self.device.type}",
                f"train.precision={'bf16' if self.bf16 else 'fp32'}"]

    def batch(self, size: str, mlm: bool, seed: int = 0) -> dict:
        d, h, ff, L, seq, batch, vocab = self.sizes[size]
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, vocab, (batch, seq), generator=gen)
        labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.15, ids, -100) if mlm else torch.roll(ids, -1, 1)
        return {"input_ids": ids.to(self.device), "labels": labels.to(self.device)}

    def scaled(self, overrides: list[str]) -> list[str]:
        if not self.dry:
            return overrides
        out = []
        for o in overrides:
            for a, b in DRY_SCHEDULES.items():
                o = o.replace(a, b)
            out.append(o)
        return out

    def train_step(self, model, opt, batch):
        with self.autocast():
            loss = model(**batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    @staticmethod
    def path_of(k: int, L: int) -> list[bool]:
        """k of L layers: the first and last (RaPTr's fixed layers) and the k - 2 after the first."""
        return [True] * L if k >= L else [i in (0, L - 1) or i < k - 1 for i in range(L)]

    @staticmethod
    def lengths(L: int) -> list[int]:
        return sorted({max(2, L // 4), L // 2, 3 * L // 4, L})

    def wrapped_model(self, size: str, objective: str):
        """(config, model wrapped with every layer running, layers, FLOPs model, wrapper, optimizer, batch)."""
        cfg = load_config(None, self.overrides(size, objective))
        torch.manual_seed(0)
        model = build_model(cfg, cfg.data.vocab_size).to(self.device).train()
        flops = model.flops(cfg.data.seq_len, 0.15 if objective == "mlm" else 1.0)
        rp = raptr.wrap(model, schedule="p:1", total_steps=1)
        rp.step(0)
        return (cfg, model, cfg.model.n_layers, flops, rp, make_optimizer(model, cfg.optim),
                self.batch(size, mlm=objective == "mlm"))

    def timed(self, fn) -> float:
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0

    def left(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def section(self, name: str, share: float, fn) -> None:
        """Run one section if the budget allows ``share`` of it; record result, time or error."""
        if self.args.only and name not in self.args.only:
            return
        need = share * self.args.budget_s
        if self.left() < need * 0.5:
            self.results["sections"][name] = {"skipped": f"time budget: {self.left():.0f} s left, needs ~{need:.0f} s"}
            print(f"[{name}] skipped: time budget")
            return
        t0 = time.perf_counter()
        print(f"[{name}] ...", flush=True)
        try:
            out = fn()
        except Exception as e:  # a failing section is a result, not the end of the suite
            out = {"error": f"{type(e).__name__}: {e}"}
            print(f"[{name}] error: {out['error']}")
        out["seconds"] = time.perf_counter() - t0
        self.results["sections"][name] = out
        print(f"[{name}] done in {out['seconds']:.1f} s", flush=True)
        self.write(Path(self.args.out), quiet=True)  # a run stopped from outside keeps every finished section

    # ------------------------------------------------------------------ 1. correctness
    def correctness(self) -> dict:
        size = "decoder (GPT-2-small-like)"
        cfg = load_config(None, self.overrides(size, "causal"))
        torch.manual_seed(0)
        plain = build_model(cfg, cfg.data.vocab_size).to(self.device).train()
        wrapped = copy.deepcopy(plain)
        L = cfg.model.n_layers
        rp = raptr.wrap(wrapped, schedule="p:1", total_steps=1)
        rp.step(0)  # p = 1: the full path
        batch = self.batch(size, mlm=False)
        with self.autocast():
            a, b = plain(**batch), wrapped(**batch)
        full_diff = abs(a.item() - b.item())
        active = [i in (0, L - 1) or i % 2 == 1 for i in range(L)]
        rp.gates.set_path(active)
        with self.autocast():
            wrapped(**batch).backward()
        layers = find_layer_stack(wrapped)
        skipped_none = all(p.grad is None for i, layer in enumerate(layers) if not active[i] for p in layer.parameters())
        run_have = all(p.grad is not None for i, layer in enumerate(layers) if active[i] for p in layer.parameters())
        resume = self._resume_check(size)
        return {"full_path_loss_abs_diff": full_diff, "full_path_tolerance": 1e-2 if self.bf16 else 1e-6,
                "full_path_equal": full_diff <= (1e-2 if self.bf16 else 1e-6), "skipped_grads_none": skipped_none,
                "run_layers_have_grads": run_have, **resume}

    def _resume_check(self, size: str) -> dict:
        """8 RaPTr steps straight vs 4 + resume + 4, deterministic algorithms on: losses must agree.
        On CUDA attention runs on SDPA's math kernel: the flash and cuDNN backward passes are not
        deterministic (the first GPU run differed by 7e-4 with them)."""
        from torch.nn.attention import SDPBackend, sdpa_kernel

        torch.use_deterministic_algorithms(True, warn_only=True)
        steps, out = 8, {}
        with tempfile.TemporaryDirectory() as tmp, sdpa_kernel(SDPBackend.MATH):
            losses = {}
            for name, cut in (("straight", None), ("resumed", 4)):
                over = self.scaled(self.overrides(size, "causal") + [
                    "method.name=raptr", "method.raptr.schedule=6-8-10-12", "method.raptr.stage_lengths=equal", f"train.steps={steps}", "train.eval_every=4",
                    "train.eval_batches=1", "train.checkpoint_every=4", "optim.warmup_steps=2", f"train.out_dir={tmp}/{name}"])
                for part in ([cut, None] if cut else [None]):
                    cfg = load_config(None, over)
                    model = build_model(cfg, cfg.data.vocab_size)
                    tokens = self.batch(size, mlm=False, seed=1)["input_ids"].cpu()
                    batches = Batches(train=lambda i, t=tokens: torch.roll(t, i, 0), val=[tokens])
                    trainer = Trainer(cfg, model, build_method(cfg), batches, CausalLMObjective(),
                                      model.flops(cfg.data.seq_len), progress=False)
                    trainer.fit(stop_after=part)
                losses[name] = [json.loads(line)["loss"] for line in open(f"{tmp}/{name}/metrics.jsonl") if '"train"' in line]
            out["resume_losses_equal"] = losses["straight"] == losses["resumed"]
            diffs = [abs(x - y) for x, y in zip(losses["straight"], losses["resumed"])]
            out["resume_max_abs_diff"] = max(diffs)
            out["resume_first_differing_step"] = next((i for i, d in enumerate(diffs) if d), None)
        torch.use_deterministic_algorithms(False)
        return out

    # ------------------------------------------------------------------ 2. activation memory
    def memory(self) -> dict:
        """Per path length (k of L layers, one bf16 training step): the bytes autograd saves for the
        backward pass (parameters excluded, each storage once) and, on CUDA, the peak allocated memory
        above what the model and optimizer hold before the step."""
        out = {}
        for size, objective in (("encoder (BERT-base-like)", "mlm"), ("decoder (GPT-2-small-like)", "causal")):
            cfg, model, L, flops, rp, opt, batch = self.wrapped_model(size, objective)
            self.train_step(model, opt, batch)  # optimizer state for every layer exists from here on
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            rows = []
            for k in self.lengths(L):
                rp.gates.set_path(self.path_of(k, L))
                saved: dict[int, int] = {}

                def pack(t):
                    storage = t.untyped_storage()
                    if storage.data_ptr() not in params:
                        saved[storage.data_ptr()] = storage.nbytes()
                    return t

                self.sync()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                static = torch.cuda.memory_allocated() if self.device.type == "cuda" else 0
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), self.autocast():
                    loss = model(**batch)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                self.sync()
                row = {"layers_run": k, "flops_ratio": flops.train_step(k, 1) / flops.full_step(1),
                       "saved_MiB": sum(saved.values()) / 2**20}
                if self.device.type == "cuda":
                    row.update(static_MiB=static / 2**20, peak_above_static_MiB=(torch.cuda.max_memory_allocated() - static) / 2**20)
                rows.append(row)
            for row in rows:
                row["saved_ratio"] = row["saved_MiB"] / rows[-1]["saved_MiB"]
                if "peak_above_static_MiB" in row:
                    row["peak_ratio"] = row["peak_above_static_MiB"] / rows[-1]["peak_above_static_MiB"]
            out[size] = {"rows": rows, "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len}
            del model, opt, rp
        return out

    # ------------------------------------------------------------------ 3. skip speed
    def skip_speed(self) -> dict:
        out = {}
        for size, objective in (("encoder (BERT-base-like)", "mlm"), ("decoder (GPT-2-small-like)", "causal")):
            cfg, model, L, flops, rp, opt, batch = self.wrapped_model(size, objective)
            ks = self.lengths(L)
            rows = {}
            for mode in ("eager", "compiled"):
                if mode == "compiled":
                    for layer in find_layer_stack(model):
                        layer.compile(backend=self.args.compile_backend)
                times = {k: [] for k in ks}
                for rep in range(self.args.reps + 2):
                    for k in ks[rep % len(ks):] + ks[: rep % len(ks)]:
                        rp.gates.set_path(self.path_of(k, L))
                        t = self.timed(lambda: self.train_step(model, opt, batch))
                        if rep >= 2:  # warm-up (and compilation) rounds
                            times[k].append(t)
                med = {k: statistics.median(v) for k, v in times.items()}
                rows[mode] = [{"layers_run": k, "time_ratio": med[k] / med[L],
                               "flops_ratio": flops.train_step(k, 1) / flops.full_step(1), "step_s": med[k]} for k in ks]
            tokens = cfg.train.batch_size * cfg.data.seq_len
            out[size] = {"rows": rows, "tokens_per_step": tokens, "compile_speedup_full": rows["eager"][-1]["step_s"] / rows["compiled"][-1]["step_s"]}
        return out

    # ------------------------------------------------------------------ 4. whole-model torch.compile
    def whole_model_compile(self) -> dict:
        """What nanoGPT and ``TrainingArguments(torch_compile=True)`` do: ``torch.compile(model)`` of a
        wrapped Hugging Face GPT-2, trained over a schedule that draws a new path at most steps.
        Counts the graphs dynamo compiles (against the same model unwrapped), fails on the
        recompile limit, then times compiled steps per path length against the FLOPs ratio."""
        from torch._dynamo.utils import counters

        size = "decoder (GPT-2-small-like)"
        cfg = load_config(None, self.overrides(size, "causal") + ["model.family=hf", "model.hf_type=gpt2"])
        L, steps = cfg.model.n_layers, self.args.compile_steps
        batch = self.batch(size, mlm=False)
        hf_batch = {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}  # HF shifts the labels itself
        limit_flag = hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit")
        out: dict = {"model": "transformers GPT2LMHeadModel", "backend": self.args.compile_backend, "steps": steps}

        def build():
            torch.manual_seed(0)
            wrapper = build_model(cfg, cfg.data.vocab_size)
            return wrapper.hf.to(self.device).train(), wrapper.flops(cfg.data.seq_len)

        def step(model, opt):
            with self.autocast():
                loss = model(**hf_batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        # the same model unwrapped, compiled whole: the graph count to compare with, and full-step time
        torch._dynamo.reset()
        counters.clear()
        plain, flops = build()
        compiled_plain = torch.compile(plain, backend=self.args.compile_backend)
        opt_plain = make_optimizer(plain, cfg.optim)
        out["unwrapped_first_step_s"] = self.timed(lambda: step(compiled_plain, opt_plain))
        base = out["unwrapped_graphs"] = int(counters["stats"].get("unique_graphs", 0))
        # timed now, not interleaved below: after the wrapped model (same classes) ran, dynamo would
        # recompile this one differently (a frame it skipped for the wrapped model is skipped for both)
        unwrapped = statistics.median([self.timed(lambda: step(compiled_plain, opt_plain)) for _ in range(self.args.reps + 1)][1:])
        del compiled_plain, plain, opt_plain

        model, _ = build()
        rp = raptr.wrap(model, schedule=self.scaled(["6-8-10-12"])[0], stage_lengths="equal", total_steps=steps, seed=0)
        compiled = torch.compile(model, backend=self.args.compile_backend)
        opt = make_optimizer(model, cfg.optim)
        paths, first = set(), None
        with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True) if limit_flag else contextlib.nullcontext():
            for i in range(steps):
                paths.add(rp.step(i).path)
                t = self.timed(lambda: step(compiled, opt))
                first = t if first is None else first
            out.update(distinct_paths=len(paths), graphs=int(counters["stats"].get("unique_graphs", 0)) - base,
                       recompile_limit_hit=False,
                       recompile_limit_checked=limit_flag, first_step_s=first)
            # compiled step time per path length, interleaved; the full path against the unwrapped model too
            ks = self.lengths(L)
            times = {k: [] for k in ks}
            for rep in range(self.args.reps + 2):
                for k in ks[rep % len(ks):] + ks[: rep % len(ks)]:
                    rp.gates.set_path(self.path_of(k, L))
                    t = self.timed(lambda: step(compiled, opt))
                    if rep >= 2:
                        times[k].append(t)
            out["graphs_after_timing"] = int(counters["stats"].get("unique_graphs", 0)) - base
        med = {k: statistics.median(v) for k, v in times.items()}
        out["rows"] = [{"layers_run": k, "flops_ratio": flops.train_step(k, 1) / flops.full_step(1),
                        "time_ratio": med[k] / med[L], "step_s": med[k]} for k in ks]
        out["wrapped_full_over_unwrapped"] = med[L] / unwrapped
        rp.detach()
        del compiled, model, opt
        # what the graph breaks cost: the unwrapped model compiled per block (torchtitan's way; no KV
        # cache, which a compiled block would otherwise guard on) against the unwrapped whole-model compile
        torch._dynamo.reset()
        blocks, _ = build()
        for layer in find_layer_stack(blocks):
            layer.compile(backend=self.args.compile_backend)
        opt_blocks = make_optimizer(blocks, cfg.optim)
        hf_batch["use_cache"] = False
        per_block = statistics.median([self.timed(lambda: step(blocks, opt_blocks)) for _ in range(self.args.reps + 2)][2:])
        out["unwrapped_per_block_over_whole"] = per_block / unwrapped
        out["bounded"] = out["graphs_after_timing"] <= out["unwrapped_graphs"] + 4
        return out

    # ------------------------------------------------------------------ 5. whole-schedule wall-clock
    def schedules(self) -> dict:
        out = {"sizes": {}, "points": self.args.points}
        for size, objective in (("encoder (BERT-base-like)", "mlm"), ("decoder (GPT-2-small-like)", "causal")):
            out["sizes"][size] = self._schedule_walls(size, objective)
        out["width"] = self._width_steps("decoder (GPT-2-small-like)")
        return out

    def _schedule_walls(self, size: str, objective: str) -> list[dict]:
        """Every method's whole schedule sampled at ``points`` steps (interleaved across methods):
        mean step time over standard's, beside the mean FLOPs ratio of the same steps."""
        total = 600
        runs = {}
        for label, over in METHODS.items():
            cfg = load_config(None, self.scaled(self.overrides(size, objective) + over + [f"train.steps={total}"]))
            torch.manual_seed(0)
            model = build_model(cfg, cfg.data.vocab_size).to(self.device).train()
            full = model.flops(cfg.data.seq_len, 0.15 if objective == "mlm" else 1.0)
            method = build_method(cfg)
            context = TrainingContext(model, find_layer_stack(model), total, 0)
            method.attach(context)
            context.optimizer = make_optimizer(model, cfg.optim)
            runs[label] = {"model": model, "method": method, "context": context, "full": full, "times": [], "flops": []}
        batch = self.batch(size, mlm=objective == "mlm")
        points = self.args.points
        at = [round(i * (total - 1) / (points - 1)) for i in range(points)]
        names = list(runs)
        for i, step in enumerate(at):
            for label in names[i % len(names):] + names[: i % len(names)]:
                r = runs[label]
                info = r["method"].begin_step(step)
                for rep in range(2 if i == 0 else 1):  # one warm-up step at the first point
                    t = self.timed(lambda: self.train_step(r["model"], r["context"].optimizer, batch))
                    if i > 0 or rep > 0:
                        r["times"].append(t)
                r["flops"].append(r["full"].train_step(info.layers_run, 1) / r["full"].full_step(1))
        base = statistics.mean(runs["standard"]["times"])
        rows = [{"method": label, "flops_ratio": statistics.mean(r["flops"]), "time_ratio": statistics.mean(r["times"]) / base}
                for label, r in runs.items()]
        del runs
        return rows

    def _width_steps(self, size: str) -> list[dict]:
        """Width subnetworks: step time at a constant kept fraction vs the unwrapped full model."""
        cfg = load_config(None, self.overrides(size, "causal"))
        torch.manual_seed(0)
        plain = build_model(cfg, cfg.data.vocab_size).to(self.device).train()
        variants = {"unwrapped": (plain, None)}
        for f in (0.5, 0.75, 1.0):
            m = copy.deepcopy(plain)
            wr = WidthRaPTr(m, [f], total_steps=1000, seed=0, require_full_final=False, seq_len=cfg.data.seq_len)
            variants[f"width {f:g}"] = (m, wr)
        opts = {k: make_optimizer(m, cfg.optim) for k, (m, _) in variants.items()}
        batch = self.batch(size, mlm=False)
        times = {k: [] for k in variants}
        for rep in range(self.args.reps + 2):
            for k, (m, wr) in variants.items():
                if wr is not None:
                    wr.step(rep)
                t = self.timed(lambda: self.train_step(m, opts[k], batch))
                if rep >= 2:
                    times[k].append(t)
        full = statistics.median(times["unwrapped"])
        width = [{"variant": k, "time_ratio": statistics.median(v) / full,
                  "layer_flops_ratio": None if variants[k][1] is None else variants[k][1].relative_flops(0)}
                 for k, v in times.items()]
        return width

    # ------------------------------------------------------------------ 6. throughput and MFU
    def throughput(self) -> dict:
        n = 4096 if not self.dry else 256
        a = torch.randn(n, n, device=self.device, dtype=torch.bfloat16 if self.bf16 else torch.float32)
        for _ in range(3):
            a @ a
        t = self.timed(lambda: [a @ a for _ in range(10)]) / 10
        peak = 2 * n**3 / t
        size = "decoder (GPT-2-small-like)"
        steps, warm = self.args.steps, 3
        over = self.overrides(size, "causal") + ["model.family=hf", "model.hf_type=gpt2", f"train.steps={steps}",
                                                 f"train.eval_every={10 * steps}", "train.eval_batches=1",
                                                 f"train.checkpoint_every={10 * steps}", "optim.warmup_steps=2"]
        cfg = load_config(None, over)
        batch = self.batch(size, mlm=False)
        tokens = batch["input_ids"].cpu()
        with tempfile.TemporaryDirectory() as tmp:
            model = build_model(cfg, cfg.data.vocab_size)
            flops = model.flops(cfg.data.seq_len)
            Trainer(cfg, model, build_method(cfg), Batches(train=lambda i: tokens, val=[tokens]), CausalLMObjective(),
                    flops, out_dir=Path(tmp) / "raptr", progress=False).fit()
            rows = [json.loads(line) for line in open(Path(tmp) / "raptr/metrics.jsonl") if '"train"' in line]
            ours = statistics.median([b["train_seconds"] - a["train_seconds"] for a, b in zip(rows, rows[1:])][warm:])
            hf = self._hf_trainer_step(cfg, tokens, steps, warm, tmp)
        per_step = flops.full_step(cfg.train.batch_size)
        tok = cfg.train.batch_size * cfg.data.seq_len
        return {"matmul_tflops": peak / 1e12, "model_flops_per_step": per_step,
                "raptr_tokens_per_s": tok / ours, "hf_trainer_tokens_per_s": tok / hf, "ratio_raptr_over_hf": hf / ours,
                "raptr_mfu_vs_matmul": per_step / ours / peak, "hf_mfu_vs_matmul": per_step / hf / peak}

    def _hf_trainer_step(self, cfg, tokens, steps, warm, tmp) -> float:
        from transformers import Trainer as HFTrainer, TrainerCallback, TrainingArguments

        hf_model = build_model(cfg, cfg.data.vocab_size).hf
        examples = [{"input_ids": row, "labels": row} for _ in range(steps) for row in tokens]

        class Timer(TrainerCallback):
            times: list[float] = []

            def on_step_begin(self, a, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self.t0)

        timer = Timer()
        args = TrainingArguments(output_dir=f"{tmp}/hf", per_device_train_batch_size=cfg.train.batch_size, max_steps=steps,
                                 learning_rate=cfg.optim.lr, warmup_steps=2, bf16=self.bf16, use_cpu=self.dry, report_to=[],
                                 save_strategy="no", logging_strategy="no", dataloader_num_workers=0, seed=0)
        HFTrainer(model=hf_model, args=args, train_dataset=examples, callbacks=[timer],
                  data_collator=lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}).train()
        return statistics.median(timer.times[warm:])

    # ------------------------------------------------------------------ 7. recompilations
    def recompiles(self) -> dict:
        from torch._dynamo.utils import counters

        size = "decoder (GPT-2-small-like)"
        steps = self.args.steps
        cfg = load_config(None, self.scaled(self.overrides(size, "causal") + [
            "method.name=raptr", "method.raptr.schedule=6-8-10-12", "method.raptr.stage_lengths=equal", f"train.steps={steps}"]))
        torch._dynamo.reset()
        counters.clear()
        torch.manual_seed(0)
        model = build_model(cfg, cfg.data.vocab_size).to(self.device).train()
        method = build_method(cfg)
        context = TrainingContext(model, find_layer_stack(model), steps, 0)
        method.attach(context)
        for layer in context.layers:
            layer.compile(backend=self.args.compile_backend)
        opt = make_optimizer(model, cfg.optim)
        batch = self.batch(size, mlm=False)
        paths = set()
        for step in range(steps):
            info = method.begin_step(step)
            paths.add(info.path)
            self.train_step(model, opt, batch)
        graphs = int(counters["stats"].get("unique_graphs", 0))
        return {"steps": steps, "distinct_paths": len(paths), "compiled_graphs": graphs,
                "frames_compiled": int(counters["frames"].get("ok", 0)), "bounded": graphs <= 8}

    # ------------------------------------------------------------------ output
    def write(self, out: Path, quiet: bool = False) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.results["total_seconds"] = time.perf_counter() - self.started
        (out / "gpu_suite.json").write_text(json.dumps(self.results, indent=2, default=str))
        (out / "gpu_suite.md").write_text(self.markdown())
        if not quiet:
            print(f"wrote {out / 'gpu_suite.json'} and {out / 'gpu_suite.md'} ({self.results['total_seconds']:.0f} s)")

    def markdown(self) -> str:
        r, s = self.results, self.results["sections"]
        lines = [f"# GPU suite on {r['device']}", "", f"torch {r['torch']}; {'DRY RUN (CPU, tiny sizes)' if r['dry_run'] else 'bf16 autocast'}; "
                 f"`python benchmarks/gpu_suite.py`; {r.get('total_seconds', 0):.0f} s in all.", ""]
        for name, sec in s.items():
            lines += [f"## {name}", ""]
            if "skipped" in sec or "error" in sec:
                lines += [f"{sec.get('skipped') or sec.get('error')}", ""]
                continue
            if name == "correctness":
                lines += ["| check | result |", "|---|---|"] + [f"| {k} | {v} |" for k, v in sec.items() if k != "seconds"] + [""]
            elif name == "skip speed":
                for size, d in sec.items():
                    if not isinstance(d, dict):
                        continue
                    lines += [f"{size}, {d['tokens_per_step']} tokens/step; compile speed-up at full depth {d['compile_speedup_full']:.2f}x", "",
                              "| layers run | FLOPs / full | eager time / full | compiled time / full |", "|---|---|---|---|"]
                    for e, c in zip(d["rows"]["eager"], d["rows"]["compiled"]):
                        lines.append(f"| {e['layers_run']} | {e['flops_ratio']:.3f} | {e['time_ratio']:.3f} | {c['time_ratio']:.3f} |")
                    lines.append("")
            elif name == "activation memory":
                for size, d in sec.items():
                    if not isinstance(d, dict):
                        continue
                    cuda = "peak_ratio" in d["rows"][0]
                    lines += [f"{size}, {d['tokens_per_step']} tokens/step, one training step", "",
                              "| layers run | FLOPs / full | saved activations MiB | saved / full |"
                              + (" peak above static MiB | peak / full |" if cuda else ""),
                              "|---|---|---|---|" + ("---|---|" if cuda else "")]
                    for row in d["rows"]:
                        lines.append(f"| {row['layers_run']} | {row['flops_ratio']:.3f} | {row['saved_MiB']:.1f} | {row['saved_ratio']:.3f} |"
                                     + (f" {row['peak_above_static_MiB']:.1f} | {row['peak_ratio']:.3f} |" if cuda else ""))
                    lines.append("")
            elif name == "whole-model compile":
                lines += [f"`torch.compile(model)` of a wrapped {sec['model']} ({sec['backend']}), {sec['steps']} steps of "
                          f"6-8-10-12 drawing {sec['distinct_paths']} distinct paths: {sec['graphs']} graphs "
                          f"({sec['graphs_after_timing']} after the timing below) against {sec['unwrapped_graphs']} for the "
                          f"unwrapped model; recompile limit hit: {sec['recompile_limit_hit']}"
                          f"{'' if sec['recompile_limit_checked'] else ' (not checkable on this torch)'}; first step "
                          f"{sec['first_step_s']:.1f} s (unwrapped {sec['unwrapped_first_step_s']:.1f} s). Full path, wrapped over "
                          f"unwrapped (both compiled whole): {sec['wrapped_full_over_unwrapped']:.3f}x; the unwrapped model compiled "
                          f"per block over compiled whole: {sec['unwrapped_per_block_over_whole']:.3f}x.", "",
                          "| layers run | FLOPs / full | compiled time / full |", "|---|---|---|"]
                lines += [f"| {r['layers_run']} | {r['flops_ratio']:.3f} | {r['time_ratio']:.3f} |" for r in sec["rows"]] + [""]
            elif name == "schedules":
                for size, rows in sec["sizes"].items():
                    lines += [f"{size}: each method's whole schedule (600 steps) sampled at {sec['points']} steps", "",
                              "| method | FLOPs / standard | wall-clock / standard | wall-clock - FLOPs |", "|---|---|---|---|"]
                    lines += [f"| {m['method']} | {m['flops_ratio']:.3f} | {m['time_ratio']:.3f} | {m['time_ratio'] - m['flops_ratio']:+.3f} |"
                              for m in rows] + [""]
                lines += ["| width variant | layer FLOPs / full | step time / unwrapped full |", "|---|---|---|"]
                lines += [f"| {w['variant']} | {'-' if w['layer_flops_ratio'] is None else format(w['layer_flops_ratio'], '.3f')} "
                          f"| {w['time_ratio']:.3f} |" for w in sec["width"]] + [""]
            else:
                lines += ["| quantity | value |", "|---|---|"] + [
                    f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in sec.items() if k != "seconds"] + [""]
        return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_suite.json and gpu_suite.md")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks the suite itself in seconds")
    parser.add_argument("--budget-s", type=float, default=None, help="seconds for the whole suite (default 450; dry run 120)")
    parser.add_argument("--reps", type=int, default=None, help="timed rounds per variant (default 8; dry run 2)")
    parser.add_argument("--points", type=int, default=None, help="schedule points for the wall-clock section (default 12)")
    parser.add_argument("--steps", type=int, default=None, help="steps of the throughput and recompile runs (default 20)")
    parser.add_argument("--only", default=None, help="comma-separated sections to run (default: all), e.g. 'whole-model compile'")
    parser.add_argument("--compile-steps", type=int, default=None, help="steps of the whole-model compile run (default 32)")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (default inductor; dry run eager)")
    args = parser.parse_args()
    dry = args.dry_run
    args.budget_s = args.budget_s or (150 if dry else 470)
    args.reps = args.reps or (2 if dry else 8)
    args.points = args.points or (4 if dry else 12)
    args.steps = args.steps or (6 if dry else 20)
    args.compile_steps = args.compile_steps or 32
    args.only = [x.strip() for x in args.only.split(",")] if args.only else None
    args.compile_backend = args.compile_backend or ("eager" if dry else "inductor")
    suite = Suite(args)
    print(f"gpu suite on {suite.results['device']}, budget {args.budget_s:.0f} s")
    suite.section("correctness", 0.08, suite.correctness)
    suite.section("activation memory", 0.05, suite.memory)
    suite.section("skip speed", 0.28, suite.skip_speed)
    suite.section("whole-model compile", 0.17, suite.whole_model_compile)
    suite.section("schedules", 0.20, suite.schedules)
    suite.section("throughput", 0.12, suite.throughput)
    suite.section("recompiles", 0.08, suite.recompiles)
    suite.write(Path(args.out))
    failed = [k for k, v in suite.results["sections"].items() if "error" in v]
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
