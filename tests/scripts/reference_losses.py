"""Write tests/fixtures/reference_losses.json: per-step losses of a short run of every built-in method.

    python tests/scripts/reference_losses.py          # rewrite the fixture (only after a deliberate change of numerics)
    python tests/scripts/reference_losses.py --add    # add cases the fixture lacks (a new method), keep the others
    python tests/scripts/reference_losses.py --record-machine   # record this CPU for the cases it reproduces bitwise

The runs train on the shipped Austen chapters (tests/fixtures/austen) on CPU with one thread, so
``tests/test_reference_losses.py`` can demand bitwise equality: a refactoring that changes any
number fails it.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent.parent
FIXTURE = HERE / "fixtures" / "reference_losses.json"
AUSTEN = "austen=" + str(HERE / "fixtures" / "austen")

COMMON = ["model.d_model=32", "model.n_heads=2", "model.d_ff=64", "model.n_layers=6", "data.vocab_size=1024",
          "data.seq_len=32", "train.batch_size=4", "train.eval_batches=2", "optim.warmup_steps=2", "train.threads=1",
          "train.steps=12", "train.eval_every=6", "train.checkpoint_every=100", "train.log_every=1", "train.device=cpu",
          f"data.sources={AUSTEN}", "data.val_fraction=0.15"]

CASES = {
    "standard": ["method.name=standard"],
    "raptr": ["method.name=raptr", "method.raptr.schedule=3-4-6"],
    "raptr-sqrt-uniform": ["method.name=raptr", "method.raptr.schedule=2-4-6", "method.raptr.scaling=sqrt",
                           "method.raptr.sampling=uniform", "method.raptr.fixed=none", "train.path_seed=3"],
    "stacking": ["method.name=stacking", "method.stacking.schedule=2-4-6", "method.stacking.rewarmup_steps=2"],
    "midas": ["method.name=stacking", "method.stacking.schedule=3-6", "method.stacking.copy=middle",
              "method.stacking.optimizer_state=reset"],
    "pld": ["method.name=pld", "method.pld.theta=0.5", "method.pld.gamma=0.2"],
    "layerdrop": ["method.name=layerdrop", "method.layerdrop.keep_prob=0.6"],
    "raptr-causal": ["method.name=raptr", "method.raptr.schedule=3-4-6", "objective.name=causal", "data.tokenizer=bpe"],
    # added with the width methods (after the protocol restructuring; guards them from here on)
    "width": ["method.name=width", "method.width.schedule=0.5-0.75-1", "model.n_heads=4"],
    "depthwidth": ["method.name=depthwidth", "method.depthwidth.schedule=3-4-6",
                   "method.depthwidth.width_schedule=0.5-0.75-1", "method.depthwidth.scaling=sqrt", "model.n_heads=4"],
    # added when 3-6-9-12 with Prop-1 stage lengths became RaPTr's default (the cases above run on the
    # preset bert-tiny-raptr-paper, which is what bert-tiny-raptr was when they were recorded)
    "raptr-default": ["method.name=raptr", "model.n_layers=12", "method.raptr.schedule=f:0.25-0.5-0.75-1",
                      "method.raptr.stage_lengths=prop:1"],
}


def cpu_signature() -> str:
    """What float32 kernels a loss trace depends on: bitwise equality holds only on the same kind of CPU
    (vector width, vendor kernels) with the same torch."""
    import platform

    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{platform.machine()} {model}; torch {torch.__version__} {torch.backends.cpu.get_cpu_capability()}"


def run_case(name: str, cache_dir: str, out_root: str) -> list[float]:
    from raptr.training.build import build_trainer
    from raptr.training.config import load_config

    cfg = load_config("bert-tiny-raptr-paper", COMMON + CASES[name] + [f"data.cache_dir={cache_dir}", f"train.out_dir={out_root}/{name}"])
    build_trainer(cfg, progress=False).fit()
    rows = [json.loads(line) for line in (Path(out_root) / name / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["kind"] == "train"]


def record_machine() -> None:
    """Rerun every case; where the losses equal the fixture's bitwise, record this CPU (the test then
    demands bitwise equality on it); report the largest relative difference of any that do not."""
    torch.set_num_threads(1)
    out = json.loads(FIXTURE.read_text())
    here = cpu_signature()
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in out.items():
            losses = run_case(name, f"{tmp}/data", f"{tmp}/runs")
            if losses == case["losses"]:
                case["cpu"] = here
                print(f"{name}: bitwise equal here: recorded", file=sys.stderr)
            else:
                worst = max(abs(a - b) / abs(b) for a, b in zip(losses, case["losses"]))
                print(f"{name}: differs here (max relative {worst:.1e}): not recorded", file=sys.stderr)
    FIXTURE.write_text(json.dumps(out, indent=1) + "\n")
    print(f"{here}\nwrote {FIXTURE}", file=sys.stderr)


def main() -> None:
    if "--record-machine" in sys.argv:
        return record_machine()
    torch.set_num_threads(1)
    out = json.loads(FIXTURE.read_text()) if "--add" in sys.argv and FIXTURE.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            if name not in out:
                out[name] = {"overrides": CASES[name], "losses": run_case(name, f"{tmp}/data", f"{tmp}/runs"),
                             "cpu": cpu_signature()}
    FIXTURE.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {FIXTURE} ({len(out)} runs)", file=sys.stderr)


if __name__ == "__main__":
    main()
