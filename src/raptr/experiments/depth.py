"""Serving at reduced depth: a trained run's full-model validation loss with only k of its L layers.

The paper leaves open whether progressive-subnetwork training leaves a model that still works when
served shallower (LayerDrop's users serve that way). ``raptr depth RUN... --layers 4,6,8,10,12``
loads each run's last checkpoint and evaluates it on the run's own validation batches (the same
batches and objective draws as its training-time evaluations, so k = L reproduces its logged final
loss) with the layers not kept skipped exactly as in training (identity). By default the first and
last layers are kept and the rest spread evenly; ``--keep`` gives the layer lists.

Writes ``OUT/depth.json``, ``OUT/depth.md`` (table) and ``OUT/depth.png`` (loss against k).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from raptr.errors import RaptrError


def evenly_kept(num_layers: int, k: int) -> list[int]:
    """k of ``num_layers`` layers spread evenly from the first to the last (both kept):
    round(i (L − 1) / (k − 1)) for i = 0..k−1, e.g. 4 of 12: [0, 4, 7, 11]."""
    if not 2 <= k <= num_layers:
        raise RaptrError(f"--layers {k}: serve with between 2 (first and last) and {num_layers} layers")
    return [int(i * (num_layers - 1) / (k - 1) + 0.5) for i in range(k)]


def _parse_keep(spec: str, num_layers: int) -> list[int]:
    try:
        kept = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise RaptrError(f"--keep {spec!r}: give comma-separated layer indices, e.g. --keep 0,3,6,11") from None
    if not kept or kept[0] < 0 or kept[-1] >= num_layers:
        raise RaptrError(f"--keep {spec!r}: layer indices must lie in 0..{num_layers - 1}")
    return kept


def depth_losses(run_dir: str | Path, layers: Sequence[int] = (), keep: Sequence[str] = (), device: str = "auto",
                 progress: bool = True) -> dict:
    """The run's val loss served with each kept-layer set: ``layers`` (counts, kept evenly) and ``keep`` (lists)."""
    import torch
    from tqdm.auto import tqdm

    from raptr.core import GatedLayers
    from raptr.experiments.probes.runs import load_run
    from raptr.models.registry import find_layer_stack, layer_contract
    from raptr.ranks import EVAL_STREAM, step_generator
    from raptr.training.build import build_objective

    run = load_run(run_dir, device=device)
    cfg = run.cfg
    stack = find_layer_stack(run.model)
    n = len(stack)
    gates = GatedLayers(stack, layer_contract(run.model)[0])
    objective = build_objective(cfg, run.data.ids, run.data.tokenizer.get_vocab_size())
    val = list(run.data.val.eval_batches(cfg.train.batch_size, cfg.train.eval_batches))
    sets = [evenly_kept(n, k) for k in layers] + [_parse_keep(spec, n) for spec in keep]
    rows = []
    for kept in tqdm(sets, desc=Path(run_dir).name, disable=not progress, leave=False):
        gates.serve([i in kept for i in range(n)])
        losses = []
        with torch.no_grad(), torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            for i, tokens in enumerate(val):
                batch = objective(tokens, step_generator(cfg.train.seed, i, EVAL_STREAM))
                inputs = {k: batch[k].to(run.device) for k in ("input_ids", "labels", "prefix_len") if k in batch}
                losses.append(run.model(**inputs).item())
        rows.append({"layers": len(kept), "kept": kept, "val_loss": sum(losses) / len(losses)})
    gates.serve(None)
    summary = json.loads((Path(run_dir) / "summary.json").read_text()) if (Path(run_dir) / "summary.json").is_file() else {}
    return {"run": str(run_dir), "name": Path(run_dir).name, "method": cfg.method.name, "num_layers": n,
            "checkpoint": run.checkpoint.name if run.checkpoint else None, "logged_final_val_loss": summary.get("final_val_loss"),
            "git_commit": summary.get("git_commit"), "rows": rows}


def depth_report(runs: Sequence[str | Path], out: str | Path, layers: Sequence[int] = (), keep: Sequence[str] = (),
                 device: str = "auto", progress: bool = True, command: str = "") -> Path:
    """Evaluate every run at every depth; write depth.json, depth.md and depth.png in ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not layers and not keep:
        raise RaptrError("nothing to evaluate: give --layers (e.g. 4,6,8,10,12) or --keep (layer lists)")
    results = [depth_losses(r, layers, keep, device, progress) for r in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "depth.json").write_text(json.dumps({"command": command, "runs": results}, indent=2))
    sets = [(r["layers"], r["kept"]) for r in results[0]["rows"]]
    head = " | ".join(f"k={k}" for k, _ in sets)
    lines = ["# Served at reduced depth", "", f"Made by `{command}`." if command else "", "",
             "Full-model validation loss of each run's last checkpoint served with k of its layers (the others skipped "
             "as identities, exactly as in training); kept layers: "
             + "; ".join(f"k={k}: {kept}" for k, kept in sets) + ". The k = L column reproduces each run's logged "
             "final val loss (*logged*).", "",
             f"| run | method | logged | {head} |", "|---|---|---|" + "---|" * len(sets)]
    for r in results:
        logged = r["logged_final_val_loss"]
        cells = " | ".join(f"{row['val_loss']:.4f}" for row in r["rows"])
        lines.append(f"| {r['name']} | {r['method']} | {'-' if logged is None else f'{logged:.4f}'} | {cells} |")
    (out / "depth.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot([row["layers"] for row in r["rows"]], [row["val_loss"] for row in r["rows"]], marker="o", label=r["name"])
    ax.set(xlabel="layers served (first and last kept, the rest evenly)", ylabel="val loss (nats)",
           title="served at reduced depth")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "depth.png", dpi=110)
    plt.close(fig)
    return out / "depth.md"
