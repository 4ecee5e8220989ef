"""The GPU suite's dry run on CPU (tiny sizes): every section runs, the correctness checks hold,
and the JSON and markdown it writes are complete, so the script cannot rot between GPU sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_dry_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_suite.py"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_suite.json").read_text())
    sections = result["sections"]
    assert set(sections) == {"correctness", "activation memory", "skip speed", "whole-model compile", "schedules",
                             "throughput", "recompiles"}
    assert not [k for k, v in sections.items() if "error" in v or "skipped" in v]
    c = sections["correctness"]
    assert c["full_path_equal"] and c["skipped_grads_none"] and c["run_layers_have_grads"] and c["resume_losses_equal"]
    for size in sections["skip speed"].values():
        if isinstance(size, dict):
            assert [r["layers_run"] for r in size["rows"]["eager"]] == [r["layers_run"] for r in size["rows"]["compiled"]]
            assert size["rows"]["eager"][-1]["flops_ratio"] == 1.0
    for size in sections["activation memory"].values():
        if isinstance(size, dict):
            rows = size["rows"]
            assert rows[-1]["flops_ratio"] == 1.0 and rows[-1]["saved_ratio"] == 1.0
            saved = [r["saved_MiB"] for r in rows]
            assert saved == sorted(saved) and saved[0] < saved[-1]  # fewer layers run, fewer activations saved
    whole = sections["whole-model compile"]  # torch.compile(model) of a wrapped HF GPT-2 over changing paths
    assert whole["distinct_paths"] >= 10 and whole["bounded"] and not whole["recompile_limit_hit"]
    assert whole["graphs"] <= whole["unwrapped_graphs"] + 4
    assert [r["layers_run"] for r in whole["rows"]][-1] == 6
    assert len(sections["schedules"]["sizes"]) == 2
    for rows in sections["schedules"]["sizes"].values():
        methods = {m["method"]: m for m in rows}
        assert methods["standard"]["flops_ratio"] == 1.0 and methods["raptr 6-8-10-12"]["flops_ratio"] < 0.95
    assert sections["throughput"]["raptr_tokens_per_s"] > 0 and sections["throughput"]["hf_trainer_tokens_per_s"] > 0
    assert sections["recompiles"]["distinct_paths"] >= 2 and sections["recompiles"]["bounded"]
    md = (tmp_path / "gpu_suite.md").read_text()
    assert "DRY RUN" in md and "| layers run | FLOPs / full |" in md and "| method | FLOPs / standard |" in md
    assert "saved activations MiB" in md and "`torch.compile(model)` of a wrapped" in md
